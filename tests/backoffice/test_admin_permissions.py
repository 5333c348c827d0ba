"""Who reaches what: the permission matrix of the back office, and the roles' Groups."""

from __future__ import annotations

import io
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest
from django.contrib.auth.models import Group
from django.core.management import call_command
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from accounts.models import AuditLog, Organization, User
from billing import staff_roles as roles
from billing.models import (
    CreditLedgerEntry,
    CreditNote,
    Invoice,
    Price,
    PriceOverride,
    TierMultiplier,
)
from billing.periods import hour_start
from billing.staff_roles import roles_sync
from tests.backoffice.support import Staff, client_for, invoice_in
from tests.billing.factories import CHAT, OverrideFactory

pytestmark = pytest.mark.django_db


@dataclass
class World:
    org: Organization
    draft: Invoice
    finalized: Invoice
    override: PriceOverride


@pytest.fixture
def world(staff: Staff) -> World:
    finalized = invoice_in("finalized")
    draft = invoice_in("draft")
    override = OverrideFactory(organization=finalized.organization, discount_percent=10)
    return World(org=finalized.organization, draft=draft, finalized=finalized, override=override)


def pages(w: World) -> list[str]:
    return [
        reverse("admin:index"),
        reverse("admin:backoffice-customer", args=[w.org.id]),
        reverse("admin:backoffice-invoice", args=[w.finalized.id]),
        reverse("admin:backoffice-usage"),
        reverse("admin:backoffice-usage-csv"),
        reverse("admin:backoffice-margin"),
        reverse("admin:backoffice-margin-csv"),
        reverse("admin:billing_invoice_changelist"),
        reverse("admin:billing_creditnote_changelist"),
        reverse("admin:billing_creditledgerentry_changelist"),
        reverse("admin:billing_price_changelist"),
        reverse("admin:billing_tiermultiplier_changelist"),
        reverse("admin:billing_priceoverride_changelist"),
        reverse("admin:billing_budget_changelist"),
        reverse("admin:billing_topup_changelist"),
        reverse("admin:billing_topupreversal_changelist"),
        reverse("admin:billing_autorecharge_changelist"),
        reverse("admin:accounts_organization_changelist"),
        reverse("admin:accounts_apikey_changelist"),
        reverse("admin:accounts_membership_changelist"),
        reverse("admin:accounts_auditlog_changelist"),
        reverse("admin:catalog_endpoint_changelist"),
    ]


def state(w: World) -> tuple[Any, ...]:
    """Everything a money action could change."""
    return (
        Organization.objects.get(pk=w.org.pk).status,
        sorted(Invoice.objects.values_list("id", "status", "payment_reference", "total")),
        CreditLedgerEntry.objects.count(),
        CreditNote.objects.count(),
        Price.objects.count(),
        TierMultiplier.objects.count(),
        PriceOverride.objects.count(),
        PriceOverride.objects.get(pk=w.override.pk).effective_until,
        AuditLog.objects.count(),
    )


def next_hour() -> str:
    return (hour_start(timezone.now()) + timedelta(hours=2)).strftime("%Y-%m-%dT%H:%M")


def actions(w: World) -> list[tuple[str, dict[str, str]]]:
    """Every money-moving POST of the back office, with valid data."""
    reason = {"reason": "matrix", "form_token": "matrix-token"}
    inv = w.finalized
    return [
        (
            reverse("admin:backoffice-customer-status", args=[w.org.id]),
            {**reason, "status": "suspended"},
        ),
        (
            reverse("admin:backoffice-credit-grant", args=[w.org.id]),
            {**reason, "kind": "prepaid_purchase", "amount": "10.00"},
        ),
        (reverse("admin:backoffice-invoice-action", args=[w.draft.id, "finalize"]), reason),
        (
            reverse("admin:backoffice-invoice-action", args=[inv.id, "mark-paid"]),
            {**reason, "payment_reference": "TRF-9"},
        ),
        (reverse("admin:backoffice-invoice-action", args=[inv.id, "void"]), reason),
        (
            reverse("admin:backoffice-invoice-action", args=[inv.id, "credit-note"]),
            {**reason, "amount": "1.00"},
        ),
        (
            reverse("admin:backoffice-price-new"),
            {
                **reason,
                "model_name": CHAT,
                "token_kind": "input",
                "unit_price": "0.5",
                "effective_from": next_hour(),
            },
        ),
        (
            reverse("admin:backoffice-tier-multiplier-new"),
            {
                **reason,
                "service_tier": "priority",
                "model_name": "",
                "multiplier": "1.5",
                "effective_from": next_hour(),
            },
        ),
        (
            reverse("admin:backoffice-override-new", args=[w.org.id]),
            {**reason, "kind": "discount", "discount_percent": "5", "effective_from": next_hour()},
        ),
        (
            reverse("admin:backoffice-override-end", args=[w.override.id]),
            {**reason, "at": next_hour()},
        ),
    ]


