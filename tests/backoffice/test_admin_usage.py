"""The usage explorer: filters, totals, CSV export, a large range streamed in bounded memory."""

from __future__ import annotations

import csv
import io
import tracemalloc
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from django.db import connection
from django.http import StreamingHttpResponse
from django.test import AsyncClient
from django.urls import reverse
from django.utils.html import escape

from billing.backoffice.selectors import UsageFilter, usage_filter_parse, usage_totals
from billing.models import Price, UsageRollup
from core.errors import InvalidInput
from tests.backoffice.support import Staff, client_for, mark_verified
from tests.billing.factories import (
    CHAT,
    EMBED,
    OverrideFactory,
    PriceFactory,
    RollupFactory,
    price_book,
)
from tests.core.test_csv_export import FORMULA_NAMES
from tests.factories import OrganizationFactory

pytestmark = pytest.mark.django_db

T0 = datetime(2026, 10, 5, 8, tzinfo=UTC)
URL = reverse("admin:backoffice-usage")
CSV_URL = reverse("admin:backoffice-usage-csv")


@pytest.fixture
def rows(db: None) -> dict[str, Any]:
    """Two organizations; the first with two projects, keys, endpoints and models."""
    acme = OrganizationFactory(name="Acme")
    other = OrganizationFactory(name="Globex")
    spec = [
        # org, project, key, endpoint, model, hour offset, requests, in, out
        (acme.id, "proj_a", "key_a", "ep-a", CHAT, 0, 2, 100, 10),
        (acme.id, "proj_a", "key_a", "ep-a", CHAT, 1, 3, 200, 20),
        (acme.id, "proj_a", "key_b", "ep-b", EMBED, 1, 5, 300, 0),
        (acme.id, "proj_b", "key_c", "ep-a", CHAT, 30, 7, 400, 40),
        (other.id, "proj_z", "key_z", "ep-a", CHAT, 1, 11, 1000, 100),
    ]
    for org, project, key, endpoint, model, offset, requests, i, o in spec:
        RollupFactory(
            organization_id=org,
            project_id=project,
            api_key_id=key,
            endpoint_id=endpoint,
            model_name=model,
            hour=T0 + timedelta(hours=offset),
            requests=requests,
            input_tokens=i,
            output_tokens=o,
        )
    return {"acme": acme, "other": other}


def params(**extra: str) -> dict[str, str]:
    return {"start": "2026-10-01", "end": "2026-11-01", **extra}


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        ({}, (5, 28, 2000, 170)),
        ({"org": "ACME"}, (4, 17, 1000, 70)),
        ({"org": "ACME", "project": "proj_a"}, (3, 10, 600, 30)),
        ({"key": "key_a"}, (2, 5, 300, 30)),
        ({"endpoint": "ep-b"}, (1, 5, 300, 0)),
        ({"model": CHAT}, (4, 23, 1700, 170)),
        ({"start": "2026-10-05T09:00", "end": "2026-10-05T10:00"}, (3, 19, 1500, 120)),
        ({"start": "2026-10-06", "end": "2026-10-07"}, (1, 7, 400, 40)),
    ],
)
def test_filters_and_totals(
    staff: Staff, rows: dict[str, Any], filters: dict[str, str], expected: tuple[int, ...]
) -> None:
    if filters.get("org") == "ACME":
        filters = {**filters, "org": rows["acme"].id}

    response = client_for(staff.support).get(URL, params(**filters))

    assert response.status_code == 200
    totals = response.context["totals"]
    assert (totals.rows, totals.requests, totals.input_tokens, totals.output_tokens) == expected


def test_totals_by_model_and_charges_for_one_organization(rows: dict[str, Any]) -> None:
    price_book(CHAT, "1", "2")
    price_book(EMBED, "0.5", "0.5")
    f = usage_filter_parse(params(org=rows["acme"].id))

    totals = usage_totals(f)

    assert [
        (m.model_name, m.requests, m.input_tokens, m.output_tokens) for m in totals.by_model
    ] == [
        (CHAT, 12, 700, 70),
        (EMBED, 5, 300, 0),
    ]
    # 700 * 1/M + 70 * 2/M + 300 * 0.5/M, exact
    assert totals.charges == Decimal("0.00099")


