"""The customer page: what staff see of one organization, suspension, credit grants."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.urls import reverse
from django.utils import timezone

from accounts import keys
from accounts.models import ApiKey, AuditLog, Organization
from accounts.permissions import Role
from accounts.principal import SYSTEM
from accounts.services import api_key_revoke
from billing.budgets import BudgetSpec, budgets_set
from billing.models import CreditLedgerEntry, StripeCustomer
from billing.periods import month_start
from catalog.models import AcceleratorPool, Endpoint, ModelVersion
from core.redis import get_redis
from tests.backoffice.support import Staff, client_for, invoice_in
from tests.billing.factories import CHAT, CatalogModelFactory, GrantFactory, staff_principal, usage
from tests.factories import OrganizationFactory, UserFactory, add_member, make_api_key

pytestmark = pytest.mark.django_db


def page_url(org: Organization) -> str:
    return reverse("admin:backoffice-customer", args=[org.id])


@pytest.fixture
def customer(db: None) -> dict[str, Any]:
    owner = UserFactory(email="owner@acme.example")
    org = OrganizationFactory(name="Acme Corp", owner=owner)
    add_member(org, Role.BILLING, UserFactory(email="finance@acme.example"))
    live, live_secret = make_api_key(org)
    dead, _ = make_api_key(org)
    api_key_revoke(principal=SYSTEM, key=dead)
    model = CatalogModelFactory(name=CHAT)
    version = ModelVersion.objects.create(
        model=model, version=1, runtime="echo", sha256="a" * 64, location="x"
    )
    pool = AcceleratorPool.objects.create(name="cpu-test", region="local")
    endpoint = Endpoint.objects.create(
        organization=org, name="acme-chat", model_version=version, pool=pool
    )
    invoice = invoice_in("paid", org=org)  # before the grant, which would pay it
    GrantFactory(organization=org, amount=Decimal("40.00"), reason="PO-1234")
    budgets_set(
        principal=staff_principal(),
        org=org,
        specs=[BudgetSpec(monthly_amount="500", alert_thresholds=[50, 100])],
    )
    usage(
        org, month_start(timezone.now()) + timedelta(hours=2), input_tokens=1234,
        cached_input_tokens=789, output_tokens=56,
    )  # fmt: skip
    return {
        "org": org,
        "live": live,
        "live_secret": live_secret,
        "dead": dead,
        "endpoint": endpoint,
        "invoice": invoice,
    }


def test_the_page_shows_everything_about_the_organization(
    staff: Staff, customer: dict[str, Any]
) -> None:
    org = customer["org"]

    response = client_for(staff.support).get(page_url(org))

    assert response.status_code == 200
    body = response.content.decode()
    for expected in (
        "Acme Corp",
        org.region,
        "owner@acme.example",
        "finance@acme.example",
        customer["live"].prefix,
        customer["dead"].prefix,
        ">revoked<",
        ">active<",
        "acme-chat",
        customer["endpoint"].id,
        "PO-1234",
        "40.00",
        "500.00",
        customer["invoice"].number,
        "1234",  # this month's input tokens
        "no Stripe customer",
    ):
        assert expected in body, expected
    assert customer["live_secret"] not in body
    assert customer["live"].digest not in body
    overview = response.context["o"]
    assert [k.status for k in overview.keys] == ["revoked", "active"]
    assert [(u.model_name, u.input_tokens, u.cached_input_tokens) for u in overview.usage] == [
        (CHAT, 1234, 789)
    ]
    assert '<td class="num">1234</td><td class="num">789</td><td class="num">56</td>' in body
    assert overview.balance.balance == Decimal("40.00")


def test_the_stripe_link_appears_when_there_is_a_customer(
    staff: Staff, customer: dict[str, Any], settings: Any
) -> None:
    settings.STRIPE_API_KEY = "sk_test_abc"
    StripeCustomer.objects.create(organization=customer["org"], stripe_customer_id="cus_Q1w2E3")

    body = client_for(staff.support).get(page_url(customer["org"])).content.decode()

    assert 'href="https://dashboard.stripe.com/test/customers/cus_Q1w2E3"' in body


def test_support_sees_no_action_forms(staff: Staff, customer: dict[str, Any]) -> None:
    org = customer["org"]
    body = client_for(staff.support).get(page_url(org)).content.decode()
    assert reverse("admin:backoffice-customer-status", args=[org.id]) not in body
    assert reverse("admin:backoffice-credit-grant", args=[org.id]) not in body

    admin_body = client_for(staff.billing_admin).get(page_url(org)).content.decode()
    assert reverse("admin:backoffice-customer-status", args=[org.id]) in admin_body
    assert reverse("admin:backoffice-credit-grant", args=[org.id]) in admin_body


def test_an_unknown_organization_is_404(staff: Staff) -> None:
    client = client_for(staff.billing_admin)
    for name in (
        "admin:backoffice-customer",
        "admin:backoffice-customer-status",
        "admin:backoffice-credit-grant",
        "admin:backoffice-override-new",
    ):
        assert client.get(reverse(name, args=["org_missing"])).status_code == 404, name
    assert client.get(reverse("admin:backoffice-override-end", args=[999999])).status_code == 404


# --- Suspension ---------------------------------------------------------------------------


def cached(key: ApiKey) -> keys.KeyIdentity:
    raw = get_redis().get(keys.cache_key(key.digest))
    assert raw is not None
    return keys.KeyIdentity.from_json(str(raw))


def suspend(client: Any, org: Organization, status: str, token: str, reason: str) -> Any:
    return client.post(
        reverse("admin:backoffice-customer-status", args=[org.id]),
        {"status": status, "reason": reason, "form_token": token},
    )


def test_suspending_refuses_the_keys_and_is_audited(
    staff: Staff, customer: dict[str, Any], django_capture_on_commit_callbacks: Any
) -> None:
    org, key = customer["org"], customer["live"]
    client = client_for(staff.billing_admin)

    with django_capture_on_commit_callbacks(execute=True):
        response = suspend(client, org, "suspended", "susp-token-1", "invoice 90 days overdue")

    assert response.status_code == 302
    assert Organization.objects.get(pk=org.pk).status == "suspended"
    assert cached(key).organization_active is False
    entry = AuditLog.objects.get(action="organization.suspended")
    assert (entry.actor_user_id, entry.metadata["reason"]) == (
        staff.billing_admin.id,
        "invoice 90 days overdue",
    )

    with django_capture_on_commit_callbacks(execute=True):
        suspend(client, org, "active", "susp-token-2", "paid in full")

    assert Organization.objects.get(pk=org.pk).status == "active"
    assert cached(key).organization_active is True
    assert (
        AuditLog.objects.get(action="organization.reactivated").metadata["reason"] == "paid in full"
    )


def test_suspension_needs_a_reason(staff: Staff, customer: dict[str, Any]) -> None:
    org = customer["org"]
    response = suspend(client_for(staff.billing_admin), org, "suspended", "susp-token-3", "")
    assert response.status_code == 400
    assert Organization.objects.get(pk=org.pk).status == "active"
    assert not AuditLog.objects.filter(action="organization.suspended").exists()


def test_a_bad_status_is_refused(staff: Staff, customer: dict[str, Any]) -> None:
    org = customer["org"]
    response = suspend(client_for(staff.billing_admin), org, "deleted", "susp-token-4", "why")
    assert response.status_code == 400
    assert "Select a valid choice" in response.content.decode()
    assert Organization.objects.get(pk=org.pk).status == "active"


# --- Credits ---------------------------------------------------------------------------------


def grant(client: Any, org: Organization, token: str, **data: str) -> Any:
    return client.post(
        reverse("admin:backoffice-credit-grant", args=[org.id]),
        {
            "kind": "promotional",
            "amount": "25.00",
            "reason": "launch promo",
            "form_token": token,
            **data,
        },
    )


def test_granting_promotional_credit_with_an_expiry(staff: Staff, customer: dict[str, Any]) -> None:
    org = customer["org"]
    expires = (timezone.now() + timedelta(days=30)).replace(second=0, microsecond=0)

    response = grant(
        client_for(staff.billing_admin),
        org,
        "grant-token-1",
        expires_at=expires.strftime("%Y-%m-%dT%H:%M"),
        reference="CAMPAIGN-7",
    )

    assert response.status_code == 302
    entry = CreditLedgerEntry.objects.get(organization=org, kind="promotional")
    assert (entry.amount, entry.expires_at, entry.reference, entry.created_by_id) == (
        Decimal("25.00"),
        expires,
        "CAMPAIGN-7",
        staff.billing_admin.id,
    )
    audit = AuditLog.objects.get(action="billing.credit_granted")
    assert audit.metadata["reason"] == "launch promo"
    assert audit.actor_label == staff.billing_admin.email
    ledger = client_for(staff.support).get(page_url(org)).content.decode()
    assert "launch promo" in ledger


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"amount": "0"}, "amount must be positive"),
        ({"amount": "12.345"}, "amount may have at most 2 decimal places"),
        ({"amount": "a lot"}, "amount must be a decimal number"),
        ({"expires_at": "2020-01-01T00:00"}, "expires_at must be in the future"),
        ({"kind": "credit_note"}, "Select a valid choice"),
    ],
)
def test_bad_grants_are_refused_and_nothing_is_written(
    staff: Staff, customer: dict[str, Any], data: dict[str, str], message: str
) -> None:
    org = customer["org"]
    before = (CreditLedgerEntry.objects.count(), AuditLog.objects.count())

    response = grant(client_for(staff.billing_admin), org, "grant-token-2", **data)

    assert response.status_code == 400
    assert message in response.content.decode()
    assert (CreditLedgerEntry.objects.count(), AuditLog.objects.count()) == before


def test_a_refused_grant_can_be_corrected_and_sent_again(
    staff: Staff, customer: dict[str, Any]
) -> None:
    org = customer["org"]
    client = client_for(staff.billing_admin)

    assert grant(client, org, "grant-token-3", amount="-5").status_code == 400
    assert grant(client, org, "grant-token-3", amount="5").status_code == 302

    assert CreditLedgerEntry.objects.filter(organization=org, kind="promotional").count() == 1
