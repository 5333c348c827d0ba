"""The second factor of a person: a TOTP authenticator and single-use recovery codes.

One authenticator per person, for the back office (staff must have one) and the console
(anyone may enrol one; an organization may require one of its owners and admins).
Built on django-otp. A person's authenticator is a confirmed `TOTPDevice`; their
recovery codes are the tokens of one `StaticDevice`, each deleted as it is used, and kept
only as a keyed digest (`recovery_code_digest`: HMAC-SHA256 under `SECRET_KEY`, salted
for this use; django-otp itself would keep them as typed), so a copy of the table holds
no usable code. Every
check goes through `django_otp.verify_token`, which locks the device row for the check
(select_for_update), accepts a TOTP code only for a time step after the last one accepted
(a code seen once, by an onlooker or a proxy log, never works again) and backs off
exponentially after each wrong code (1 s, 2 s, 4 s ... per device). A session counts as
verified once `django_otp.login` has put the device's id in it; `OTPMiddleware` re-reads
that device on each request, so removing a staff member's devices (`two_factor_reset`)
unverifies their open sessions at once.
"""

from __future__ import annotations

import re
import secrets
from base64 import b32encode
from dataclasses import dataclass
from datetime import datetime

from django.conf import settings
from django.db import transaction
from django.utils.crypto import salted_hmac
from django_otp import verify_token
from django_otp.models import Device
from django_otp.plugins.otp_static.models import StaticDevice, StaticToken
from django_otp.plugins.otp_totp.models import TOTPDevice

from accounts import selectors
from accounts.models import User
from accounts.principal import Principal
from accounts.services import audit_record
from core.errors import Conflict, InvalidInput

AUTHENTICATOR_NAME = "authenticator"
RECOVERY_NAME = "recovery codes"
_TOTP_CODE = re.compile(r"\d{6}")
# 10 base32 characters: 50 random bits per code, shown as two groups of five.
_RECOVERY_CODE = re.compile(r"[a-z2-7]{10}")
# What the digests of recovery codes are keyed with (the migration that digested the codes
# issued before, accounts/0004, uses the same salt and length).
_RECOVERY_SALT = "mantle.accounts.recovery-code"

# Audit actions: the back office's (staff) and the console's (anyone).
_STAFF_ACTIONS = {
    "enrolled": "staff.two_factor_enrolled",
    "recovery_code_used": "staff.recovery_code_used",
}
_CONSOLE_ACTIONS = {
    "enrolled": "user.mfa_enrolled",
    "recovery_code_used": "user.mfa_recovery_code_used",
}


@dataclass(frozen=True)
class Enrolment:
    """An authenticator waiting for its first code: what the enrolment page shows, once."""

    device_id: str  # django-otp's persistent id of the unconfirmed device
    secret: str  # base32, for typing into an app by hand
    uri: str  # the otpauth:// URI a QR code carries


@dataclass(frozen=True)
class Verification:
    device: Device | None  # the device that accepted the code; None when refused
    locked_until: datetime | None = None  # set when refused for too many wrong codes


def session_verified(user: object) -> bool:
    """Whether this request's user passed the second factor in this session.

    `OTPMiddleware` gives `request.user` an `is_verified()`; without it (a request that
    did not go through the middleware) the answer is no, so the gate fails closed.
    """
    is_verified = getattr(user, "is_verified", None)
    return callable(is_verified) and bool(is_verified())


def two_factor_enrolled(user: User) -> bool:
    return selectors.mfa_enrolled(user)


def recovery_code_digest(code: str) -> str:
    """What is stored of a recovery code (as a django-otp static token, 16 characters)."""
    return salted_hmac(_RECOVERY_SALT, code, algorithm="sha256").hexdigest()[:16]


def recovery_codes_left(user: User) -> int:
    return StaticToken.objects.filter(device__user=user, device__confirmed=True).count()


def two_factor_enrol_begin(*, user: User) -> Enrolment:
    """A new unconfirmed authenticator with a fresh secret; earlier unconfirmed ones go.

    Each call makes a new secret, so a secret is shown once: a page left open elsewhere
    holds a secret that no longer enrols anything. Refused (ValueError) once `user` has a
    confirmed authenticator: replacing it takes a reset by an operator.
    """
    with transaction.atomic():
        if two_factor_enrolled(user):
            raise ValueError(f"{user.email} already has an authenticator")
        TOTPDevice.objects.filter(user=user, confirmed=False).delete()
        device = TOTPDevice.objects.create(user=user, name=AUTHENTICATOR_NAME, confirmed=False)
    return _enrolment(device)


