"""The price book in the back office: new prices, history, a change mid-month, overrides."""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.urls import reverse
from django.utils import timezone

from accounts.models import AuditLog, Organization
from billing.invoicing import invoice_refresh_draft
from billing.models import Invoice, Price, PriceOverride
from billing.periods import hour_start
from billing.pricing import price_lookup
from core.errors import Conflict
from tests.backoffice.support import Staff, client_for, invoice_in, last_month
from tests.billing.factories import CHAT, usage
from tests.factories import OrganizationFactory

pytestmark = pytest.mark.django_db

NEW_PRICE = reverse("admin:backoffice-price-new")


def change_hour() -> datetime:
    """A whole hour soon, with the hour before it in the same month (a mid-month change)."""
    at = hour_start(timezone.now()) + timedelta(hours=2)
    if (at - timedelta(hours=1)).month != at.month:
        at += timedelta(hours=1)
    return at


def local(at: datetime) -> str:
    return at.strftime("%Y-%m-%dT%H:%M")


def post_price(client: Any, token: str, **data: str) -> Any:
    return client.post(
        NEW_PRICE,
        {
            "model_name": CHAT,
            "token_kind": "input",
            "unit_price": "3",
            "effective_from": local(change_hour()),
            "reason": "new hardware costs",
            "form_token": token,
            **data,
        },
    )


def lines_of(inv: Invoice) -> list[tuple[str, int, Decimal | None, Decimal]]:
    return list(
        inv.lines.order_by("position").values_list("label", "quantity", "unit_price", "amount")
    )


def test_a_price_change_mid_month_splits_the_month_and_leaves_finalized_invoices(
    staff: Staff,
) -> None:
    november = invoice_in("finalized")  # last month, at 1 and 2 per million: 3.00
    org = november.organization
    billed = (lines_of(november), november.total, november.number)
    at = change_hour()
    usage(org, at - timedelta(hours=1), input_tokens=1_000_000)
    usage(org, at, input_tokens=1_000_000)

    response = post_price(client_for(staff.billing_admin), "price-token-1")

    assert response.status_code == 302
    row = Price.objects.get(model_name=CHAT, token_kind="input", effective_from=at)
    assert (row.unit_price, row.created_by_id, row.reason) == (
        Decimal("3.000000000"),
        staff.billing_admin.id,
        "new hardware costs",
    )
    audit = AuditLog.objects.get(action="billing.price_set")
    assert audit.metadata["reason"] == "new hardware costs"
    assert audit.actor_user_id == staff.billing_admin.id

    draft = invoice_refresh_draft(org=org, month=at)
    assert draft is not None
    assert [(q, p, a) for _, q, p, a in lines_of(draft)] == [
        (1_000_000, Decimal("1.000000000"), Decimal("1.00")),
        (1_000_000, Decimal("3.000000000"), Decimal("3.00")),
    ]
    assert draft.subtotal == Decimal("4.00")

    again = Invoice.objects.get(pk=november.pk)
    assert (lines_of(again), again.total, again.number) == billed
    with pytest.raises(Conflict, match="no longer changes"):
        invoice_refresh_draft(org=org, month=last_month())


def test_a_cached_input_price_from_the_form_bills_cached_tokens_apart(staff: Staff) -> None:
    november = invoice_in("finalized")  # the price book: 1 input and 2 output per million
    org = november.organization
    at = change_hour()
    usage(org, at - timedelta(hours=1), input_tokens=1_000_000, cached_input_tokens=800_000)
    usage(org, at, input_tokens=1_000_000, cached_input_tokens=800_000)
    form = client_for(staff.billing_admin).get(NEW_PRICE).content.decode()
    assert '<option value="cached_input">Cached Input</option>' in form

    response = post_price(
        client_for(staff.billing_admin), "price-token-cached", token_kind="cached_input",
        unit_price="0.25",
    )  # fmt: skip

    assert response.status_code == 302
    row = Price.objects.get(model_name=CHAT, token_kind="cached_input")
    assert (row.unit_price, row.effective_from) == (Decimal("0.25"), at)
    assert AuditLog.objects.get(action="billing.price_set").metadata["token_kind"] == (
        "cached_input"
    )
    draft = invoice_refresh_draft(org=org, month=at)
    assert draft is not None
    # Before the price, every input token at 1; from it, the 800,000 cached at 0.25.
    assert lines_of(draft) == [
        ("chat-small cached input tokens", 800_000, Decimal("0.25"), Decimal("0.20")),
        ("chat-small input tokens", 1_200_000, Decimal("1"), Decimal("1.20")),
    ]