@pytest.mark.parametrize(
    ("query", "param", "message"),
    [
        ({"start": "yesterday"}, "start", "start must be a date or date and time"),
        ({"end": "2026-13-01"}, "end", "end must be a date or date and time"),
        ({"start": "2026-10-02", "end": "2026-10-01"}, "end", "end must be after start"),
        ({"org": "org_nope"}, "org", "organization 'org_nope' does not exist"),
        ({"model": "m" * 201}, "model", "model must be at most 200 characters"),
    ],
)
def test_bad_filters_are_named(
    staff: Staff, rows: dict[str, Any], query: dict[str, str], param: str, message: str
) -> None:
    client = client_for(staff.support)

    page = client.get(URL, query)
    export = client.get(CSV_URL, query)

    assert page.status_code == 400
    assert escape(f"{param}: {message}") in page.content.decode()
    assert export.status_code == 400
    assert export.content.decode().startswith(f"{param}: {message}")
    with pytest.raises(InvalidInput) as caught:
        usage_filter_parse(query)
    assert caught.value.param == param


def test_csv_export_has_exactly_the_filtered_rows(staff: Staff, rows: dict[str, Any]) -> None:
    response = client_for(staff.support).get(CSV_URL, params(org=rows["acme"].id, model=CHAT))

    assert isinstance(response, StreamingHttpResponse)
    assert response.is_async is False  # WSGI: a plain generator
    assert response["Content-Type"] == "text/csv; charset=utf-8"
    assert response["Content-Disposition"] == (
        'attachment; filename="usage-20261001T0000-20261101T0000.csv"'
    )
    body = b"".join(response.streaming_content).decode()  # type: ignore[arg-type]
    assert list(csv.reader(io.StringIO(body))) == [
        [
            "hour",
            "organization_id",
            "project_id",
            "api_key_id",
            "endpoint_id",
            "model_name",
            "requests",
            "input_tokens",
            "output_tokens",
            "amount",
            "currency",
            "cached_input_tokens",  # added later: at the end, nothing before it moved
            "batch_requests",  # and the batch lines' part (billed at batch prices)
            "batch_input_tokens",
            "batch_output_tokens",
            "batch_cached_input_tokens",
            # and the priority and flex tiers' parts (billed at their multipliers), and
            # provisioned throughput's (0 per token)
            *(
                f"{tier}_{name}"
                for tier in ("priority", "flex", "provisioned")
                for name in ("requests", "input_tokens", "output_tokens", "cached_input_tokens")
            ),
            # and of relayed requests, the providers' charges and the estimated counts
            "cost_of_goods",
            "estimated_requests",
        ],
        [
            "2026-10-05T08:00:00Z",
            rows["acme"].id,
            "proj_a",
            "key_a",
            "ep-a",
            CHAT,
            "2",
            "100",
            "10",
            "",
            "",
            *["0"] * 17,
            "0.000000000",
            "0",
        ],
        [
            "2026-10-05T09:00:00Z",
            rows["acme"].id,
            "proj_a",
            "key_a",
            "ep-a",
            CHAT,
            "3",
            "200",
            "20",
            "",
            "",
            *["0"] * 17,
            "0.000000000",
            "0",
        ],
        [
            "2026-10-06T14:00:00Z",
            rows["acme"].id,
            "proj_b",
            "key_c",
            "ep-a",
            CHAT,
            "7",
            "400",
            "40",
            "",
            "",
            *["0"] * 17,
            "0.000000000",
            "0",
        ],
    ]


def test_csv_rows_carry_their_amount_at_the_organizations_prices(
    staff: Staff, rows: dict[str, Any]
) -> None:
    price_book(CHAT, "1", "2")  # per million tokens; EMBED has no price
    OverrideFactory(
        organization=rows["acme"], model_name=CHAT, token_kind="", discount_percent=Decimal("25")
    )
    response = client_for(staff.support).get(CSV_URL, params())
    body = b"".join(response.streaming_content).decode()  # type: ignore[attr-defined]
    table = list(csv.DictReader(io.StringIO(body)))
    got = {
        (r["organization_id"], r["model_name"], r["input_tokens"]): (r["amount"], r["currency"])
        for r in table
    }
    acme, other = rows["acme"].id, rows["other"].id
    assert got == {
        # 25% off for Acme: (100 * 1 + 10 * 2) / 1M * 0.75
        (acme, CHAT, "100"): ("0.000090000", "USD"),
        (acme, CHAT, "200"): ("0.000180000", "USD"),
        (acme, EMBED, "300"): ("", ""),
        (acme, CHAT, "400"): ("0.000360000", "USD"),
        # list price for Globex: 1000 * 1 + 100 * 2
        (other, CHAT, "1000"): ("0.001200000", "USD"),
    }
    # The rows add up to what the page's totals charge Acme.
    totals = usage_totals(usage_filter_parse(params(org=acme)))
    assert sum(Decimal(a) for (org, _, _), (a, _) in got.items() if org == acme and a) == (
        totals.charges
    )