def two_factor_enrolment(*, user: User, device_id: str) -> Enrolment | None:
    """The pending enrolment `device_id` of `user`, to show again after a wrong code."""
    device = _pending_device(user, device_id)
    return None if device is None else _enrolment(device)


def two_factor_enrol_confirm(
    *, principal: Principal, user: User, device_id: str, code: str, console: bool = False
) -> tuple[TOTPDevice, list[str]] | None:
    """Confirms the pending authenticator with its first code; returns it and new recovery
    codes (replacing any earlier ones), or None when the code is wrong or the enrolment
    is gone. The codes exist in clear only in this return value and in the database row
    that checks them (django-otp keeps them like the TOTP secret); show them once."""
    with transaction.atomic():
        device = _pending_device(user, device_id, for_update=True)
        if device is None or two_factor_enrolled(user):
            return None
        if not device.verify_token(_compact(code)):
            return None
        device.confirmed = True
        device.save(update_fields=["confirmed"])
        codes = _recovery_codes_replace(user)
        audit_record(
            principal=principal,
            action=(_CONSOLE_ACTIONS if console else _STAFF_ACTIONS)["enrolled"],
            target=user,
            organization=None,
            metadata={"recovery_codes": len(codes)},
        )
    return device, codes


def two_factor_enrol_unattended(*, principal: Principal, user: User) -> Enrolment:
    """A confirmed authenticator made without a first code, for an account created from a
    terminal (the demo operator of bin/run): the caller shows its secret, once, to the
    person at that terminal. No recovery codes: a lost secret takes a reset."""
    with transaction.atomic():
        if two_factor_enrolled(user):
            raise ValueError(f"{user.email} already has an authenticator")
        TOTPDevice.objects.filter(user=user, confirmed=False).delete()
        device = TOTPDevice.objects.create(user=user, name=AUTHENTICATOR_NAME, confirmed=True)
        audit_record(
            principal=principal,
            action="staff.two_factor_enrolled",
            target=user,
            organization=None,
            metadata={"recovery_codes": 0},
        )
    return _enrolment(device)


def two_factor_verify(
    *, principal: Principal, user: User, code: str, console: bool = False
) -> Verification:
    """Checks a code from the authenticator (six digits) or a recovery code (used up)."""
    code = _compact(code)
    device: Device | None
    if _TOTP_CODE.fullmatch(code):
        device = TOTPDevice.objects.filter(user=user, confirmed=True).first()
    elif _RECOVERY_CODE.fullmatch(code):
        device = StaticDevice.objects.filter(user=user, confirmed=True).first()
        code = recovery_code_digest(code)
    else:
        return Verification(device=None)
    if device is None:
        return Verification(device=None)
    # Asked first only to say why a code is refused; verify_token checks again under the
    # row lock, and refuses any code, right or wrong, while the device backs off.
    allowed, info = device.verify_is_allowed()
    if not allowed:
        return Verification(device=None, locked_until=(info or {}).get("locked_until"))
    accepted = verify_token(user, device.persistent_id, code)
    if accepted is None:
        return Verification(device=None)
    if isinstance(accepted, StaticDevice):
        audit_record(
            principal=principal,
            action=(_CONSOLE_ACTIONS if console else _STAFF_ACTIONS)["recovery_code_used"],
            target=user,
            organization=None,
            metadata={"recovery_codes_left": accepted.token_set.count()},
        )
    return Verification(device=accepted)


@transaction.atomic
def two_factor_reset(*, principal: Principal, user: User) -> int:
    """Removes every device of `user` (authenticator and recovery codes).

    Their open sessions stop counting as verified at their next request, and their next
    sign-in asks them to enrol again. Returns how many devices were removed.
    """
    removed = 0
    for model in (TOTPDevice, StaticDevice):
        removed += model.objects.filter(user=user).delete()[1].get(model._meta.label, 0)
    audit_record(
        principal=principal,
        action="staff.two_factor_reset",
        target=user,
        organization=None,
        metadata={"devices_removed": removed},
    )
    return removed


