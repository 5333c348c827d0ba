"""The wallet's Redis layout: every key name and hash field, defined once.

docs/billing.md, "Admission", describes it. billing/wallet.py writes it from the database
and counts the drain's usage into it, billing/spend.py settles and releases reservations,
and the admission script of gateway/limits.py reads it and reserves. Python uses the names
here; a Lua script gets the same names through `lua()`, which writes them in once, at
import: the script Redis runs is the same as if they were spelled out, no argument more.
"""

from __future__ import annotations

from string import Template

# --- Keys ----------------------------------------------------------------------------------


def wallet_key(organization_id: str) -> str:
    """The wallet hash of an organization (the fields below)."""
    return f"mantle:wallet:{organization_id}"


def held_key(organization_id: str) -> str:
    """Reservations in flight: request id -> `<worst>:<release-by ms>:<project or ''>`,
    then `:<key>` when the API key's hard budget holds a reservation too."""
    return f"mantle:wallet-held:{organization_id}"


def pending_key(organization_id: str) -> str:
    """Settled costs the drain has not counted yet: request id -> `<cost>[:<project>]`,
    or `<cost>:<project or ''>:<key>` when the key's hard budget counts it too."""
    return f"mantle:wallet-pending:{organization_id}"


def counted_key(request_id: str) -> str:
    """The drain counted the request before its gateway settled it."""
    return f"mantle:wallet-counted:{request_id}"


def batch_mark_key(fingerprint: str) -> str:
    """A drain batch already counted into the wallets (a digest of its request ids)."""
    return f"mantle:wallet-batch:{fingerprint}"


def price_key(organization_id: str, model_name: str) -> str:
    """The organization's effective prices of a model (PRICE_FIELDS), or UNPRICED."""
    return f"mantle:price:{organization_id}:{model_name}"


# --- Fields of the wallet hash -------------------------------------------------------------

MODE = "mode"  # prepaid | postpaid when capped, UNLIMITED when not
CAP = "cap_nanos"
SPENT = "spent_nanos"
RESERVED = "reserved_nanos"
PENDING = "pending_nanos"
MONTH = "month"
SYNCED_AT = "synced_at"
SYNC_GEN = "sync_gen"
UNLIMITED = "unlimited"
"""The `mode` under which admission checks no money (a missing hash is unchecked too)."""

PROJECT_PREFIX = "p:"
KEY_PREFIX = "k:"


def project_field(project_id: str, name: str) -> str:
    """A capped project's own CAP, SPENT, RESERVED or PENDING: `p:<project>:<name>`."""
    return f"{PROJECT_PREFIX}{project_id}:{name}"


def key_field(key_id: str, name: str) -> str:
    """An API key's with a hard monthly budget: `k:<key>:<name>` (as a project's)."""
    return f"{KEY_PREFIX}{key_id}:{name}"


# --- Fields of the price hash --------------------------------------------------------------

