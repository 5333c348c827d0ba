"""Per-key controls end to end: the allowlist in the key's cached identity, enforced at
admission (403 `model_not_allowed` before anything is taken) and by batch validation; the
controls set and read through the management API and the console keys page."""

from __future__ import annotations

import asyncio
import json
import time
from decimal import Decimal
from typing import Any

import pytest
from django.utils import timezone

from accounts import keys
from accounts.models import ApiKey, AuditLog
from accounts.permissions import Role
from accounts.principal import SYSTEM
from billing import key_budgets, wallet_keys
from billing.periods import hour_start
from billing.wallet import wallet_read, wallet_sync
from catalog.models import Endpoint
from catalog.selectors import endpoint_spec
from core.errors import InvalidInput
from core.redis import get_redis
from gateway import pipeline
from gateway.batch_runner import validate_lines
from gateway.errors import OpenAIError
from gateway.models import Batch
from tests.billing.factories import usage
from tests.conftest import OrgWorld
from tests.console.support import org_url
from tests.factories import make_api_key, make_model_version, make_pool
from workers.contract import pool_live_key

pytestmark = pytest.mark.django_db

ALLOWED, OTHER = "allow-chat", "other-chat"


def _endpoint(name: str) -> Endpoint:
    version = make_model_version(
        None,
        {"name": name, "kind": "chat", "runtime": "onnx", "sha256": "0" * 64, "location": "-"},
    )
    return Endpoint.objects.create(
        organization=None, name=name, pool=make_pool("keyctl"), model_version=version
    )


@pytest.fixture
def endpoints(db: None) -> dict[str, Endpoint]:
    return {name: _endpoint(name) for name in (ALLOWED, OTHER)}


def _cached(key: ApiKey) -> keys.KeyIdentity:
    found = asyncio.run(keys.cache_get(key.digest))
    assert isinstance(found, keys.KeyIdentity)
    return found


def _restrict(key: ApiKey, models: list[str], capture: Any) -> ApiKey:
    with capture(execute=True):  # the write-through runs on commit
        return key_budgets.key_controls_set(
            principal=SYSTEM, key=key, monthly_budget=None, allowed_models=models
        )


def test_the_cached_identity_carries_the_allowlist_and_follows_each_change(
    world: OrgWorld, endpoints: dict[str, Endpoint], django_capture_on_commit_callbacks: Any
) -> None:
    with django_capture_on_commit_callbacks(execute=True):
        key, _ = make_api_key(world.org)
    assert _cached(key).allowed_models == ()

    _restrict(key, [ALLOWED], django_capture_on_commit_callbacks)
    identity = _cached(key)
    assert identity.allowed_models == (ALLOWED,)
    assert identity.may_use(ALLOWED) and not identity.may_use(OTHER)
    # The record is sealed: a record edited in Redis to widen the list fails its check.
    raw = get_redis().get(keys.cache_key(key.digest))
    forged = json.loads(raw).copy()
    forged["allowed_models"] = []
    assert keys.identity_from_cache(key.digest, json.dumps(forged)) is None

    _restrict(key, [ALLOWED, OTHER], django_capture_on_commit_callbacks)
    assert _cached(key).allowed_models == (ALLOWED, OTHER)
    _restrict(key, [], django_capture_on_commit_callbacks)
    assert _cached(key).allowed_models == ()


