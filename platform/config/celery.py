"""The Django-side Celery app: control and billing queues (inference runs in workers/)."""

from __future__ import annotations

import os

from celery import Celery

from workers.broker import guard_redis_unacked_restore

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.base")

guard_redis_unacked_restore()  # the control worker survives a broker blip too
app = Celery("mantle")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks(["accounts", "catalog", "billing"])
app.autodiscover_tasks(["billing"], related_name="stripe_tasks")
app.autodiscover_tasks(["billing"], related_name="metering_tasks")
