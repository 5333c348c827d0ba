"""Schema-driven fuzzing (schemathesis) of the management API and the gateway, on a live server.

The gateway's /v1 (the OpenAI-compatible API) is fuzzed from the document it serves
(GET /v1/openapi.json, generated from its protocol types), with bodies that fit it and bodies
that break it; /v2 (the open inference protocol) from a hand-written document
(tests/security/openapi_v2_support.py), against a real tensor model (a tiny ONNX graph built
with the onnx helper API) served by the live worker.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.generation import GenerationMode

from catalog.models import Endpoint
from catalog.services import endpoint_publish
from config.api import api
from gateway.openapi import document
from tests.factories import make_api_key, make_model_version, tensor_artifact
from tests.reliability.conftest import Tenant, tenant_on
from tests.security.openapi_v2_support import DOCUMENT_V2
from tests.support.stack import Stack, builtin_manifests

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.django_db(transaction=True),
    pytest.mark.timeout(600),
    pytest.mark.models,
]

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


# The management API's document (django-ninja), the gateway's /v1 document as this process
# builds it (its operations name the tests; the cases come from the served one, which
# `served_v1` checks is the same) and the /v2 document (tests/security/openapi_v2_support.py).
MANAGEMENT = _operations(schemathesis.openapi.from_dict(api.get_openapi_schema()))
GATEWAY = _operations(schemathesis.openapi.from_dict(document()))
GATEWAY_V2 = _operations(schemathesis.openapi.from_dict(DOCUMENT_V2))


@pytest.fixture(scope="module")
def served_v1(fuzz_server: Live) -> dict[str, Any]:
    """The operations of the /v1 document the live gateway serves, without a key."""
    served = requests.get(f"{fuzz_server.url}/v1/openapi.json", timeout=30)
    assert served.status_code == 200
    assert served.json() == document()
    return _operations(schemathesis.openapi.from_dict(served.json()))


@pytest.fixture
def fuzz_tenant(fuzz_server: Live, transactional_db: None) -> tuple[Tenant, str]:
    tenant = tenant_on(POOL, fuzz_server.manifests)
    _, admin_secret = make_api_key(tenant.org, scopes=["admin", "inference"])
    return tenant, admin_secret


def fuzz(
    operation: Any,
    prepare: Any,
    generation_mode: GenerationMode = GenerationMode.POSITIVE,
    **call: Any,
) -> None:
    # `derandomize` seeds each operation's cases from this function's source: an edit to
    # `run` changes every case of every operation.
    @BOUNDED
    @given(case=operation.as_strategy(generation_mode))
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
def test_gateway(
    label: str, fuzz_tenant: tuple[Tenant, str], fuzz_server: Live, served_v1: dict[str, Any]
) -> None:
    tenant, _ = fuzz_tenant
    rng = random.Random(label)

    def prepare(case: Any) -> None:
        if isinstance(case.body, dict) and "model" in case.body and rng.random() < 0.7:
            case.body["model"] = tenant.echo.id
        if "model_id" in (case.path_parameters or {}) and rng.random() < 0.5:
            case.path_parameters["model_id"] = tenant.echo.id

    # The document is exact (it is the validation's own schema), so bodies that fit it are
    # mostly accepted: bodies that break it (unknown roles and formats, out-of-range numbers,
    # wrong types, unknown members) are sent too, and must be refused in OpenAI's shape.
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
        fuzz(
            served_v1[label],
            prepare,
            mode,
            base_url=fuzz_server.url,
            headers={"authorization": f"Bearer {tenant.secret}"},
        )


# --- /v2 -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ranker(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The manifest of a tensor model: features [batch, 4] FP32 -> shifted [batch, 4], score."""
    return tensor_artifact(tmp_path_factory.mktemp("fuzz-artifacts"), offset=1.0)


@pytest.fixture
def fuzz_tensor(fuzz_tenant: tuple[Tenant, str], ranker: dict[str, Any]) -> tuple[Tenant, Endpoint]:
    tenant, _ = fuzz_tenant
    version = make_model_version(tenant.org, ranker, model_name=f"fuzz-ranker-{tenant.org.id}")
    endpoint = Endpoint.objects.create(
        organization=tenant.org,
        name=f"ranker-{POOL}",
        pool=tenant.echo.pool,
        model_version=version,
        rpm_limit=1_000_000,
        tpm_limit=1_000_000_000,
    )
    endpoint_publish(endpoint)
    return tenant, endpoint


def _numbers(value: Any) -> list[float]:
    """The numbers anywhere in a generated value (bools are not numbers here)."""
    if isinstance(value, list):
        return [n for item in value for n in _numbers(item)]
    if isinstance(value, int | float) and not isinstance(value, bool):
        return [value]
    return []


def _features(case_input: Any, rng: random.Random) -> dict[str, Any]:
    """An input the ranker takes (`features`, FP32, [rows, 4]), from the generated numbers."""
    values = _numbers(case_input.get("data") if isinstance(case_input, dict) else None)[:64]
    padding = -len(values) % 4 if values else 4
    values += [rng.uniform(-100, 100) for _ in range(padding)]
    rows = len(values) // 4
    data: list[Any] = values
    if rng.random() < 0.5:
        data = [values[4 * r : 4 * r + 4] for r in range(rows)]
    return {"name": "features", "shape": [rows, 4], "datatype": "FP32", "data": data}


_RANKER_OUTPUTS: list[Any] = [None, [{"name": "score"}], [{"name": "shifted"}, {"name": "score"}]]


@pytest.mark.parametrize("label", sorted(GATEWAY_V2))
def test_gateway_v2(label: str, fuzz_tensor: tuple[Tenant, Endpoint], fuzz_server: Live) -> None:
    tenant, endpoint = fuzz_tensor
    version = str(endpoint.model_version.version)
    rng = random.Random(label)

    def prepare(case: Any) -> None:
        # Most cases name the tenant's tensor model (and the version it serves), to get past
        # the 404s; a few a name with a `/` (raw or %2F), which no route matches.
        params = case.path_parameters or {}
        if "name" in params:
            roll = rng.random()
            if roll < 0.8:
                params["name"] = endpoint.id
            elif roll < 0.9:
                params["name"] = rng.choice([f"{endpoint.id}/x", quote(f"org/{endpoint.id}", "")])
        if "version" in params and rng.random() < 0.8:
            params["version"] = version
        # Over half the infer bodies carry inputs the model takes (the generated numbers,
        # as features [rows, 4] FP32), mostly with outputs it has: real inference on the
        # worker. Others get the input's name right, to reach the datatype and shape checks.
        body = case.body
        if isinstance(body, dict) and body.get("inputs"):
            roll = rng.random()
            if roll < 0.6:
                body["inputs"] = [_features(body["inputs"][0], rng)]
                if rng.random() < 0.7:
                    body["outputs"] = rng.choice(_RANKER_OUTPUTS)
            elif roll < 0.85:
                for item in body["inputs"]:
                    if rng.random() < 0.7:
                        item["name"] = "features"

    statuses: Counter[int] = Counter()
    with requests.Session() as session:
        session.hooks["response"].append(lambda r, *_, **__: statuses.update([r.status_code]))
        fuzz(
            GATEWAY_V2[label],
            prepare,
            session=session,
            base_url=fuzz_server.url,
            headers={"authorization": f"Bearer {tenant.secret}"},
        )
    if label.endswith("/infer"):
        # Both the refusals and real inference were exercised (the cases are derandomized).
        assert statuses[200] and statuses[400], statuses