def is_login_redirect(response: Any, url: str) -> bool:
    return response.status_code == 302 and response["Location"].startswith(
        f"{reverse('admin:login')}?next="
    )


# --- Reading -------------------------------------------------------------------------------


@pytest.mark.parametrize("role", ["billing_admin", "support", "superuser"])
def test_staff_roles_read_every_page(staff: Staff, world: World, role: str) -> None:
    client = client_for(getattr(staff, role))
    for url in pages(world):
        assert client.get(url).status_code == 200, url


@pytest.mark.parametrize("who", ["customer", "anonymous"])
def test_customers_and_strangers_never_reach_the_admin(
    staff: Staff, world: World, who: str
) -> None:
    client = client_for(staff.customer if who == "customer" else None)
    for url in pages(world):
        assert is_login_redirect(client.get(url), url), url


def test_staff_without_a_role_see_no_data(staff: Staff, world: World) -> None:
    client = client_for(staff.no_role)
    index = client.get(reverse("admin:index"))
    assert index.status_code == 200
    assert "Your staff role has no access to usage and revenue" in index.content.decode()
    for url in pages(world)[1:]:
        assert client.get(url).status_code == 403, url


def test_a_customer_cannot_log_in_to_the_admin(staff: Staff) -> None:
    client = Client()
    response = client.post(
        reverse("admin:login"),
        {"username": staff.customer.email, "password": "correct horse battery"},
    )
    assert response.status_code == 200
    assert "staff account" in response.content.decode()
    assert "_auth_user_id" not in client.session


def test_staff_who_open_the_login_page_land_in_the_admin(staff: Staff) -> None:
    client = Client()
    form = client.get(reverse("admin:login"))
    assert form.context["app_path"] == "/admin/login/?next=%2Fadmin%2F"

    response = client.post(
        form.context["app_path"],
        {"username": staff.support.email, "password": "correct horse battery"},
    )

    assert response.status_code == 302
    assert response["Location"] == reverse("admin:index")


# --- Changing ---------------------------------------------------------------------------------


@pytest.mark.parametrize("index", range(9))
def test_support_cannot_change_anything(staff: Staff, world: World, index: int) -> None:
    url, data = actions(world)[index]
    before = state(world)
    client = client_for(staff.support)

    assert client.get(url).status_code == 403
    assert client.post(url, data).status_code == 403
    assert state(world) == before


@pytest.mark.parametrize("index", range(9))
def test_customers_cannot_change_anything(staff: Staff, world: World, index: int) -> None:
    url, data = actions(world)[index]
    before = state(world)

    assert is_login_redirect(client_for(staff.customer).post(url, data), url)
    assert state(world) == before


@pytest.mark.parametrize("role", ["billing_admin", "superuser"])
@pytest.mark.parametrize("index", range(9))
def test_billing_admins_can_do_each_action(
    staff: Staff, world: World, role: str, index: int
) -> None:
    url, data = actions(world)[index]
    before = state(world)

    response = client_for(getattr(staff, role)).post(url, data)

    assert response.status_code == 302, response.content.decode()[:2000]
    after = state(world)
    assert after != before
    assert after[-1] == before[-1] + 1  # exactly one audit entry
    entry = AuditLog.objects.order_by("-id").first()
    assert entry is not None
    assert entry.actor_user_id == getattr(staff, role).id
    assert entry.metadata["reason"] == "matrix"


