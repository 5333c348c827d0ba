"""After the commit: the spend outbox row applied to Redis once, the hooks run, the row deleted.

Step 4 of docs/billing.md's "Exactly once, step by step". The batch's tokens are added to
`mantle:spend:<org>` by one Lua script that first sets `mantle:spend-applied:<batch>` NX,
so a replay adds nothing; then the `on_counted` hooks run (the wallet's is one); then the
outbox row goes. A drain that dies in between leaves the row, and whoever replays the
outbox (at start, every 30 s) finishes the batch with the same events.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

import redis
from django.db import transaction

from billing.metering.parse import FIELD_NAMES
from billing.metering.store import spend_delta
from billing.models import SpendOutbox
from billing.models import UsageEvent as UsageEventRow
from workers.contract import UsageEvent

logger = logging.getLogger(__name__)

SPEND_APPLIED_TTL_S = 7 * 24 * 3600
"""How long a batch's spend marker outlives it: longer than any outbox row can wait."""


def spend_key(organization_id: str) -> str:
    """Hash of the tokens counted for an organization: `input_tokens`, `output_tokens`,
    `cached_input_tokens` (a part of `input_tokens`)."""
    return f"mantle:spend:{organization_id}"


def spend_applied_key(batch: str) -> str:
    return f"mantle:spend-applied:{batch}"


# --- Hooks -------------------------------------------------------------------------------

CountedHook = Callable[[Sequence[UsageEvent]], None]
_hooks: list[CountedHook] = []


def on_counted(hook: CountedHook) -> CountedHook:
    """Register `hook(events)`, called after each commit with the events it counted.

    Usable as a decorator; register at import time (an AppConfig.ready). A hook runs in the
    drain process, after the commit and before the acknowledgement, at least once per
    counted event: if the drain dies or a hook raises, the batch is replayed from the spend
    outbox with the same events, so a hook must be idempotent by request id. Hooks should
    batch their own I/O: they are on the drain's hot path.
    """
    if hook not in _hooks:
        _hooks.append(hook)
    return hook


def registered_hooks() -> tuple[CountedHook, ...]:
    return tuple(_hooks)


# --- Spend in Redis and the outbox -------------------------------------------------------

# Marker and increments in one script: a replay of the same batch finds the marker and adds
# nothing, and a crash cannot leave the increments without the marker or the reverse.
_APPLY_SPEND_LUA = """
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then return 0 end
for i = 2, #KEYS do
  redis.call('HINCRBY', KEYS[i], 'input_tokens', ARGV[3 * i - 4])
  redis.call('HINCRBY', KEYS[i], 'output_tokens', ARGV[3 * i - 3])
  redis.call('HINCRBY', KEYS[i], 'cached_input_tokens', ARGV[3 * i - 2])
end
return 1
"""


def spend_apply(client: redis.Redis, *, batch: str, deltas: Mapping[str, Sequence[int]]) -> bool:
    """Add a committed batch's tokens to `mantle:spend:<org>`, once per batch. True if added.

    `deltas`: organization -> (input, output, cached input) tokens; an outbox row of the
    previous release has only the first two.
    """
    keys = [spend_applied_key(batch)]
    args: list[Any] = [SPEND_APPLIED_TTL_S]
    for org, counts in sorted(deltas.items()):
        keys.append(spend_key(org))
        args += spend_delta(counts)
    return bool(client.eval(_APPLY_SPEND_LUA, len(keys), *keys, *args))


def _run_hooks(hooks: Sequence[CountedHook], events: Sequence[UsageEvent]) -> bool:
    ok = True
    for hook in hooks:
        try:
            hook(events)
        except Exception:
            logger.exception("on_counted hook %r failed; its batch will be replayed", hook)
            ok = False
    return ok


def outbox_finish(
    client: redis.Redis,
    *,
    batch: str,
    deltas: Mapping[str, Sequence[int]],
    events: Sequence[UsageEvent] | None,
    hooks: Sequence[CountedHook],
) -> bool:
    """Apply a committed batch's spend and hooks, then delete its outbox row.

    Whoever locks the row does it (this drain, or another replaying the outbox); a batch
    whose hooks fail keeps its row for the next replay. True when the row is gone.
    """
    with transaction.atomic():
        row = SpendOutbox.objects.select_for_update(skip_locked=True).filter(batch=batch).first()
        if row is None:
            return True  # replayed by another drain, or in its hands right now
        spend_apply(client, batch=batch, deltas=deltas)
        if hooks:
            if events is None:
                events = _events_from_table(row)
            if not _run_hooks(hooks, events):
                return False
        row.delete()
    return True


def _events_from_table(row: SpendOutbox) -> list[UsageEvent]:
    """A replayed batch's events, read back from the raw table."""
    ids = row.request_ids
    if not ids:
        return []
    fields = [f if f != "finished_at" else "occurred_at" for f in FIELD_NAMES]
    events = []
    for values in UsageEventRow.objects.filter(request_id__in=ids).values_list(*fields):
        converted: list[Any] = [v.timestamp() if isinstance(v, datetime) else v for v in values]
        events.append(UsageEvent(*converted))
    return events


def outbox_replay(
    client: redis.Redis, *, hooks: Sequence[CountedHook] = (), limit: int = 100
) -> int:
    """Finish batches whose drain died after committing. Returns how many were finished."""
    done = 0
    pending = SpendOutbox.objects.order_by("id").values_list("batch", "deltas")[:limit]
    for batch, deltas in pending:
        if outbox_finish(client, batch=batch.hex, deltas=deltas, events=None, hooks=hooks):
            done += 1
    if done:
        logger.info("spend outbox: %d committed batch(es) finished", done)
    return done
