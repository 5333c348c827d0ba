"""Compile tasks: parse the payload, run the job, report back on the control queue."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from workers.compile.celery_app import app, settings
from workers.compile.jobs import job_run
from workers.contract import (
    CompileOutcome,
    CompileRequest,
    CompileStatus,
    Queue,
    TaskName,
    from_payload,
    to_payload,
)

logger = logging.getLogger(__name__)


def send_control(name: str, payload: Mapping[str, Any]) -> None:
    app.send_task(name, args=[dict(payload)], queue=Queue.CONTROL.value)


@app.task(name=TaskName.COMPILE_RUN.value, queue=Queue.COMPILE.value, ignore_result=True)
def run(payload: dict[str, Any]) -> None:
    try:
        request = from_payload(CompileRequest, payload)
    except (TypeError, ValueError, KeyError, AttributeError):
        # A malformed payload never parses; retrying is pointless. Fail the job
        # if its id at least is readable, so it does not stay queued forever.
        logger.exception("malformed compile payload; dropped")
        job_id = payload.get("job_id") if isinstance(payload, Mapping) else None
        if isinstance(job_id, str) and job_id:
            outcome = CompileOutcome(
                job_id=job_id,
                status=CompileStatus.FAILED.value,
                steps=(),
                error="the compile node could not read this job (malformed task payload)",
                error_code="internal_error",
            )
            send_control(TaskName.COMPILE_FINISHED.value, to_payload(outcome))
        return
    job_run(request=request, settings=settings, send=send_control)
