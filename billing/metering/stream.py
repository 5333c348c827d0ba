"""The usage stream as the drain's consumer group sees it: read, claim, acknowledge, trim.

Steps 2 and 5 of docs/billing.md's "Exactly once, step by step": XREADGROUP (group
`billing-drain`) hands a consumer entries that stay pending until XACK, through crashes;
entries a dead consumer left pending are claimed (XAUTOCLAIM) by another; the
acknowledgement moves the batch's dead letters to `mantle:usage:dead` in the same MULTI.
The stream is trimmed only below what every group has delivered and acknowledged.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import redis

from workers.contract import USAGE_STREAM

logger = logging.getLogger(__name__)

GROUP = "billing-drain"
DEAD_LETTER_STREAM = "mantle:usage:dead"
DEAD_LETTER_MAXLEN = 1_000_000

RawEntry = tuple[str, list[str] | None]
"""A stream entry as read: (id, its flat [field, value, ...] list, or None when it was
deleted from the stream while pending)."""

DeadLetter = tuple[str, str, dict[str, str]]
"""An entry that cannot be counted: (its id, the reason, its fields)."""


def _raw_reply(response: Any, **options: Any) -> Any:
    return response


def raw_reader(client: redis.Redis) -> redis.Redis:
    """A client on the same connections whose reads return the server's reply as is:
    redis-py's dict-building callbacks cost more than the rest of the parsing."""
    reader = redis.Redis(connection_pool=client.connection_pool)
    for command in ("XREADGROUP", "XAUTOCLAIM"):
        reader.set_response_callback(command, _raw_reply)
    return reader


def _entries(reply: Any) -> list[RawEntry]:
    if not reply:
        return []
    # RESP3 (redis-py's default) replies with a map of streams, RESP2 with pairs.
    entries = reply[USAGE_STREAM] if isinstance(reply, dict) else reply[0][1]
    return [(entry_id, flat) for entry_id, flat in entries]


def read_group(
    reader: redis.Redis, consumer: str, *, after: str, count: int, block_ms: int | None = None
) -> list[RawEntry]:
    """Entries for `consumer` after `after`: its own pending history, or `>` for new ones.

    `reader` is a `raw_reader`."""
    reply = reader.xreadgroup(GROUP, consumer, {USAGE_STREAM: after}, count=count, block=block_ms)
    return _entries(reply)


def claim_stale(
    reader: redis.Redis, consumer: str, *, min_idle_ms: int, start: str, count: int
) -> tuple[str, list[RawEntry]]:
    """Takes over entries pending longer than `min_idle_ms` in other (dead) consumers.

    Returns the cursor to continue from ("0-0" when done) and the entries claimed."""
    reply = reader.xautoclaim(
        USAGE_STREAM,
        GROUP,
        consumer,
        min_idle_time=min_idle_ms,
        start_id=start,
        count=count,
    )
    cursor, claimed = reply[0], reply[1]
    return cursor, [(entry_id, flat) for entry_id, flat in claimed]


def acknowledge(client: redis.Redis, entry_ids: Sequence[str], dead: Sequence[DeadLetter]) -> None:
    """XACK the entries; the dead letters go to DEAD_LETTER_STREAM in the same MULTI."""
    if not entry_ids:
        return
    pipe = client.pipeline(transaction=True)
    for entry_id, reason, fields in dead:
        logger.warning("usage entry %s dead-lettered: %s", entry_id, reason)
        record: dict[Any, Any] = {**fields, "_source_id": entry_id, "_reason": reason}
        pipe.xadd(
            DEAD_LETTER_STREAM,
            record,
            maxlen=DEAD_LETTER_MAXLEN,
            approximate=True,
        )
    pipe.xack(USAGE_STREAM, GROUP, *entry_ids)
    pipe.execute()


def ensure_group(client: redis.Redis) -> None:
    """Create the stream and the drain's consumer group (from the first entry) if missing."""
    try:
        client.xgroup_create(USAGE_STREAM, GROUP, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def _id_ms(entry_id: str) -> int:
    return int(entry_id.split("-", 1)[0])


def drain_lag_seconds(client: redis.Redis) -> float:
    """Age of the oldest event the drain has not counted: pending, or not delivered yet.

    Four cheap commands, whatever the stream's length: TIME (the server's clock, the one
    that stamped the ids), the group's last-delivered id, its oldest pending id, and the
    first entry after the last delivered one.
    """
    try:
        pipe = client.pipeline(transaction=False)
        pipe.time()
        pipe.xinfo_groups(USAGE_STREAM)
        pipe.xpending(USAGE_STREAM, GROUP)
        (seconds, micros), groups, pending = pipe.execute()
    except redis.ResponseError:
        return 0.0  # no stream or no group yet: nothing to drain
    group = next((g for g in groups if g["name"] == GROUP), None)
    if group is None:
        return 0.0
    oldest = []
    if pending["pending"]:
        oldest.append(_id_ms(str(pending["min"])))
    unread = client.xrange(USAGE_STREAM, min=f"({group['last-delivered-id']}", count=1)
    if unread:
        oldest.append(_id_ms(str(unread[0][0])))
    if not oldest:
        return 0.0
    now_ms = int(seconds) * 1000 + int(micros) // 1000
    return max(0.0, (now_ms - min(oldest)) / 1000)


def usage_stream_trim(client: redis.Redis) -> int:
    """Drop stream entries that every consumer group has delivered and acknowledged."""
    try:
        groups = client.xinfo_groups(USAGE_STREAM)
    except redis.ResponseError:
        return 0
    if not groups:
        return 0  # without a group nothing is known to be counted
    bounds = []
    for group in groups:
        pending = client.xpending(USAGE_STREAM, group["name"])
        if pending["pending"]:
            ms, seq = pending["min"].split("-")
            bounds.append((int(ms), int(seq)))
        else:
            ms, seq = group["last-delivered-id"].split("-")
            bounds.append((int(ms), int(seq) + 1))
    ms, seq = min(bounds)
    # Approximate trimming removes whole nodes only, never an id at or past the bound.
    return int(client.xtrim(USAGE_STREAM, minid=f"{ms}-{seq}", approximate=True))
