"""Run one compile job on this node and report it to the control plane as tasks."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from workers.compile.pipeline import Pipeline
from workers.compile.remote import is_remote
from workers.compile.settings import CompileSettings
from workers.compile.validate import Limits
from workers.contract import CompileOutcome, CompileProgress, CompileRequest, TaskName, to_payload

logger = logging.getLogger(__name__)

Send = Callable[[str, Mapping[str, Any]], None]
"""Sends one task (name, payload) to the control queue."""


def job_run(*, request: CompileRequest, settings: CompileSettings, send: Send) -> CompileOutcome:
    """Run the pipeline, sending progress after every step change and the outcome at the end.

    Progress `seq` is a millisecond clock made strictly increasing, so that a
    redelivered job's reports supersede an earlier run's, and a late report
    never overwrites a newer one (the control queue does not keep order).
    """
    last = 0

    def report(steps: Sequence[Mapping[str, Any]]) -> None:
        nonlocal last
        last = max(last + 1, time.time_ns() // 1_000_000)
        progress = CompileProgress(job_id=request.job_id, seq=last, steps=tuple(map(dict, steps)))
        send(TaskName.COMPILE_STEP.value, to_payload(progress))

    # A shared store (s3://...) gets the artifact once it is sealed in this
    # node's own store, which stays its local cache.
    remote = request.store if request.store and is_remote(request.store) else None
    if remote or not request.store:
        store = settings.artifact_dir
    else:
        store = Path(request.store.removeprefix("file://")).expanduser()
    pipeline = Pipeline(
        request,
        store=store,
        remote=remote,
        report=report,
        prepare_python=settings.prepare_python,
        limits=Limits(max_tensor_bytes=settings.max_tensor_bytes),
        ort_threads=settings.ort_threads,
    )
    outcome = pipeline.run()
    logger.info(
        "compile job %s: %s%s",
        request.job_id,
        outcome.status,
        f" ({outcome.error_code}: {outcome.error})" if outcome.error else "",
    )
    send(TaskName.COMPILE_FINISHED.value, to_payload(outcome))
    return outcome
