"""Batch lines are billed at batch prices, end to end: a real gateway, worker and batch runner.

A batch created with a key whose per-minute request limit is spent still runs every line
(batch lines are outside the online limits), each reserved, settled, drained and invoiced at
the model's batch prices (the starter prices: half the online ones), exactly once.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator, Mapping
from decimal import Decimal
from typing import Any

import openai
import pytest
from django.utils import timezone
from openai import OpenAI
from openai.types import Batch

from billing.invoicing import invoice_refresh_draft
from billing.metering.drain import usage_drain
from billing.models import BillingAccount, CreditLedgerEntry, UsageRollup
from billing.wallet import wallet_read, wallet_record_events, wallet_sync
from core.redis import get_redis
from tests.factories import make_api_key
from tests.gateway.conftest import CHAT, Served
from tests.support.stack import Process
from workers.contract import USAGE_STREAM

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True), pytest.mark.models]

# The starter prices of the built-in chat model in nanos per token (tests.factories'
# price_builtin_models, as bin/run's seed_prices), online and of batch lines.
ONLINE = {"input": 50, "cached_input": 25, "output": 200}
BATCH = {"input": 25, "cached_input": 12.5, "output": 100}


@pytest.fixture
def runner(served: Served) -> Iterator[Process]:
    proc = served.live.stack.batch_runner(
        "batch-billing-runner", MANTLE_BATCH_LEASE_S="3", MANTLE_BATCH_POLL_S="0.2"
    )
    yield proc
    served.live.stack.stop(proc)


def batch_input(client: OpenAI, questions: list[str]) -> str:
    """An uploaded input file of one greedy chat line per question."""
    lines = [
        {
            "custom_id": f"q-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": CHAT,
                "messages": [{"role": "user", "content": question}],
                "max_tokens": 8,
                "temperature": 0,
            },
        }
        for i, question in enumerate(questions)
    ]
    data = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
    return client.files.create(file=("batch.jsonl", io.BytesIO(data)), purpose="batch").id


def finished(client: OpenAI, batch_id: str, timeout: float = 240) -> Batch:
    deadline = time.time() + timeout
    while time.time() < deadline:
        batch = client.batches.retrieve(batch_id)
        if batch.status in {"completed", "failed", "expired", "cancelled"}:
            return batch
        time.sleep(0.3)
    raise AssertionError(f"batch {batch_id} still {batch.status} after {timeout}s")


def org_events(organization_id: str, count: int) -> list[Mapping[str, str]]:
    """The organization's usage events on the stream, once `count` of them are there."""
    deadline = time.time() + 30
    while True:
        found = [
            fields
            for _, fields in get_redis().xrange(USAGE_STREAM)
            if fields.get("organization_id") == organization_id  # type: ignore[union-attr]
        ]
        if len(found) >= count or time.time() > deadline:
            return found  # type: ignore[return-value]
        time.sleep(0.2)


def cost(event: Mapping[str, str]) -> int:
    """What the settle parks and the drain counts for one event, in nanos (rounded up)."""
    prices = BATCH if event["service_class"] == "batch" else ONLINE
    prompt, cached = int(event["input_tokens"]), int(event["cached_input_tokens"])
    exact = (
        (prompt - cached) * Decimal(prices["input"])
        + cached * Decimal(prices["cached_input"])
        + int(event["output_tokens"]) * Decimal(prices["output"])
    )
    return int(-(-exact // 1))


def test_a_batch_runs_outside_a_spent_rate_limit_and_is_billed_at_batch_prices(
    served: Served, runner: Process
) -> None:
    org = served.org
    BillingAccount.objects.create(organization=org, mode="prepaid")
    CreditLedgerEntry.objects.create(
        organization=org, kind="prepaid_purchase", amount=Decimal("1"), reason="test credit"
    )
    wallet_sync(org)
    _, secret = make_api_key(org, scopes=["inference"], rpm_limit=1)
    client = served.client(secret)
    ask: dict[str, Any] = {"model": CHAT, "max_tokens": 8, "temperature": 0}
    client.chat.completions.create(messages=[{"role": "user", "content": "Hi"}], **ask)
    with pytest.raises(openai.RateLimitError):  # the key's one request a minute is spent
        client.chat.completions.create(messages=[{"role": "user", "content": "Hi"}], **ask)

    created = client.batches.create(
        input_file_id=batch_input(client, ["Name a color.", "Say hello.", "2+2=?"]),
        endpoint="/v1/chat/completions",
        completion_window="24h",
    )
    done = finished(client, created.id)

    assert done.status == "completed", done.errors
    assert done.request_counts is not None and done.request_counts.completed == 3
    events = org_events(org.id, 4)
    assert sorted(e["service_class"] for e in events) == ["batch", "batch", "batch", "online"]
    # Settled at admission's prices: nothing reserved any more, the cost parked as pending.
    settled = wallet_read(org.id)
    assert settled["reserved_nanos"] == "0"
    assert settled["pending_nanos"] == str(sum(cost(e) for e in events))

    for _ in range(2):  # the second drain finds nothing new: exactly once
        usage_drain(
            consumer="batch-billing-e2e", client=get_redis(), once=True,
            hooks=[wallet_record_events],
        )  # fmt: skip

    drained = wallet_read(org.id)
    assert (drained["pending_nanos"], drained["spent_nanos"]) == (
        "0",
        str(sum(cost(e) for e in events)),
    )
    rollups = UsageRollup.objects.filter(organization_id=org.id)
    assert sum(r.requests for r in rollups) == 4
    assert sum(r.batch_requests for r in rollups) == 3
    invoice = invoice_refresh_draft(org=org, month=timezone.now())
    assert invoice is not None
    lines = {line.label: (line.quantity, line.unit_price) for line in invoice.lines.all()}
    batch = [e for e in events if e["service_class"] == "batch"]
    cached = sum(int(e["cached_input_tokens"]) for e in batch)
    expected = {
        f"{CHAT} batch input tokens": (
            sum(int(e["input_tokens"]) for e in batch) - cached,
            Decimal("0.025"),
        ),
        f"{CHAT} batch cached input tokens": (cached, Decimal("0.0125")),
        f"{CHAT} batch output tokens": (
            sum(int(e["output_tokens"]) for e in batch),
            Decimal("0.1"),
        ),
    }
    assert {label: lines[label] for label in lines if " batch " in label} == {
        label: line for label, line in expected.items() if line[0]
    }