# --- The console: a person's own authenticator -------------------------------------------


class CodeRefused(InvalidInput):
    """A wrong (or used) code where a code is asked again to confirm a change."""

    code = "mfa_code_refused"


class CodeLocked(CodeRefused):
    status = 429


def _confirm_with_code(principal: Principal, user: User, code: str) -> Device:
    result = two_factor_verify(principal=principal, user=user, code=code, console=True)
    if result.device is not None:
        return result.device
    if result.locked_until is not None:
        raise CodeLocked(
            f"Too many wrong codes: try again after {result.locked_until:%H:%M:%S} UTC.",
            param="code",
        )
    raise CodeRefused("That code is not valid (or was used already).", param="code")


def recovery_codes_regenerate(*, principal: Principal, user: User, code: str) -> list[str]:
    """New recovery codes (the old ones stop working), once a current code proves the
    person holds the authenticator (or a recovery code). Shown once by the caller."""
    if not two_factor_enrolled(user):
        raise Conflict("enrol an authenticator first", param="code")
    _confirm_with_code(principal, user, code)
    with transaction.atomic():
        codes = _recovery_codes_replace(user)
        audit_record(
            principal=principal,
            action="user.mfa_recovery_codes_regenerated",
            target=user,
            organization=None,
            metadata={"recovery_codes": len(codes)},
        )
    return codes


def two_factor_remove(*, principal: Principal, user: User, code: str) -> int:
    """The person removes their own authenticator and recovery codes, proving with a
    code that they hold them. Refused for staff (the back office needs the authenticator;
    an operator's reset replaces it) and while an organization requires it of them."""
    if user.is_staff:
        raise Conflict(
            "staff keep their authenticator for the back office: an operator's reset "
            "(docs/backoffice.md) replaces it",
            param="code",
        )
    requiring = list(selectors.mfa_organizations_requiring(user))
    if requiring:
        names = ", ".join(o.name for o in requiring)
        raise Conflict(
            f"{names} require{'s' if len(requiring) == 1 else ''} multi-factor "
            "authentication for owners and admins: the authenticator cannot be removed",
            param="code",
        )
    if not two_factor_enrolled(user):
        raise Conflict("there is no authenticator to remove", param="code")
    _confirm_with_code(principal, user, code)
    with transaction.atomic():
        removed = 0
        for model in (TOTPDevice, StaticDevice):
            removed += model.objects.filter(user=user).delete()[1].get(model._meta.label, 0)
        audit_record(
            principal=principal,
            action="user.mfa_removed",
            target=user,
            organization=None,
            metadata={"devices_removed": removed},
        )
    return removed


def recovery_code_display(code: str) -> str:
    """`abcdefghij` as `abcde-fghij`: easier to copy by hand; any spacing is accepted back."""
    return f"{code[:5]}-{code[5:]}"


def _recovery_codes_replace(user: User) -> list[str]:
    StaticDevice.objects.filter(user=user).delete()
    device = StaticDevice.objects.create(user=user, name=RECOVERY_NAME, confirmed=True)
    codes = [_new_recovery_code() for _ in range(int(settings.MANTLE_RECOVERY_CODES))]
    StaticToken.objects.bulk_create(
        StaticToken(device=device, token=recovery_code_digest(c)) for c in codes
    )
    return codes


def _new_recovery_code() -> str:
    return b32encode(secrets.token_bytes(10)).decode()[:10].lower()


def _pending_device(user: User, device_id: str, *, for_update: bool = False) -> TOTPDevice | None:
    device = Device.from_persistent_id(device_id, for_verify=for_update)
    if not isinstance(device, TOTPDevice) or device.user_id != user.pk or device.confirmed:
        return None
    return device


def _enrolment(device: TOTPDevice) -> Enrolment:
    return Enrolment(
        device_id=device.persistent_id,
        secret=b32encode(device.bin_key).decode(),
        uri=device.config_url,
    )


def _compact(code: str) -> str:
    """What a person typed, without the spaces and dashes they may add, lower case."""
    return re.sub(r"[\s-]", "", code).lower()
