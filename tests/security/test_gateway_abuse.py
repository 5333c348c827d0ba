"""Low-grade abuse through a real gateway process: key guessing behind a shared address,
made-up and oversized model names, and the region an organization may name."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from django.test import Client

from accounts.models import Organization
from accounts.permissions import Role
from catalog import specs
from core.redis import get_redis
from gateway.resolve import failures_key
from tests.conftest import OrgWorld
from tests.factories import OrganizationFactory, make_api_key
from tests.support.stack import Stack

pytestmark = pytest.mark.django_db(transaction=True)

FAILURE_LIMIT = 5


@pytest.fixture(scope="module")
def gateway_url(django_db_setup: None, django_db_blocker: Any) -> Iterator[str]:
    with django_db_blocker.unblock():
        stack = Stack.for_tests()
    try:
        _, url = stack.gateway("gateway-abuse", MANTLE_KEY_FAILURE_LIMIT=str(FAILURE_LIMIT))
        yield url
    finally:
        stack.stop_all()


def guess(n: int) -> str:
    return "sk-" + f"{n:048d}"


@pytest.mark.e2e
def test_a_valid_key_keeps_working_from_an_address_blocked_for_guessing(gateway_url: str) -> None:
    _, secret = make_api_key(OrganizationFactory())
    get_redis().delete(failures_key("127.0.0.1"))
    with httpx.Client(base_url=gateway_url, timeout=30) as http:
        # The guesser, from 127.0.0.1, until it is blocked.
        statuses = [
            http.get("/v1/models", headers={"authorization": f"Bearer {guess(n)}"}).status_code
            for n in range(FAILURE_LIMIT + 2)
        ]
        assert statuses == [401] * FAILURE_LIMIT + [429, 429]
        assert get_redis().get(failures_key("127.0.0.1")) == str(FAILURE_LIMIT)

        # A customer behind the same address (a NAT) is still served.
        for _ in range(3):
            served = http.get("/v1/models", headers={"authorization": f"Bearer {secret}"})
            assert served.status_code == 200, served.text
        # ...while the guesser stays blocked, and its count is not extended by refusals.
        again = http.get("/v1/models", headers={"authorization": f"Bearer {guess(99)}"})
        assert again.status_code == 429
        assert again.json()["error"]["code"] == "too_many_failed_authentications"
        assert get_redis().get(failures_key("127.0.0.1")) == str(FAILURE_LIMIT)
    get_redis().delete(failures_key("127.0.0.1"))


@pytest.mark.e2e
def test_made_up_model_names_leave_nothing_in_redis(gateway_url: str) -> None:
    _, secret = make_api_key(OrganizationFactory())
    headers = {"authorization": f"Bearer {secret}"}
    names = [f"made-up-{n}" for n in range(50)]
    with httpx.Client(base_url=gateway_url, timeout=30) as http:
        for name in names:
            body = {"model": name, "messages": [{"role": "user", "content": "hi"}]}
            response = http.post("/v1/chat/completions", json=body, headers=headers)
            assert response.status_code == 404, response.text
            assert response.json()["error"]["code"] == "model_not_found"
    for name in names:
        assert not get_redis().exists(specs.endpoint_name_key(name))


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        (
            "/v1/chat/completions",
            {"model": "m" * 257, "messages": [{"role": "user", "content": "hi"}]},
            "model",
        ),
        ("/v1/embeddings", {"model": "m" * 10_000, "input": "hi"}, "model"),
        ("/v1/completions", {"model": "m", "prompt": "hi", "user": "u" * 257}, "user"),
        (
            "/v1/chat/completions",
            {"model": "m", "messages": [{"role": "user"}], "metadata": {"k" * 65: "v"}},
            "metadata",
        ),
    ],
)
def test_oversized_identifiers_are_refused_at_parse_time(
    gateway_url: str, path: str, body: dict[str, Any], param: str
) -> None:
    _, secret = make_api_key(OrganizationFactory())
    before = set(get_redis().keys(f"{specs.ENDPOINT_KEY_PREFIX}*"))
    response = httpx.post(
        f"{gateway_url}{path}", json=body, headers={"authorization": f"Bearer {secret}"}, timeout=30
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", param)
    assert set(get_redis().keys(f"{specs.ENDPOINT_KEY_PREFIX}*")) == before


@pytest.mark.e2e
def test_an_oversized_model_id_in_the_path_is_refused(gateway_url: str) -> None:
    _, secret = make_api_key(OrganizationFactory())
    response = httpx.get(
        f"{gateway_url}/v1/models/{'m' * 300}",
        headers={"authorization": f"Bearer {secret}"},
        timeout=30,
    )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "model"


# --- Regions ------------------------------------------------------------------------------


def create_org(client: Client, **body: str) -> Any:
    return client.post("/api/v1/organizations", body, content_type="application/json")


def test_only_configured_regions_are_accepted(world: OrgWorld, settings: Any) -> None:
    settings.MANTLE_REGIONS = ["local", "eu"]
    client = world.client_for(Role.OWNER)
    before = Organization.objects.count()

    refused = create_org(client, name="Elsewhere", region="mars-1")

    assert refused.status_code == 400
    assert refused.json()["error"]["param"] == "region"
    assert refused.json()["error"]["message"] == "region must be one of local, eu"
    assert Organization.objects.count() == before
    made = create_org(client, name="In Europe", region="eu")
    assert made.status_code == 201, made.content
    assert made.json()["region"] == "eu"
    assert create_org(client, name="Default").json()["region"] == settings.MANTLE_DEFAULT_REGION