def test_the_history_lists_every_version(staff: Staff) -> None:
    invoice_in("draft")  # the price book since 2026-01-01
    post_price(client_for(staff.billing_admin), "price-token-2")

    response = client_for(staff.support).get(
        reverse("admin:billing_price_changelist"),
        {"model_name": CHAT, "token_kind__exact": "input"},
    )

    body = response.content.decode()
    assert response.status_code == 200
    assert "scheduled" in body and "in effect" in body
    assert "3.000000000" in body and "1.000000000" in body


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"effective_from": "2020-01-01T00:00"}, "effective_from must not be in the past"),
        ({"effective_from": "2099-01-01T00:30"}, "effective_from must be a whole UTC hour"),
        ({"unit_price": "-1"}, "unit_price must be in [0, 1000000] per million"),
        ({"unit_price": "0.0000000001"}, "unit_price may have at most 9 decimal places"),
        ({"model_name": "no-such-model"}, "Select a valid choice"),
        ({"token_kind": "cached"}, "Select a valid choice"),
        ({"reason": ""}, "This field is required"),
    ],
)
def test_bad_prices_are_refused_and_nothing_is_written(
    staff: Staff, data: dict[str, str], message: str
) -> None:
    invoice_in("draft")
    before = (Price.objects.count(), AuditLog.objects.count())

    response = post_price(client_for(staff.billing_admin), "price-token-3", **data)

    assert response.status_code == 400
    assert message in response.content.decode()
    assert (Price.objects.count(), AuditLog.objects.count()) == before


def test_a_second_price_for_the_same_hour_is_a_conflict(staff: Staff) -> None:
    invoice_in("draft")
    client = client_for(staff.billing_admin)
    post_price(client, "price-token-4")

    response = post_price(client, "price-token-5", unit_price="4")

    assert response.status_code == 409
    assert "already has a price from" in response.content.decode()
    assert Price.objects.filter(unit_price=Decimal("4")).count() == 0


# --- Organization overrides ---------------------------------------------------------------


def test_an_organization_rate_and_its_end(staff: Staff) -> None:
    invoice_in("draft")
    org: Organization = OrganizationFactory(name="Contract Co")
    at = change_hour()
    client = client_for(staff.billing_admin)

    created = client.post(
        reverse("admin:backoffice-override-new", args=[org.id]),
        {
            "kind": "rate",
            "model_name": CHAT,
            "token_kind": "input",
            "unit_price": "0.25",
            "effective_from": local(at),
            "reason": "enterprise contract 2027",
            "form_token": "override-token-1",
        },
    )

    assert created.status_code == 302
    override = PriceOverride.objects.get(organization=org)
    assert (override.kind, override.unit_price, override.effective_from) == (
        "rate",
        Decimal("0.250000000"),
        at,
    )
    assert price_lookup(org, CHAT, "input", at).unit_price == Decimal("0.250000000")
    assert price_lookup(None, CHAT, "input", at).unit_price == Decimal("1.000000000")
    page = client_for(staff.support).get(reverse("admin:backoffice-customer", args=[org.id]))
    assert "0.250000000/M" in page.content.decode()

    ended = client.post(
        reverse("admin:backoffice-override-end", args=[override.id]),
        {
            "at": local(at + timedelta(hours=5)),
            "reason": "contract ends",
            "form_token": "end-token-1",
        },
    )

    assert ended.status_code == 302
    override.refresh_from_db()
    assert override.effective_until == at + timedelta(hours=5)
    assert price_lookup(org, CHAT, "input", at + timedelta(hours=5)).source == "list"
    assert (
        AuditLog.objects.get(action="billing.price_override_ended").metadata["reason"]
        == "contract ends"
    )


def test_a_rate_without_a_price_is_refused(staff: Staff) -> None:
    invoice_in("draft")
    org: Organization = OrganizationFactory(name="Contract Co")

    response = client_for(staff.billing_admin).post(
        reverse("admin:backoffice-override-new", args=[org.id]),
        {
            "kind": "rate",
            "model_name": CHAT,
            "token_kind": "input",
            "effective_from": local(change_hour()),
            "reason": "contract",
            "form_token": "override-token-2",
        },
    )

    assert response.status_code == 400
    assert "a rate needs unit_price" in response.content.decode()
    assert not PriceOverride.objects.filter(organization=org).exists()
