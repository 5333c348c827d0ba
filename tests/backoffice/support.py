"""Helpers of the back-office tests: staff of each role, invoices in each state."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.contrib.auth.models import Group
from django.contrib.sessions.backends.db import SessionStore
from django.test import Client
from django.test.client import ClientMixin
from django.utils import timezone
from django_otp import DEVICE_ID_SESSION_KEY
from django_otp.oath import TOTP
from django_otp.plugins.otp_totp.models import TOTPDevice
from playwright.sync_api import Page

from accounts.models import Organization, User
from billing import staff_roles as roles
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
from tests.support.browser import AppServer, login_as


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


def authenticator(user: User) -> TOTPDevice:
    """The user's confirmed authenticator, made on first use (as if they had enrolled)."""
    device = TOTPDevice.objects.filter(user=user, confirmed=True).first()
    if device is None:
        device = TOTPDevice.objects.create(user=user, name="authenticator", confirmed=True)
    return device


def totp_code(device: TOTPDevice, *, steps_ahead: int = 0) -> str:
    """The code the user's app shows now (or `steps_ahead` 30-second steps later)."""
    otp = TOTP(device.bin_key, device.step, device.t0, device.digits, device.drift)
    otp.time = time.time() + steps_ahead * device.step
    return f"{otp.token():0{device.digits}d}"


def wrong_code(device: TOTPDevice) -> str:
    """Six digits that no time step within the device's tolerance accepts."""
    near = {totp_code(device, steps_ahead=s) for s in range(-2, 3)}
    return next(c for c in (f"{n:06d}" for n in range(123456, 999999, 7919)) if c not in near)


def mark_verified(client: ClientMixin, user: User) -> None:
    """Marks the client's signed-in session as having passed the second factor, the way
    django_otp.login does after a good code (the form itself has its own tests)."""
    session = client.session
    session[DEVICE_ID_SESSION_KEY] = authenticator(user).persistent_id
    session.save()


def verified_login_as(page: Page, user: User, server: AppServer) -> None:
    """tests.support.browser.login_as, then the session marked as past the second factor."""
    login_as(page, user, server)
    cookie = next(
        c for c in page.context.cookies(server.url) if c["name"] == settings.SESSION_COOKIE_NAME
    )
    session = SessionStore(session_key=cookie["value"])
    session[DEVICE_ID_SESSION_KEY] = authenticator(user).persistent_id
    session.save()


def client_for(user: User | None, *, verified: bool = True) -> Client:
    """A client signed in as `user`; staff also pass the second factor unless told not to."""
    client = Client()
    if user is not None:
        client.force_login(user)
        if user.is_staff and verified:
            mark_verified(client, user)
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