def test_cached_input_tokens_in_the_explorer_and_its_csv(staff: Staff) -> None:
    # 1,000 input tokens, 600 of them served from the prefix cache, at a cached price.
    price_book(CHAT, "1", "2")
    PriceFactory(model_name=CHAT, token_kind="cached_input", unit_price=Decimal("0.25"))
    acme = OrganizationFactory(name="Acme")
    RollupFactory(
        organization_id=acme.id, project_id="proj_a", api_key_id="key_a", endpoint_id="ep-a",
        model_name=CHAT, hour=T0, requests=2, input_tokens=1000, cached_input_tokens=600,
        output_tokens=100,
    )  # fmt: skip
    client = client_for(staff.support)

    page = client.get(URL, params(org=acme.id))
    export = client.get(CSV_URL, params(org=acme.id))

    totals = page.context["totals"]
    assert (totals.input_tokens, totals.cached_input_tokens, totals.output_tokens) == (
        1000,
        600,
        100,
    )
    assert [(m.model_name, m.input_tokens, m.cached_input_tokens) for m in totals.by_model] == [
        (CHAT, 1000, 600)
    ]
    # 400 uncached * 1/M + 600 cached * 0.25/M + 100 * 2/M (all 1,000 at 1/M: 0.0012)
    assert totals.charges == Decimal("0.00075")
    assert '<span data-testid="total-cached-input">600</span>' in page.content.decode()
    body = b"".join(export.streaming_content).decode()  # type: ignore[attr-defined]
    [row] = list(csv.DictReader(io.StringIO(body)))
    assert (row["input_tokens"], row["cached_input_tokens"], row["amount"]) == (
        "1000",
        "600",
        "0.000750000",
    )


def test_cost_of_goods_in_the_explorer_and_its_csv(staff: Staff) -> None:
    """Relayed requests' cost beside the organization's charges; exact to the nano per row."""
    price_book(CHAT, "1", "2")
    acme = OrganizationFactory(name="Acme")
    RollupFactory(
        organization_id=acme.id, project_id="proj_a", api_key_id="key_a", endpoint_id="ep-a",
        model_name=CHAT, hour=T0, requests=3, input_tokens=1000, output_tokens=100,
        cost_nanos=600_001, estimated_requests=1,
    )  # fmt: skip
    RollupFactory(
        organization_id=acme.id, project_id="proj_a", api_key_id="key_a", endpoint_id="ep-a",
        model_name=CHAT, hour=T0 + timedelta(hours=1), requests=1, input_tokens=10,
    )  # fmt: skip
    client = client_for(staff.support)

    page = client.get(URL, params(org=acme.id))
    export = client.get(CSV_URL, params(org=acme.id))

    totals = page.context["totals"]
    assert (totals.charges, totals.cost, totals.estimated_requests) == (
        Decimal("0.00121"),  # 1,010 * 1/M + 100 * 2/M
        Decimal("0.000600001"),
        1,
    )
    body = page.content.decode()
    assert '<div class="bo-stat" data-testid="total-cost">0.00</div>' in body
    assert '<span data-testid="total-estimated">1</span> requests with estimated' in body
    text = b"".join(export.streaming_content).decode()  # type: ignore[attr-defined]
    table = list(csv.DictReader(io.StringIO(text)))
    assert [(r["amount"], r["cost_of_goods"], r["estimated_requests"]) for r in table] == [
        ("0.001200000", "0.000600001", "1"),
        ("0.000010000", "0.000000000", "0"),
    ]


@pytest.mark.parametrize("name", FORMULA_NAMES)
def test_the_csv_defuses_text_a_spreadsheet_would_run(staff: Staff, name: str) -> None:
    """Model names are the customer's; ids are not, but the rule is on every text cell."""
    org = OrganizationFactory(name=name)
    RollupFactory(
        organization_id=org.id, project_id=name, api_key_id=name, endpoint_id=name,
        model_name=name, hour=T0, requests=1, input_tokens=2, output_tokens=3,
    )  # fmt: skip

    response = client_for(staff.support).get(CSV_URL, params(org=org.id))

    body = b"".join(response.streaming_content).decode()  # type: ignore[attr-defined]
    table = list(csv.DictReader(io.StringIO(body, newline="")))
    assert len(table) == 1
    [row] = table
    for column in ("project_id", "api_key_id", "endpoint_id", "model_name"):
        assert row[column] == f"'{name}", column
    assert (row["organization_id"], row["requests"], row["input_tokens"]) == (org.id, "1", "2")


