"""Preconditions shared by the money actions: who may act, and the reason they must give."""

from __future__ import annotations

from datetime import datetime

from django.conf import settings
from django.db import transaction

from accounts.models import Organization
from accounts.principal import Principal
from core.errors import InvalidInput, PermissionDenied


def check_staff(principal: Principal) -> None:
    """Moving money is for Mantle staff (or the system itself), never a customer or a key."""
    if principal.api_key is not None:
        raise PermissionDenied("API keys cannot perform billing back-office actions")
    if principal.user is not None and not principal.user.is_staff:
        raise PermissionDenied("only Mantle staff can perform billing back-office actions")


def check_reason(reason: str) -> str:
    cleaned = (reason or "").strip()
    if not cleaned:
        raise InvalidInput("reason must not be empty: say why, for the audit log", param="reason")
    if len(cleaned) > 500:
        raise InvalidInput("reason must be at most 500 characters", param="reason")
    return cleaned


def check_currency(currency: str) -> str:
    expected: str = settings.MANTLE_BILLING_CURRENCY
    if currency != expected:
        raise InvalidInput(
            f"currency must be {expected} (the platform bills in one currency)", param="currency"
        )
    return currency


def check_aware(value: datetime, *, param: str) -> datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise InvalidInput(f"{param} must carry a time zone (UTC recommended)", param=param)
    return value


def lock_organization(org: Organization) -> Organization:
    """Serializes an organization's money writes (invoices, ledger); call inside atomic().

    One lock per organization keeps the reasoning simple: a finalization, a refresh,
    a grant and an expiry of the same organization never interleave.
    """
    assert transaction.get_connection().in_atomic_block, "lock_organization needs a transaction"
    return Organization.objects.select_for_update().get(pk=org.pk)
