"""Inference tasks: parse the payload, hand it to the serving runtime, return."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from workers.celery_app import app, get_runtime, settings
from workers.contract import EmbedRequest, GenerateRequest, InferRequest, TaskName, from_payload

logger = logging.getLogger(__name__)


def _parse(cls: type[Any], payload: Mapping[str, Any]) -> Any:
    try:
        return from_payload(cls, payload)
    except (TypeError, ValueError, KeyError, AttributeError):
        # A malformed payload will never parse, so retrying is pointless; tell
        # the client if the request id at least is readable.
        logger.exception("malformed %s payload; dropped", cls.__name__)
        request_id = payload.get("request_id") if isinstance(payload, Mapping) else None
        if isinstance(request_id, str) and request_id:
            runtime = get_runtime()
            runtime.writer.error(request_id, "invalid_request", "malformed task payload")
            runtime.writer.flush()
        return None


@app.task(name=TaskName.GENERATE.value, queue=settings.queue, ignore_result=True)
def generate(payload: dict[str, Any]) -> None:
    request = _parse(GenerateRequest, payload)
    if request is not None:
        outcome = get_runtime().serve_generate(request)
        logger.info("generate %s: %s", request.request_id, outcome.status)


@app.task(name=TaskName.EMBED.value, queue=settings.queue, ignore_result=True)
def embed(payload: dict[str, Any]) -> None:
    request = _parse(EmbedRequest, payload)
    if request is not None:
        outcome = get_runtime().serve_embed(request)
        logger.info("embed %s: %s", request.request_id, outcome.status)


@app.task(name=TaskName.INFER.value, queue=settings.queue, ignore_result=True)
def infer(payload: dict[str, Any]) -> None:
    request = _parse(InferRequest, payload)
    if request is not None:
        outcome = get_runtime().serve_infer(request)
        logger.info("infer %s: %s", request.request_id, outcome.status)
