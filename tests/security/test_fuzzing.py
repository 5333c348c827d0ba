"""Schema-driven fuzzing (schemathesis) of the management API and the gateway, on a live server."""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from config.api import api
from tests.factories import make_api_key
from tests.reliability.conftest import Tenant, tenant_on
from tests.security.openapi_v1 import DOCUMENT
from tests.stack import Stack, builtin_manifests

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True), pytest.mark.timeout(600)]

POOL = "relfuzz"
# No 500s; every reply in its documented shape (bodies of documented statuses, and
# OpenAI-shaped errors for the gateway's `default`); declared content types.
CHECKS = [
    schemathesis.checks.not_a_server_error,
    schemathesis.checks.response_schema_conformance,
    schemathesis.checks.content_type_conformance,
]
BOUNDED = settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
    database=None,
)


@dataclass
class Live:
    url: str
    manifests: list[dict[str, Any]]


@pytest.fixture(scope="module")
def fuzz_server(django_db_setup: None, django_db_blocker: Any) -> Iterator[Live]:
    manifests = builtin_manifests()
    stack = Stack.for_tests()
    try:
        _, url = stack.gateway(name="rel-fuzz-gateway")
        stack.worker(POOL, name="rel-fuzz-worker", concurrency=8)
        yield Live(url=url, manifests=manifests)
    finally:
        stack.stop_all()


def _operations(schema: Any) -> dict[str, Any]:
    return {result.ok().label: result.ok() for result in schema.get_all_operations()}


# The management API's document (django-ninja) and the gateway's (tests/security/openapi_v1.py).
MANAGEMENT = _operations(schemathesis.openapi.from_dict(api.get_openapi_schema()))
GATEWAY = _operations(schemathesis.openapi.from_dict(DOCUMENT))


@pytest.fixture
def fuzz_tenant(fuzz_server: Live, transactional_db: None) -> tuple[Tenant, str]:
    tenant = tenant_on(POOL, fuzz_server.manifests)
    _, admin_secret = make_api_key(tenant.org, scopes=["admin", "inference"])
    return tenant, admin_secret


def fuzz(operation: Any, prepare: Any, **call: Any) -> None:
    @BOUNDED
    @given(case=operation.as_strategy())
    def run(case: Any) -> None:
        prepare(case)
        response = case.call(timeout=60, **call)
        case.validate_response(response, checks=CHECKS)

    run()


@pytest.mark.parametrize("label", sorted(MANAGEMENT))
def test_management_api(label: str, fuzz_tenant: tuple[Tenant, str], fuzz_server: Live) -> None:
    tenant, admin_secret = fuzz_tenant
    rng = random.Random(label)

    def prepare(case: Any) -> None:
        # Half the cases address the caller's own organization, to get past the 404s.
        if "organization_id" in (case.path_parameters or {}) and rng.random() < 0.5:
            case.path_parameters["organization_id"] = tenant.org.id

    fuzz(
        MANAGEMENT[label],
        prepare,
        base_url=fuzz_server.url,
        headers={"authorization": f"Bearer {admin_secret}"},
    )


@pytest.mark.parametrize("label", sorted(GATEWAY))
def test_gateway(label: str, fuzz_tenant: tuple[Tenant, str], fuzz_server: Live) -> None:
    tenant, _ = fuzz_tenant
    rng = random.Random(label)

    def prepare(case: Any) -> None:
        if isinstance(case.body, dict) and "model" in case.body and rng.random() < 0.7:
            case.body["model"] = tenant.echo.id
        if "model_id" in (case.path_parameters or {}) and rng.random() < 0.5:
            case.path_parameters["model_id"] = tenant.echo.id

    fuzz(
        GATEWAY[label],
        prepare,
        base_url=fuzz_server.url,
        headers={"authorization": f"Bearer {tenant.secret}"},
    )
