"""Provisioned throughput in billing: commitments sold, changed and ended (history kept,
audited), written for the gateway, billed per unit-hour whether used or not, and usage
within the units at nothing per token (docs/provisioned.md)."""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.utils import timezone

from accounts.models import AuditLog, Organization
from accounts.principal import SYSTEM, Principal
from billing import provisioned
from billing.invoicing import invoice_refresh_draft
from billing.models import Invoice, ProvisionedCommitment
from billing.periods import hour_start, month_start
from billing.pricing import PriceBook
from billing.wallet import prices_compute, wallet_record_usage
from catalog.models import Endpoint
from catalog.services import endpoint_create
from core.errors import Conflict, InvalidInput, NotFound
from core.redis import get_redis
from tests.billing.factories import CHAT, at, price_book, staff_principal, usage
from tests.factories import UNSERVED_ENCODER, OrganizationFactory, make_model_version, make_pool

pytestmark = pytest.mark.django_db


@pytest.fixture
def staff() -> Principal:
    return staff_principal()


@pytest.fixture
def org() -> Organization:
    price_book(CHAT, input_price="1", output_price="2")
    return OrganizationFactory()


def endpoint_of(org: Organization, name: str = "chat", pool: str = "prov-pool") -> Endpoint:
    version = make_model_version(org, UNSERVED_ENCODER, model_name=f"{name}-{org.id}")
    return endpoint_create(
        principal=SYSTEM, org=org, name=name, model_version_id=version.id, pool=make_pool(pool).name
    )


def next_hour(hours: int = 1) -> datetime:
    return hour_start(timezone.now()) + timedelta(hours=hours)


def sell(staff: Principal, org: Organization, endpoint: Endpoint, **kwargs: Any) -> Any:
    kwargs.setdefault("units", 3)
    kwargs.setdefault("unit_hour_price", "2.5")
    kwargs.setdefault("starts_at", next_hour())
    kwargs.setdefault("reason", "Q1 contract")
    kwargs.setdefault("tokens_per_minute_per_unit", 600)
    return provisioned.commitment_create(
        principal=staff, org=org, endpoint_id=endpoint.id, **kwargs
    )


# --- selling, changing, ending --------------------------------------------------------------


def test_an_operator_sells_units_of_an_endpoint_audited(
    staff: Principal, org: Organization
) -> None:
    endpoint = endpoint_of(org)

    row = sell(staff, org, endpoint, overflow="refuse")

    assert (row.units, row.unit_hour_price, row.overflow) == (3, Decimal("2.5"), "refuse")
    assert row.model_name == endpoint.model_version.model.name
    assert row.tokens_per_minute_per_unit == 600
    entry = AuditLog.objects.get(action="billing.provisioned_create")
    assert entry.metadata["units"] == 3 and entry.organization_id == org.id


def test_bad_commitments_are_refused_naming_what_is_wrong(
    staff: Principal, org: Organization
) -> None:
    endpoint = endpoint_of(org)
    other = endpoint_of(OrganizationFactory(), name="theirs")
    cases: list[tuple[dict[str, Any], str]] = [
        ({"units": 0}, "units"),
        ({"units": 10_001}, "units"),
        ({"unit_hour_price": "-1"}, "unit_hour_price"),
        ({"overflow": "queue"}, "overflow"),
        ({"starts_at": next_hour(-2)}, "must not be in the past"),
        ({"starts_at": next_hour() + timedelta(minutes=30)}, "whole UTC hour"),
        ({"ends_at": next_hour()}, "ends_at must be after starts_at"),
        ({"reason": " "}, "reason"),
    ]
    for given, message in cases:
        with pytest.raises(InvalidInput) as error:
            sell(staff, org, endpoint, **given)
        assert message in error.value.message, given
    with pytest.raises(NotFound):  # another organization's endpoint
        sell(staff, org, other)
    sell(staff, org, endpoint)
    with pytest.raises(Conflict):  # one commitment per organization and endpoint at a time
        sell(staff, org, endpoint, starts_at=next_hour(5))
    assert ProvisionedCommitment.objects.count() == 1


def test_a_change_ends_the_row_and_starts_its_successor_and_an_end_is_an_end(
    staff: Principal, org: Organization
) -> None:
    endpoint = endpoint_of(org)
    first = sell(staff, org, endpoint)

    second = provisioned.commitment_change(
        principal=staff, commitment=first, at=next_hour(3), units=5, reason="more"
    )
    first.refresh_from_db()

    assert (first.ends_at, second.starts_at, second.units) == (next_hour(3), next_hour(3), 5)
    assert (second.unit_hour_price, second.overflow) == (first.unit_hour_price, first.overflow)
    ended = provisioned.commitment_end(
        principal=staff, commitment=second, at=next_hour(10), reason="churned"
    )
    assert ended.ends_at == next_hour(10)
    with pytest.raises(Conflict):
        provisioned.commitment_end(principal=staff, commitment=ended, at=next_hour(20), reason="x")
    actions = set(AuditLog.objects.values_list("action", flat=True))
    assert {"billing.provisioned_change", "billing.provisioned_end"} <= actions


