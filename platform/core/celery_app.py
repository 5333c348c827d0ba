"""The Django-side Celery app object, for the apps that send tasks by name.

Only the object: which modules hold tasks (autodiscovery) and the broker guard are the
wiring's business (config/celery.py, which `celery -A config.celery` loads). Settings
are read lazily, on first use, from Django's settings under the CELERY_ namespace.
"""

from __future__ import annotations

import os

from celery import Celery

# Before the app is built: Celery installs its Django fix-up (django.setup() in the worker,
# connections closed around tasks) only if the settings module is known at that moment.
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.base")
app = Celery("mantle")
app.config_from_object("django.conf:settings", namespace="CELERY")
