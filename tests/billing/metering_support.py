"""Helpers for the metering tests: usage events on the stream, totals read back."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

import factory
import redis
from django.db.models import Count, Sum

from billing.metering import outbox, store, stream
from billing.models import SpendOutbox, UsageEvent, UsageRollup
from workers.contract import USAGE_STREAM
from workers.contract import UsageEvent as ContractEvent


def hour_start(seconds_ago: float = 0.0) -> float:
    """The start of the UTC hour that was `seconds_ago` ago, as unix time."""
    moment = time.time() - seconds_ago
    return float(int(moment // 3600) * 3600)


class UsageEventFactory(factory.Factory):
    """A worker's usage event (the contract dataclass), two hours ago by default."""

    class Meta:
        model = ContractEvent

    request_id = factory.Sequence(lambda n: f"req_test{n:08d}")
    organization_id = "org_acme"
    project_id = "proj_acme"
    api_key_id = "key_acme"
    endpoint_id = "ep-acme"
    model_version_id = "mv_smollm"
    model_name = "smollm2-135m-instruct"
    input_tokens = 100
    output_tokens = 20
    status = "stop"
    finished_at = factory.LazyFunction(lambda: hour_start(7200) + 60.25)
    started_at = factory.LazyAttribute(lambda o: o.finished_at - 1.5)
    queue_ms = 3
    compute_ms = 1500
    worker = "cpu-test"
    # A quarter of the prompt from the prefix cache, so every drain test counts cached
    # tokens too (and a test that sets input_tokens never gets more cached than input).
    cached_input_tokens = factory.LazyAttribute(lambda o: o.input_tokens // 4)


def emit(client: redis.Redis, events: Iterable[ContractEvent]) -> list[str]:
    """Append the events to the usage stream as a worker would (XADD of to_fields())."""
    pipe = client.pipeline(transaction=False)
    for event in events:
        pipe.xadd(USAGE_STREAM, event.to_fields())  # type: ignore[arg-type]
    return [str(i) for i in pipe.execute()]


@dataclass(frozen=True)
class Totals:
    requests: int
    input_tokens: int
    output_tokens: int
    cached_input_tokens: int


def expected_totals(events: Iterable[ContractEvent]) -> Totals:
    events = list(events)
    return Totals(
        requests=len(events),
        input_tokens=sum(e.input_tokens for e in events),
        output_tokens=sum(e.output_tokens for e in events),
        cached_input_tokens=sum(e.cached_input_tokens for e in events),
    )


def raw_totals() -> Totals:
    sums = UsageEvent.objects.aggregate(
        n=Count("request_id"),
        i=Sum("input_tokens"),
        o=Sum("output_tokens"),
        ci=Sum("cached_input_tokens"),
    )
    return Totals(sums["n"], sums["i"] or 0, sums["o"] or 0, sums["ci"] or 0)


def rollup_totals() -> Totals:
    sums = store.rollup_totals()
    return Totals(
        sums["requests"], sums["input_tokens"], sums["output_tokens"], sums["cached_input_tokens"]
    )


def spend(client: redis.Redis, organization_id: str) -> tuple[int, int]:
    values = client.hmget(outbox.spend_key(organization_id), "input_tokens", "output_tokens")
    return int(values[0] or 0), int(values[1] or 0)


def cached_spend(client: redis.Redis, organization_id: str) -> int:
    """The organization's counted cached input tokens in `mantle:spend:<org>`."""
    return int(client.hget(outbox.spend_key(organization_id), "cached_input_tokens") or 0)


def pending_count(client: redis.Redis) -> int:
    try:
        return int(client.xpending(USAGE_STREAM, stream.GROUP)["pending"])
    except redis.ResponseError:
        return 0


def outbox_count() -> int:
    return SpendOutbox.objects.count()


def rollup_rows() -> list[tuple[str, str, str, str, str, float, int, int, int]]:
    return [
        (
            r.organization_id,
            r.project_id,
            r.api_key_id,
            r.endpoint_id,
            r.model_name,
            r.hour.timestamp(),
            r.requests,
            r.input_tokens,
            r.output_tokens,
        )
        for r in UsageRollup.objects.order_by("organization_id", "api_key_id", "hour")
    ]