# --- what the gateway reads ------------------------------------------------------------------


def test_the_sync_writes_commitments_in_effect_and_removes_ended_ones(
    staff: Principal, org: Organization
) -> None:
    endpoint = endpoint_of(org)
    row = sell(staff, org, endpoint, starts_at=next_hour())
    client = get_redis()

    provisioned.provisioned_sync(now=next_hour())

    raw = client.hget(provisioned.endpoint_key(endpoint.id), org.id)
    found = provisioned.Entitlement.decode(raw)
    assert found is not None and found.units == 3 and found.overflow == "spill"
    assert found.active(next_hour().timestamp() + 1)
    assert not found.active(next_hour().timestamp() - 1)  # not before it starts
    pool = client.hgetall(provisioned.pool_key(endpoint.pool.name))
    assert list(pool) == [f"{endpoint.id}:{org.id}"]
    # Ended: the next sync removes it.
    ProvisionedCommitment.objects.filter(pk=row.pk).update(ends_at=next_hour(2))
    provisioned.provisioned_sync(now=next_hour(3))
    assert not client.exists(provisioned.endpoint_key(endpoint.id))
    assert not client.exists(provisioned.pool_key(endpoint.pool.name))


# --- money -----------------------------------------------------------------------------------


def test_usage_within_the_units_costs_nothing_per_token(org: Organization) -> None:
    assert prices_compute(org.id)[CHAT].for_class("provisioned").input == "0"
    cost = wallet_record_usage(
        organization_id=org.id, model_name=CHAT, input_tokens=1_000, output_tokens=10,
        request_id="req_prov", service_class="provisioned",
    )  # fmt: skip
    assert cost == 0
    book = PriceBook.load(org.id)
    [charge] = book.rate(CHAT, at(10, 5), [("provisioned_input", 1_000_000)]).charges
    assert charge.price is not None and charge.price.unit_price == 0


def lines_of(invoice: Invoice) -> list[tuple[str, str, int, Decimal | None, Decimal]]:
    return [
        (line.kind, line.label, line.quantity, line.unit_price, line.amount)
        for line in invoice.lines.order_by("position")
    ]


def test_unit_hours_are_billed_used_or_not_on_their_own_lines(
    staff: Principal, org: Organization
) -> None:
    endpoint = endpoint_of(org)
    # Sold in the past (written directly: the service refuses past hours), 3 units for
    # 10 hours of October, then 5 units from the 2nd at 06:00 to the 2nd at 08:00.
    common = {
        "organization": org,
        "endpoint": endpoint,
        "model_name": "chat-model",
        "tokens_per_minute_per_unit": 600,
        "unit_hour_price": Decimal("2.5"),
        "reason": "test",
    }
    ProvisionedCommitment.objects.create(
        units=3, starts_at=at(10, 1, 20), ends_at=at(10, 2, 6), **common
    )
    ProvisionedCommitment.objects.create(
        units=5, starts_at=at(10, 2, 6), ends_at=at(10, 2, 8), **common
    )
    # Usage within the units: 0 per token, on its own line.
    usage(org, at(10, 1, 21), input_tokens=1_000_000, provisioned_input_tokens=1_000_000)

    invoice = invoice_refresh_draft(org=org, month=at(10))

    assert invoice is not None
    assert lines_of(invoice) == [
        ("usage", "chat-small provisioned input tokens", 1_000_000, Decimal("0"), Decimal("0.00")),
        ("provisioned", "provisioned throughput: chat-model (chat), 3 units x 10 h from "
         "2026-10-01 20:00 UTC", 30, Decimal("2.5"), Decimal("75.00")),
        ("provisioned", "provisioned throughput: chat-model (chat), 5 units x 2 h from "
         "2026-10-02 06:00 UTC", 10, Decimal("2.5"), Decimal("25.00")),
    ]  # fmt: skip
    assert invoice.subtotal == Decimal("100.00")


