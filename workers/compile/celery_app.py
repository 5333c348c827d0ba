"""The Celery app of compile nodes: `celery -A workers.compile.celery_app worker -Q compile`."""

from __future__ import annotations

from celery import Celery

from workers.broker import guard_redis_unacked_restore
from workers.compile.settings import CompileSettings
from workers.contract import Queue

settings = CompileSettings.from_env()
guard_redis_unacked_restore()

# No fix-ups: Celery's Django fix-up switches on whenever DJANGO_SETTINGS_MODULE
# is in the environment, and a compile node must never import Django.
app = Celery(
    "mantle_compile", broker=settings.broker_url, include=["workers.compile.tasks"], fixups=[]
)
app.conf.update(
    task_serializer="json",
    accept_content=["json"],
    result_serializer="json",
    # Results travel back as tasks on the control queue, never through a backend.
    task_ignore_result=True,
    # Acknowledged once the job ended, so a node that goes away mid-job leaves
    # it to be redelivered (rerunning a compile is harmless: content-addressed).
    # But a job whose export kills its process (out of memory) is not requeued:
    # it would kill every node in turn; the control plane fails it as stale.
    task_acks_late=True,
    task_reject_on_worker_lost=False,
    # One job at a time per process: an export holds gigabytes and every core.
    worker_prefetch_multiplier=1,
    broker_transport_options={"visibility_timeout": settings.time_limit_s + 600},
    task_soft_time_limit=settings.time_limit_s,
    task_time_limit=settings.time_limit_s + 60,
    task_default_queue=Queue.COMPILE.value,
    broker_connection_retry_on_startup=True,
    worker_send_task_events=False,
)
