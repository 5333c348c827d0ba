"""Auto-recharge: when a prepaid balance falls under the organization's threshold, its
saved payment method is charged its set amount off-session, once per crossing, within a
daily cap. Evaluated on the billing queue (beat, wallet syncs, settings saves), never in
the gateway: the request path pays nothing for it.

Once per crossing: `AutoRecharge.armed` is cleared in the transaction that records the
crossing's charge (a pending TopUp with `crossing` = the count of crossings, unique per
organization), under the settings row's lock, and set again only when an evaluation finds
the balance back at or above the threshold. The charge's idempotency key is derived from
(organization, crossing), so a retried task or two evaluators never charge a crossing
twice. Whatever becomes of the charge (paid, declined), the crossing is spent: a decline
is recorded and alerted, never retried in a loop. The credit itself comes with the
`payment_intent.succeeded` webhook (topups.topup_settle).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from django.conf import settings
from django.db import transaction
from django.db.models import Sum
from django.utils import timezone

from accounts.models import Organization
from accounts.principal import Principal
from accounts.services import audit_record
from billing import checks, jobs
from billing.alerts.balance import spendable_balance
from billing.models import AutoRecharge, BillingAccount, StripeCustomer, TopUp
from billing.money import MAX_AMOUNT, check_places, parse_decimal
from billing.payments import topups
from billing.payments.stripe_sync import stripe_backend, stripe_required
from billing.payments.stripe_types import (
    StripeCardDeclined,
    StripeError,
    StripeIdempotencyConflict,
    StripeRateLimited,
    StripeUnavailable,
    TopUpCharge,
    auto_recharge_idempotency_key,
    to_minor_units,
)
from billing.wallet import billing_mode
from core.errors import InvalidInput

logger = logging.getLogger(__name__)

# A crossing's charge not sent within this long (a crash, Stripe down all day) is given
# up rather than sent late: Stripe forgets idempotency keys after 24 hours.
CHARGE_DEADLINE = timedelta(hours=23)
# Retried later under the same key; a conflict on the key is a request of this crossing
# still running at Stripe (another evaluation's), never a reason to give the crossing up.
_TRANSIENT = (StripeRateLimited, StripeUnavailable, StripeIdempotencyConflict)


@dataclass(frozen=True)
class AutoRechargeSpec:
    enabled: bool
    threshold: Decimal
    amount: Decimal
    daily_cap: Decimal


def auto_recharge_of(org: Organization) -> AutoRecharge | None:
    return AutoRecharge.objects.filter(organization=org).first()


def auto_recharge_check(
    *, threshold: Decimal | str, amount: Decimal | str, daily_cap: Decimal | str
) -> tuple[Decimal, Decimal, Decimal]:
    """The three amounts, each checked; InvalidInput names the field at fault."""
    low = check_places(parse_decimal(threshold, param="threshold"), 2, param="threshold")
    if low < 0 or low > MAX_AMOUNT:
        raise InvalidInput(f"threshold must be between 0 and {MAX_AMOUNT}", param="threshold")
    charge = topups.topup_check_amount(amount, param="amount")
    cap = check_places(parse_decimal(daily_cap, param="daily_cap"), 2, param="daily_cap")
    cap_max = Decimal(settings.MANTLE_AUTO_RECHARGE_DAILY_CAP_MAX)
    if cap < charge or cap > cap_max:
        raise InvalidInput(
            f"daily_cap must be at least the amount ({charge}) and at most {cap_max}",
            param="daily_cap",
        )
    return low, charge, cap


def auto_recharge_set(
    *, principal: Principal, org: Organization, spec: AutoRechargeSpec
) -> AutoRecharge:
    """Saves the settings (audited) and re-arms: saving again after a declined card was
    replaced allows a new charge, within the daily cap. Enabling needs Stripe and a saved
    default payment method."""
    threshold, amount, cap = auto_recharge_check(
        threshold=spec.threshold, amount=spec.amount, daily_cap=spec.daily_cap
    )
    if spec.enabled:
        _check_payment_method(org)
    with transaction.atomic():
        checks.lock_organization(org)
        row, _ = AutoRecharge.objects.select_for_update().update_or_create(
            organization=org,
            defaults={
                "enabled": spec.enabled,
                "threshold": threshold,
                "amount": amount,
                "daily_cap": cap,
                "armed": True,
                "updated_by": principal.user,
            },
        )
        audit_record(
            principal=principal,
            action="billing.auto_recharge_set",
            target=row,
            organization=org,
            metadata={
                "enabled": spec.enabled,
                "threshold": str(threshold),
                "amount": str(amount),
                "daily_cap": str(cap),
                "currency": settings.MANTLE_BILLING_CURRENCY,
            },
        )
        if spec.enabled:
            jobs.queue_auto_recharge_evaluate(org.id)
    return row


def _check_payment_method(org: Organization) -> None:
    if stripe_backend() is None:
        raise InvalidInput("auto-recharge needs card payments (Stripe)", param="enabled")
    row = StripeCustomer.objects.filter(organization=org).first()
    method = None
    if row is not None:
        method = stripe_required().customer_retrieve(row.stripe_customer_id)
    if method is None or method.default_payment_method_id is None:
        raise InvalidInput(
            "save a payment method first: auto-recharge charges the saved one",
            param="enabled",
        )


def auto_recharge_spent_today(org: Organization, *, now: datetime) -> Decimal:
    """Auto-recharge charges of the UTC day of `now` that took or may take money."""
    day = now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    total = TopUp.objects.filter(
        organization=org,
        source=TopUp.Source.AUTO_RECHARGE,
        status__in=[TopUp.Status.PENDING, TopUp.Status.PAID],
        created_at__gte=day,
        created_at__lt=day + timedelta(days=1),
    ).aggregate(s=Sum("amount"))["s"]
    return total if total is not None else Decimal(0)


def auto_recharge_evaluate(org: Organization, *, now: datetime | None = None) -> TopUp | None:
    """Charges the organization's crossing if its balance is under the threshold; returns
    the top-up charged now, if any. Re-arms when the balance is back at or above it.

    Precondition: none; safe to run concurrently and repeatedly (see the module's
    docstring). A transient Stripe error propagates (the task retries: the pending top-up
    is charged then, under the same key).
    """
    now = now or timezone.now()
    auto_recharge_resume(org, now=now)
    with transaction.atomic():
        row = AutoRecharge.objects.select_for_update().filter(organization=org).first()
        if row is None or not row.enabled or billing_mode(org) != BillingAccount.Mode.PREPAID:
            return None
        # Read under the lock: an evaluation never acts on a balance another one has
        # already answered (a stale low figure would charge a crossing re-armed since).
        balance = spendable_balance(org, now=now)
        if balance >= row.threshold:
            if not row.armed:
                row.armed = True
                row.save(update_fields=["armed", "updated_at"])
            return None
        if not row.armed:
            return None
        spent = auto_recharge_spent_today(org, now=now)
        if spent + row.amount > row.daily_cap:
            # Stays armed: the next UTC day's first evaluation charges the crossing.
            logger.debug(  # every beat until midnight: not worth a line each time
                "auto-recharge of %s held by its daily cap (%s + %s > %s)",
                org.id,
                spent,
                row.amount,
                row.daily_cap,
            )
            return None
        row.crossings += 1
        row.armed = False
        row.save(update_fields=["crossings", "armed", "updated_at"])
        topup = TopUp.objects.create(
            organization=org,
            source=TopUp.Source.AUTO_RECHARGE,
            amount=row.amount,
            currency=settings.MANTLE_BILLING_CURRENCY,
            crossing=row.crossings,
            created_at=now,
        )
    logger.info(
        "auto-recharge of %s: balance %s under %s, charging %s (crossing %s)",
        org.id,
        balance,
        row.threshold,
        row.amount,
        row.crossings,
    )
    auto_recharge_charge(topup)
    return topup


def auto_recharge_resume(org: Organization, *, now: datetime) -> int:
    """Charges the organization's crossings recorded but never sent (a crash or a
    transient Stripe error between the record and the charge); gives up on those older
    than CHARGE_DEADLINE. Returns how many were charged."""
    unsent = TopUp.objects.filter(
        organization=org,
        source=TopUp.Source.AUTO_RECHARGE,
        status=TopUp.Status.PENDING,
        stripe_payment_intent_id__isnull=True,
    ).order_by("created_at")
    charged = 0
    for topup in unsent:
        if topup.created_at < now - CHARGE_DEADLINE:
            topups.topup_fail(
                topup_id=topup.id,
                code="not_sent",
                message="the charge could not be sent to Stripe within a day",
            )
            continue
        auto_recharge_charge(topup)
        charged += 1
    return charged


def auto_recharge_charge(topup: TopUp) -> None:
    """Sends a crossing's charge to Stripe: off-session, confirmed at once, the crossing's
    idempotency key. A refusal (declined, needs authentication, no saved method) fails the
    top-up for good; only a transient error propagates, to be retried with the same key.

    The top-up's row is locked (skipping a locked one) while Stripe is asked, so two
    evaluations never send one crossing at once; the webhook of the payment waits for it.
    """
    assert topup.source == TopUp.Source.AUTO_RECHARGE and topup.crossing is not None
    org_id = topup.organization_id
    with transaction.atomic():
        claimed = (
            TopUp.objects.select_for_update(skip_locked=True)
            .filter(id=topup.id, status=TopUp.Status.PENDING, stripe_payment_intent_id=None)
            .first()
        )
        if claimed is None:
            return  # sent already, failed, or being sent by another evaluation
        customer = StripeCustomer.objects.filter(organization_id=org_id).first()
        try:
            backend = stripe_required()
            method = (
                backend.customer_retrieve(customer.stripe_customer_id).default_payment_method_id
                if customer is not None
                else None
            )
            if customer is None or method is None:
                topups.topup_fail(
                    topup_id=topup.id,
                    code="no_payment_method",
                    message="no saved payment method to charge",
                )
                return
            intent = backend.payment_intent_charge_off_session(
                TopUpCharge(
                    organization_id=org_id,
                    topup_id=topup.id,
                    customer_id=customer.stripe_customer_id,
                    amount=to_minor_units(topup.amount, topup.currency),
                    currency=topup.currency,
                    description="Mantle prepaid credit (auto-recharge)",
                ),
                payment_method_id=method,
                idempotency_key=auto_recharge_idempotency_key(org_id, topup.crossing),
            )
        except StripeCardDeclined as exc:
            topups.topup_fail(
                topup_id=topup.id,
                code=exc.decline_code or exc.code,
                message=exc.message,
                payment_intent_id=exc.payment_intent_id,
            )
            return
        except _TRANSIENT:
            raise
        except StripeError as exc:
            topups.topup_fail(topup_id=topup.id, code=exc.code, message=exc.message)
            return
        claimed.stripe_payment_intent_id = intent.id
        claimed.save(update_fields=["stripe_payment_intent_id"])
    logger.info("auto-recharge %s charged as %s (%s)", topup.id, intent.id, intent.status)


def auto_recharge_due() -> list[str]:
    """Organizations whose auto-recharge is on (the beat's list)."""
    return list(
        AutoRecharge.objects.filter(enabled=True)
        .order_by("organization_id")
        .values_list("organization_id", flat=True)
    )
