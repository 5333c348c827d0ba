"""Billing page: balance and month spend, budgets and alerts, invoices, payment methods."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from django.utils import timezone

from accounts.permissions import Role
from billing.models import Budget, BudgetAlert
from billing.periods import hour_start, month_start
from tests.billing.factories import CHAT, GrantFactory, price_book, usage
from tests.billing.stripe_support import make_invoice, use_fake_stripe
from tests.conftest import OrgWorld
from tests.console.support import org_url
from tests.factories import default_project

pytestmark = pytest.mark.django_db


def test_balance_month_spend_and_credit_grants(world: OrgWorld) -> None:
    price_book(CHAT, "1", "2")
    usage(world.org, hour_start(timezone.now()), input_tokens=3_000_000, output_tokens=1_000_000)
    GrantFactory(organization=world.org, amount=Decimal("25.00"), reason="welcome credit")
    response = world.client_for(Role.BILLING).get(org_url("console-billing", world.org.id))
    assert response.status_code == 200
    balance = response.context["balance"]
    assert (balance.month_spend, balance.balance) == (Decimal("5.00"), Decimal("25.00"))
    page = response.content.decode()
    assert '<strong id="month-spend">$5.00</strong>' in page
    assert '<strong id="credit-balance">$25.00</strong>' in page
    assert "welcome credit" in page
    assert "Card payments appear here when the platform" in page  # Stripe is off


def test_budget_save_keeps_the_other_budgets(world: OrgWorld) -> None:
    client = world.client_for(Role.OWNER)
    url = org_url("console-budget-save", world.org.id)
    project = default_project(world.org)
    response = client.post(url, {"monthly_amount": "100", "alert_thresholds": "50, 90"})
    assert response.status_code == 302
    assert (
        client.post(
            url,
            {"project": project.id, "monthly_amount": "20.50", "alert_thresholds": "100",
             "hard_limit": "on"},
        ).status_code
        == 302
    )  # fmt: skip
    rows = {
        b.project_id: (b.monthly_amount, b.alert_thresholds, b.hard_limit)
        for b in Budget.objects.filter(organization=world.org)
    }
    assert rows == {
        None: (Decimal("100.00"), [50, 90], False),
        project.id: (Decimal("20.50"), [100], True),
    }
    # Saving the organization's again replaces only that one.
    client.post(url, {"monthly_amount": "150", "alert_thresholds": "80"})
    assert Budget.objects.get(organization=world.org, project=None).monthly_amount == Decimal(
        "150.00"
    )
    assert Budget.objects.filter(organization=world.org).count() == 2


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"monthly_amount": "0", "alert_thresholds": "50"}, "budgets.0.monthly_amount must be in"),
        ({"monthly_amount": "10", "alert_thresholds": "fifty"}, "whole percentages separated"),
        ({"monthly_amount": "10", "alert_thresholds": "50, 50"}, "must not repeat"),
        ({"monthly_amount": "10", "alert_thresholds": "5000"}, "must be in [1, 1000] percent"),
        ({"monthly_amount": "1.234", "alert_thresholds": "50"}, "no more than 2 decimal places"),
    ],
)
def test_bad_budget_is_refused_and_nothing_changes(
    world: OrgWorld, data: dict[str, str], message: str
) -> None:
    response = world.client_for(Role.OWNER).post(org_url("console-budget-save", world.org.id), data)
    assert response.status_code == 400
    assert message in response.content.decode()
    assert Budget.objects.filter(organization=world.org).count() == 0


def test_admin_sees_billing_but_cannot_change_budgets(world: OrgWorld) -> None:
    client = world.client_for(Role.ADMIN)
    page = client.get(org_url("console-billing", world.org.id)).content.decode()
    assert "Save budget" not in page
    response = client.post(
        org_url("console-budget-save", world.org.id),
        {"monthly_amount": "10", "alert_thresholds": "50"},
    )
    assert response.status_code == 403
    assert Budget.objects.count() == 0


def test_budget_delete_and_another_organizations_budget_is_404(
    world: OrgWorld, other_world: OrgWorld
) -> None:
    client = world.client_for(Role.BILLING)
    client.post(
        org_url("console-budget-save", world.org.id),
        {"monthly_amount": "10", "alert_thresholds": "50"},
    )
    world_owner = other_world.client_for(Role.OWNER)
    world_owner.post(
        org_url("console-budget-save", other_world.org.id),
        {"monthly_amount": "99", "alert_thresholds": "50"},
    )
    theirs = Budget.objects.get(organization=other_world.org)
    response = client.post(org_url("console-budget-delete", world.org.id, budget_id=str(theirs.id)))
    assert response.status_code == 404
    assert Budget.objects.filter(id=theirs.id).exists()
    mine = Budget.objects.get(organization=world.org)
    client.post(org_url("console-budget-delete", world.org.id, budget_id=str(mine.id)))
    assert not Budget.objects.filter(organization=world.org).exists()


def test_alerts_are_listed(world: OrgWorld) -> None:
    budget = Budget.objects.create(
        organization=world.org, monthly_amount=Decimal("10"), alert_thresholds=[50]
    )
    BudgetAlert.objects.create(
        organization=world.org,
        budget=budget,
        month=month_start(timezone.now()).date(),
        threshold=50,
        budget_amount=Decimal("10.00"),
        spend=Decimal("5.10"),
    )
    page = world.client_for(Role.OWNER).get(org_url("console-billing", world.org.id))
    assert "50% of the" in page.content.decode()
    assert "budget of $10.00 reached (spend $5.10)" in page.content.decode()


def test_invoice_detail_and_printable_view(world: OrgWorld) -> None:
    invoice = make_invoice(world.org, number="MAN-2026-000042", amounts=("12.34", "5.66"))
    client = world.client_for(Role.BILLING)
    listing = client.get(org_url("console-billing", world.org.id)).content.decode()
    assert "MAN-2026-000042" in listing
    detail = client.get(org_url("console-invoice", world.org.id, invoice_id=invoice.id))
    body = detail.content.decode()
    assert detail.status_code == 200
    assert "mantle-chat-small line 0" in body and "mantle-chat-small line 1" in body
    assert "<strong>18.00 USD</strong>" in body
    printable = client.get(org_url("console-invoice-print", world.org.id, invoice_id=invoice.id))
    assert printable.status_code == 200
    text = printable.content.decode()
    assert "Invoice MAN-2026-000042" in text
    assert 'class="side"' not in text  # no console navigation on paper


@pytest.mark.parametrize("name", ["console-invoice", "console-invoice-print"])
def test_another_organizations_invoice_is_404(
    world: OrgWorld, other_world: OrgWorld, name: str
) -> None:
    theirs = make_invoice(other_world.org, number="MAN-2026-000099")
    response = world.client_for(Role.OWNER).get(org_url(name, world.org.id, invoice_id=theirs.id))
    assert response.status_code == 404


def test_payment_methods_with_stripe(world: OrgWorld, settings: Any) -> None:
    fake = use_fake_stripe(settings)
    client = world.client_for(Role.OWNER)
    page = client.get(org_url("console-billing", world.org.id)).content.decode()
    assert "No payment method saved." in page
    response = client.post(org_url("console-payment-method-add", world.org.id))
    assert response.status_code == 303
    session_id = next(iter(fake.checkout_sessions))
    assert response["Location"] == fake.checkout_sessions[session_id]["url"]
    fake.checkout_complete(session_id, card="pm_card_visa")
    page = client.get(org_url("console-billing", world.org.id)).content.decode()
    assert "Visa ending in 4242" in page


def test_billing_role_adds_payment_methods_admin_does_not(world: OrgWorld, settings: Any) -> None:
    use_fake_stripe(settings)
    response = world.client_for(Role.ADMIN).post(
        org_url("console-payment-method-add", world.org.id)
    )
    assert response.status_code == 403
