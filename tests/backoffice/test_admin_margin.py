"""The margin page: revenue (the invoices' rating), cost of goods of relayed requests,
margin per model and per organization; its CSV; who may see it."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.contrib.auth.models import Group, Permission
from django.urls import reverse
from django.utils import timezone
from django.utils.html import escape

from billing import staff_roles as roles
from billing.backoffice.adminsite import sidebar_navigation
from billing.backoffice.selectors import MARGIN_CSV_COLUMNS, margin, usage_filter_parse
from billing.invoicing import invoice_refresh_draft
from billing.periods import month_start
from tests.backoffice.support import Staff, client_for, staff_user
from tests.billing.factories import CHAT, OverrideFactory, RollupFactory, price_book
from tests.core.test_csv_export import FORMULA_NAMES
from tests.factories import OrganizationFactory

pytestmark = pytest.mark.django_db

RELAY = "gpt-relay"  # a model served by an upstream provider
UNPRICED = "no-price"
T0 = datetime(2026, 10, 5, 8, tzinfo=UTC)
URL = reverse("admin:backoffice-margin")
CSV_URL = reverse("admin:backoffice-margin-csv")
OCTOBER = {"start": "2026-10-01", "end": "2026-11-01"}
BILLION = 1_000_000_000


def rollup(org: Any, model: str, hours: int, requests: int, i: int, o: int, **extra: Any) -> None:
    RollupFactory(
        organization_id=org.id,
        project_id="proj",
        api_key_id="key",
        endpoint_id="ep",
        model_name=model,
        hour=T0 + timedelta(hours=hours),
        requests=requests,
        input_tokens=i,
        output_tokens=o,
        **extra,
    )


@pytest.fixture
def world(db: None) -> dict[str, Any]:
    """Two organizations' October: a pool model and a relayed one, a contract discount, an
    unpriced model, and usage of November that the period leaves out.

    Prices per million: CHAT 1 input / 2 output, RELAY 3 / 6 (Acme 25% off RELAY).
    """
    price_book(CHAT, "1", "2")
    price_book(RELAY, "3", "6")
    acme = OrganizationFactory(name="Acme")
    globex = OrganizationFactory(name="Globex")
    OverrideFactory(organization=acme, model_name=RELAY, token_kind="", discount_percent=25)
    # Acme CHAT: 1 + 1 = 2.00 revenue, 1.50 cost (say, a provider fallback), 2 estimated
    rollup(acme, CHAT, 0, 10, 1_000_000, 500_000, cost_nanos=3 * BILLION // 2, estimated_requests=2)
    # Acme RELAY: (6 + 6) * 0.75 = 9.00 revenue, 10.00 cost: a loss
    rollup(acme, RELAY, 1, 4, 2_000_000, 1_000_000, cost_nanos=10 * BILLION)
    # Globex CHAT on the pool: 0.50 revenue, no cost
    rollup(globex, CHAT, 2, 5, 500_000, 0)
    # Globex RELAY: 3 + 6 = 9.00 revenue, 4.50 cost, counts estimated
    rollup(
        globex, RELAY, 30, 1, 1_000_000, 1_000_000,
        cost_nanos=9 * BILLION // 2, estimated_requests=1,
    )  # fmt: skip
    # Globex's unpriced model: no revenue, 0.25 cost
    rollup(globex, UNPRICED, 3, 2, 1_000, 1_000, cost_nanos=BILLION // 4)
    # November: outside the period
    rollup(acme, RELAY, 24 * 30, 9, 9_000_000, 0, cost_nanos=99 * BILLION)
    return {"acme": acme, "globex": globex}


def figures(line: Any) -> tuple[Any, ...]:
    return (
        line.requests,
        line.estimated_requests,
        line.revenue,
        line.cost,
        line.margin,
        line.margin_percent,
    )


def test_margin_per_model_and_organization_is_revenue_less_cost(world: dict[str, Any]) -> None:
    m = margin(usage_filter_parse(OCTOBER))

    d = Decimal
    assert [(x.model_name, *figures(x)) for x in m.by_model] == [
        (RELAY, 5, 1, d("18"), d("14.5"), d("3.5"), d("19.44")),
        (CHAT, 15, 2, d("2.5"), d("1.5"), d("1.0"), d("40.00")),
        (UNPRICED, 2, 0, d("0"), d("0.25"), d("-0.25"), None),
    ]
    acme, globex = world["acme"], world["globex"]
    assert [(x.organization_id, x.organization_name, *figures(x)) for x in m.by_organization] == [
        (acme.id, "Acme", 14, 2, d("11"), d("11.5"), d("-0.5"), d("-4.55")),
        (globex.id, "Globex", 8, 1, d("9.5"), d("4.75"), d("4.75"), d("50.00")),
    ]
    assert figures(m.total) == (22, 3, d("20.5"), d("16.25"), d("4.25"), d("20.73"))
    assert m.total.unpriced_requests == 2
    for line in [*m.by_model, *m.by_organization, *m.lines, m.total]:
        assert line.margin == line.revenue - line.cost
    assert m.currency == "USD"


def test_revenue_is_what_the_invoices_bill(world: dict[str, Any]) -> None:
    """The page rates through PriceBook.rate_rollups like the invoice: a month's revenue of
    an organization is its invoice's subtotal (whole cents here, so no line rounds)."""
    m = margin(usage_filter_parse(OCTOBER))

    for line in m.by_organization:
        org = world["acme"] if line.organization_id == world["acme"].id else world["globex"]
        invoice = invoice_refresh_draft(org=org, month=T0)
        assert invoice is not None
        assert invoice.subtotal == line.revenue