@pytest.mark.parametrize("role", ["support", "billing_admin"])
def test_generic_admin_forms_change_nothing(staff: Staff, world: World, role: str) -> None:
    client = client_for(getattr(staff, role))
    target: User = staff.customer
    prices = Price.objects.count()

    change = client.post(
        reverse("admin:accounts_user_change", args=[target.pk]),
        {"email": target.email, "is_staff": "on", "is_superuser": "on", "is_active": "on"},
    )
    delete = client.post(
        reverse("admin:billing_invoice_delete", args=[world.finalized.id]), {"post": "yes"}
    )
    add = client.post(reverse("admin:billing_price_add"), {"model_name": CHAT})

    assert change.status_code == 403
    assert delete.status_code == 403
    if role == "billing_admin":  # sent to the back office's price form, nothing created
        assert add.status_code == 302
        assert add["Location"] == reverse("admin:backoffice-price-new")
    else:  # support may not set prices
        assert add.status_code == 403
    assert Price.objects.count() == prices
    target.refresh_from_db()
    assert (target.is_staff, target.is_superuser) == (False, False)
    assert Invoice.objects.filter(pk=world.finalized.pk).exists()


def test_organization_status_cannot_be_edited_through_its_generic_form(
    staff: Staff, world: World
) -> None:
    response = client_for(staff.superuser).post(
        reverse("admin:accounts_organization_change", args=[world.org.id]),
        {"name": world.org.name, "status": "suspended", "region": "local"},
    )
    assert response.status_code == 302
    assert response["Location"] == reverse("admin:backoffice-customer", args=[world.org.id])
    assert Organization.objects.get(pk=world.org.pk).status == "active"


def test_only_superusers_give_staff_a_role(staff: Staff) -> None:
    target = staff.no_role
    group = Group.objects.get(name=roles.BILLING_ADMIN)

    response = client_for(staff.superuser).post(
        reverse("admin:accounts_user_change", args=[target.pk]),
        {
            "email": target.email,
            "full_name": target.full_name,
            "is_active": "on",
            "is_staff": "on",
            "groups": [str(group.pk)],
        },
    )

    assert response.status_code == 302
    assert list(target.groups.values_list("name", flat=True)) == [roles.BILLING_ADMIN]


# --- The roles ------------------------------------------------------------------------------


def perms_of(name: str) -> set[str]:
    group = Group.objects.get(name=name)
    return {
        f"{p.content_type.app_label}.{p.codename}"
        for p in group.permissions.select_related("content_type")
    }


def test_the_migration_created_both_roles_with_exact_permissions(db: None) -> None:
    support = perms_of(roles.SUPPORT)
    admin = perms_of(roles.BILLING_ADMIN)

    assert all(p.split(".")[1].startswith("view_") for p in support)
    assert "billing.view_invoice" in support and "accounts.view_apikey" in support
    assert admin == support | {roles.MOVE_MONEY, roles.SUSPEND, *roles.MANAGE_PROVIDERS}
    assert len(support) == len(roles.VIEWABLE)


def test_roles_sync_is_idempotent_and_restores_removed_permissions(db: None) -> None:
    group = Group.objects.get(name=roles.SUPPORT)
    group.permissions.clear()
    group.permissions.add(*Group.objects.get(name=roles.BILLING_ADMIN).permissions.all())

    first = roles_sync()
    second = roles_sync()

    assert (
        first
        == second
        == {
            roles.SUPPORT: len(roles.VIEWABLE),
            roles.BILLING_ADMIN: len(roles.VIEWABLE) + 2 + len(roles.MANAGE_PROVIDERS),
        }
    )
    assert roles.MOVE_MONEY not in perms_of(roles.SUPPORT)


def test_the_management_command_resyncs_the_roles(db: None) -> None:
    Group.objects.filter(name=roles.SUPPORT).delete()
    out = io.StringIO()

    call_command("backoffice_roles", stdout=out)

    assert out.getvalue().splitlines() == [
        f"{roles.SUPPORT}: {len(roles.VIEWABLE)} permissions",
        f"{roles.BILLING_ADMIN}: {len(roles.VIEWABLE) + 2 + len(roles.MANAGE_PROVIDERS)} "
        "permissions",
    ]
    assert perms_of(roles.SUPPORT) == perms_of(roles.BILLING_ADMIN) - {
        roles.MOVE_MONEY,
        roles.SUSPEND,
        *roles.MANAGE_PROVIDERS,
    }
