"""An organization's own provider (BYOK, docs/providers.md) that under-reports its usage is
billed at least the gateway's own count of what it relayed, with no cost of goods: through
real processes, the relaying gateway, the fake provider (tests/support/upstream_fake.py),
Redis and the drain (`manage.py drain_usage`), to the back office's margin.

The gateway reaches the fake on loopback through the allow-lists of organizations' own
providers (MANTLE_PROVIDER_BYOK_ALLOWED_*), not the operator's, which it is not given.
"""

from __future__ import annotations

import csv
import io
import math
import time
from collections.abc import Iterator
from datetime import timedelta
from decimal import Decimal

import pytest
from django.urls import reverse
from django.utils import timezone

from accounts.models import Organization
from billing.models import UsageEvent
from catalog.models import Endpoint, Model, ModelVersion, Provider, RouteTarget
from catalog.services import endpoint_publish, pool_ensure
from tests.backoffice.support import client_for, staff_user
from tests.factories import OrganizationFactory, make_api_key, price_model
from tests.gateway.relay_support import client, provider, wait_usage
from tests.support.stack import Process, Stack
from tests.support.upstream_fake import UpstreamFake

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

PRICE_PER_MILLION = Decimal("2.5")  # input and output tokens alike
# A long question: its answer ("echo: " and the words) is far more than one token.
CONTENT = " ".join(f"word{i:03d}" for i in range(120))
MESSAGES = [{"role": "user", "content": CONTENT}]
UNDER_REPORT = {"report_prompt_tokens": 1, "report_completion_tokens": 1}


@pytest.fixture(scope="module")
def byok_gateway(django_db_setup: None) -> Iterator[Process]:
    """A gateway whose organizations' providers may be on loopback; the operator's lists
    (MANTLE_PROVIDER_ALLOWED_*) are empty."""
    stack = Stack.for_tests()
    for name in ("MANTLE_PROVIDER_ALLOWED_HTTP", "MANTLE_PROVIDER_ALLOWED_PRIVATE"):
        stack.env.pop(name, None)
    try:
        proc = stack.start_gateway(
            "gateway-relay-byok",
            env={
                "MANTLE_PROVIDER_BYOK": "true",
                "MANTLE_PROVIDER_BYOK_ALLOWED_HTTP": "127.0.0.1",
                "MANTLE_PROVIDER_BYOK_ALLOWED_PRIVATE": "127.0.0.1",
            },
        )
        stack.wait_serving(proc)
        yield proc
    finally:
        stack.stop_all()


def private_relayed_endpoint(org: Organization, name: str, upstream: Provider) -> Endpoint:
    """The organization's own model and endpoint, served only by its own provider, priced,
    published. The provider's cost per token is set: it must not be recorded."""
    model = Model.objects.create(name=name, kind="chat", context_length=8192, organization=org)
    version = ModelVersion.objects.create(
        model=model, version=1, runtime="upstream", sha256="", location=""
    )
    pool = pool_ensure(name="upstream", region="any", providers=[])
    endpoint = Endpoint.objects.create(
        name=name, model_version=version, pool=pool, organization=org
    )
    RouteTarget.objects.create(
        endpoint=endpoint,
        kind="provider",
        provider=upstream,
        upstream_model="gpt-4o",
        cost_input=Decimal("0.00001"),
        cost_output=Decimal("0.00003"),
    )
    endpoint_publish(endpoint)
    price_model(name, "chat", unit_price=str(PRICE_PER_MILLION))
    return endpoint


def gateway_count(text: str) -> int:
    """The relay's own count of a text it relayed: 4 bytes a token (docs/providers.md)."""
    return math.ceil(len(text.encode()) / 4)


def test_an_organizations_provider_under_reporting_is_billed_the_gateways_count_with_no_cost(
    byok_gateway: Process, upstream_fake: UpstreamFake
) -> None:
    org = OrganizationFactory()
    _, secret = make_api_key(org, scopes=["inference"])
    own = provider("acme-own-openai", upstream_fake.openai_base_url, upstream_fake.key)
    own.organization = org
    own.save(update_fields=["organization"])
    # A private endpoint is called by its id.
    endpoint = private_relayed_endpoint(org, "acme-byok-chat", own).id
    relay = client(byok_gateway.url, secret)

    # The provider reports 1 prompt token and 1 completion token for a long answer, whole
    # and streamed.
    upstream_fake.add_faults(UNDER_REPORT, UNDER_REPORT)
    raw = relay.chat.completions.with_raw_response.create(
        model=endpoint, messages=MESSAGES, max_tokens=400
    )
    whole = raw.parse()
    assert whole.usage is not None and whole.usage.completion_tokens == 1  # as reported
    raw_stream = relay.chat.completions.with_raw_response.create(
        model=endpoint, messages=MESSAGES, max_tokens=400, stream=True
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in raw_stream.parse() if c.choices)
    answer = f"echo: {CONTENT}"
    assert whole.choices[0].message.content == streamed == answer
    # The fake marks a stream answered once it has sent the last chunk: on a loaded machine
    # the client can have read it a moment before.
    give_up = time.monotonic() + 10
    sent = upstream_fake.requests()
    while any(r["outcome"] == "pending" for r in sent) and time.monotonic() < give_up:
        time.sleep(0.05)
        sent = upstream_fake.requests()
    assert [r["outcome"] for r in sent] == ["answered", "answered"]
    request_ids = [raw.headers["x-request-id"], raw_stream.headers["x-request-id"]]

    # The usage events the gateway wrote: at least its own count, no cost of goods, marked
    # estimated (the floor applied).
    floor_in, floor_out = gateway_count(CONTENT), gateway_count(answer)
    assert floor_out > 100  # the long answer, far from the 1 token reported
    for request_id in request_ids:
        [event] = wait_usage(request_id)
        assert event["provider_id"] == own.id
        assert int(event["output_tokens"]) == floor_out
        assert int(event["input_tokens"]) >= floor_in
        assert event["cost_nanos"] == "0"
        assert event["estimated"] == "1"

    # The drain, a process of its own, meters them.
    Stack.for_tests().manage("drain_usage", "--once")
    rows = list(UsageEvent.objects.filter(organization_id=org.id))
    assert sorted(r.request_id for r in rows) == sorted(request_ids)
    for row in rows:
        assert row.provider_id == own.id
        assert row.output_tokens == floor_out
        assert row.input_tokens >= floor_in
        assert row.cost_nanos == 0
        assert row.estimated == 1
    billed_in = sum(r.input_tokens for r in rows)
    billed_out = sum(r.output_tokens for r in rows)
    revenue = (billed_in + billed_out) * PRICE_PER_MILLION / 1_000_000
    assert revenue > 0

    # The back office's margin: the revenue at the organization's price, no cost of goods,
    # the margin is the revenue.
    now = timezone.now()
    period = {
        "start": (now - timedelta(days=1)).strftime("%Y-%m-%d"),
        "end": (now + timedelta(days=1)).strftime("%Y-%m-%d"),
        "org": org.id,
    }
    staff = client_for(staff_user(is_superuser=True))
    response = staff.get(reverse("admin:backoffice-margin-csv"), period)
    assert response.status_code == 200, response.content[:500]
    table = list(csv.DictReader(io.StringIO(response.content.decode())))
    assert len(table) == 1, table
    [line] = table
    assert line["model_name"] == "acme-byok-chat"
    assert (line["requests"], line["estimated_requests"]) == ("2", "2")
    assert Decimal(line["revenue"]) == revenue
    assert Decimal(line["cost_of_goods"]) == 0
    assert Decimal(line["margin"]) == revenue
    assert line["margin_percent"] == "100.00"
