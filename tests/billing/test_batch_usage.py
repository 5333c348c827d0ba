"""Batch prices: the usage of batch lines rated, invoiced, shown and counted at them.

Each unit has a `batch_` twin in the price book. A rollup's batch part (the drain's
`batch_*` columns, tests/billing/test_batch_metering.py) is billed at the batch price where
one applies, else at the online price, on its own line; a batch token never costs more
than an online one. Starter and compiled-model prices give every unit a batch price at
half its online price.
"""

from __future__ import annotations

import csv
import io
from datetime import date, timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.utils import timezone

from accounts.models import Organization
from accounts.permissions import Role
from accounts.principal import SYSTEM, Principal
from billing import wallet_keys
from billing.backoffice.selectors import usage_csv as backoffice_csv
from billing.backoffice.selectors import usage_filter_parse, usage_totals
from billing.invoicing import invoice_finalize, invoice_refresh_draft, month_spend
from billing.models import Invoice, Price, StripeCustomer, UsageRollup
from billing.payments import stripe_sync
from billing.payments.stripe_fake import FakeStripe
from billing.pricing import PriceBook, billed_quantities, price_set
from billing.starter_prices import batch_price, starter_prices_ensure
from billing.wallet import prices_compute, wallet_record_usage
from catalog.models import Model
from console.selectors import usage_report
from core.redis import get_redis
from tests.billing.factories import (
    CHAT,
    NO_TIER_TENSOR_UNITS,
    NO_TIER_TOKENS,
    CatalogModelFactory,
    OverrideFactory,
    PriceFactory,
    at,
    price_book,
    staff_principal,
    usage,
)
from tests.billing.stripe_support import use_fake_stripe
from tests.conftest import OrgWorld
from tests.console.support import org_url
from tests.factories import OrganizationFactory

pytestmark = pytest.mark.django_db

OCTOBER = {"start": "2026-10-01", "end": "2026-10-31"}


@pytest.fixture
def org() -> Organization:
    """CHAT lists at 1 (input) and 2 (output) per million; no batch price unless a test
    gives one."""
    price_book(CHAT, input_price="1", output_price="2")
    return OrganizationFactory()


@pytest.fixture
def staff() -> Principal:
    return staff_principal()


def list_price(kind: str, unit_price: str, **kwargs: Any) -> None:
    PriceFactory(model_name=CHAT, token_kind=kind, unit_price=Decimal(unit_price), **kwargs)


def batch_prices() -> None:
    """Half the online prices, and batch cached input tokens at a quarter of input."""
    list_price("batch_input", "0.5")
    list_price("batch_output", "1")
    list_price("batch_cached_input", "0.25")


BATCH_PARTS = ("requests", "input_tokens", "output_tokens", "compute_ms", "cached_input_tokens")


def batch_usage(org: Organization, when: Any, *, requests: int = 1, **fields: Any) -> UsageRollup:
    """A rollup of batch lines only: every count is also its batch part."""
    fields["requests"] = requests
    parts = {f"batch_{name}": value for name, value in fields.items() if name in BATCH_PARTS}
    return usage(org, when, **fields, **parts)


def lines_of(invoice: Invoice) -> list[tuple[str, str, int, Decimal | None, Decimal]]:
    return [
        (line.kind, line.label, line.quantity, line.unit_price, line.amount)
        for line in invoice.lines.order_by("position")
    ]


def charges(book: PriceBook, quantities: list[tuple[str, int]]) -> list[tuple[str, int, Any]]:
    rating = book.rate(CHAT, at(10, 5), quantities)
    return [(c.unit, c.quantity, c.price and c.price.unit_price) for c in rating.charges]


# --- the price book ------------------------------------------------------------------------


def test_starter_batch_prices_are_half_the_online_prices() -> None:
    for name in ("smollm2-135m-instruct", "all-minilm-l6-v2", "mantle-echo"):
        CatalogModelFactory(name=name)

    starter_prices_ensure(principal=SYSTEM)

    prices = {(p.model_name, p.token_kind): p.unit_price for p in Price.objects.all()}
    smollm = {kind: price for (name, kind), price in prices.items() if name.startswith("smol")}
    assert smollm == {
        "input": Decimal("0.05"),
        "output": Decimal("0.2"),
        "cached_input": Decimal("0.025"),
        "batch_input": Decimal("0.025"),
        "batch_output": Decimal("0.1"),
        "batch_cached_input": Decimal("0.0125"),
    }
    assert prices["all-minilm-l6-v2", "batch_input"] == Decimal("0.005")
    assert prices["mantle-echo", "batch_output"] == Decimal("0")  # free stays free


