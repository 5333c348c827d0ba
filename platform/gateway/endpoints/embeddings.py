"""POST /v1/embeddings: vectors of texts or token ids, as floats or base64."""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Any

import numpy as np
from django.conf import settings
from django.http import HttpRequest, HttpResponseBase

from accounts.keys import KeyIdentity
from catalog.specs import EndpointSpec
from core import metrics, turns
from gateway import relay, text
from gateway.errors import OpenAIError, invalid
from gateway.pipeline import (
    admit,
    billing_identity,
    limits_for,
    model_ref,
    parse_request,
    request_id_of,
    require_method,
    result_of,
    send,
    service_class,
    settle,
)
from gateway.protocol import Embedding, EmbeddingList, EmbeddingRequest
from gateway.replies import gateway_view, json_reply
from gateway.resolve import require_kind, resolve
from workers import contract


@gateway_view
async def embeddings(request: HttpRequest) -> HttpResponseBase:
    await turns.take()
    require_method(request, "POST")
    body = parse_request(request, EmbeddingRequest)
    identity, spec = await resolve(request, body.model)
    assert spec is not None
    require_kind(spec, {"embedding"}, "v1/embeddings")
    if spec.routed:
        return await relay.serve(
            request,
            identity,
            spec,
            relay.call_of("embeddings", relay.params(body)),
            lambda: _on_pool(request, body, identity, spec),
        )
    return await _on_pool(request, body, identity, spec)


async def _on_pool(
    request: HttpRequest, body: EmbeddingRequest, identity: KeyIdentity, spec: EndpointSpec
) -> HttpResponseBase:
    """The request on the endpoint's own pool."""
    turns.give_up()  # the pool's own order (tiers, fair sharing) applies from here
    if body.dimensions is not None and body.dimensions != spec.dimensions:
        raise invalid(
            f"This model produces {spec.dimensions}-dimensional embeddings; "
            f"dimensions={body.dimensions} is not supported.",
            "dimensions",
        )
    inputs = await _inputs(spec, body.input)
    prompt_tokens = sum(len(i) for i in inputs)
    limits = limits_for(identity, spec)
    request_id = request_id_of(request)
    organization_id = identity.organization_id
    admission = await admit(limits, spec, organization_id, prompt_tokens, 0, request_id)
    deadline = time.time() + settings.MANTLE_REQUEST_TIMEOUT_S
    payload = contract.EmbedRequest(
        request_id=request_id,
        model=model_ref(spec),
        identity=billing_identity(identity, spec),
        inputs=tuple(tuple(i) for i in inputs),
        deadline=deadline,
        enqueued_at=time.time(),
        service_class=service_class(),
    )
    ticket = await send(
        contract.TaskName.EMBED,
        payload,
        spec=spec,
        request_id=request_id,
        deadline=deadline,
        on_refused=lambda: settle(organization_id, request_id, admission, 0, 0),
    )
    try:
        event = await result_of(ticket, contract.EVENT_EMBEDDINGS)
    except (asyncio.CancelledError, OpenAIError):
        await settle(organization_id, request_id, admission, 0, 0)
        raise
    matrix: np.ndarray | None = None
    if event is not None:
        raw = base64.b64decode(event["data"])
        matrix = np.frombuffer(raw, dtype="<f4").reshape(int(event["count"]), int(event["dims"]))
        prompt_tokens = int(event.get("prompt_tokens", prompt_tokens))
    await settle(organization_id, request_id, admission, prompt_tokens, 0)
    metrics.GATEWAY_TOKENS.labels("input").inc(prompt_tokens)
    if matrix is None:
        raise OpenAIError(500, "The worker returned no embeddings.", type_="server_error")
    data: list[Embedding] = []
    for index, row in enumerate(matrix):
        vector: list[float] | str = (
            base64.b64encode(row.astype("<f4").tobytes()).decode()
            if body.encoding_format == "base64"
            else row.tolist()
        )
        data.append({"object": "embedding", "index": index, "embedding": vector})
    reply: EmbeddingList = {
        "object": "list",
        "data": data,
        "model": body.model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }
    return json_reply(reply, headers=admission.headers())


async def _inputs(spec: EndpointSpec, value: Any) -> list[list[int]]:
    """The token ids of each input: texts tokenized, id lists checked against the vocabulary
    and cut to the model's input length (texts are cut by the tokenizer)."""
    if isinstance(value, str):
        items: list[Any] = [value]
    elif value and all(isinstance(v, int) for v in value):
        items = [value]
    else:
        items = list(value)
    if not items:
        raise invalid("input must not be empty", "input")
    if len(items) > 2048:
        raise invalid("input may hold at most 2048 items", "input")
    out = []
    for index, item in enumerate(items):
        if isinstance(item, str):
            if not item:
                raise invalid(f"input[{index}] must not be an empty string", "input")
            ids = await text.encode(spec, item, "input")
        else:
            if not item:
                raise invalid(f"input[{index}] must not be empty", "input")
            ids = text.check_token_ids(spec, item, "input")[: spec.max_input_tokens]
        out.append(ids)
    return out
