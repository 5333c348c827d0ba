"""Reads of the catalog; customer-reachable ones are scoped by organization."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from django.db.models import Q, QuerySet

from accounts.models import Organization
from catalog.models import (
    AcceleratorPool,
    Endpoint,
    EndpointRevision,
    Model,
    ModelVersion,
    Provider,
    RouteTarget,
)
from catalog.specs import EndpointSpec
from core import secretbox
from core.errors import InvalidInput, NotFound
from core.redis import get_redis
from workers.contract import HEARTBEAT_TTL_S, pool_live_key, worker_info_key


def endpoints_visible_to(organization_id: str) -> QuerySet[Endpoint]:
    return (
        Endpoint.objects.filter(Q(organization__isnull=True) | Q(organization_id=organization_id))
        .select_related("model_version__model", "pool")
        .order_by("created_at")
    )


def endpoint_spec(endpoint: Endpoint) -> EndpointSpec:
    version = endpoint.model_version
    model: Model = version.model
    manifest = version.manifest or {}
    embedding = manifest.get("embedding") or {}
    providers = list(endpoint.pool.providers or [])
    if "CPUExecutionProvider" not in providers:
        providers.append("CPUExecutionProvider")
    return EndpointSpec(
        id=endpoint.id,
        name=endpoint.name,
        organization_id=endpoint.organization_id,
        active=endpoint.status == Endpoint.Status.ACTIVE,
        model_name=model.name,
        kind=model.kind,
        runtime=version.runtime,
        version_id=version.id,
        sha256=version.sha256,
        location=version.location,
        tokenizer_file=version.tokenizer_file,
        chat_template=version.chat_template,
        eos_token_ids=tuple(manifest.get("eos_token_ids") or ()),
        context_length=model.context_length,
        max_input_tokens=int(embedding.get("max_input_tokens") or model.context_length),
        dimensions=int(embedding.get("dimensions") or 0),
        pool=endpoint.pool.name,
        queue=endpoint.pool.queue,
        providers=tuple(providers),
        rpm_limit=endpoint.rpm_limit,
        tpm_limit=endpoint.tpm_limit,
        created=int(endpoint.created_at.timestamp()),
        version=version.version,
        io=dict(manifest.get("io") or {}) if model.kind == Model.Kind.TENSOR else {},
        targets=route_targets(endpoint),
    )


def route_targets(endpoint: Endpoint) -> tuple[dict[str, Any], ...]:
    """The endpoint's enabled route targets as its spec carries them (providers that are
    disabled drop out)."""
    found = RouteTarget.objects.filter(endpoint=endpoint, enabled=True).select_related("provider")
    return tuple(
        {
            "id": t.id,
            "kind": t.kind,
            "provider_id": t.provider_id or "",
            "model": t.upstream_model,
            "position": t.position,
            "weight": t.weight,
            "cost_input": str(t.cost_input),
            "cost_output": str(t.cost_output),
            "cost_cached_input": str(t.cost_cached_input),
        }
        for t in found.order_by("position", "created_at", "id")
        if t.provider is None or t.provider.enabled
    )


def endpoint_spec_load(ref: str) -> EndpointSpec | None:
    """The gateway's cache-miss path: an endpoint by id (`ep-...`) or public name."""
    qs = Endpoint.objects.select_related("model_version__model", "pool")
    if ref.startswith("ep-"):
        endpoint = qs.filter(id=ref).first()
    else:
        endpoint = qs.filter(name=ref, organization__isnull=True).first()
    return endpoint_spec(endpoint) if endpoint is not None else None


# --- Management API: endpoints, model versions and pools of one organization ----------------


def endpoints_of(org: Organization) -> QuerySet[Endpoint]:
    """The organization's own endpoints (public ones are the platform's, not managed here)."""
    return (
        Endpoint.objects.filter(organization=org)
        .select_related("model_version__model", "previous_model_version", "pool")
        .order_by("created_at", "id")
    )