def test_admission_refuses_a_model_off_the_list_before_taking_anything(
    world: OrgWorld, endpoints: dict[str, Endpoint], django_capture_on_commit_callbacks: Any
) -> None:
    key, _ = make_api_key(world.org)
    _restrict(key, [ALLOWED], django_capture_on_commit_callbacks)
    identity = _cached(key)
    get_redis().zadd(pool_live_key("keyctl"), {"node-a": time.time()})
    wallet_sync(world.org)

    def admit(name: str, relayed: bool) -> Any:
        spec = endpoint_spec(endpoints[name])
        lim = pipeline.limits_for(identity, spec)
        if relayed:
            call = pipeline.admit_relayed(lim, spec, world.org.id, 10, 10, f"req-{name}")
        else:
            call = pipeline.admit(lim, spec, world.org.id, 10, 10, f"req-{name}")
        return asyncio.run(call)

    for relayed in (False, True):
        with pytest.raises(OpenAIError) as refused:
            admit(OTHER, relayed)
        assert (refused.value.status, refused.value.code) == (403, "model_not_allowed")
        assert OTHER in refused.value.message
        assert refused.value.param == "model"
    # Nothing was taken: no rate-limit bucket, no reservation, no pool share.
    assert get_redis().keys("mantle:rl:*") == []
    assert wallet_read(world.org.id).get(wallet_keys.RESERVED, "0") == "0"

    admitted = admit(ALLOWED, relayed=True)
    assert admitted.allowed


def test_a_batch_of_a_model_the_key_may_not_use_fails_validation(
    world: OrgWorld, endpoints: dict[str, Endpoint], django_capture_on_commit_callbacks: Any
) -> None:
    key, _ = make_api_key(world.org)
    _restrict(key, [ALLOWED], django_capture_on_commit_callbacks)
    batch = Batch(
        organization_id=world.org.id,
        api_key_id=key.id,
        endpoint="/v1/chat/completions",
        input_file_id="file-x",
    )

    def line(model: str) -> tuple[int, bytes]:
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
        request = {
            "custom_id": model,
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": body,
        }
        return 1, json.dumps(request).encode()

    refused = validate_lines(batch, iter([line(OTHER)]))
    assert [e["code"] for e in refused.errors] == ["model_not_allowed"]
    assert validate_lines(batch, iter([line(ALLOWED)])).errors == []


def test_the_service_checks_budget_places_and_model_names(
    world: OrgWorld, endpoints: dict[str, Endpoint]
) -> None:
    key, _ = make_api_key(world.org)
    cases: list[tuple[dict[str, Any], str]] = [
        ({"monthly_budget": "1.005"}, "monthly_budget"),
        ({"monthly_budget": "-1"}, "monthly_budget"),
        ({"monthly_budget": 1.5}, "monthly_budget"),  # a float is refused
        ({"monthly_budget": None, "budget_mode": "sometimes"}, "budget_mode"),
        ({"monthly_budget": None, "allowed_models": ["no-such-model"]}, "allowed_models.0"),
        (
            {"monthly_budget": None, "allowed_models": [f"m{i}" for i in range(101)]},
            "allowed_models",
        ),
    ]
    for kwargs, param in cases:
        with pytest.raises(InvalidInput) as bad:
            key_budgets.key_controls_set(principal=SYSTEM, key=key, **kwargs)
        assert bad.value.param == param, kwargs
    # Nothing was written by a refused change.
    key.refresh_from_db()
    assert (key.monthly_budget, key.allowed_models) == (None, [])


# --- management API --------------------------------------------------------------------


def _url(world: OrgWorld, key: ApiKey) -> str:
    return f"/api/v1/organizations/{world.org.id}/api-keys/{key.id}/controls"