@pytest.mark.parametrize(
    ("online", "batch"),
    [("0.05", "0.025"), ("0.000000003", "0.000000002"), ("0.000000001", "0.000000001"), ("0", "0")],
)
def test_a_default_batch_price_is_rounded_up_never_to_free(online: str, batch: str) -> None:
    assert batch_price(Decimal(online)) == Decimal(batch)


def test_operators_set_batch_prices_like_any_price(staff: Principal) -> None:
    CatalogModelFactory(name=CHAT)
    start = timezone.now().replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)

    row = price_set(
        principal=staff, model_name=CHAT, token_kind="batch_cached_input", unit_price="0.01",
        effective_from=start, reason="batch pricing",
    )  # fmt: skip

    assert Price.objects.get(pk=row.pk).token_kind == "batch_cached_input"
    assert PriceBook.load(None).effective(CHAT, "batch_cached_input", start) is not None


# --- rating ----------------------------------------------------------------------------------


def test_a_rollups_batch_part_is_split_from_its_online_usage() -> None:
    # 1,000 input tokens: 600 of batch lines (200 of them cached), 300 cached in all.
    row = {"i": 1_000, "ci": 300, "o": 50, "r": 5, "c": 100}
    row |= {"bi": 600, "bci": 200, "bo": 30, "br": 2, "bc": 40}

    assert billed_quantities(row, "chat") == [
        ("input", 300),
        ("cached_input", 100),
        ("output", 20),
        ("batch_input", 400),
        ("batch_cached_input", 200),
        ("batch_output", 30),
        *NO_TIER_TOKENS,
    ]
    assert billed_quantities(row, "tensor") == [
        ("request", 3),
        ("compute_ms", 60),
        ("batch_request", 2),
        ("batch_compute_ms", 40),
        *NO_TIER_TENSOR_UNITS,
    ]


def test_batch_tokens_are_charged_at_the_batch_prices(org: Organization) -> None:
    batch_prices()
    book = PriceBook.load(org.id)

    quantities = [("batch_input", 400), ("batch_cached_input", 600), ("batch_output", 50)]
    assert charges(book, [("input", 100), *quantities]) == [
        ("input", 100, Decimal("1")),
        ("batch_input", 400, Decimal("0.5")),
        ("batch_cached_input", 600, Decimal("0.25")),
        ("batch_output", 50, Decimal("1")),
    ]  # fmt: skip


@pytest.mark.parametrize(
    "terms",
    [
        "no batch price",
        "a batch price above the online price",
        "a contract rate on input below the batch list price",
        "a discount on input alone that takes it below the batch price",
    ],
)
def test_without_a_batch_price_that_applies_batch_tokens_cost_the_online_price(
    org: Organization, terms: str
) -> None:
    if terms == "a batch price above the online price":
        list_price("batch_input", "1.5")
    elif terms == "a contract rate on input below the batch list price":
        list_price("batch_input", "0.5")
        OverrideFactory(
            organization=org, kind="rate", model_name=CHAT, token_kind="input",
            unit_price=Decimal("0.4"),
        )  # fmt: skip
    elif terms == "a discount on input alone that takes it below the batch price":
        list_price("batch_input", "0.5")
        OverrideFactory(
            organization=org, kind="discount", model_name=CHAT, token_kind="input",
            discount_percent=Decimal("60"),
        )  # fmt: skip
    book = PriceBook.load(org.id)
    online = book.effective(CHAT, "input", at(10, 5))
    assert online is not None

    rating = book.rate(CHAT, at(10, 5), [("input", 100), ("batch_input", 400)])

    # Never free, never dearer than online; still on a batch line of its own.
    assert [(c.unit, c.quantity, c.price) for c in rating.charges] == [
        ("input", 100, online),
        ("batch_input", 400, online),
    ]


@pytest.mark.parametrize(
    ("prices", "expected"),
    [
        # No batch cached price: they are batch input tokens (as cached tokens are input ones).
        ({"batch_input": "0.5"}, [("batch_input", 1_000, Decimal("0.5"))]),
        # ...unless an online cached token is cheaper: never dearer than one.
        (
            {"batch_input": "0.5", "cached_input": "0.1"},
            [("batch_input", 400, Decimal("0.5")), ("batch_cached_input", 600, Decimal("0.1"))],
        ),
        # A batch cached price above the batch input price: batch input tokens.
        (
            {"batch_input": "0.5", "batch_cached_input": "0.6"},
            [("batch_input", 1_000, Decimal("0.5"))],
        ),
        # Nothing of batch priced, nothing cached priced: the online input price.
        ({}, [("batch_input", 1_000, Decimal("1"))]),
    ],
    ids=["no-batch-cached-price", "online-cached-cheaper", "batch-cached-dearer", "none"],
)
def test_batch_cached_tokens_cost_the_cheapest_price_that_covers_them(
    org: Organization, prices: dict[str, str], expected: list[tuple[str, int, Decimal]]
) -> None:
    for kind, price in prices.items():
        list_price(kind, price)

    assert (
        charges(PriceBook.load(org.id), [("batch_input", 400), ("batch_cached_input", 600)])
        == expected
    )


