"""Live platforms whose dependencies tests break: a private Redis, proxies to PG and the broker."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis
from django.conf import settings

from accounts.models import ApiKey, Organization
from catalog.models import AcceleratorPool, Endpoint, ModelVersion
from catalog.services import builtin_models_register, endpoint_publish, pool_ensure
from tests.factories import OrganizationFactory, make_api_key, price_builtin_models
from tests.reliability.support import PrivateRedis, TcpProxy, redis_url_of_tests
from tests.support.stack import Process, Stack, builtin_manifests, database_url

CHAT = "smollm2-135m-instruct"
ECHO = "mantle-echo"


@dataclass
class FaultyPlatform:
    """A gateway and a worker whose Redis, broker and database can each be taken away."""

    stack: Stack
    url: str
    gateway: Process
    worker: Process
    redis: PrivateRedis
    broker: TcpProxy
    database: TcpProxy
    pool: str
    manifests: list[dict[str, Any]]

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis.url, decode_responses=True)


def _with_port(url: str, port: int) -> str:
    parts = urlsplit(url)
    userinfo = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
    return parts._replace(netloc=f"{userinfo}{parts.hostname}:{port}").geturl()


@pytest.fixture(scope="module")
def faulty(django_db_setup: None, django_db_blocker: Any) -> Iterator[FaultyPlatform]:
    manifests = builtin_manifests()
    private = PrivateRedis()
    broker_parts = urlsplit(settings.CELERY_BROKER_URL)
    broker = TcpProxy(broker_parts.port or 6379, broker_parts.hostname or "127.0.0.1")
    db_url = database_url()
    database = TcpProxy(urlsplit(db_url).port or 5432)
    stack = Stack.for_tests()
    broker_url = _with_port(settings.CELERY_BROKER_URL, broker.port)
    stack.env.update(
        {
            "REDIS_URL": private.url,
            "CELERY_BROKER_URL": broker_url,
            "DATABASE_URL": _with_port(db_url, database.port),
            # Fail fast and predictably while the database is cut.
            "DATABASE_CONNECT_TIMEOUT": "2",
        }
    )
    pool = "reldeps"
    try:
        with redis_url_of_tests(private.url):
            redis.Redis.from_url(settings.CELERY_BROKER_URL).delete(f"inference.{pool}")
            gateway, url = stack.gateway(name="rel-deps-gateway")
            worker = stack.worker(pool, name="rel-deps-worker", concurrency=8)
            yield FaultyPlatform(
                stack=stack,
                url=url,
                gateway=gateway,
                worker=worker,
                redis=private,
                broker=broker,
                database=database,
                pool=pool,
                manifests=manifests,
            )
    finally:
        stack.stop_all()
        broker.close()
        database.close()
        private.close()


@dataclass
class Tenant:
    org: Organization
    key: ApiKey
    secret: str
    chat: Endpoint
    echo: Endpoint


def builtin_versions(manifests: list[dict[str, Any]]) -> dict[str, ModelVersion]:
    """The built-in models' versions by model name (registered if they are not yet), priced:
    admission refuses a model without a price."""
    versions = {e.name: e.model_version for e in builtin_models_register(manifests)}
    price_builtin_models()
    return versions


def endpoint_on(org: Organization, pool: AcceleratorPool, version: ModelVersion) -> Endpoint:
    """`org`'s own published endpoint of `version` on `pool`."""
    endpoint = Endpoint.objects.create(
        organization=org,
        name=f"{version.model.name}-{pool.name}",
        pool=pool,
        model_version=version,
        # These tests are about faults, not limits.
        rpm_limit=1_000_000,
        tpm_limit=1_000_000_000,
    )
    endpoint_publish(endpoint)
    return endpoint


def tenant_on(pool_name: str, manifests: list[dict[str, Any]]) -> Tenant:
    """An organization with a key and its own chat and echo endpoints on `pool_name`."""
    versions = builtin_versions(manifests)
    pool = pool_ensure(name=pool_name, region="local", providers=["CPUExecutionProvider"])
    org = OrganizationFactory()
    key, secret = make_api_key(org, scopes=["inference"])
    chat, echo = (endpoint_on(org, pool, versions[name]) for name in (CHAT, ECHO))
    return Tenant(org=org, key=key, secret=secret, chat=chat, echo=echo)


@pytest.fixture
def tenant(faulty: FaultyPlatform, transactional_db: None) -> Iterator[Tenant]:
    with redis_url_of_tests(faulty.redis.url):
        yield tenant_on(faulty.pool, faulty.manifests)
