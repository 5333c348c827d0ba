"""GET /v1/models and /v1/models/{model}: the models a key may call."""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse

from catalog.selectors import endpoint_spec, endpoints_visible_to
from catalog.specs import EndpointSpec
from gateway.backends import database_read
from gateway.errors import OpenAIError, model_not_found
from gateway.pipeline import require_method
from gateway.protocol import Model, ModelList
from gateway.replies import gateway_view, json_reply
from gateway.resolve import resolve


@gateway_view
async def list_models(request: HttpRequest) -> HttpResponse:
    require_method(request, "GET")
    identity, _ = await resolve(request, None)
    found = await database_read(_visible_specs, identity.organization_id)
    reply: ModelList = {"object": "list", "data": [_card(s) for s in found if s.active]}
    return json_reply(reply)


@gateway_view
async def retrieve_model(request: HttpRequest, model_id: str) -> HttpResponse:
    require_method(request, "GET")
    try:
        _, spec = await resolve(request, model_id)
    except OpenAIError as exc:
        if exc.code == "endpoint_paused":
            raise model_not_found(model_id) from exc
        raise
    assert spec is not None
    return json_reply(_card(spec))


def _card(spec: EndpointSpec) -> Model:
    # A public endpoint (no organization) is Mantle's own.
    return {
        "id": spec.public_id,
        "object": "model",
        "created": spec.created,
        "owned_by": "mantle" if spec.organization_id is None else spec.organization_id,
    }


def _visible_specs(organization_id: str) -> list[EndpointSpec]:
    return [endpoint_spec(e) for e in endpoints_visible_to(organization_id)]
