"""Control-queue tasks of the catalog: compile nodes' progress and outcomes, stale jobs."""

from __future__ import annotations

import logging
from typing import Any

from celery import shared_task

from catalog import compile as compile_jobs
from workers.contract import CompileOutcome, CompileProgress, Queue, TaskName, from_payload

logger = logging.getLogger(__name__)


@shared_task(name=TaskName.COMPILE_STEP.value, queue=Queue.CONTROL.value, ignore_result=True)
def compile_step(payload: dict[str, Any]) -> None:
    compile_jobs.compile_job_progress(progress=from_payload(CompileProgress, payload))


@shared_task(name=TaskName.COMPILE_FINISHED.value, queue=Queue.CONTROL.value, ignore_result=True)
def compile_finished(payload: dict[str, Any]) -> None:
    compile_jobs.compile_job_finish(outcome=from_payload(CompileOutcome, payload))


@shared_task(
    name="mantle.control.compile_fail_stale", queue=Queue.CONTROL.value, ignore_result=True
)
def compile_fail_stale() -> int:
    return compile_jobs.compile_jobs_fail_stale()
