"""Management API for endpoints (create, update, pause, rollout, rollback), pools, the fleet,
the organization's own upstream providers and its endpoints' route targets."""

from __future__ import annotations

import dataclasses

from django.conf import settings
from django.db import transaction
from django.http import HttpRequest
from ninja import Router, Status

from accounts import selectors as accounts_selectors
from accounts.models import Organization
from accounts.permissions import Perm
from accounts.principal import Principal
from catalog import providers, selectors, services
from catalog.models import AcceleratorPool, Endpoint, EndpointRevision, Provider, RouteTarget
from catalog.schemas import (
    EndpointIn,
    EndpointOut,
    EndpointPatch,
    EndpointRevisionOut,
    FleetPoolOut,
    PoolOut,
    ProviderIn,
    ProviderOut,
    ProviderPatch,
    RolloutIn,
    RouteTargetOut,
    RouteTargetsIn,
)
from core.errors import PermissionDenied

router = Router(tags=["endpoints"])

ORG = "/organizations/{organization_id}"
ENDPOINT = f"{ORG}/endpoints/{{endpoint_id}}"
PROVIDER = f"{ORG}/providers/{{provider_id}}"


def _principal(request: HttpRequest) -> Principal:
    principal: Principal = request.auth  # type: ignore[attr-defined]
    return principal


def _endpoint_out(e: Endpoint) -> EndpointOut:
    version = e.model_version
    return EndpointOut(
        id=e.id,
        name=e.name,
        status=e.status,
        kind=version.model.kind,
        model=version.model.name,
        model_version_id=version.id,
        model_version=version.version,
        previous_model_version_id=e.previous_model_version_id,
        pool=e.pool.name,
        region=e.pool.region,
        rpm_limit=e.rpm_limit,
        tpm_limit=e.tpm_limit,
        created_at=e.created_at,
        updated_at=e.updated_at,
    )


def _pool_out(p: AcceleratorPool) -> PoolOut:
    return PoolOut(
        name=p.name, region=p.region, providers=list(p.providers or []), description=p.description
    )


def _revision_out(r: EndpointRevision) -> EndpointRevisionOut:
    return EndpointRevisionOut(
        number=r.number,
        action=r.action,
        model_version_id=r.model_version_id,
        model_version=r.model_version.version,
        created_by=r.created_by,
        created_at=r.created_at,
    )


def _managed(request: HttpRequest, organization_id: str, endpoint_id: str) -> Endpoint:
    org = accounts_selectors.organization_for(
        _principal(request), organization_id, Perm.ENDPOINTS_MANAGE
    )
    return selectors.endpoint_get(org, endpoint_id)


# --- Endpoints --------------------------------------------------------------------------------


@router.get(f"{ORG}/endpoints", response=list[EndpointOut])
def endpoint_list(request: HttpRequest, organization_id: str) -> list[EndpointOut]:
    org = accounts_selectors.organization_for(
        _principal(request), organization_id, Perm.ENDPOINTS_VIEW
    )
    return [_endpoint_out(e) for e in selectors.endpoints_of(org)]


@router.post(f"{ORG}/endpoints", response={201: EndpointOut})
def endpoint_create(
    request: HttpRequest, organization_id: str, payload: EndpointIn
) -> Status[EndpointOut]:
    principal = _principal(request)
    org = accounts_selectors.organization_for(principal, organization_id, Perm.ENDPOINTS_MANAGE)
    endpoint = services.endpoint_create(
        principal=principal,
        org=org,
        name=payload.name,
        model_version_id=payload.model_version_id,
        pool=payload.pool,
        rpm_limit=payload.rpm_limit,
        tpm_limit=payload.tpm_limit,
    )
    return Status(201, _endpoint_out(selectors.endpoint_get(org, endpoint.id)))


@router.get(ENDPOINT, response=EndpointOut)
def endpoint_get(request: HttpRequest, organization_id: str, endpoint_id: str) -> EndpointOut:
    org = accounts_selectors.organization_for(
        _principal(request), organization_id, Perm.ENDPOINTS_VIEW
    )
    return _endpoint_out(selectors.endpoint_get(org, endpoint_id))


