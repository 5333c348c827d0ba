"""Tensor compute is paid for: /v2 through a real gateway and worker, against the wallet.

The attacks of docs/security.md (free compute): an organization with no prepaid credit, or
at its hard budget, calling a tensor model; anyone calling a model nothing prices. Before
the fix, both ran at zero cost and were never invoiced.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

import httpx
import pytest
from django.utils import timezone

from accounts.models import Organization
from billing import wallet_keys
from billing.invoicing import invoice_refresh_draft
from billing.metering.drain import usage_drain
from billing.models import BillingAccount, Budget, CreditLedgerEntry, Price
from billing.wallet import wallet_read, wallet_record_events, wallet_sync
from core.redis import get_redis
from tests.factories import (
    PRICED_SINCE,
    OrganizationFactory,
    make_api_key,
    make_model_version,
    make_pool,
)
from tests.gateway import test_v2_e2e as v2_e2e
from tests.gateway.conftest import LiveStack
from tests.gateway.test_v2_e2e import admin_auth, features, infer_body, usage_by_request
from tests.support.stack import Process
from workers.contract import USAGE_STREAM, response_stream_key, task_claim_key

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True), pytest.mark.models]

POOL = v2_e2e.POOL
artifacts = v2_e2e.artifacts
tensor_worker = v2_e2e.tensor_worker

# 10,000 USD per million requests = 10,000,000 nanos ($0.01) a request; 0.001 USD per
# million compute ms = 1 nano a millisecond. The worst case of one request is $0.01 plus
# its compute deadline (the gateway's MANTLE_REQUEST_TIMEOUT_S) in nanos.
REQUEST_NANOS = 10_000_000


def serve_ranker(
    live: LiveStack, org: Organization, manifest: dict[str, Any], *, priced: bool
) -> tuple[str, str]:
    """An endpoint of the organization's own tensor model; its id and an inference key."""
    make_pool(POOL, region="local", providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    name = f"ranker-{org.id[-6:]}"
    version = make_model_version(org, manifest, model_name=name, priced=False)
    if priced:
        since = datetime.fromisoformat(PRICED_SINCE)
        for unit, price in (("request", "10000"), ("compute_ms", "0.001")):
            Price.objects.create(
                model_name=name, token_kind=unit, unit_price=Decimal(price), effective_from=since
            )
    _, admin_secret = make_api_key(org, scopes=["admin"])
    with httpx.Client(base_url=live.url, **admin_auth(admin_secret), timeout=60) as admin:
        created = admin.post(
            f"/api/v1/organizations/{org.id}/endpoints",
            json={"name": "ranker", "model_version_id": version.id, "pool": POOL},
        )
    assert created.status_code == 201, created.text
    _, secret = make_api_key(org, scopes=["inference"])
    return created.json()["id"], secret


def infer(live: LiveStack, endpoint_id: str, secret: str) -> httpx.Response:
    with httpx.Client(
        base_url=live.url, headers={"authorization": f"Bearer {secret}"}, timeout=60
    ) as client:
        return client.post(f"/v2/models/{endpoint_id}/infer", json=infer_body(features(2)))


def assert_never_dispatched(response: httpx.Response) -> None:
    request_id = response.headers["x-request-id"]
    redis = get_redis()
    assert not redis.exists(response_stream_key(request_id), task_claim_key(request_id))
    assert request_id not in {f["request_id"] for _, f in redis.xrange(USAGE_STREAM)}  # type: ignore[union-attr]


@pytest.mark.parametrize("account", ["prepaid_without_credit", "hard_budget_below_one_request"])
def test_tensor_compute_without_money_is_refused_before_dispatch(
    live: LiveStack,
    tensor_worker: Process,
    transactional_db: None,
    artifacts: dict[str, Any],
    account: str,
) -> None:
    org = OrganizationFactory()
    if account == "prepaid_without_credit":
        BillingAccount.objects.create(organization=org, mode="prepaid")
    else:
        BillingAccount.objects.create(organization=org, mode="postpaid")
        # $0.01 covers the request's price but not its compute deadline on top.
        Budget.objects.create(organization=org, monthly_amount=Decimal("0.01"), hard_limit=True)
    endpoint_id, secret = serve_ranker(live, org, artifacts["v1"], priced=True)
    wallet_sync(org)

    refused = infer(live, endpoint_id, secret)

    assert refused.status_code == 429, refused.text
    assert refused.json()["code"] == "insufficient_quota"
    assert refused.headers["x-should-retry"] == "false"
    assert_never_dispatched(refused)
    assert wallet_read(org.id).get("reserved_nanos", "0") == "0"


def test_tensor_compute_is_reserved_settled_metered_and_invoiced(
    live: LiveStack, tensor_worker: Process, transactional_db: None, artifacts: dict[str, Any]
) -> None:
    org = OrganizationFactory()
    BillingAccount.objects.create(organization=org, mode="prepaid")
    CreditLedgerEntry.objects.create(
        organization=org, kind="prepaid_purchase", amount=Decimal("1"), reason="test credit"
    )
    Budget.objects.create(organization=org, monthly_amount=Decimal("0.50"), hard_limit=True)
    endpoint_id, secret = serve_ranker(live, org, artifacts["v1"], priced=True)
    wallet_sync(org)

    answered = infer(live, endpoint_id, secret)

    assert answered.status_code == 200, answered.text
    request_id = answered.headers["x-request-id"]
    event = usage_by_request({request_id})[request_id]
    compute_ms = int(event["compute_ms"])
    # Settled: the reservation released, a cost parked until the drain counts it, which
    # bounds the worker's figure from above (the gateway's own wait).
    settled = wallet_read(org.id)
    assert settled["reserved_nanos"] == "0"
    assert int(settled["pending_nanos"]) >= REQUEST_NANOS + compute_ms
    # The same exactly-once usage stream as tokens: the drain counts the worker's figures.
    usage_drain(
        consumer="v2-billing-e2e", client=get_redis(), once=True, hooks=[wallet_record_events]
    )
    drained = wallet_read(org.id)
    assert (drained["pending_nanos"], drained["spent_nanos"]) == (
        "0",
        str(REQUEST_NANOS + compute_ms),
    )
    invoice = invoice_refresh_draft(org=org, month=timezone.now())
    assert invoice is not None
    assert [(line.label, line.quantity, line.unit_price) for line in invoice.lines.all()] == [
        (f"ranker-{org.id[-6:]} compute milliseconds", compute_ms, Decimal("0.001")),
        (f"ranker-{org.id[-6:]} requests", 1, Decimal("10000")),
    ]
    assert invoice.subtotal == Decimal("0.01")
    assert not invoice.held_usage.exists()


def test_a_model_without_a_price_is_refused_for_everyone_and_never_dispatched(
    live: LiveStack, tensor_worker: Process, transactional_db: None, artifacts: dict[str, Any]
) -> None:
    org = OrganizationFactory()  # postpaid, no budget: money alone would let it through
    endpoint_id, secret = serve_ranker(live, org, artifacts["v1"], priced=False)

    refused = infer(live, endpoint_id, secret)
    again = infer(live, endpoint_id, secret)  # now from the cached `unpriced` marker

    for response in (refused, again):
        assert response.status_code == 403, response.text
        body = response.json()
        assert (body["code"], body["param"]) == ("model_not_priced", "model")
        assert "has no price" in body["error"]
        assert_never_dispatched(response)
    assert get_redis().hgetall(wallet_keys.price_key(org.id, f"ranker-{org.id[-6:]}")) == {
        "unpriced": "1"
    }
    assert not get_redis().exists(f"mantle:rl:endpoint:{endpoint_id}:req")
