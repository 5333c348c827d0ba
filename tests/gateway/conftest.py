"""A live platform for end-to-end tests: a gateway server and a worker node, real Redis."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from openai import OpenAI

from accounts.models import ApiKey, Organization
from catalog.models import Endpoint
from catalog.services import builtin_models_register
from core.redis import get_redis
from tests.factories import OrganizationFactory, make_api_key, price_builtin_models
from tests.gateway.relay_support import LOOPBACK_ALLOWED
from tests.support.stack import Process, Stack, builtin_manifests
from tests.support.upstream_fake import (  # noqa: F401 (fixtures by name)
    upstream_fake_fixture,
    upstream_fake_server_fixture,
)

CHAT = "smollm2-135m-instruct"
EMBED = "all-minilm-l6-v2"
ECHO = "mantle-echo"


@dataclass
class LiveStack:
    stack: Stack
    url: str
    gateway: Process
    worker: Process
    manifests: list[dict[str, Any]]


@pytest.fixture(scope="session")
def live(django_db_setup: None, django_db_blocker: Any) -> Iterator[LiveStack]:
    manifests = builtin_manifests()
    get_redis().flushdb()
    stack = Stack.for_tests()
    try:
        gateway, url = stack.gateway()
        # Every test registers the built-in models anew, so each test's chat endpoint is a
        # new model version with its own engine (~0.6 GB for SmolLM2 fp32). With the default
        # idle time (30 min) a session of end-to-end tests held them all and ran the
        # machine out of memory; engines idle for 20 s are unloaded (a test that needs one
        # again reloads it in ~2 s).
        worker = stack.worker("cpu", concurrency=32, MANTLE_ENGINE_IDLE_S="20")
        yield LiveStack(stack=stack, url=url, gateway=gateway, worker=worker, manifests=manifests)
    finally:
        stack.stop_all()


@dataclass
class Served:
    live: LiveStack
    org: Organization
    key: ApiKey
    secret: str
    endpoints: dict[str, Endpoint]

    def client(self, secret: str | None = None, url: str | None = None) -> OpenAI:
        return OpenAI(
            base_url=f"{url or self.live.url}/v1",
            api_key=secret or self.secret,
            max_retries=0,
            timeout=120,
        )


@pytest.fixture
def served(live: LiveStack, transactional_db: None) -> Served:
    endpoints = {e.name: e for e in builtin_models_register(live.manifests)}
    price_builtin_models()  # as bin/run's seed_prices: admission refuses unpriced models
    org = OrganizationFactory()
    key, secret = make_api_key(org, scopes=["inference"])
    return Served(live=live, org=org, key=key, secret=secret, endpoints=endpoints)


@pytest.fixture(scope="module")
def relay_gateway(live: LiveStack) -> Iterator[Process]:
    """A second gateway process (same database and Redis) allowed to reach loopback
    providers: the relay. The session's gateway is the upstream Mantle."""
    proc = live.stack.start_gateway("gateway-relay", env=LOOPBACK_ALLOWED)
    live.stack.wait_serving(proc)
    try:
        yield proc
    finally:
        live.stack.stop(proc)