@router.patch(ENDPOINT, response=EndpointOut)
def endpoint_update(
    request: HttpRequest, organization_id: str, endpoint_id: str, payload: EndpointPatch
) -> EndpointOut:
    endpoint = services.endpoint_update(
        principal=_principal(request),
        endpoint=_managed(request, organization_id, endpoint_id),
        name=payload.name,
        pool=payload.pool,
        rpm_limit=payload.rpm_limit,
        tpm_limit=payload.tpm_limit,
    )
    return _endpoint_out(endpoint)


@router.delete(ENDPOINT, response={204: None})
def endpoint_delete(request: HttpRequest, organization_id: str, endpoint_id: str) -> Status[None]:
    services.endpoint_delete(
        principal=_principal(request), endpoint=_managed(request, organization_id, endpoint_id)
    )
    return Status(204, None)


@router.post(f"{ENDPOINT}/pause", response=EndpointOut)
def endpoint_pause(request: HttpRequest, organization_id: str, endpoint_id: str) -> EndpointOut:
    endpoint = services.endpoint_set_status(
        principal=_principal(request),
        endpoint=_managed(request, organization_id, endpoint_id),
        status=Endpoint.Status.PAUSED,
    )
    return _endpoint_out(endpoint)


@router.post(f"{ENDPOINT}/resume", response=EndpointOut)
def endpoint_resume(request: HttpRequest, organization_id: str, endpoint_id: str) -> EndpointOut:
    endpoint = services.endpoint_set_status(
        principal=_principal(request),
        endpoint=_managed(request, organization_id, endpoint_id),
        status=Endpoint.Status.ACTIVE,
    )
    return _endpoint_out(endpoint)


@router.post(f"{ENDPOINT}/rollout", response=EndpointOut)
def endpoint_rollout(
    request: HttpRequest, organization_id: str, endpoint_id: str, payload: RolloutIn
) -> EndpointOut:
    endpoint = services.endpoint_rollout(
        principal=_principal(request),
        endpoint=_managed(request, organization_id, endpoint_id),
        model_version_id=payload.model_version_id,
    )
    return _endpoint_out(endpoint)


@router.post(f"{ENDPOINT}/rollback", response=EndpointOut)
def endpoint_rollback(request: HttpRequest, organization_id: str, endpoint_id: str) -> EndpointOut:
    endpoint = services.endpoint_rollback(
        principal=_principal(request), endpoint=_managed(request, organization_id, endpoint_id)
    )
    return _endpoint_out(endpoint)


@router.get(f"{ENDPOINT}/revisions", response=list[EndpointRevisionOut])
def endpoint_revisions(
    request: HttpRequest, organization_id: str, endpoint_id: str
) -> list[EndpointRevisionOut]:
    org = accounts_selectors.organization_for(
        _principal(request), organization_id, Perm.ENDPOINTS_VIEW
    )
    endpoint = selectors.endpoint_get(org, endpoint_id)
    return [_revision_out(r) for r in selectors.endpoint_revisions(endpoint)]


# --- Pools and the fleet ----------------------------------------------------------------------


@router.get(f"{ORG}/pools", response=list[PoolOut])
def pool_list(request: HttpRequest, organization_id: str) -> list[PoolOut]:
    org = accounts_selectors.organization_for(
        _principal(request), organization_id, Perm.ENDPOINTS_VIEW
    )
    return [_pool_out(p) for p in selectors.pools_for(org)]


@router.get(f"{ORG}/fleet", response=list[FleetPoolOut])
def fleet(request: HttpRequest, organization_id: str) -> list[FleetPoolOut]:
    org = accounts_selectors.organization_for(
        _principal(request), organization_id, Perm.ENDPOINTS_VIEW
    )
    return [
        FleetPoolOut(live_workers=len(pool.workers), **dataclasses.asdict(pool))
        for pool in selectors.fleet_for(org)
    ]


# --- Upstream providers and route targets (docs/providers.md) --------------------------------
#
# Only while the operator allows organizations to bring their own providers
# (MANTLE_PROVIDER_BYOK); an organization routes its endpoints to its own providers (the
# operator's are routed by the operator, in the back office). A credential is write-only:
# no response carries it, only `has_credential`.


def _byok(request: HttpRequest, organization_id: str, perm: Perm) -> Organization:
    org = accounts_selectors.organization_for(_principal(request), organization_id, perm)
    if not settings.MANTLE_PROVIDER_BYOK:
        raise PermissionDenied(providers.BYOK_OFF, code="providers_not_enabled")
    return org