def test_contract_terms_apply_to_batch_prices(org: Organization) -> None:
    batch_prices()
    rated, discounted = org, OrganizationFactory()
    OverrideFactory(
        organization=rated, kind="rate", model_name=CHAT, token_kind="batch_output",
        unit_price=Decimal("0.8"),
    )  # fmt: skip
    OverrideFactory(organization=discounted, kind="discount", discount_percent=Decimal("10"))

    mine = charges(PriceBook.load(rated.id), [("batch_output", 10)])
    theirs = charges(PriceBook.load(discounted.id), [("batch_output", 10)])

    assert (mine, theirs) == (
        [("batch_output", 10, Decimal("0.8"))],
        [("batch_output", 10, Decimal("0.9"))],
    )


# --- invoices ----------------------------------------------------------------------------------


def test_batch_usage_has_its_own_invoice_lines_each_rounded_once(org: Organization) -> None:
    batch_prices()
    # 3,010,000 input tokens, 2,010,000 of them of batch lines (1,000,000 of those cached);
    # 1,000,000 output tokens, all of batch lines.
    usage(
        org, at(10, 3), input_tokens=3_010_000, output_tokens=1_000_000, requests=10,
        batch_requests=4, batch_input_tokens=2_010_000, batch_output_tokens=1_000_000,
        cached_input_tokens=1_000_000, batch_cached_input_tokens=1_000_000,
    )  # fmt: skip

    invoice = invoice_refresh_draft(org=org, month=at(10))

    assert invoice is not None
    assert lines_of(invoice) == [
        ("usage", "chat-small batch cached input tokens", 1_000_000, Decimal("0.25"),
         Decimal("0.25")),
        # 1,010,000 at 0.5/M = 0.505 -> 0.50 (half-even, once, at the line)
        ("usage", "chat-small batch input tokens", 1_010_000, Decimal("0.5"), Decimal("0.50")),
        ("usage", "chat-small batch output tokens", 1_000_000, Decimal("1"), Decimal("1.00")),
        ("usage", "chat-small input tokens", 1_000_000, Decimal("1"), Decimal("1.00")),
    ]  # fmt: skip
    assert invoice.subtotal == Decimal("2.75")
    assert list(invoice.lines.values_list("token_kind", flat=True).order_by("position")) == [
        "batch_cached_input",
        "batch_input",
        "batch_output",
        "input",
    ]


def test_a_batch_price_from_mid_month_splits_the_batch_line_at_its_hour(
    org: Organization,
) -> None:
    list_price("batch_input", "0.5", effective_from=at(10, 15))
    batch_usage(org, at(10, 14, 23), input_tokens=1_000_000)
    batch_usage(org, at(10, 15, 0), input_tokens=1_000_000)

    invoice = invoice_refresh_draft(org=org, month=at(10))

    assert invoice is not None
    assert lines_of(invoice) == [
        # before the 15th at the online price, after it at the batch price
        ("usage", "chat-small batch input tokens from 2026-10-14 23:00 UTC", 1_000_000,
         Decimal("1"), Decimal("1.00")),
        ("usage", "chat-small batch input tokens from 2026-10-15 00:00 UTC", 1_000_000,
         Decimal("0.5"), Decimal("0.50")),
    ]  # fmt: skip


@pytest.mark.parametrize("with_batch_prices", [True, False])
def test_late_batch_usage_is_billed_once(
    org: Organization, staff: Principal, with_batch_prices: bool
) -> None:
    if with_batch_prices:
        batch_prices()
    batch_usage(org, at(8, 3), input_tokens=1_000_000)
    august = invoice_refresh_draft(org=org, month=at(8))
    assert august is not None
    invoice_finalize(principal=staff, invoice=august)
    batch_usage(org, at(8, 4), input_tokens=2_000_000, api_key_id="late")
    usage(org, at(9, 4), input_tokens=1_000_000)

    september = invoice_refresh_draft(org=org, month=at(9))
    assert september is not None
    invoice_finalize(principal=staff, invoice=september)
    october = invoice_refresh_draft(org=org, month=at(10))

    price = Decimal("0.5") if with_batch_prices else Decimal("1")
    assert [(kind, label, qty, p) for kind, label, qty, p, _ in lines_of(september)] == [
        ("usage", "chat-small input tokens", 1_000_000, Decimal("1")),
        ("adjustment", "adjustment: late usage for 2026-08: chat-small batch input tokens",
         2_000_000, price),
    ]  # fmt: skip
    assert october is None  # nothing left to bill, nothing billed twice


