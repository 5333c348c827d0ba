"""Control-queue tasks of accounts."""

from __future__ import annotations

from celery import shared_task

from accounts import services


@shared_task(name="mantle.control.flush_api_key_last_used", queue="control", ignore_result=True)
def flush_api_key_last_used() -> int:
    return services.api_keys_flush_last_used()