def endpoint_get(org: Organization, endpoint_id: str) -> Endpoint:
    found = endpoints_of(org).filter(id=endpoint_id).first()
    if found is None:
        raise NotFound(f"endpoint {endpoint_id!r} not found", param="endpoint_id")
    return found


def endpoint_revisions(endpoint: Endpoint) -> QuerySet[EndpointRevision]:
    return (
        EndpointRevision.objects.filter(endpoint=endpoint)
        .select_related("model_version")
        .order_by("-number")
    )


def model_version_for(org: Organization, model_version_id: str) -> ModelVersion:
    """A version the organization may serve: of its own models or of the platform's.

    Another organization's version is NotFound, like any id it does not own.
    """
    found = (
        ModelVersion.objects.filter(
            Q(model__organization__isnull=True) | Q(model__organization=org), id=model_version_id
        )
        .select_related("model")
        .first()
    )
    if found is None:
        raise NotFound(f"model version {model_version_id!r} not found", param="model_version_id")
    return found


def pools_for(org: Organization) -> QuerySet[AcceleratorPool]:
    """The pools the organization may place endpoints on: those of its data-residency region."""
    return AcceleratorPool.objects.filter(region=org.region).order_by("name")


def pool_for(org: Organization, name: str, *, param: str = "pool") -> AcceleratorPool:
    """A pool of the organization's region (data residency: its requests never leave it).

    A pool of another region is refused exactly like one that does not exist: the error
    names only this organization's own pools, never where others are.
    """
    pool = pools_for(org).filter(name=name).first()
    if pool is None:
        allowed = list(pools_for(org).values_list("name", flat=True))
        raise InvalidInput(
            f"pool {name!r} is not available in this organization's region; available: {allowed}",
            param=param,
        )
    return pool


# --- The fleet view (from the workers' heartbeats in Redis) -----------------------------------


@dataclass(frozen=True, slots=True)
class LoadedVersion:
    model_version_id: str
    model: str
    version: int


@dataclass(frozen=True, slots=True)
class FleetWorker:
    node: str
    providers: list[str]
    models_loaded: list[LoadedVersion]
    other_models_loaded: int  # versions of other organizations: counted, never named
    free_slots: int
    total_slots: int
    tokens_per_s: float
    last_heartbeat: datetime
    heartbeat_age_s: float


@dataclass(frozen=True, slots=True)
class FleetPool:
    name: str
    region: str
    providers: list[str]  # configured preference order
    providers_in_use: list[str]  # what live workers actually run on
    workers: list[FleetWorker]
    free_slots: int
    total_slots: int
    tokens_per_s: float


def fleet_for(org: Organization) -> list[FleetPool]:
    """Per pool of the organization (its region's, and wherever its endpoints are): live workers.

    Heartbeats of nodes that stopped more than HEARTBEAT_TTL_S ago are left out:
    they are dead for admission too. A worker's loaded versions are named only
    when the organization may see them.
    """
    pools = list(
        AcceleratorPool.objects.filter(Q(region=org.region) | Q(endpoints__organization=org))
        .distinct()
        .order_by("name")
    )
    client = get_redis()
    now = time.time()
    pipe = client.pipeline(transaction=False)
    for pool in pools:
        pipe.zrangebyscore(pool_live_key(pool.name), now - HEARTBEAT_TTL_S, "+inf", withscores=True)
    members: list[list[tuple[str, float]]] = pipe.execute()
    nodes = [node for entries in members for node, _ in entries]
    infos: list[Any] = client.mget([worker_info_key(n) for n in nodes]) if nodes else []
    heartbeats = {n: json.loads(raw) for n, raw in zip(nodes, infos, strict=True) if raw}
    versions = _visible_versions(
        org, (v for hb in heartbeats.values() for v in hb["models_loaded"])
    )
    out = []
    for pool, entries in zip(pools, members, strict=True):
        workers = [
            _fleet_worker(heartbeats[node], score, now, versions)
            for node, score in entries
            if node in heartbeats
        ]
        out.append(
            FleetPool(
                name=pool.name,
                region=pool.region,
                providers=list(pool.providers or []),
                providers_in_use=sorted({p for w in workers for p in w.providers}),
                workers=workers,
                free_slots=sum(w.free_slots for w in workers),
                total_slots=sum(w.total_slots for w in workers),
                tokens_per_s=round(sum(w.tokens_per_s for w in workers), 2),
            )
        )
    return out


