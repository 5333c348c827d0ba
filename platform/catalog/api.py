"""Management API for endpoints (create, update, pause, rollout, rollback), pools and the fleet."""

from __future__ import annotations

import dataclasses

from django.http import HttpRequest
from ninja import Router, Status

from accounts import selectors as accounts_selectors
from accounts.permissions import Perm
from accounts.principal import Principal
from catalog import selectors, services
from catalog.models import AcceleratorPool, Endpoint, EndpointRevision
from catalog.schemas import (
    EndpointIn,
    EndpointOut,
    EndpointPatch,
    EndpointRevisionOut,
    FleetPoolOut,
    PoolOut,
    RolloutIn,
)

router = Router(tags=["endpoints"])

ORG = "/organizations/{organization_id}"
ENDPOINT = f"{ORG}/endpoints/{{endpoint_id}}"


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