PRICE_INPUT = "in"  # nanos per input token
PRICE_OUTPUT = "out"  # nanos per output token
PRICE_REQUEST = "req"  # nanos per request
PRICE_COMPUTE_MS = "ms"  # nanos per compute millisecond
# nanos per cached input token: the cached price where one applies, else the input price
PRICE_CACHED_INPUT = "cin"
# The same five for batch lines (service class `batch`): each the price the invoice bills
# a batch line's unit at (PriceBook.billed), the online one where no batch price applies.
PRICE_BATCH_INPUT = "bin"
PRICE_BATCH_OUTPUT = "bout"
PRICE_BATCH_REQUEST = "breq"
PRICE_BATCH_COMPUTE_MS = "bms"
PRICE_BATCH_CACHED_INPUT = "bcin"
# The same five for each priced service tier (priority `p...`, flex `f...`): the online
# price times the tier's multiplier (PriceBook.billed). Never absent from a hash this
# release writes: admission fills a hash without them again before it admits a tier.
PRICE_PRIORITY_INPUT = "pin"
PRICE_PRIORITY_OUTPUT = "pout"
PRICE_PRIORITY_REQUEST = "preq"
PRICE_PRIORITY_COMPUTE_MS = "pms"
PRICE_PRIORITY_CACHED_INPUT = "pcin"
PRICE_FLEX_INPUT = "fin"
PRICE_FLEX_OUTPUT = "fout"
PRICE_FLEX_REQUEST = "freq"
PRICE_FLEX_COMPUTE_MS = "fms"
PRICE_FLEX_CACHED_INPUT = "fcin"
PRICE_FIELDS = (
    PRICE_INPUT,
    PRICE_OUTPUT,
    PRICE_REQUEST,
    PRICE_COMPUTE_MS,
    PRICE_CACHED_INPUT,
    PRICE_BATCH_INPUT,
    PRICE_BATCH_OUTPUT,
    PRICE_BATCH_REQUEST,
    PRICE_BATCH_COMPUTE_MS,
    PRICE_BATCH_CACHED_INPUT,
    PRICE_PRIORITY_INPUT,
    PRICE_PRIORITY_OUTPUT,
    PRICE_PRIORITY_REQUEST,
    PRICE_PRIORITY_COMPUTE_MS,
    PRICE_PRIORITY_CACHED_INPUT,
    PRICE_FLEX_INPUT,
    PRICE_FLEX_OUTPUT,
    PRICE_FLEX_REQUEST,
    PRICE_FLEX_COMPUTE_MS,
    PRICE_FLEX_CACHED_INPUT,
)
"""In this order everywhere (admission reads them in its script)."""
UNPRICED = "unpriced"
"""The price hash's only field, with a short TTL, for a model nothing prices."""


# --- Lua -----------------------------------------------------------------------------------

LUA_NAMES = {
    "mode": MODE,
    "cap": CAP,
    "spent": SPENT,
    "reserved": RESERVED,
    "pending": PENDING,
    "month": MONTH,
    "synced_at": SYNCED_AT,
    "sync_gen": SYNC_GEN,
    "unlimited": UNLIMITED,
    "project": PROJECT_PREFIX,
    "apikey": KEY_PREFIX,
    "price_input": PRICE_INPUT,
    "price_output": PRICE_OUTPUT,
    "price_request": PRICE_REQUEST,
    "price_compute_ms": PRICE_COMPUTE_MS,
    "price_cached_input": PRICE_CACHED_INPUT,
    "price_batch_input": PRICE_BATCH_INPUT,
    "price_batch_output": PRICE_BATCH_OUTPUT,
    "price_batch_request": PRICE_BATCH_REQUEST,
    "price_batch_compute_ms": PRICE_BATCH_COMPUTE_MS,
    "price_batch_cached_input": PRICE_BATCH_CACHED_INPUT,
    "price_priority_input": PRICE_PRIORITY_INPUT,
    "price_priority_output": PRICE_PRIORITY_OUTPUT,
    "price_priority_request": PRICE_PRIORITY_REQUEST,
    "price_priority_compute_ms": PRICE_PRIORITY_COMPUTE_MS,
    "price_priority_cached_input": PRICE_PRIORITY_CACHED_INPUT,
    "price_flex_input": PRICE_FLEX_INPUT,
    "price_flex_output": PRICE_FLEX_OUTPUT,
    "price_flex_request": PRICE_FLEX_REQUEST,
    "price_flex_compute_ms": PRICE_FLEX_COMPUTE_MS,
    "price_flex_cached_input": PRICE_FLEX_CACHED_INPUT,
    "unpriced": UNPRICED,
}


def lua(script: str) -> str:
    """`script` with `${cap}`, `${spent}`... (the keys of LUA_NAMES) written in; `$$` is `$`.

    A project's field is `'${project}' .. id .. ':${cap}'`. An unknown name raises at
    import, so a script cannot name a field that does not exist.
    """
    return Template(script).substitute(LUA_NAMES)
