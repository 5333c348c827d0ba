"""Helpers of the relay's end-to-end tests (docs/providers.md)."""

from __future__ import annotations

import time
from typing import Any

import openai

from catalog.models import Endpoint, Model, ModelVersion, Provider, RouteTarget
from catalog.services import endpoint_publish, pool_ensure
from core import secretbox
from core.redis import get_redis
from tests.factories import OrganizationFactory, make_api_key, price_model
from workers.contract import USAGE_STREAM

LOOPBACK_ALLOWED = {
    "MANTLE_PROVIDER_ALLOWED_HTTP": "127.0.0.1",
    "MANTLE_PROVIDER_ALLOWED_PRIVATE": "127.0.0.1",
    "MANTLE_PROVIDER_COOLDOWN_S": "5",
}


def upstream_org_key() -> str:
    """A key of the organization that buys from the upstream Mantle: the provider's
    credential."""
    org = OrganizationFactory()
    _, secret = make_api_key(org, scopes=["inference"])
    return secret


def provider(name: str, base_url: str, credential: str, **extra: Any) -> Provider:
    return Provider.objects.create(
        name=name,
        kind=extra.pop("kind", Provider.Kind.OPENAI_COMPATIBLE),
        base_url=base_url,
        credential_encrypted=secretbox.seal(credential),
        **extra,
    )


def relayed_endpoint(name: str, kind: str, targets: list[dict[str, Any]]) -> Endpoint:
    """A public model served only by providers (runtime upstream), priced, published."""
    model = Model.objects.create(name=name, kind=kind, context_length=8192)
    version = ModelVersion.objects.create(
        model=model, version=1, runtime="upstream", sha256="", location=""
    )
    pool = pool_ensure(name="upstream", region="any", providers=[])
    endpoint = Endpoint.objects.create(name=name, model_version=version, pool=pool)
    for target in targets:
        RouteTarget.objects.create(endpoint=endpoint, **target)
    endpoint_publish(endpoint)
    price_model(name, kind, unit_price="0.000001")
    return endpoint


def client(url: str, secret: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=secret, max_retries=0, timeout=60)


def usage_events(request_id: str) -> list[dict[str, str]]:
    return [
        dict(fields)  # type: ignore[arg-type]
        for _, fields in get_redis().xrange(USAGE_STREAM)
        if fields.get("request_id") == request_id  # type: ignore[union-attr]
    ]


def wait_usage(request_id: str, timeout: float = 10) -> list[dict[str, str]]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = usage_events(request_id)
        if found:
            time.sleep(0.2)  # a second event, if there were one, would be there by now
            return usage_events(request_id)
        time.sleep(0.05)
    return []