def test_batch_usage_nothing_prices_is_held_as_batch_units() -> None:
    org = OrganizationFactory()
    batch_usage(
        org, at(10, 3), model="no-price", input_tokens=1_000, cached_input_tokens=700,
        output_tokens=5,
    )  # fmt: skip

    invoice = invoice_refresh_draft(org=org, month=at(10))

    assert invoice is not None
    assert lines_of(invoice) == []
    held = invoice.held_usage.values_list("model_name", "token_kind", "quantity")
    assert sorted(held) == [("no-price", "batch_input", 1_000), ("no-price", "batch_output", 5)]


# --- where usage is shown --------------------------------------------------------------------


def mixed_october(org: Organization) -> None:
    """Online and batch usage of CHAT in October, at batch prices from the 10th."""
    for kind, price in (("batch_input", "0.5"), ("batch_output", "1")):
        list_price(kind, price, effective_from=at(10, 10))
    usage(org, at(10, 5), input_tokens=3_000_000, output_tokens=1_000, requests=3)
    batch_usage(org, at(10, 5), input_tokens=1_000_000, output_tokens=9, requests=2)
    batch_usage(org, at(10, 12), input_tokens=4_000_000, output_tokens=500_000, requests=5)


def test_the_consoles_money_for_a_month_is_the_invoices_subtotal(org: Organization) -> None:
    mixed_october(org)

    invoice = invoice_refresh_draft(org=org, month=at(10))
    report = usage_report(org, start=date(2026, 10, 1), end=date(2026, 10, 31), dimension="day")

    assert invoice is not None
    # online 3M at 1 and 1,000 at 2; batch 1M at 1 and 9 at 2 (before the 10th), then
    # 4M at 0.5 and 500,000 at 1
    assert invoice.subtotal == Decimal("6.50")
    assert report.total.cost == Decimal("6.502018")
    assert month_spend(org, at(10), exact=True) == report.total.cost
    assert report.total.batch_cost == Decimal("3.500018")
    total = report.total
    assert (total.requests, total.batch_requests) == (10, 7)
    assert (total.input_tokens, total.batch_input_tokens) == (8_000_000, 5_000_000)
    assert (total.output_tokens, total.batch_output_tokens) == (501_009, 500_009)


def test_batch_usage_on_the_console_page_and_in_its_csv(world: OrgWorld) -> None:
    price_book(CHAT, "1", "2")
    mixed_october(world.org)
    client = world.client_for(Role.VIEWER)

    page = client.get(org_url("console-usage", world.org.id), {**OCTOBER, "group": "model"})
    export = client.get(org_url("console-usage-csv", world.org.id), {**OCTOBER, "group": "model"})

    [row] = page.context["report"].rows
    assert row.batch_tokens == 5_500_009
    assert '<td class="num" data-testid="batch-tokens">5500009</td>' in page.content.decode()
    [line, total] = list(csv.DictReader(io.StringIO(export.content.decode())))
    assert line == total | {"model": CHAT, "id": CHAT}
    assert {k: v for k, v in line.items() if k.startswith("batch_") or k == "cost_usd"} == {
        "cost_usd": "6.502018000",
        "batch_requests": "7",
        "batch_input_tokens": "5000000",
        "batch_output_tokens": "500009",
        "batch_cached_input_tokens": "0",
        "batch_cost_usd": "3.500018000",
    }


def test_the_consoles_models_page_shows_batch_prices(world: OrgWorld) -> None:
    CatalogModelFactory(name=CHAT)
    price_book(CHAT, "1", "2")
    list_price("batch_input", "0.5")  # no batch output price: it is the online one

    page = world.client_for(Role.VIEWER).get(org_url("console-models", world.org.id))

    [entry] = [e for e in page.context["entries"] if e.model.name == CHAT]
    assert (entry.batch_input_price, entry.batch_output_price) == (Decimal("0.5"), None)
    assert 'data-testid="batch-input-price">batch $0.5000</small>' in page.content.decode()