def test_filters_narrow_the_margin_to_an_organization_or_a_model(world: dict[str, Any]) -> None:
    acme = world["acme"]
    only_acme = margin(usage_filter_parse({**OCTOBER, "org": acme.id}))
    only_relay = margin(usage_filter_parse({**OCTOBER, "model": RELAY}))

    assert [x.organization_id for x in only_acme.by_organization] == [acme.id]
    assert figures(only_acme.total)[2:4] == (Decimal("11"), Decimal("11.5"))
    assert [x.model_name for x in only_relay.by_model] == [RELAY]
    assert figures(only_relay.total)[2:4] == (Decimal("18"), Decimal("14.5"))


def test_the_period_defaults_to_this_month() -> None:
    price_book(RELAY, "3", "6")
    org = OrganizationFactory(name="Now")
    now = timezone.now()
    this_month = month_start(now)
    RollupFactory(
        organization_id=org.id, model_name=RELAY, hour=this_month, requests=1,
        input_tokens=1_000_000, cost_nanos=BILLION,
    )  # fmt: skip
    RollupFactory(
        organization_id=org.id, model_name=RELAY, hour=this_month - timedelta(hours=1),
        requests=1, input_tokens=1_000_000, cost_nanos=BILLION,
    )  # fmt: skip

    m = margin(usage_filter_parse({}, now=now))

    assert m.start == this_month
    assert figures(m.total)[:4] == (1, 0, Decimal("3"), Decimal("1"))


def test_the_page_shows_the_totals_and_both_tables(staff: Staff, world: dict[str, Any]) -> None:
    response = client_for(staff.billing_admin).get(URL, OCTOBER)

    assert response.status_code == 200
    body = response.content.decode()
    assert '<div class="bo-stat" data-testid="margin-revenue">20.50</div>' in body
    assert '<div class="bo-stat" data-testid="margin-cost">16.25</div>' in body
    assert '<div class="bo-stat" data-testid="margin-margin">4.25</div>' in body
    assert '<span data-testid="margin-percent">20.73</span>%' in body
    assert '<span data-testid="margin-estimated">3</span> with estimated counts' in body
    assert '<span data-testid="margin-unpriced">2</span> in hours without a price' in body
    assert (
        f'<tr><td>{RELAY}</td><td class="num">5</td><td class="num">1</td>'
        '<td class="num">18.00</td><td class="num">14.50</td><td class="num">3.50</td>'
        '<td class="num">19.44%</td></tr>'
    ) in body
    assert '<td class="num">-0.50</td><td class="num">-4.55%</td>' in body  # Acme's loss
    assert f"{CSV_URL}?start=2026-10-01T00%3A00&amp;end=2026-11-01T00%3A00" in body


def test_a_bad_period_is_named(staff: Staff) -> None:
    client = client_for(staff.support)
    query = {"start": "2026-10-02", "end": "2026-10-01"}

    page = client.get(URL, query)
    export = client.get(CSV_URL, query)

    assert page.status_code == 400
    assert escape("end: end must be after start") in page.content.decode()
    assert export.status_code == 400
    assert export.content.decode() == "end: end must be after start\n"