def _visible_versions(org: Organization, ids: Iterable[str]) -> dict[str, LoadedVersion]:
    wanted = set(ids)
    if not wanted:
        return {}
    rows = ModelVersion.objects.filter(
        Q(model__organization__isnull=True) | Q(model__organization=org), id__in=wanted
    ).values_list("id", "model__name", "version")
    return {vid: LoadedVersion(vid, name, number) for vid, name, number in rows}


def _fleet_worker(
    heartbeat: dict[str, Any], score: float, now: float, versions: dict[str, LoadedVersion]
) -> FleetWorker:
    loaded = list(heartbeat.get("models_loaded") or [])
    return FleetWorker(
        node=str(heartbeat["node"]),
        providers=list(heartbeat.get("providers") or []),
        models_loaded=[versions[v] for v in loaded if v in versions],
        other_models_loaded=sum(1 for v in loaded if v not in versions),
        free_slots=int(heartbeat.get("free_slots") or 0),
        total_slots=int(heartbeat.get("total_slots") or 0),
        tokens_per_s=float(heartbeat.get("tokens_per_s") or 0.0),
        last_heartbeat=datetime.fromtimestamp(score, tz=UTC),
        heartbeat_age_s=round(max(0.0, now - score), 3),
    )


@dataclass(frozen=True, slots=True)
class ProviderConnection:
    """What the gateway's relay needs of a provider (docs/providers.md). `credential` is
    the decrypted secret: held in the gateway's memory only, never logged or cached in
    Redis (its repr hides it)."""

    id: str
    organization_id: str | None
    name: str
    kind: str
    base_url: str
    api_version: str
    credential: str = dataclasses.field(repr=False)
    connect_timeout_s: float = 5.0
    first_byte_timeout_s: float = 30.0
    max_concurrency: int = 64
    enabled: bool = True


def provider_connection(provider_id: str) -> ProviderConnection | None:
    """The gateway's read of a provider (None: none by that id)."""
    provider = Provider.objects.filter(id=provider_id).first()
    if provider is None:
        return None
    return ProviderConnection(
        id=provider.id,
        organization_id=provider.organization_id,
        name=provider.name,
        kind=provider.kind,
        base_url=provider.base_url,
        api_version=provider.api_version,
        credential=secretbox.unseal(provider.credential_encrypted),
        connect_timeout_s=provider.connect_timeout_s,
        first_byte_timeout_s=provider.first_byte_timeout_s,
        max_concurrency=provider.max_concurrency,
        enabled=provider.enabled,
    )


def providers_of(org: Organization | None) -> QuerySet[Provider]:
    """The organization's own providers (None: the operator's)."""
    if org is None:
        return Provider.objects.filter(organization__isnull=True).order_by("name", "id")
    return Provider.objects.filter(organization=org).order_by("name", "id")


def provider_get(org: Organization, provider_id: str) -> Provider:
    """One of the organization's own providers; another's is NotFound, like any id it does
    not own."""
    found = providers_of(org).filter(id=provider_id).first()
    if found is None:
        raise NotFound(f"provider {provider_id!r} not found", param="provider_id")
    return found


def route_targets_of(endpoint: Endpoint) -> QuerySet[RouteTarget]:
    """Every route target of the endpoint, enabled or not, in the order they are tried."""
    return (
        RouteTarget.objects.filter(endpoint=endpoint)
        .select_related("provider")
        .order_by("position", "created_at", "id")
    )