def test_batch_usage_in_the_back_office_explorer_and_its_csv(org: Organization) -> None:
    mixed_october(org)
    f = usage_filter_parse({"org": org.id, "start": "2026-10-01", "end": "2026-11-01"})

    totals = usage_totals(f)
    rows = list(csv.DictReader(io.StringIO("".join(backoffice_csv(f)))))

    assert (totals.requests, totals.batch_requests) == (10, 7)
    assert (totals.input_tokens, totals.batch_input_tokens) == (8_000_000, 5_000_000)
    assert (totals.output_tokens, totals.batch_output_tokens) == (501_009, 500_009)
    [model] = totals.by_model
    assert (model.batch_requests, model.batch_input_tokens, model.batch_output_tokens) == (
        7,
        5_000_000,
        500_009,
    )
    assert totals.charges == Decimal("6.502018")
    got = [
        (r["hour"], r["requests"], r["batch_requests"], r["batch_input_tokens"], r["amount"])
        for r in rows
    ]
    assert sorted(got) == [
        # the online and batch rollups of the 5th (one row each, as the factory wrote them)
        ("2026-10-05T00:00:00Z", "2", "2", "1000000", "1.000018000"),
        ("2026-10-05T00:00:00Z", "3", "0", "0", "3.002000000"),
        ("2026-10-12T00:00:00Z", "5", "5", "4000000", "2.500000000"),
    ]
    assert sum(Decimal(r["amount"]) for r in rows) == totals.charges


def test_stripe_meter_events_carry_batch_units(world: OrgWorld, settings: Any) -> None:
    fake: FakeStripe = use_fake_stripe(settings)
    Model.objects.create(name="chat", kind=Model.Kind.CHAT, context_length=2048)
    since = timezone.now() - timedelta(days=1)
    for kind, price in (("input", "1"), ("output", "2"), ("batch_input", "0.5")):
        Price.objects.create(
            model_name="chat", token_kind=kind, unit_price=Decimal(price), effective_from=since
        )
    hour = timezone.now().replace(minute=0, second=0, microsecond=0) - timedelta(hours=2)
    UsageRollup.objects.create(
        organization_id=world.org.id, project_id="proj_x", api_key_id="k1", endpoint_id="ep-x",
        model_name="chat", hour=hour, requests=3, input_tokens=1_000, output_tokens=70,
        batch_requests=2, batch_input_tokens=600, batch_output_tokens=50,
    )  # fmt: skip

    assert stripe_sync.stripe_meter_push_hour(hour=hour) == 4

    mine = StripeCustomer.objects.get(organization=world.org).stripe_customer_id
    kinds = ("input", "output", "batch_input", "batch_output")
    assert {k: fake.meter_total(customer_id=mine, model="chat", kind=k) for k in kinds} == {
        "input": 400,
        "output": 20,
        "batch_input": 600,
        # no batch output price: the online one, still sent as batch output (the invoice's line)
        "batch_output": 50,
    }


# --- the wallet ---------------------------------------------------------------------------------


def test_the_price_hash_carries_the_batch_prices_or_else_the_online_ones(
    org: Organization,
) -> None:
    batch_prices()
    other = OrganizationFactory()
    OverrideFactory(
        organization=other, kind="rate", model_name=CHAT, token_kind="output",
        unit_price=Decimal("0.2"),
    )  # fmt: skip

    mine, theirs = prices_compute(org.id)[CHAT], prices_compute(other.id)[CHAT]

    assert (mine.batch_input, mine.batch_output, mine.batch_cached_input) == ("500", "1000", "250")
    # The contract's output rate is below the batch list price: batch lines cost it too.
    assert (theirs.batch_input, theirs.batch_output, theirs.batch_cached_input) == (
        "500",
        "200",
        "250",
    )
    assert (mine.batch_request, mine.batch_compute_ms) == ("0", "0")  # a text model


def test_the_drain_counts_a_batch_line_at_the_batch_prices(org: Organization) -> None:
    batch_prices()

    cost = wallet_record_usage(
        organization_id=org.id, model_name=CHAT, input_tokens=1_000, cached_input_tokens=600,
        output_tokens=10, request_id="req_batch", service_class="batch",
    )  # fmt: skip
    online = wallet_record_usage(
        organization_id=org.id, model_name=CHAT, input_tokens=1_000, cached_input_tokens=600,
        output_tokens=10, request_id="req_online",
    )  # fmt: skip

    assert cost == 400 * 500 + 600 * 250 + 10 * 1000
    assert online == 1_000 * 1000 + 10 * 2000  # no online cached price: input tokens
    assert get_redis().hget(wallet_keys.price_key(org.id, CHAT), "bcin") == "250"
