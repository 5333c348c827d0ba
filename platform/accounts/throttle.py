"""Console log-in throttling: failed attempts counted in Redis per email and per client address."""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass

from django.conf import settings

from config.errors import DomainError
from config.redis import get_redis

logger = logging.getLogger(__name__)

KEY_PREFIX = "mantle:login-fail:"

# One round trip: count the failure in both windows. The window starts at the first
# failure (EXPIRE NX keeps later failures from pushing it back), so a locked-out person
# knows when they may try again, and a steady trickle of guesses cannot keep an
# account locked forever.
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


@dataclass(frozen=True)
class Failures:
    email: int
    address: int


def email_key(email: str) -> str:
    # Hashed: the key names in Redis should not be a list of the addresses people typed.
    digest = hashlib.sha256(email.strip().lower().encode()).hexdigest()[:32]
    return f"{KEY_PREFIX}email:{digest}"


def address_key(address: str) -> str:
    return f"{KEY_PREFIX}addr:{address}"


def _keys(email: str, address: str | None) -> list[str]:
    found = [email_key(email)]
    if address:
        found.append(address_key(address))
    return found


def login_throttle_check(*, email: str, address: str | None) -> None:
    """Refuses (LoginThrottled) before the password is even checked once a limit is reached."""
    client = get_redis()
    keys = _keys(email, address)
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.get(key)
        pipe.ttl(key)
    replies = pipe.execute()
    limits = [settings.MANTLE_LOGIN_MAX_FAILURES_PER_EMAIL]
    if address:
        limits.append(settings.MANTLE_LOGIN_MAX_FAILURES_PER_ADDRESS)
    for index, limit in enumerate(limits):
        count = int(replies[2 * index] or 0)
        if count < limit:
            continue
        ttl = int(replies[2 * index + 1])
        wait = max(1, math.ceil((ttl if ttl > 0 else settings.MANTLE_LOGIN_FAILURE_WINDOW_S) / 60))
        what = "this email address" if index == 0 else "your network address"
        logger.warning(
            "log-in refused: %s failed log-ins for %s (address %s) in the window",
            count,
            "the email" if index == 0 else "the address",
            address or "unknown",
        )
        raise LoginThrottled(
            f"Too many failed log-ins for {what}. Try again in {wait} minute"
            f"{'s' if wait != 1 else ''}, or reset your password.",
            param="email" if index == 0 else None,
        )


def login_failure_record(*, email: str, address: str | None) -> Failures:
    """Counts one failed attempt. The password is never passed here, so never logged."""
    keys = _keys(email, address)
    counts = get_redis().eval(_RECORD, len(keys), *keys, settings.MANTLE_LOGIN_FAILURE_WINDOW_S)
    failures = Failures(
        email=int(counts[0]),
        address=int(counts[1]) if address else 0,
    )
    logger.info(
        "failed log-in for %s from %s (%s for the email, %s for the address in the window)",
        email.strip().lower(),
        address or "unknown",
        failures.email,
        failures.address,
    )
    return failures


def login_success_reset(*, email: str) -> None:
    """A successful log-in clears the email's count; the address's stays (it may be shared
    by an attacker trying many accounts)."""
    get_redis().delete(email_key(email))