def _provider_out(p: Provider) -> ProviderOut:
    return ProviderOut(
        id=p.id,
        name=p.name,
        kind=p.kind,
        base_url=p.base_url,
        api_version=p.api_version,
        has_credential=bool(p.credential_encrypted),
        connect_timeout_s=p.connect_timeout_s,
        first_byte_timeout_s=p.first_byte_timeout_s,
        max_concurrency=p.max_concurrency,
        enabled=p.enabled,
        created_at=p.created_at,
        updated_at=p.updated_at,
    )


def _target_out(t: RouteTarget) -> RouteTargetOut:
    # The operator's targets: what the operator pays its provider is not shown.
    operators = t.provider is not None and t.provider.organization_id is None
    return RouteTargetOut(
        id=t.id,
        kind=t.kind,
        provider_id=t.provider_id,
        provider_name=t.provider.name if t.provider is not None else None,
        upstream_model=t.upstream_model,
        position=t.position,
        weight=t.weight,
        cost_input=None if operators else f"{t.cost_input:f}",
        cost_output=None if operators else f"{t.cost_output:f}",
        cost_cached_input=None if operators else f"{t.cost_cached_input:f}",
        operator=operators,
        enabled=t.enabled,
    )


@router.get(f"{ORG}/providers", response=list[ProviderOut])
def provider_list(request: HttpRequest, organization_id: str) -> list[ProviderOut]:
    org = _byok(request, organization_id, Perm.PROVIDERS_MANAGE)
    return [_provider_out(p) for p in selectors.providers_of(org)]


@router.post(f"{ORG}/providers", response={201: ProviderOut})
def provider_create(
    request: HttpRequest, organization_id: str, payload: ProviderIn
) -> Status[ProviderOut]:
    org = _byok(request, organization_id, Perm.PROVIDERS_MANAGE)
    provider = providers.provider_create(
        principal=_principal(request), organization=org, **payload.model_dump()
    )
    return Status(201, _provider_out(provider))


@router.get(PROVIDER, response=ProviderOut)
def provider_get(request: HttpRequest, organization_id: str, provider_id: str) -> ProviderOut:
    org = _byok(request, organization_id, Perm.PROVIDERS_MANAGE)
    return _provider_out(selectors.provider_get(org, provider_id))


@router.patch(PROVIDER, response=ProviderOut)
def provider_update(
    request: HttpRequest, organization_id: str, provider_id: str, payload: ProviderPatch
) -> ProviderOut:
    org = _byok(request, organization_id, Perm.PROVIDERS_MANAGE)
    principal = _principal(request)
    fields = payload.model_dump(exclude_none=True)
    enabled = fields.pop("enabled", None)
    provider = selectors.provider_get(org, provider_id)
    with transaction.atomic():
        if fields:
            provider = providers.provider_update(principal=principal, provider=provider, **fields)
        if enabled is not None:
            provider = providers.provider_set_enabled(
                principal=principal, provider=provider, enabled=enabled
            )
    return _provider_out(selectors.provider_get(org, provider_id))


@router.delete(PROVIDER, response={204: None})
def provider_delete(request: HttpRequest, organization_id: str, provider_id: str) -> Status[None]:
    org = _byok(request, organization_id, Perm.PROVIDERS_MANAGE)
    providers.provider_delete(
        principal=_principal(request), provider=selectors.provider_get(org, provider_id)
    )
    return Status(204, None)


@router.get(f"{ENDPOINT}/targets", response=list[RouteTargetOut])
def route_targets_get(
    request: HttpRequest, organization_id: str, endpoint_id: str
) -> list[RouteTargetOut]:
    org = _byok(request, organization_id, Perm.ENDPOINTS_VIEW)
    endpoint = selectors.endpoint_get(org, endpoint_id)
    return [_target_out(t) for t in selectors.route_targets_of(endpoint)]


@router.put(f"{ENDPOINT}/targets", response=list[RouteTargetOut])
def route_targets_set(
    request: HttpRequest, organization_id: str, endpoint_id: str, payload: RouteTargetsIn
) -> list[RouteTargetOut]:
    org = _byok(request, organization_id, Perm.ENDPOINTS_MANAGE)
    endpoint = selectors.endpoint_get(org, endpoint_id)
    providers.route_targets_set(
        principal=_principal(request),
        endpoint=endpoint,
        targets=[t.model_dump() for t in payload.targets],
        operator_providers=False,
    )
    return [_target_out(t) for t in selectors.route_targets_of(endpoint)]
