"""Helpers of the back-office tests: staff of each role, invoices in each state."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from django.contrib.auth.models import Group
from django.test import Client
from django.utils import timezone

from accounts.models import Organization, User
from billing.backoffice import roles
from billing.invoicing import (
    invoice_finalize,
    invoice_mark_paid,
    invoice_refresh_draft,
    invoice_void,
)
from billing.models import Invoice, Price
from billing.periods import month_start
from tests.billing.factories import CHAT, price_book, staff_principal, usage
from tests.factories import OrganizationFactory, UserFactory


@dataclass
class Staff:
    billing_admin: User
    support: User
    superuser: User
    no_role: User  # is_staff, but in no role
    customer: User  # an organization's owner, not staff


def staff_user(group: str | None = None, **extra: object) -> User:
    user: User = UserFactory(is_staff=True, **extra)
    if group is not None:
        user.groups.add(Group.objects.get(name=group))
    return user


def make_staff() -> Staff:
    customer: User = UserFactory()
    OrganizationFactory(name="Customer Co", owner=customer)
    return Staff(
        billing_admin=staff_user(roles.BILLING_ADMIN),
        support=staff_user(roles.SUPPORT),
        superuser=UserFactory(is_staff=True, is_superuser=True),
        no_role=staff_user(),
        customer=customer,
    )


def client_for(user: User | None) -> Client:
    client = Client()
    if user is not None:
        client.force_login(user)
    return client


def last_month(now: datetime | None = None) -> datetime:
    return month_start(month_start(now or timezone.now()) - timedelta(days=1))


def invoice_in(state: str, *, org: Organization | None = None) -> Invoice:
    """An invoice of last month (so it may be finalized) in the state asked for.

    Usage: 1M input and 1M output tokens of chat-small at 1 and 2 per million = 3.00.
    """
    if not Price.objects.filter(model_name=CHAT).exists():
        price_book()
    org = org or OrganizationFactory(name=f"Billed {state}")
    usage(
        org,
        last_month() + timedelta(days=3, hours=5),
        input_tokens=1_000_000,
        output_tokens=1_000_000,
    )
    inv = invoice_refresh_draft(org=org, month=last_month())
    assert inv is not None
    if state == "draft":
        return inv
    staff = staff_principal()
    inv = invoice_finalize(principal=staff, invoice=inv)
    if state == "paid":
        inv = invoice_mark_paid(
            principal=staff, invoice=inv, payment_reference="TRF-1", reason="wire"
        )
    elif state == "void":
        inv = invoice_void(principal=staff, invoice=inv, reason="test void")
    assert inv.status == state
    return inv
