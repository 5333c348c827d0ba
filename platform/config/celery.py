"""The Django-side Celery app: control and billing queues (inference runs in workers/)."""

from __future__ import annotations

import os

from core.celery_app import app
from workers.broker import guard_redis_unacked_restore

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.base")

guard_redis_unacked_restore()  # the control worker survives a broker blip too
# billing.tasks imports the task modules of billing.metering and billing.payments.
app.autodiscover_tasks(["accounts", "catalog", "gateway", "billing"])

__all__ = ["app"]
