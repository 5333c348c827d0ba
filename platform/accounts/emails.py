"""The emails of sign-up and invitations; each link in them is the only copy of its secret."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.core.mail import send_mail
from django.urls import reverse


@dataclass(frozen=True)
class Link:
    """A new emailed link: its secret goes in the email only, its digest is stored."""

    secret: str
    digest: str
    expires_at: datetime


def link_new(*, ttl_s: int, now: datetime) -> Link:
    secret = secrets.token_urlsafe(32)
    return Link(secret, link_digest(secret), now + timedelta(seconds=ttl_s))


def link_digest(secret: str) -> str:
    """What a link's row stores and is found by: a copy of the table opens no link."""
    return hashlib.sha256(secret.encode()).hexdigest()


def _url(name: str, token: str) -> str:
    return f"{settings.PUBLIC_BASE_URL}{reverse(name, kwargs={'token': token})}"


def _when(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M UTC")


def send_invitation(
    *,
    email: str,
    organization_name: str,
    role: str,
    inviter: str,
    token: str,
    expires_at: datetime,
) -> None:
    link = _url("console-invitation", token)
    send_mail(
        subject=f"{inviter} invited you to {organization_name} on Mantle",
        message=(
            f"{inviter} invited {email} to join {organization_name} on Mantle as {role}.\n\n"
            f"To accept, open this link:\n{link}\n\n"
            f"It works once, until {_when(expires_at)}. If you did not expect this "
            "invitation, ignore this email: nothing happens unless the link is opened "
            "and accepted."
        ),
        from_email=None,
        recipient_list=[email],
    )


def send_signup_verification(*, email: str, token: str, expires_at: datetime) -> None:
    link = _url("console-signup-verify", token)
    send_mail(
        subject="Confirm your email address for Mantle",
        message=(
            "Someone (we hope you) signed up for Mantle with this address.\n\n"
            f"To create the account, open this link:\n{link}\n\n"
            f"It works once, until {_when(expires_at)}. If it was not you, ignore this "
            "email: no account is created."
        ),
        from_email=None,
        recipient_list=[email],
    )


def send_signup_existing(*, email: str) -> None:
    """Sent instead of a new account when the address is already registered, so that the
    sign-up page can answer the same for taken and free addresses."""
    login = f"{settings.PUBLIC_BASE_URL}{reverse('console-login')}"
    reset = f"{settings.PUBLIC_BASE_URL}{reverse('console-password-reset')}"
    send_mail(
        subject="Someone tried to sign up for Mantle with your address",
        message=(
            "Someone tried to create a Mantle account with this address, but you already "
            "have one, so nothing was created.\n\n"
            f"If it was you, log in at {login}\n"
            f"or, if you forgot your password, reset it at {reset}\n\n"
            "If it was not you, you need not do anything."
        ),
        from_email=None,
        recipient_list=[email],
    )
