"""The endpoint spec: everything the gateway needs about an endpoint, cached in Redis."""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

from core import integrity

logger = logging.getLogger(__name__)

ENDPOINT_KEY_PREFIX = "mantle:endpoint:"
ENDPOINT_NAME_PREFIX = "mantle:endpoint-name:"
# Cached in place of a spec for an endpoint that does not exist. A deleted endpoint's key
# holds it for a while (not just deleted) so that a gateway's cache fill from a database
# read made just before the delete cannot put the spec back: fills only write absent keys.
UNKNOWN = "unknown"
DELETED_TTL_S = 300


def endpoint_key(endpoint_id: str) -> str:
    return f"{ENDPOINT_KEY_PREFIX}{endpoint_id}"


def endpoint_name_key(name: str) -> str:
    return f"{ENDPOINT_NAME_PREFIX}{name}"


@dataclasses.dataclass(frozen=True, slots=True)
class EndpointSpec:
    id: str
    name: str
    organization_id: str | None  # None: public
    active: bool
    model_name: str
    kind: str
    runtime: str
    version_id: str
    sha256: str
    location: str
    tokenizer_file: str
    chat_template: str
    eos_token_ids: tuple[int, ...]
    context_length: int
    max_input_tokens: int  # embeddings: inputs are truncated to this
    dimensions: int  # embeddings only
    pool: str
    queue: str
    providers: tuple[str, ...]
    rpm_limit: int
    tpm_limit: int
    created: int
    # Added later: defaults keep specs cached by an older release readable.
    version: int = 0  # the model version's number (v2 `model_version`)
    io: dict[str, Any] = dataclasses.field(default_factory=dict)  # manifest `io`: tensor models
    # Where requests may run besides (or instead of) the pool (docs/providers.md): enabled
    # route targets in order, each {"id", "kind": "pool"|"provider", "provider_id",
    # "model", "position", "weight", "cost_input", "cost_output", "cost_cached_input"}
    # (costs: decimal strings, the currency per token). Empty: the pool only.
    targets: tuple[dict[str, Any], ...] = ()

    @property
    def routed(self) -> bool:
        """Whether its requests follow route targets (gateway/relay.py) rather than only
        the pool: a provider may serve them, or the pool reports itself as their server."""
        return bool(self.targets)

    @property
    def relayed(self) -> bool:
        """Whether any of its requests may go to an upstream provider."""
        return any(t.get("kind") == "provider" for t in self.targets)

    @property
    def public(self) -> bool:
        return self.organization_id is None

    def visible_to(self, organization_id: str) -> bool:
        return self.organization_id is None or self.organization_id == organization_id

    @property
    def public_id(self) -> str:
        """What `/v1/models` lists: a public endpoint by name, a private one by id."""
        return self.name if self.public else self.id

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, raw: str) -> EndpointSpec:
        """Parses a record; its seal, if any, is not checked (see `spec_from_cache`)."""
        return cls.from_fields(integrity.unsealed_fields(json.loads(raw)))

    @classmethod
    def from_fields(cls, data: dict[str, Any]) -> EndpointSpec:
        data["eos_token_ids"] = tuple(data["eos_token_ids"])
        data["providers"] = tuple(data["providers"])
        data["targets"] = tuple(data.get("targets") or ())
        return cls(**data)


def spec_record(where: str, spec: EndpointSpec, *, ttl_s: int) -> str:
    """The spec as stored at Redis key `where`: sealed (core/integrity.py), since the
    gateway takes who may call an endpoint and what it costs from it."""
    return integrity.seal(where, dataclasses.asdict(spec), ttl_s=ttl_s)


def spec_from_cache(where: str, raw: str) -> EndpointSpec | None:
    """The spec read from Redis key `where`, or None (logged) when it fails its check."""
    spec = integrity.unseal_as(where, raw, EndpointSpec.from_fields)
    if spec is not None:
        return spec
    logger.warning(
        "cached endpoint spec %s failed its integrity check; discarded, reading the database",
        where,
    )
    return None