def test_a_commitment_alone_makes_a_draft_and_a_current_month_bills_hours_begun(
    staff: Principal, org: Organization
) -> None:
    endpoint = endpoint_of(org)
    now = timezone.now()
    ProvisionedCommitment.objects.create(
        organization=org, endpoint=endpoint, model_name="m", units=2,
        tokens_per_minute_per_unit=600, unit_hour_price=Decimal("1"), reason="t",
        starts_at=month_start(now),
    )  # fmt: skip

    invoice = invoice_refresh_draft(org=org, month=now)

    assert invoice is not None
    [line] = invoice.lines.all()
    begun = int((now - month_start(now)).total_seconds() // 3600) + 1
    assert (line.kind, line.quantity) == ("provisioned", 2 * begun)


def test_utilization_counts_units_in_use_and_tokens_within_them(
    staff: Principal, org: Organization
) -> None:
    endpoint = endpoint_of(org)
    now = timezone.now()
    row = ProvisionedCommitment.objects.create(
        organization=org, endpoint=endpoint, model_name="m", units=4,
        tokens_per_minute_per_unit=600, unit_hour_price=Decimal("1"), reason="t",
        starts_at=hour_start(now) - timedelta(hours=5),
    )  # fmt: skip
    client = get_redis()
    key = provisioned.inflight_key(endpoint.id, org.id)
    client.zadd(key, {"r1": now.timestamp() + 60, "r2": now.timestamp() + 60, "old": 1})
    usage(
        org, hour_start(now), input_tokens=5_000, output_tokens=1_000,
        provisioned_input_tokens=3_000, provisioned_output_tokens=1_000,
        endpoint_id=endpoint.id,
    )  # fmt: skip

    [found] = provisioned.utilization(org, now=now)

    assert found.commitment == row
    assert found.in_flight == 2  # the expired place is not counted
    assert found.tokens == 4_000
    assert found.guaranteed == int(4 * 600 * found.minutes)


# --- the back office and the console ---------------------------------------------------------


def test_billing_admins_sell_change_and_end_units_from_the_customer_page() -> None:
    from django.urls import reverse

    from tests.backoffice.support import client_for, make_staff

    staff = make_staff()
    org = OrganizationFactory()
    endpoint = endpoint_of(org)
    admin = client_for(staff.billing_admin)
    customer = reverse("admin:backoffice-customer", args=[org.id])
    start = next_hour().strftime("%Y-%m-%dT%H:%M")

    sold = admin.post(
        reverse("admin:backoffice-commitment-new", args=[org.id]),
        {"endpoint_id": endpoint.id, "units": "2", "unit_hour_price": "4", "overflow": "spill",
         "tokens_per_minute_per_unit": "600", "starts_at": start, "reason": "deal",
         "form_token": "token-prov-1"},
    )  # fmt: skip
    assert sold.status_code == 302, sold.context["form"].errors
    row = ProvisionedCommitment.objects.get(organization=org)
    assert (row.units, row.unit_hour_price, row.created_by_id) == (
        2,
        Decimal("4"),
        staff.billing_admin.id,
    )
    page = admin.get(customer).content.decode()
    assert 'data-testid="provisioned"' in page and endpoint.name in page
    changed = admin.post(
        reverse("admin:backoffice-commitment-change", args=[row.id]),
        {"at": next_hour(2).strftime("%Y-%m-%dT%H:%M"), "units": "6", "reason": "more",
         "form_token": "token-prov-2"},
    )  # fmt: skip
    assert changed.status_code == 302
    successor = ProvisionedCommitment.objects.get(organization=org, ends_at__isnull=True)
    assert successor.units == 6
    ended = admin.post(
        reverse("admin:backoffice-commitment-end", args=[successor.id]),
        {
            "at": next_hour(5).strftime("%Y-%m-%dT%H:%M"),
            "reason": "churn",
            "form_token": "token-prov-3",
        },
    )
    assert ended.status_code == 302
    successor.refresh_from_db()
    assert successor.ends_at == next_hour(5)
    # Support staff read, never sell.
    support = client_for(staff.support)
    refused = support.post(
        reverse("admin:backoffice-commitment-new", args=[org.id]),
        {"endpoint_id": endpoint.id, "units": "1", "unit_hour_price": "1", "overflow": "spill",
         "starts_at": start, "reason": "x", "form_token": "token-prov-4"},
    )  # fmt: skip
    assert refused.status_code == 403
    assert ProvisionedCommitment.objects.count() == 2


def test_the_consoles_usage_page_shows_the_units_in_use(staff: Principal, world: Any) -> None:
    from accounts.permissions import Role
    from tests.console.support import org_url

    endpoint = endpoint_of(world.org)
    ProvisionedCommitment.objects.create(
        organization=world.org, endpoint=endpoint, model_name="m", units=3,
        tokens_per_minute_per_unit=600, unit_hour_price=Decimal("1"), reason="t",
        starts_at=hour_start(timezone.now()) - timedelta(hours=2),
    )  # fmt: skip
    get_redis().zadd(
        provisioned.inflight_key(endpoint.id, world.org.id), {"r1": timezone.now().timestamp() + 60}
    )

    page = world.client_for(Role.VIEWER).get(org_url("console-usage", world.org.id))

    assert page.status_code == 200
    body = page.content.decode()
    assert 'data-testid="provisioned"' in body
    assert '<td class="num" data-testid="units-in-use">1 of 3</td>' in body


def test_budgets_and_the_prepaid_balance_count_the_unit_hours(org: Organization) -> None:
    from billing.invoicing import month_spend, unbilled_usage

    endpoint = endpoint_of(org)
    now = timezone.now()
    ProvisionedCommitment.objects.create(
        organization=org, endpoint=endpoint, model_name="m", units=2,
        tokens_per_minute_per_unit=600, unit_hour_price=Decimal("1.5"), reason="t",
        starts_at=month_start(now),
    )  # fmt: skip
    begun = int((now - month_start(now)).total_seconds() // 3600) + 1

    assert month_spend(org, now, exact=True) == Decimal(2 * begun) * Decimal("1.5")
    assert unbilled_usage(org) == Decimal(2 * begun) * Decimal("1.5")
    # A project's budget counts its own usage only: units are the organization's.
    project = org.projects.get(is_default=True)
    assert month_spend(org, now, project_id=project.id, exact=True) == 0
