"""/v1/batches: create, list, retrieve and cancel batches (gateway/batches.py keeps them,
gateway/batch_runner.py runs them)."""

from __future__ import annotations

import functools

from django.http import HttpRequest, HttpResponseBase

from gateway.backends import database_read
from gateway.batches import (
    Creator,
    batch_cancel,
    batch_create,
    batch_get,
    batch_list,
    batch_object,
)
from gateway.errors import OpenAIError, invalid
from gateway.management_rate import management_rate
from gateway.pipeline import parse_request
from gateway.protocol_batches import LIST_DEFAULT_LIMIT, LIST_MAX_LIMIT, BatchCreateRequest
from gateway.replies import gateway_view, json_reply
from gateway.resolve import resolve


def _allow(request: HttpRequest, *methods: str) -> None:
    if request.method not in methods:
        raise OpenAIError(
            405,
            f"Method {request.method} not allowed; use {' or '.join(methods)}.",
            code="method_not_allowed",
        )


@gateway_view
async def batches(request: HttpRequest) -> HttpResponseBase:
    """POST /v1/batches (create) and GET /v1/batches (list, newest first)."""
    _allow(request, "GET", "POST")
    if request.method == "POST":
        body = parse_request(request, BatchCreateRequest)
        identity, _ = await resolve(request, None)
        await management_rate(identity.organization_id)
        creator = Creator(identity.organization_id, identity.project_id, identity.key_id)
        created = await database_read(batch_create, creator, body)
        return json_reply(batch_object(created))
    identity, _ = await resolve(request, None)
    await management_rate(identity.organization_id)
    raw_limit = request.GET.get("limit")
    limit = LIST_DEFAULT_LIMIT
    if raw_limit is not None:
        if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= LIST_MAX_LIMIT:
            raise invalid(
                f"Invalid value for 'limit': an integer from 1 to {LIST_MAX_LIMIT}.", "limit"
            )
        limit = int(raw_limit)
    listed = await database_read(
        functools.partial(
            batch_list, identity.organization_id, after=request.GET.get("after"), limit=limit
        )
    )
    return json_reply(listed)


@gateway_view
async def batch(request: HttpRequest, batch_id: str) -> HttpResponseBase:
    """GET /v1/batches/{batch_id}."""
    _allow(request, "GET")
    identity, _ = await resolve(request, None)
    await management_rate(identity.organization_id)
    found = await database_read(batch_get, identity.organization_id, batch_id)
    return json_reply(batch_object(found))


@gateway_view
async def cancel(request: HttpRequest, batch_id: str) -> HttpResponseBase:
    """POST /v1/batches/{batch_id}/cancel."""
    _allow(request, "POST")
    identity, _ = await resolve(request, None)
    await management_rate(identity.organization_id)
    found = await database_read(batch_cancel, identity.organization_id, batch_id)
    return json_reply(batch_object(found))
