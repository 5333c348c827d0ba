"""Request and response shapes of the catalog API: endpoints, pools, the fleet, providers
and route targets."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

from ninja import Schema
from pydantic import Field

from accounts.schemas import In


class EndpointIn(In):
    name: str = Field(min_length=1, max_length=120)
    model_version_id: str = Field(min_length=1, max_length=40)
    pool: str = Field(min_length=1, max_length=64, description="an accelerator pool's name")
    rpm_limit: int | None = Field(default=None, ge=1, description="requests per minute")
    tpm_limit: int | None = Field(default=None, ge=1, description="tokens per minute")


class EndpointPatch(In):
    name: str | None = Field(default=None, min_length=1, max_length=120)
    pool: str | None = Field(default=None, min_length=1, max_length=64)
    rpm_limit: int | None = Field(default=None, ge=1)
    tpm_limit: int | None = Field(default=None, ge=1)


class RolloutIn(In):
    model_version_id: str = Field(min_length=1, max_length=40)


class EndpointOut(Schema):
    id: str
    name: str
    status: str
    kind: str
    model: str
    model_version_id: str
    model_version: int
    previous_model_version_id: str | None = Field(
        description="what `POST .../rollback` returns to; null until the version was switched"
    )
    pool: str
    region: str
    rpm_limit: int
    tpm_limit: int
    created_at: datetime
    updated_at: datetime


class EndpointRevisionOut(Schema):
    number: int
    action: str
    model_version_id: str
    model_version: int
    created_by: str
    created_at: datetime


class PoolOut(Schema):
    name: str
    region: str
    providers: list[str] = Field(description="ONNX Runtime execution providers, preferred first")
    description: str


class LoadedVersionOut(Schema):
    model_version_id: str
    model: str
    version: int


class FleetWorkerOut(Schema):
    node: str
    providers: list[str] = Field(description="execution providers the node actually runs on")
    models_loaded: list[LoadedVersionOut]
    other_models_loaded: int = Field(description="loaded versions of other organizations")
    free_slots: int
    total_slots: int
    tokens_per_s: float
    last_heartbeat: datetime
    heartbeat_age_s: float


class FleetPoolOut(Schema):
    name: str
    region: str
    providers: list[str]
    providers_in_use: list[str]
    live_workers: int
    free_slots: int
    total_slots: int
    tokens_per_s: float
    workers: list[FleetWorkerOut]


# --- Upstream providers and route targets (docs/providers.md) ------------------------------


class ProviderIn(In):
    name: str = Field(min_length=1, max_length=120)
    kind: str = Field(description="openai, azure-openai or openai-compatible")
    base_url: str = Field(
        min_length=1,
        max_length=500,
        description="the API root (https://api.openai.com/v1); Azure: the resource endpoint",
    )
    api_version: str = Field(default="", max_length=40, description="Azure only: api-version")
    credential: str = Field(
        default="",
        max_length=4096,
        description="the provider's API key; write-only, never returned",
    )
    connect_timeout_s: float = 5.0
    first_byte_timeout_s: float = 30.0
    max_concurrency: int = 64
    enabled: bool = True


class ProviderPatch(In):
    name: str | None = Field(default=None, min_length=1, max_length=120)
    kind: str | None = None
    base_url: str | None = Field(default=None, min_length=1, max_length=500)
    api_version: str | None = Field(default=None, max_length=40)
    credential: str | None = Field(
        default=None,
        max_length=4096,
        description="a new value replaces the stored one; absent or blank keeps it",
    )
    connect_timeout_s: float | None = None
    first_byte_timeout_s: float | None = None
    max_concurrency: int | None = None
    enabled: bool | None = None


class ProviderOut(Schema):
    id: str
    name: str
    kind: str
    base_url: str
    api_version: str
    has_credential: bool = Field(description="whether a credential is stored (never shown)")
    connect_timeout_s: float
    first_byte_timeout_s: float
    max_concurrency: int
    enabled: bool
    created_at: datetime
    updated_at: datetime


class RouteTargetIn(In):
    kind: str = Field(description="pool (the endpoint's own pool) or provider")
    provider_id: str | None = Field(default=None, max_length=40)
    upstream_model: str = Field(
        default="", max_length=200, description="the provider's model, or the Azure deployment"
    )
    position: int = Field(default=0, description="lowest first; the next is the fallback")
    weight: int = Field(default=1, description="share of its position's traffic")
    cost_input: Decimal = Field(default=Decimal(0), description="provider's charge per token")
    cost_output: Decimal = Decimal(0)
    cost_cached_input: Decimal = Decimal(0)
    enabled: bool = True


class RouteTargetsIn(In):
    targets: list[RouteTargetIn] = Field(
        description="replaces every target (at most 16); empty: the endpoint's pool only"
    )


class RouteTargetOut(Schema):
    id: str
    kind: str
    provider_id: str | None
    provider_name: str | None
    upstream_model: str
    position: int
    weight: int
    cost_input: str | None = Field(
        description="a decimal string, the currency per token; null on the operator's targets"
    )
    cost_output: str | None
    cost_cached_input: str | None
    operator: bool = Field(
        description="a target the operator set on one of its providers: it may be kept, "
        "moved or removed (its costs stay the operator's), not added"
    )
    enabled: bool
