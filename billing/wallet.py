"""The wallet: each organization's funds for admission, written to Redis from the database.

The layout (billing/wallet_keys.py names its keys and fields) is shared with
billing/spend.py (the gateway's settle and the drain's count) and the admission script of
gateway/limits.py, and written down exactly in docs/billing.md, "Admission". In short, per
organization:

    mantle:wallet:<org>            mode, cap_nanos, spent_nanos, reserved_nanos,
                                   pending_nanos, month, synced_at,
                                   p:<project>:cap_nanos, p:<project>:spent_nanos
    mantle:price:<org>:<model>     in, out, req, ms, cin: nanos per token, request, compute
                                   millisecond and cached input token (decimal strings,
                                   exact), and bin, bout, breq, bms, bcin: the same for
                                   batch lines; or `unpriced`

Admission may spend `cap - spent - reserved - pending`; what matters is the difference,
so `wallet_sync` rebases `spent_nanos` with an increment rather than overwriting it.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal

import redis
from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from accounts.models import ApiKey, BudgetMode, Organization
from accounts.principal import Principal
from accounts.services import audit_record
from billing import checks, jobs, spend, wallet_keys
from billing.credits import credit_available
from billing.invoicing import month_spend, unbilled_usage
from billing.models import BillingAccount, Budget, CreditLedgerEntry, TokenKind, UsageRollup
from billing.money import nanos_ceil, nanos_floor, nanos_per_token
from billing.periods import month_label, month_start
from billing.pricing import (
    CACHED_INPUT,
    CLASS_TWINS,
    PRICED_TIERS,
    EffectivePrice,
    PriceBook,
    billed_units,
    model_kinds,
)
from core.errors import InvalidInput
from core.redis import get_redis
from workers.contract import ServiceClass
from workers.contract import UsageEvent as ContractUsageEvent

logger = logging.getLogger(__name__)

Mode = BillingAccount.Mode
BATCH_MARK_TTL_S = 7 * 24 * 3600


@dataclass(frozen=True)
class WalletState:
    """What the database says the wallet should be, computed at one moment.

    `spent_nanos` is the baseline that `spent_nanos` in Redis is rebased to: the spend
    that `cap_nanos` does not already reflect. Caps are rounded down, spend up.
    """

    organization_id: str
    mode: str  # prepaid | postpaid when capped, else unlimited (the gateway skips the check)
    cap_nanos: int | None  # None: no organization-level check
    spent_nanos: int
    month: str
    projects: Mapping[str, tuple[int, int]] = field(default_factory=dict)  # id -> (cap, spent)
    # API keys with a hard monthly budget: id -> (cap, spent), as projects.
    keys: Mapping[str, tuple[int, int]] = field(default_factory=dict)
    prices: Mapping[str, spend.Prices] = field(default_factory=dict)  # model -> its prices


def billing_mode(org: Organization) -> str:
    account = BillingAccount.objects.filter(organization=org).first()
    return account.mode if account else settings.MANTLE_BILLING_DEFAULT_MODE


def billing_mode_set(
    *, principal: Principal, org: Organization, mode: str, reason: str
) -> BillingAccount:
    """Sets how the organization pays (staff only); the wallet follows after commit."""
    checks.check_staff(principal)
    reason = checks.check_reason(reason)
    if mode not in Mode.values:
        raise InvalidInput(f"mode must be one of {sorted(Mode.values)}", param="mode")
    with transaction.atomic():
        before = billing_mode(org)
        account, _ = BillingAccount.objects.update_or_create(
            organization=org, defaults={"mode": mode}
        )
        audit_record(
            principal=principal,
            action="billing.mode_set",
            target=org,
            organization=org,
            metadata={"from": before, "to": mode, "reason": reason},
        )
        jobs.queue_wallet_sync(org.id)
    return account


def wallet_compute(org: Organization, *, now: datetime | None = None) -> WalletState:
    """The wallet from the database (no Redis).

    - prepaid: spent = usage on no issued invoice (drafts, late usage), cap = credit
      available (non-expired grants' remainders). The ledger only moves at invoice
      finalization, so together they count each usage exactly once. With a hard
      organization budget too, the cap is lowered so that cap - spent is the smaller
      of the two headrooms (funds, and budget minus this month's spend).
    - postpaid: spent = this month's usage charges; cap = the hard organization
      budget, or none.
    - unlimited: spent = this month's usage charges; no cap, no project caps.
    Project hard budgets (not in unlimited mode): cap = budget, spent = the project's
    month usage charges; API keys with a hard monthly budget alike (the key's own month
    usage charges).
    """
    now = now or timezone.now()
    month = month_start(now)
    mode = billing_mode(org)
    hard = {b.project_id: b for b in Budget.objects.filter(organization=org, hard_limit=True)}
    org_budget = hard.pop(None, None)
    cap: int | None = None
    if mode == Mode.PREPAID:
        # Unbilled usage BEFORE the ledger: a finalization in between is then
        # counted twice (refuses a little early), never missed.
        spent = nanos_ceil(unbilled_usage(org))
        headroom = nanos_floor(credit_available(org, now)) - spent
        if org_budget is not None:
            used = nanos_ceil(month_spend(org, month, exact=True))
            headroom = min(headroom, nanos_floor(org_budget.monthly_amount) - used)
        cap = spent + headroom
    else:
        spent = nanos_ceil(month_spend(org, month, exact=True))
        if mode == Mode.POSTPAID and org_budget is not None:
            cap = nanos_floor(org_budget.monthly_amount)
    projects: dict[str, tuple[int, int]] = {}
    if mode != Mode.UNLIMITED:
        for project_id, budget in hard.items():
            assert project_id is not None
            used = nanos_ceil(month_spend(org, month, project_id=project_id, exact=True))
            projects[project_id] = (nanos_floor(budget.monthly_amount), used)
    keys: dict[str, tuple[int, int]] = {}
    if mode != Mode.UNLIMITED:
        for key_id, amount in hard_key_budgets(org):
            used = nanos_ceil(month_spend(org, month, api_key_id=key_id, exact=True))
            keys[key_id] = (nanos_floor(amount), used)
    return WalletState(
        organization_id=org.id,
        # What admission does, which the gateway reads: no cap, no check ("unlimited").
        mode=mode if cap is not None else Mode.UNLIMITED,
        cap_nanos=cap,
        spent_nanos=spent,
        month=month_label(month),
        projects=projects,
        keys=keys,
        prices=prices_compute(org.id, now=now),
    )


def hard_key_budgets(org: Organization) -> list[tuple[str, Decimal]]:
    """(key id, monthly budget) of the organization's unrevoked keys with a hard budget."""
    rows = ApiKey.objects.filter(
        organization=org,
        monthly_budget__isnull=False,
        budget_mode=BudgetMode.HARD,
        revoked_at__isnull=True,
    ).values_list("id", "monthly_budget")
    return [(key_id, amount) for key_id, amount in rows.order_by("id") if amount is not None]


def prices_compute(
    organization_id: str, *, now: datetime | None = None, models: Iterable[str] | None = None
) -> dict[str, spend.Prices]:
    """model -> the organization's effective prices now, in nanos per unit.

    A text model's are per input and output token (request and compute time are 0), and
    per cached input token: its cached price where one applies, else the input price; a
    tensor model's per request and per compute millisecond (tokens are 0). The batch
    prices are the same units of batch lines: the batch price where one applies, else the
    online one; the priority and flex prices the online ones times the tier's multiplier.
    Each is what the invoice bills the unit at (`PriceBook.billed`). Exact
    decimal strings: the gateway rounds a reservation up, the drain rounds each request's
    cost up. A model not priced for both of its units is left out (logged): the gateway
    refuses it (`model_not_priced`) and its usage would be held, not invoiced.
    """
    now = now or timezone.now()
    book = PriceBook.load(organization_id, model_names=models)
    names = sorted(book.model_names() if models is None else set(models))
    kinds = model_kinds(names)
    prices = {}
    for model in names:
        served = billed_units(kinds[model])
        found = [book.effective(model, unit, now) for unit in served]
        if None in found:
            if any(price is not None for price in found):
                logger.error("%s is priced for one of %s only; not admitted", model, served)
            continue
        # Every other unit bills at worst as one of these two (a cached token as an input
        # token, a batch line's as an online one), so it is priced too.
        online = served if kinds[model] == "tensor" else (*served, CACHED_INPUT)
        units = (
            *online,
            *(twins[unit] for twins in CLASS_TWINS.values() for unit in online),
        )
        per_unit = {unit: _nanos(book.billed(model, unit, now)[1]) for unit in units}
        prices[model] = spend.Prices(
            **{field: per_unit.get(unit, "0") for field, unit in _PRICE_UNITS.items()}
        )
    return prices


# Each field of spend.Prices, and the unit whose billed price it holds.
_PRICE_UNITS = {
    "input": TokenKind.INPUT.value,
    "output": TokenKind.OUTPUT.value,
    "request": TokenKind.REQUEST.value,
    "compute_ms": TokenKind.COMPUTE_MS.value,
    "cached_input": TokenKind.CACHED_INPUT.value,
    "batch_input": TokenKind.BATCH_INPUT.value,
    "batch_output": TokenKind.BATCH_OUTPUT.value,
    "batch_request": TokenKind.BATCH_REQUEST.value,
    "batch_compute_ms": TokenKind.BATCH_COMPUTE_MS.value,
    "batch_cached_input": TokenKind.BATCH_CACHED_INPUT.value,
    **{
        f"{tier}_{unit}": f"{tier}_{unit}"
        for tier in PRICED_TIERS
        for unit in ("input", "output", "request", "compute_ms", "cached_input")
    },
}


def _nanos(price: EffectivePrice | None) -> str:
    assert price is not None  # every unit of a served model is priced (prices_compute)
    return _plain(nanos_per_token(price.unit_price))


def price_fill(organization_id: str, model_name: str) -> spend.Prices | None:
    """The model's price hash from the database, written to Redis (admission's miss path).

    An unpriced model gets a short-lived `unpriced` marker instead, so admission refuses it
    without asking the database each time, and serves it within a minute of being priced.
    """
    found = prices_compute(organization_id, models=[model_name]).get(model_name)
    spend.price_write(get_redis(), organization_id, model_name, found)
    return found


# Rebases the wallet in one step. Increments (never overwrites) keep every HINCRBY of
# the drain and the gateway that raced with the database read. `sync_gen` makes two
# syncs of one organization serialize: one that read the counters before another sync
# rebased them would rebase twice, so it is refused (0) and computed again. All numbers
# arrive as strings and go to Redis unchanged: Lua numbers are doubles, nanos need 64 bits.
_SYNC = wallet_keys.lua("""
local w = KEYS[1]
if (redis.call('HGET', w, '${sync_gen}') or '0') ~= ARGV[6] then return 0 end
redis.call('HINCRBY', w, '${sync_gen}', 1)
redis.call('HSET', w, '${mode}', ARGV[1], '${month}', ARGV[4], '${synced_at}', ARGV[5])
if ARGV[2] == '' then
  redis.call('HDEL', w, '${cap}')
else
  redis.call('HSET', w, '${cap}', ARGV[2])
end
redis.call('HINCRBY', w, '${spent}', ARGV[3])
local keep = {}
local n = tonumber(ARGV[7])
for i = 0, n - 1 do
  -- `p:<project>` or `k:<key>`: whose cap (a project's or an API key's).
  local pid = ARGV[8 + 3 * i]
  local cap_f = pid .. ':${cap}'
  local spent_f = pid .. ':${spent}'
  keep[cap_f] = true
  keep[spent_f] = true
  redis.call('HSET', w, cap_f, ARGV[9 + 3 * i])
  redis.call('HINCRBY', w, spent_f, ARGV[10 + 3 * i])
end
for _, f in ipairs(redis.call('HKEYS', w)) do
  -- A project's reserved and pending belong to requests in flight: never the sync's.
  local owned = string.sub(f, 1, 2) == '${project}' or string.sub(f, 1, 2) == '${apikey}'
  if owned and not keep[f] and not string.find(f, ':${reserved}$$')
     and not string.find(f, ':${pending}$$') then
    redis.call('HDEL', w, f)
  end
end
return 1
""")
SYNC_ATTEMPTS = 5


class WalletSyncContended(RuntimeError):
    """Other syncs of the same organization kept rebasing first; the next run will do."""


def wallet_sync(org: Organization, *, now: datetime | None = None) -> WalletState:
    """Recomputes the organization's wallet and prices from the database, into Redis.

    Why it never loses spend: the drain increments `spent_nanos` only after its rows
    are committed. The counters are read here BEFORE the database (S0), and rebased by
    `baseline - S0`: an increment that happened before the S0 read is for rows the
    database read sees (replaced by the baseline), one after it is kept. A row committed
    just before the database read but counted after S0 is counted twice until the next
    sync: refusals can come a little early, spending past the cap cannot.
    """
    client = get_redis()
    key = wallet_keys.wallet_key(org.id)
    released = spend.release_expired_holds(client, org.id)
    if released:
        logger.warning(
            "released %d reservation(s) of %s that no gateway settled in time", released, org.id
        )
    for _ in range(SYNC_ATTEMPTS):
        before: dict[str, str] = client.hgetall(key)  # type: ignore[assignment]
        state = wallet_compute(org, now=now)
        args: list[str] = [
            state.mode,
            "" if state.cap_nanos is None else str(state.cap_nanos),
            str(state.spent_nanos - int(before.get(wallet_keys.SPENT, 0))),
            state.month,
            f"{time.time():.3f}",
            before.get(wallet_keys.SYNC_GEN, "0"),
            str(len(state.projects) + len(state.keys)),
        ]
        for project_id, (cap, used) in sorted(state.projects.items()):
            s0 = int(before.get(wallet_keys.project_field(project_id, wallet_keys.SPENT), 0))
            owner = wallet_keys.project_field(project_id, "")[:-1]
            args += [owner, str(cap), str(used - s0)]
        for key_id, (cap, used) in sorted(state.keys.items()):
            s0 = int(before.get(wallet_keys.key_field(key_id, wallet_keys.SPENT), 0))
            owner = wallet_keys.key_field(key_id, "")[:-1]
            args += [owner, str(cap), str(used - s0)]
        pipe = client.pipeline(transaction=True)
        pipe.eval(_SYNC, 1, key, *args)
        for model, prices in state.prices.items():
            spend.price_write(pipe, org.id, model, prices)
        if pipe.execute()[0] == 1:
            return state
        logger.info("wallet sync of %s raced another sync; computing again", org.id)
    raise WalletSyncContended(f"wallet sync of {org.id} lost {SYNC_ATTEMPTS} races")


def wallet_sync_due(*, now: datetime | None = None) -> list[str]:
    """Organizations whose wallet the periodic sync refreshes: any that can be refused
    (prepaid, hard budgets), has credit, or has used anything this or last month."""
    now = now or timezone.now()
    previous = month_start(month_start(now) - timedelta(days=1))
    ids: set[str] = set(
        BillingAccount.objects.filter(mode=Mode.PREPAID).values_list("organization_id", flat=True)
    )
    ids |= set(Budget.objects.filter(hard_limit=True).values_list("organization_id", flat=True))
    ids |= set(
        ApiKey.objects.filter(
            monthly_budget__isnull=False, budget_mode=BudgetMode.HARD, revoked_at__isnull=True
        ).values_list("organization_id", flat=True)
    )
    ids |= set(
        CreditLedgerEntry.objects.filter(
            Q(expires_at__isnull=True) | Q(expires_at__gt=now),
            kind__in=CreditLedgerEntry.GRANT_KINDS,
        ).values_list("organization_id", flat=True)
    )
    ids |= set(
        UsageRollup.objects.filter(hour__gte=previous)
        .values_list("organization_id", flat=True)
        .distinct()
        .order_by()
    )
    return sorted(ids)


# --- The drain side -----------------------------------------------------------------------

# One batch of counted usage, exactly once: the batch's mark is set in the same script
# as its increments, so a replayed batch (same events) changes nothing. Per event with a
# request id, the layout of billing/spend.py: a cost the gateway parked as pending moves
# to spent, otherwise `mantle:wallet-counted:<request>` tells the gateway's settle that the
# drain was first; a batch line's marker is written even when its cost was parked, since
# its id may be settled again after this (`spend.settle`). The spent increments are summed
# per wallet and per (wallet, project) before the script runs (they commute with everything
# else it does, and Python's integers are exact where Lua's numbers are not): one HINCRBY
# per wallet instead of one per event. A project with a hard budget counts its own spend
# too, and so does an API key with a hard monthly budget (each an "owner": `p:<project>`
# or `k:<key>`).
_RECORD = spend.UNPARK_LUA + wallet_keys.lua("""
if redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) == false then return 0 end
local n, m, p = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local at = 6
for i = 1, n do
  local w, pending, counted, rid, batch = ARGV[at], ARGV[at + 1], ARGV[at + 2], ARGV[at + 3],
                                          ARGV[at + 4]
  at = at + 5
  local parked = redis.call('HGET', pending, rid)
  if parked then
    redis.call('HDEL', pending, rid)
    unpark(w, parked)
  end
  if not parked or batch == '1' then
    redis.call('SET', counted, '1', 'EX', ARGV[2])
  end
end
for i = 1, m do
  redis.call('HINCRBY', ARGV[at], '${spent}', ARGV[at + 1])
  at = at + 2
end
for i = 1, p do
  local w, owner, cost = ARGV[at], ARGV[at + 1], ARGV[at + 2]
  at = at + 3
  if redis.call('HEXISTS', w, owner .. ':${cap}') == 1 then
    redis.call('HINCRBY', w, owner .. ':${spent}', cost)
  end
end
return 1
""")


# Arguments of _RECORD per request: wallet, pending hash, counted key, id, batch flag.
_PER_REQUEST = 5


@dataclass(frozen=True)
class Usage:
    organization_id: str
    model_name: str
    input_tokens: int
    output_tokens: int
    project_id: str = ""
    request_id: str = ""
    requests: int = 1
    compute_ms: int = 0
    cached_input_tokens: int = 0  # a part of input_tokens
    service_class: str = ServiceClass.ONLINE  # batch lines cost the batch prices
    api_key_id: str = ""  # counted toward the key's hard budget when it has one


def wallet_record_usage(
    *,
    organization_id: str,
    model_name: str,
    input_tokens: int,
    output_tokens: int,
    project_id: str = "",
    request_id: str = "",
    cached_input_tokens: int = 0,
    service_class: str = ServiceClass.ONLINE,
    api_key_id: str = "",
) -> int:
    """Counts one request's usage at the organization's current prices (a batch line's at
    the batch prices); returns nanos.

    For the metering drain's post-commit hook (see `wallet_record_events` for batches).
    Must run after the usage rows are committed (see `wallet_sync`).
    """
    usage = Usage(
        organization_id,
        model_name,
        input_tokens,
        output_tokens,
        project_id,
        request_id,
        cached_input_tokens=cached_input_tokens,
        service_class=service_class,
        api_key_id=api_key_id,
    )
    return wallet_record_batch([usage])[0]


def wallet_record_events(events: Sequence[ContractUsageEvent]) -> None:
    """An `on_counted` hook for billing.metering.outbox: the batch's events, exactly once."""
    wallet_record_batch(
        [
            Usage(
                organization_id=e.organization_id,
                model_name=e.model_name,
                input_tokens=int(e.input_tokens),
                output_tokens=int(e.output_tokens),
                project_id=e.project_id,
                request_id=e.request_id,
                compute_ms=int(e.compute_ms),
                cached_input_tokens=int(e.cached_input_tokens),
                service_class=e.service_class,
                api_key_id=e.api_key_id,
            )
            for e in events
        ]
    )


def wallet_record_batch(usages: Sequence[Usage]) -> list[int]:
    """Counts a batch at current prices in one atomic script; the costs, in nanos. Each
    usage is costed at the prices of its class (a batch line's at the batch prices), as the
    gateway's settle parked it.

    Idempotent when every usage has a request id: the batch is marked by a digest of its
    request ids, so the drain replaying a batch after a crash counts nothing twice.
    Prices come from the price hashes; one missing (never synced) is computed from the
    database and written. Unpriced usage costs 0 here (and is logged): the invoice
    refuses it, the operator prices it.
    """
    if not usages:
        return []
    client = get_redis()
    prices = _prices_for(client, {(u.organization_id, u.model_name) for u in usages})
    # Each pair's prices of each class in integer form once per batch, not parsed again per
    # request.
    scaled = {
        (*pair, service_class): p.for_class(service_class).scaled()
        for pair, p in prices.items()
        for service_class in {u.service_class for u in usages}
    }
    free = spend.FREE.scaled()
    costs = []
    requests: list[str] = []
    by_wallet: dict[str, int] = {}
    by_project: dict[tuple[str, str], int] = {}  # (wallet, `p:<project>` or `k:<key>`)
    for u in usages:
        cost = scaled.get((u.organization_id, u.model_name, u.service_class), free).cost(
            u.input_tokens, u.output_tokens, u.requests, u.compute_ms, u.cached_input_tokens
        )
        costs.append(cost)
        wallet = wallet_keys.wallet_key(u.organization_id)
        if u.request_id:
            requests += [
                wallet,
                wallet_keys.pending_key(u.organization_id),
                wallet_keys.counted_key(u.request_id),
                u.request_id,
                "1" if u.service_class == ServiceClass.BATCH else "0",
            ]
        by_wallet[wallet] = by_wallet.get(wallet, 0) + cost
        owners = []
        if u.project_id:
            owners.append(wallet_keys.project_field(u.project_id, "")[:-1])
        if u.api_key_id:
            owners.append(wallet_keys.key_field(u.api_key_id, "")[:-1])
        for owner in owners:
            by_project[wallet, owner] = by_project.get((wallet, owner), 0) + cost
    if all(u.request_id for u in usages):
        ids = "\n".join(sorted(u.request_id for u in usages)).encode()
        fingerprint = hashlib.sha256(ids).hexdigest()
    else:  # no identity to de-duplicate on: count as given
        fingerprint = f"anonymous:{time.time_ns()}:{id(usages)}"
    client.eval(
        _RECORD,
        1,
        wallet_keys.batch_mark_key(fingerprint),
        str(BATCH_MARK_TTL_S),
        str(spend.COUNTED_TTL_S),
        str(len(requests) // _PER_REQUEST),
        str(len(by_wallet)),
        str(len(by_project)),
        *requests,
        *(x for wallet, total in by_wallet.items() for x in (wallet, str(total))),
        *(x for (w, project), total in by_project.items() for x in (w, project, str(total))),
    )
    return costs


def _prices_for(
    client: redis.Redis, pairs: Iterable[tuple[str, str]]
) -> dict[tuple[str, str], spend.Prices]:
    ordered = sorted(pairs)
    pipe = client.pipeline(transaction=False)
    for org_id, model in ordered:
        pipe.hmget(wallet_keys.price_key(org_id, model), *wallet_keys.PRICE_FIELDS)
    found: dict[tuple[str, str], spend.Prices] = {}
    missing: dict[str, list[str]] = {}
    for (org_id, model), values in zip(ordered, pipe.execute(), strict=True):
        prices = spend.Prices.from_hash(values)
        if prices is None:
            missing.setdefault(org_id, []).append(model)
        else:
            found[(org_id, model)] = prices
    for org_id, models in missing.items():
        computed = prices_compute(org_id, models=models)
        for model in models:
            if model not in computed:
                logger.error("usage of unpriced model %s by %s counted at 0", model, org_id)
                continue
            spend.price_write(client, org_id, model, computed[model])
            found[(org_id, model)] = computed[model]
    return found


def wallet_read(organization_id: str) -> dict[str, str]:
    """The wallet hash as Redis holds it (for the console and tests)."""
    return get_redis().hgetall(wallet_keys.wallet_key(organization_id))  # type: ignore[return-value]


def _plain(value: Decimal) -> str:
    """A Decimal without exponent or trailing zeros: '150', '37.5'."""
    text = format(value.normalize(), "f")
    return text if "." not in text else text.rstrip("0").rstrip(".")
