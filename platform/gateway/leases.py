"""Places held in Redis while a request runs are leases that their gateway renews.

A request in flight holds places in sorted sets that every gateway reads: a provider's slot
and its organization's share of it (gateway/relay.py), its organization's share of a pool
and the pool's backlog (gateway/pool_share.py), a provisioned unit (gateway/provisioned.py).
Each member is scored by the moment it ends, and every take first drops the members past
theirs. A gateway gives its places back when the request ends; one that dies (SIGKILL, OOM,
a lost node) never does. Scored by the request's deadline, its places stayed taken for the
whole MANTLE_REQUEST_TIMEOUT_S: an organization's paid units, or a provider's only slot,
lost for minutes. So a place is taken for MANTLE_INFLIGHT_LEASE_S (at most to the deadline)
and this process pushes the end of every place it holds back every third of a lease, in one
pipeline (`ZADD XX`: a place given back meanwhile is not taken again): a dead gateway's
places end within a lease.

`hold` after a take succeeded, `let_go` when the place is given back (before or with the
ZREM); `end` is the score a take writes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable

from django.conf import settings

from core.redis import get_async_redis

logger = logging.getLogger(__name__)

# (sorted set, member) -> the request's deadline, for the places this process holds.
_held: dict[tuple[str, str], float] = {}
_renewer: asyncio.Task[None] | None = None


def end(deadline: float, now: float | None = None) -> float:
    """The score of a place taken or renewed now: a lease's end, at most the deadline."""
    now = time.time() if now is None else now
    return min(deadline, now + settings.MANTLE_INFLIGHT_LEASE_S)


def hold(member: str, keys: Iterable[str], deadline: float) -> None:
    """Keeps `member`'s places in `keys` leased while the request runs (until `let_go` or
    its deadline). Call it on the event loop that serves the request."""
    global _renewer
    for key in keys:
        if key:
            _held[(key, member)] = deadline
    loop = asyncio.get_running_loop()
    if _renewer is None or _renewer.done() or _renewer.get_loop() is not loop:
        _renewer = loop.create_task(_renew())


def let_go(member: str, keys: Iterable[str]) -> None:
    """Stops renewing `member`'s places in `keys` (they are being given back)."""
    for key in keys:
        _held.pop((key, member), None)


def holding(member: str) -> bool:
    """Whether this process renews any place of `member` (tests)."""
    return any(m == member for _, m in _held)


async def _renew() -> None:
    """Pushes back the end of every place this process holds, every third of a lease, in
    one round trip; ends when none is left (`hold` starts it again)."""
    while _held:
        await asyncio.sleep(settings.MANTLE_INFLIGHT_LEASE_S / 3)
        now = time.time()
        by_key: dict[str, dict[str, float]] = {}
        for (key, member), deadline in list(_held.items()):
            if deadline <= now:
                _held.pop((key, member), None)
                continue
            by_key.setdefault(key, {})[member] = end(deadline, now)
        if not by_key:
            continue
        pipe = get_async_redis().pipeline(transaction=False)
        for key, members in by_key.items():
            pipe.zadd(key, members, xx=True)
        try:
            await pipe.execute()
        except Exception:  # the next round tries again; a lease lasts three rounds
            logger.warning("could not renew the leases of %d places in flight", len(_held))
