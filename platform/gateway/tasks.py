"""Control-queue tasks of the gateway: stored responses and files past their retention deleted."""

from __future__ import annotations

from celery import shared_task

from gateway.files import delete_expired_files, delete_orphaned_bytes
from gateway.responses_store import responses_delete_expired
from workers.contract import Queue


@shared_task(
    name="mantle.control.responses_delete_expired", queue=Queue.CONTROL.value, ignore_result=True
)
def responses_expire() -> int:
    return responses_delete_expired()


@shared_task(
    name="mantle.control.files_delete_expired", queue=Queue.CONTROL.value, ignore_result=True
)
def files_expire() -> int:
    """Files past their retention, then bytes no file row names (a writer that died)."""
    deleted = delete_expired_files()
    delete_orphaned_bytes()
    return deleted