def test_the_api_sets_reads_and_clears_a_keys_controls(
    world: OrgWorld, endpoints: dict[str, Endpoint]
) -> None:
    key, _ = make_api_key(world.org)
    owner = world.client_for(Role.OWNER)
    response = owner.put(
        _url(world, key),
        {"monthly_budget": "12.50", "budget_mode": "hard", "allowed_models": [ALLOWED]},
        content_type="application/json",
    )
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["monthly_budget"] == "12.50"
    assert (body["budget_mode"], body["allowed_models"]) == ("hard", [ALLOWED])
    assert body["month_spend"] == "0.00"
    key.refresh_from_db()
    assert key.monthly_budget == Decimal("12.50")
    assert AuditLog.objects.filter(action="api_key.controls_set", target_id=key.id).count() == 1

    usage(
        world.org,
        hour_start(timezone.now()),
        input_tokens=3_000_000,
        model=ALLOWED,
        api_key_id=key.id,
    )
    read = owner.get(_url(world, key)).json()
    assert Decimal(read["month_spend"]) > 0
    listed = owner.get(f"/api/v1/organizations/{world.org.id}/api-keys/{key.id}").json()
    assert (listed["monthly_budget"], listed["allowed_models"]) == ("12.50", [ALLOWED])

    bad = owner.put(
        _url(world, key),
        {"monthly_budget": "1.001", "allowed_models": []},
        content_type="application/json",
    )
    assert bad.status_code == 400
    unknown = owner.put(
        _url(world, key),
        {"monthly_budget": "12.50", "allowed_models": ["gpt-nowhere"]},
        content_type="application/json",
    )
    assert unknown.status_code == 400
    assert "gpt-nowhere" in unknown.content.decode()

    cleared = owner.put(
        _url(world, key),
        {"monthly_budget": None, "allowed_models": []},
        content_type="application/json",
    )
    assert cleared.status_code == 200
    assert (cleared.json()["monthly_budget"], cleared.json()["allowed_models"]) == (None, [])


def test_a_budget_needs_billing_manage_an_allowlist_keys_create(
    world: OrgWorld, endpoints: dict[str, Endpoint]
) -> None:
    key, _ = make_api_key(world.org)
    admin = world.client_for(Role.ADMIN)  # keys.create, not billing.manage
    models_only = admin.put(
        _url(world, key),
        {"monthly_budget": None, "allowed_models": [ALLOWED]},
        content_type="application/json",
    )
    assert models_only.status_code == 200
    budget = admin.put(
        _url(world, key),
        {"monthly_budget": "5.00", "allowed_models": [ALLOWED]},
        content_type="application/json",
    )
    assert budget.status_code == 403
    viewer = world.client_for(Role.VIEWER).put(
        _url(world, key),
        {"monthly_budget": None, "allowed_models": []},
        content_type="application/json",
    )
    assert viewer.status_code == 403


# --- console -----------------------------------------------------------------------------


def test_the_console_sets_controls_and_lists_spend_against_the_budget(
    world: OrgWorld, endpoints: dict[str, Endpoint]
) -> None:
    key, _ = make_api_key(world.org)
    owner = world.client_for(Role.OWNER)
    url = org_url("console-key-controls", world.org.id, key_id=key.id)
    form = owner.get(url)
    assert form.status_code == 200
    saved = owner.post(
        url, {"monthly_budget": "20.00", "budget_mode": "soft", "allowed_models": ALLOWED}
    )
    assert saved.status_code == 302, saved.content.decode()[:2000]
    key.refresh_from_db()
    assert (key.monthly_budget, key.budget_mode, key.allowed_models) == (
        Decimal("20.00"),
        "soft",
        [ALLOWED],
    )
    usage(
        world.org,
        hour_start(timezone.now()),
        input_tokens=3_000_000,
        model=ALLOWED,
        api_key_id=key.id,
    )
    spend = key_budgets.key_month_spend(world.org, [key.id])[key.id]
    assert spend > 0
    page = owner.get(org_url("console-keys", world.org.id)).content.decode()
    assert f"{spend} / 20.00" in page
    assert f"models: {ALLOWED}" in page

    bad = owner.post(
        url, {"monthly_budget": "20.00", "budget_mode": "soft", "allowed_models": "nope"}
    )
    assert bad.status_code == 400
    assert "nope" in bad.content.decode()
    # A developer may restrict models but not set a budget.
    developer = world.client_for(Role.DEVELOPER)
    refused = developer.post(
        url, {"monthly_budget": "99.00", "budget_mode": "soft", "allowed_models": ALLOWED}
    )
    assert refused.status_code == 403
    key.refresh_from_db()
    assert key.monthly_budget == Decimal("20.00")
