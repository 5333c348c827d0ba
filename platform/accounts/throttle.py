"""Log-in and sign-up throttling, counted in Redis, that never hands an attacker a lock-out.

Failed log-ins are counted per (email, client address) pair and per client address, never
per email alone: a stranger who types wrong passwords for someone else's email blocks only
their own address for that email, and the owner signing in from anywhere else is not
slowed at all. Guessing one account from many addresses is therefore limited per address,
not in total; the account-wide count is only logged as a warning (a password of the
validators' strength outlasts that; see docs/console.md). Sign-ups are counted per email
and per address, so nobody can mail-bomb an address through the sign-up form.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass

from django.conf import settings

from core.errors import DomainError
from core.redis import get_redis

logger = logging.getLogger(__name__)

KEY_PREFIX = "mantle:login-fail:"
SIGNUP_PREFIX = "mantle:signup:"
INVITATION_PREFIX = "mantle:invitation-mail:"
UNKNOWN_ADDRESS = "unknown"

# One round trip: count in every window. A window starts at the first count (EXPIRE NX
# keeps later ones from pushing it back), so a refused person knows when they may try
# again, and a steady trickle cannot keep a pair or an address blocked forever.
_RECORD = """
local out = {}
for i, key in ipairs(KEYS) do
  out[i] = redis.call('INCR', key)
  redis.call('EXPIRE', key, ARGV[1], 'NX')