def test_the_page_links_the_export_with_the_same_filters(
    staff: Staff, rows: dict[str, Any]
) -> None:
    body = client_for(staff.support).get(URL, params(key="key_a")).content.decode()
    assert f"{CSV_URL}?key=key_a&amp;start=2026-10-01T00%3A00&amp;end=2026-11-01T00%3A00" in body


# --- A large range in bounded memory ------------------------------------------------------------

BIG_ROWS = 200_000
BIG_START = datetime(2025, 1, 1, tzinfo=UTC)
# One chunk of rows (2,000) and its text, with the price book's prices of the range's
# 4,000 hours, stay under this (6.0 MB measured before the batch columns, 6.3 MB with
# them: five more values a row; 7.2 MB with the tiers' and provisioned columns, 6.0 MB with
# the cost of goods columns and a fresh text buffer per chunk); the CSV of 200k rows is
# ~20 MB, and 200k model instances would take hundreds of MB.
MEMORY_BOUND = 7 * 1024 * 1024


def insert_big_range() -> None:
    # generate_series: 200k rows in one statement, 50 keys x 4,000 hours.
    with connection.cursor() as cursor:
        cursor.execute(
            """
            INSERT INTO billing_usagerollup (organization_id, project_id, api_key_id,
                endpoint_id, model_name, hour, requests, input_tokens, output_tokens, updated_at)
            SELECT 'org_big', 'proj_big', 'key_' || (g %% 50), 'ep-big', %s,
                   %s + (g / 50) * interval '1 hour', 1, g, 2 * g, now()
            FROM generate_series(0, %s - 1) AS g
            """,
            [CHAT, BIG_START, BIG_ROWS],
        )
    assert UsageRollup.objects.filter(organization_id="org_big").count() == BIG_ROWS


def big_query() -> dict[str, str]:
    return {"key": "", "start": "2025-01-01", "end": "2026-01-01", "endpoint": "ep-big"}


def test_a_large_export_streams_in_bounded_memory_under_asgi(staff: Staff) -> None:
    insert_big_range()
    price_book(CHAT, "1", "2")  # every row rated, within the same bound
    Price.objects.update(effective_from=BIG_START)
    client = AsyncClient()
    client.force_login(staff.support)
    mark_verified(client, staff.support)

    async def download() -> tuple[Any, int, int, bytes]:
        response = await client.get(CSV_URL, big_query())
        size = lines = 0
        last = b""  # the last chunk
        async for chunk in response.streaming_content:
            size += len(chunk)
            lines += chunk.count(b"\n")
            last = chunk
        return response, size, lines, last

    tracemalloc.start()
    try:
        response, size, lines, last = async_to_sync(download)()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert response.status_code == 200
    assert response.is_async is True  # the ASGI path: never read into a list first
    assert lines == BIG_ROWS + 1
    last_hour = BIG_START + timedelta(hours=(BIG_ROWS - 1) // 50)
    expected_last = (
        f"{last_hour:%Y-%m-%dT%H:%M:%SZ},org_big,proj_big,key_49,ep-big,{CHAT},1,199999,399998,"
        "0.999995000,USD" + ",0" * 17 + ",0.000000000,0"  # 199999 * 1/M + 399998 * 2/M;
    )  # no cached input tokens, no batch lines, no tier's requests, nothing relayed
    assert last.endswith(f"\n{expected_last}\n".encode())
    assert size > 2 * MEMORY_BOUND  # holding the output alone would break the bound
    assert peak < MEMORY_BOUND, f"peak {peak / 1e6:.1f} MB"


def test_filter_round_trips_through_its_params() -> None:
    f = UsageFilter(
        start=datetime(2026, 10, 1, tzinfo=UTC),
        end=datetime(2026, 10, 2, 6, tzinfo=UTC),
        organization_id="org_x",
        model_name=CHAT,
    )
    assert f.as_params() == {
        "org": "org_x",
        "model": CHAT,
        "start": "2026-10-01T00:00",
        "end": "2026-10-02T06:00",
    }