def test_the_csv_has_one_exact_row_per_organization_and_model(
    staff: Staff, world: dict[str, Any]
) -> None:
    response = client_for(staff.support).get(CSV_URL, OCTOBER)

    assert response.status_code == 200
    assert response["Content-Type"] == "text/csv; charset=utf-8"
    assert response["Content-Disposition"] == (
        'attachment; filename="margin-20261001T0000-20261101T0000.csv"'
    )
    table = list(csv.reader(io.StringIO(response.content.decode())))
    assert table[0] == list(MARGIN_CSV_COLUMNS)
    acme, globex = world["acme"].id, world["globex"].id
    expected = [
        # org, name, model, requests, estimated, revenue, cost, margin, %, currency, unpriced
        [acme, "Acme", CHAT, "10", "2", "2.000000000", "1.500000000", "0.500000000", "25.00"],
        [acme, "Acme", RELAY, "4", "0", "9.000000000", "10.000000000", "-1.000000000", "-11.11"],
        [globex, "Globex", CHAT, "5", "0", "0.500000000", "0.000000000", "0.500000000", "100.00"],
        [globex, "Globex", RELAY, "1", "1", "9.000000000", "4.500000000", "4.500000000", "50.00"],
        [globex, "Globex", UNPRICED, "2", "0", "0.000000000", "0.250000000", "-0.250000000", ""],
    ]
    unpriced = {UNPRICED: "2"}
    assert sorted(table[1:]) == sorted([*row, "USD", unpriced.get(row[2], "0")] for row in expected)
    # The rows add up to the page's totals.
    total = margin(usage_filter_parse(OCTOBER)).total
    assert sum(Decimal(r[5]) for r in table[1:]) == total.revenue
    assert sum(Decimal(r[6]) for r in table[1:]) == total.cost
    assert sum(Decimal(r[7]) for r in table[1:]) == total.margin


def test_the_csv_keeps_a_revenue_below_the_cent_exact(staff: Staff) -> None:
    price_book(RELAY, "3", "6")
    org = OrganizationFactory(name="Tiny")
    # 7 input tokens at 3/M = 0.000021; the provider charged 13 nanos.
    RollupFactory(
        organization_id=org.id, model_name=RELAY, hour=T0, requests=1, input_tokens=7,
        cost_nanos=13,
    )  # fmt: skip

    response = client_for(staff.support).get(CSV_URL, OCTOBER)

    [row] = list(csv.DictReader(io.StringIO(response.content.decode())))
    assert (row["revenue"], row["cost_of_goods"], row["margin"], row["margin_percent"]) == (
        "0.000021000",
        "0.000000013",
        "0.000020987",
        "99.94",
    )


@pytest.mark.parametrize("name", FORMULA_NAMES)
def test_the_csv_defuses_names_a_spreadsheet_would_run(staff: Staff, name: str) -> None:
    """Organization and model names are the customer's."""
    org = OrganizationFactory(name=name)
    RollupFactory(organization_id=org.id, model_name=name, hour=T0, requests=1, cost_nanos=5)

    response = client_for(staff.support).get(CSV_URL, {**OCTOBER, "org": org.id})

    table = list(csv.DictReader(io.StringIO(response.content.decode(), newline="")))
    [row] = table
    org.refresh_from_db()  # the name as stored (leading whitespace is trimmed)
    assert (row["organization_name"], row["model_name"]) == (f"'{org.name}", f"'{name}")
    assert (row["organization_id"], row["requests"], row["cost_of_goods"]) == (
        org.id,
        "1",
        "0.000000005",
    )


# --- Who may see it --------------------------------------------------------------------------


@pytest.mark.parametrize("role", ["billing_admin", "support", "superuser"])
def test_roles_that_see_revenue_see_the_margin(
    staff: Staff, world: dict[str, Any], role: str
) -> None:
    client = client_for(getattr(staff, role))

    assert client.get(URL, OCTOBER).status_code == 200
    assert client.get(CSV_URL, OCTOBER).status_code == 200


def test_a_role_without_revenue_gets_403(staff: Staff, world: dict[str, Any]) -> None:
    """Staff in no role, and a role that reads customers and invoices but not the usage
    revenue is rated from: refused, page and CSV, and no link in the sidebar."""
    readers = Group.objects.create(name="invoice readers")
    readers.permissions.set(
        Permission.objects.filter(
            codename__in=["view_organization", "view_invoice", "view_invoiceline"]
        )
    )
    reader = staff_user("invoice readers")
    for user in (staff.no_role, reader):
        assert not user.has_perm(roles.VIEW_REVENUE)
        client = client_for(user)
        page = client.get(URL, OCTOBER)
        export = client.get(CSV_URL, OCTOBER)
        assert (page.status_code, export.status_code) == (403, 403)
        assert "Acme" not in export.content.decode()


@pytest.mark.parametrize("who", ["customer", "anonymous"])
def test_customers_never_reach_the_margin(staff: Staff, who: str) -> None:
    client = client_for(staff.customer if who == "customer" else None)

    for url in (URL, CSV_URL):
        response = client.get(url)
        assert response.status_code == 302
        assert response["Location"].startswith(f"{reverse('admin:login')}?next=")


def test_the_sidebar_links_the_margin_for_roles_that_see_revenue(staff: Staff, rf: Any) -> None:
    def margin_item(user: Any) -> dict[str, Any]:
        request = rf.get("/admin/")
        request.user = user
        [section] = sidebar_navigation(request)
        [item] = [i for i in section["items"] if i["title"] == "Margin"]
        return item

    for user, shown in ((staff.support, True), (staff.billing_admin, True), (staff.no_role, False)):
        item = margin_item(user)
        assert item["link"] == URL
        assert item["permission"](None) is shown