end
return out
"""


class LoginThrottled(DomainError):
    status = 429
    code = "login_throttled"


class SignupThrottled(DomainError):
    status = 429
    code = "signup_throttled"


class InvitationThrottled(DomainError):
    status = 429
    code = "invitation_throttled"


@dataclass(frozen=True)
class Failures:
    pair: int
    address: int
    account: int


def _digest(*parts: str) -> str:
    # Hashed: key names in Redis should not be a list of the addresses people typed.
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:32]


def _email(email: str) -> str:
    return email.strip().lower()


def pair_key(email: str, address: str | None) -> str:
    return f"{KEY_PREFIX}pair:{_digest(_email(email), address or UNKNOWN_ADDRESS)}"


def address_key(address: str | None) -> str:
    return f"{KEY_PREFIX}addr:{address or UNKNOWN_ADDRESS}"


def account_key(email: str) -> str:
    """Counted for the warning log only: it never refuses anyone."""
    return f"{KEY_PREFIX}account:{_digest(_email(email))}"


def _wait_minutes(ttl: int, window_s: int) -> int:
    return max(1, math.ceil((ttl if ttl > 0 else window_s) / 60))


def login_throttle_check(*, email: str, address: str | None) -> None:
    """Refuses (LoginThrottled) before the password is even checked once a limit is reached."""
    _refuse_past_limits(pair_key(email, address), address, step="log-ins")


def second_factor_key(email: str, address: str | None) -> str:
    """The second step's own count per (email, address): a correct password, which clears
    the password's pair count, must not clear the codes' count too."""
    return f"{KEY_PREFIX}mfa:{_digest(_email(email), address or UNKNOWN_ADDRESS)}"


def second_factor_throttle_check(*, email: str, address: str | None) -> None:
    """Refuses (LoginThrottled) a code before it is checked once a limit is reached: the
    same limits and window as the password, and the same count per network address."""
    _refuse_past_limits(second_factor_key(email, address), address, step="codes")


def second_factor_failure_record(*, email: str, address: str | None) -> None:
    keys = [second_factor_key(email, address), address_key(address), account_key(email)]
    counts = get_redis().eval(_RECORD, len(keys), *keys, settings.MANTLE_LOGIN_FAILURE_WINDOW_S)
    logger.info(
        "wrong second-factor code for %s from %s (%s for the pair in the window)",
        _email(email),
        address or UNKNOWN_ADDRESS,
        counts[0],
    )


def second_factor_success_reset(*, email: str, address: str | None) -> None:
    get_redis().delete(second_factor_key(email, address))


def _refuse_past_limits(pair: str, address: str | None, *, step: str) -> None:
    keys = [pair, address_key(address)]
    limits = [
        settings.MANTLE_LOGIN_MAX_FAILURES_PER_PAIR,
        settings.MANTLE_LOGIN_MAX_FAILURES_PER_ADDRESS,
    ]
    pipe = get_redis().pipeline(transaction=False)
    for key in keys:
        pipe.get(key)
        pipe.ttl(key)
    replies = pipe.execute()
    for index, limit in enumerate(limits):
        count = int(replies[2 * index] or 0)
        if count < limit:
            continue
        wait = _wait_minutes(int(replies[2 * index + 1]), settings.MANTLE_LOGIN_FAILURE_WINDOW_S)
        what = (
            "this email address from your network address" if index == 0 else "your network address"
        )
        logger.warning(
            "%s refused: %s failed %s %s from %s in the window",
            "log-in" if step == "log-ins" else "second-factor code",
            count,
            step,
            "for the email" if index == 0 else "over all emails",
            address or UNKNOWN_ADDRESS,
        )
        failed = "failed log-ins" if step == "log-ins" else "wrong codes"
        raise LoginThrottled(
            f"Too many {failed} for {what}. Try again in {wait} minute"
            f"{'s' if wait != 1 else ''}"
            f"{', or reset your password.' if step == 'log-ins' else '.'}",
            param="email" if index == 0 else None,
        )


def login_failure_record(*, email: str, address: str | None) -> Failures:
    """Counts one failed attempt. The password is never passed here, so never logged."""
    keys = [pair_key(email, address), address_key(address), account_key(email)]
    counts = get_redis().eval(_RECORD, len(keys), *keys, settings.MANTLE_LOGIN_FAILURE_WINDOW_S)
    failures = Failures(pair=int(counts[0]), address=int(counts[1]), account=int(counts[2]))
    logger.info(
        "failed log-in for %s from %s (%s for the pair, %s for the address in the window)",
        _email(email),
        address or UNKNOWN_ADDRESS,
        failures.pair,
        failures.address,
    )
    if failures.account == settings.MANTLE_LOGIN_ACCOUNT_WARNING:
        logger.warning(
            "%s failed log-ins for %s from many addresses in the window: a distributed guess?",
            failures.account,
            _email(email),
        )
    return failures


def login_success_reset(*, email: str, address: str | None) -> None:
    """A successful log-in clears its pair's count; the address's stays (it may be shared
    by an attacker trying many accounts)."""
    get_redis().delete(pair_key(email, address))


def _over_limit(keys: list[str], limits: list[int], window_s: int) -> tuple[int, int, int] | None:
    """Counts one attempt under each key (a window from its first attempt); the first key
    past its limit, with its count and the minutes until it clears, else None."""
    client = get_redis()
    counts = client.eval(_RECORD, len(keys), *keys, window_s)
    for index, (count, limit) in enumerate(zip(counts, limits, strict=True)):
        if int(count) > limit:
            return index, int(count), _wait_minutes(int(client.ttl(keys[index])), window_s)
    return None


def _minutes(wait: int) -> str:
    return f"{wait} minute{'s' if wait != 1 else ''}"


def signup_throttle_hit(*, email: str, address: str | None) -> None:
    """Counts one sign-up attempt and refuses (SignupThrottled) past either limit.

    Counted whether or not the address is registered, so the refusal reveals nothing.
    """
    over = _over_limit(
        [
            f"{SIGNUP_PREFIX}email:{_digest(_email(email))}",
            f"{SIGNUP_PREFIX}addr:{address or UNKNOWN_ADDRESS}",
        ],
        [settings.MANTLE_SIGNUP_MAX_PER_EMAIL, settings.MANTLE_SIGNUP_MAX_PER_ADDRESS],
        settings.MANTLE_SIGNUP_WINDOW_S,
    )
    if over is None:
        return
    index, count, wait = over
    what = "this email address" if index == 0 else "your network address"
    logger.warning("sign-up refused: %s attempts for %s in the window", count, what)
    raise SignupThrottled(
        f"Too many sign-ups for {what}. Try again in {_minutes(wait)}.",
        param="email" if index == 0 else None,
    )


def invitation_mail_throttle_hit(*, organization_id: str, email: str) -> None:
    """Counts one invitation mail (a new invitation or a resend) and refuses
    (InvitationThrottled) past the limit per recipient of one organization, or per
    organization: invitations must not become a way to mail-bomb an address, nor to send
    mail in bulk. Counted per organization and recipient, not per recipient alone, so one
    tenant cannot use up the invitations another sends to the same person."""
    over = _over_limit(
        [
            f"{INVITATION_PREFIX}email:{organization_id}:{_digest(_email(email))}",
            f"{INVITATION_PREFIX}org:{organization_id}",
        ],
        [settings.MANTLE_INVITATION_MAX_PER_EMAIL, settings.MANTLE_INVITATION_MAX_PER_ORG],
        settings.MANTLE_INVITATION_WINDOW_S,
    )
    if over is None:
        return
    index, count, wait = over
    what = "this email address" if index == 0 else "this organization"
    logger.warning("invitation mail refused: %s in the window for %s", count, what)
    raise InvitationThrottled(
        f"Too many invitation emails for {what}. Try again in {_minutes(wait)}.",
        param="email" if index == 0 else None,
    )
