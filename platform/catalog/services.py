"""Writes of the catalog: pools, models and versions, endpoints, and the built-in models."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from django.conf import settings
from django.db import IntegrityError, models, transaction

from accounts.models import Organization
from accounts.principal import Principal
from accounts.services import audit_record
from catalog import specs
from catalog.models import AcceleratorPool, Endpoint, EndpointRevision, Model, ModelVersion
from catalog.selectors import endpoint_spec, model_version_for, pool_for
from core.errors import Conflict, InvalidInput
from core.redis import get_redis
from workers.contract import Runtime

logger = logging.getLogger(__name__)

ECHO_MODEL_NAME = "mantle-echo"
SPEC_TTL_S = 24 * 3600

DEFAULT_POOL_PROVIDERS = [
    "TensorrtExecutionProvider",
    "CUDAExecutionProvider",
    "CANNExecutionProvider",
    "CPUExecutionProvider",
]


def pool_ensure(
    *, name: str, region: str, providers: Sequence[str], description: str = ""
) -> AcceleratorPool:
    pool, _ = AcceleratorPool.objects.update_or_create(
        name=name,
        defaults={"region": region, "providers": list(providers), "description": description},
    )
    return pool


def endpoint_publish(endpoint: Endpoint) -> None:
    """Write-through of the endpoint spec that the gateway reads (one GET per request)."""
    spec = endpoint_spec(endpoint)
    pipe = get_redis().pipeline()
    by_id = specs.endpoint_key(spec.id)
    pipe.set(by_id, specs.spec_record(by_id, spec, ttl_s=SPEC_TTL_S), ex=SPEC_TTL_S)
    if spec.public:
        by_name = specs.endpoint_name_key(spec.name)
        pipe.set(by_name, specs.spec_record(by_name, spec, ttl_s=SPEC_TTL_S), ex=SPEC_TTL_S)
    pipe.execute()


def endpoints_publish_all() -> int:
    count = 0
    for endpoint in Endpoint.objects.select_related("model_version__model", "pool"):
        endpoint_publish(endpoint)
        count += 1
    return count


def model_version_from_manifest(
    *, model: Model, manifest: Mapping[str, Any], runtime: str
) -> ModelVersion:
    version = ModelVersion.objects.filter(model=model, sha256=manifest["sha256"]).first()
    fields = {
        "runtime": runtime,
        "size_bytes": int(manifest.get("size_bytes") or 0),
        "location": str(manifest["location"]),
        "tokenizer_file": str(manifest.get("tokenizer_file") or ""),
        "chat_template": str(manifest.get("chat_template") or ""),
        "manifest": dict(manifest),
        "status": ModelVersion.Status.READY,
    }
    if version is None:
        latest = model.versions.order_by("-version").values_list("version", flat=True).first()
        version = ModelVersion.objects.create(
            model=model, sha256=manifest["sha256"], version=(latest or 0) + 1, **fields
        )
    else:
        for key, value in fields.items():
            setattr(version, key, value)
        version.save()
    return version


@transaction.atomic
def builtin_models_register(manifests: Sequence[Mapping[str, Any]]) -> list[Endpoint]:
    """Registers the prepared built-in models as public endpoints on the default pool.

    Idempotent: re-running with the same artifacts changes nothing; a new
    artifact becomes a new version and the public endpoint moves to it.
    """
    pool = pool_ensure(
        name=settings.MANTLE_DEFAULT_POOL,
        region=settings.MANTLE_DEFAULT_REGION,
        providers=DEFAULT_POOL_PROVIDERS,
        description="Built-in pool; takes the best execution provider each node offers",
    )
    endpoints = []
    entries: list[tuple[Mapping[str, Any], str, str]] = [
        (m, str(m["name"]), str(m["runtime"])) for m in manifests
    ]
    chat = next((m for m in manifests if m.get("runtime") == Runtime.CAUSAL_LM), None)
    if chat is not None:
        # The zero-compute echo model shares the chat model's tokenizer and template.
        entries.append((chat, ECHO_MODEL_NAME, Runtime.ECHO.value))
    for manifest, name, runtime in entries:
        model, _ = Model.objects.update_or_create(
            name=name,
            organization=None,
            defaults={
                "family": "echo" if runtime == Runtime.ECHO else str(manifest.get("family", "")),
                "kind": str(manifest["kind"]),
                "context_length": int(manifest["context_length"]),
                "licence": str(manifest.get("licence", "")),
                "description": "Replays the prompt; measures platform overhead"
                if runtime == Runtime.ECHO
                else f"Built-in {manifest['kind']} model",
            },
        )
        version = model_version_from_manifest(model=model, manifest=manifest, runtime=runtime)
        endpoint = Endpoint.objects.filter(name=name, organization=None).first()
        if endpoint is None:
            endpoint = Endpoint.objects.create(
                name=name,
                organization=None,
                model_version=version,
                pool=pool,
                rpm_limit=settings.MANTLE_PUBLIC_RPM,
                tpm_limit=settings.MANTLE_PUBLIC_TPM,
            )
        elif endpoint.model_version_id != version.id:
            endpoint.model_version = version
            endpoint.save(update_fields=["model_version"])
        endpoints.append(endpoint)
    transaction.on_commit(endpoints_publish_all)
    return endpoints


# --- Endpoints of an organization (the management API) ---------------------------------------
#
# Every write locks the endpoint row, records an audit entry and a revision when the
# served version changes, and rewrites the gateway's spec in Redis once it commits:
# from then on new requests go to the new state, while requests already dispatched
# finish on the version their task names (a worker keeps every version it loaded).


def endpoint_create(
    *,
    principal: Principal,
    org: Organization,
    name: str,
    model_version_id: str,
    pool: str,
    rpm_limit: int | None = None,
    tpm_limit: int | None = None,
) -> Endpoint:
    name = _clean_endpoint_name(name)
    version = _servable_version(org, model_version_id)
    placed = pool_for(org, pool)
    try:
        with transaction.atomic():
            endpoint = Endpoint.objects.create(
                organization=org,
                name=name,
                model_version=version,
                pool=placed,
                rpm_limit=rpm_limit if rpm_limit is not None else _default("rpm_limit"),
                tpm_limit=tpm_limit if tpm_limit is not None else _default("tpm_limit"),
            )
            _revision(endpoint, version, EndpointRevision.Action.CREATED, principal)
            audit_record(
                principal=principal,
                action="endpoint.created",
                target=endpoint,
                organization=org,
                metadata={"name": name, "model_version_id": version.id, "pool": placed.name},
            )
            _publish_on_commit(endpoint.id)
    except IntegrityError as exc:
        raise Conflict(f"an endpoint named {name!r} already exists", param="name") from exc
    logger.info("endpoint %s created in %s: %s on %s", endpoint.id, org.id, version.id, pool)
    return endpoint


def endpoint_update(
    *,
    principal: Principal,
    endpoint: Endpoint,
    name: str | None = None,
    pool: str | None = None,
    rpm_limit: int | None = None,
    tpm_limit: int | None = None,
) -> Endpoint:
    """Renames, re-limits or moves an endpoint; only the fields given change."""
    org = _org(endpoint)
    changes: dict[str, Any] = {}
    if name is not None:
        changes["name"] = _clean_endpoint_name(name)
    if pool is not None:
        changes["pool"] = pool_for(org, pool)
    if rpm_limit is not None:
        changes["rpm_limit"] = rpm_limit
    if tpm_limit is not None:
        changes["tpm_limit"] = tpm_limit
    try:
        with transaction.atomic():
            locked = _lock(endpoint)
            changed = {k: v for k, v in changes.items() if getattr(locked, k) != v}
            if not changed:
                return locked
            for field, value in changed.items():
                setattr(locked, field, value)
            locked.save(update_fields=[*changed, "updated_at"])
            audit_record(
                principal=principal,
                action="endpoint.updated",
                target=locked,
                organization=org,
                metadata={k: (v.name if k == "pool" else v) for k, v in changed.items()},
            )
            _publish_on_commit(locked.id)
    except IntegrityError as exc:
        raise Conflict(
            f"an endpoint named {changes['name']!r} already exists", param="name"
        ) from exc
    return locked


def endpoint_set_status(*, principal: Principal, endpoint: Endpoint, status: str) -> Endpoint:
    """Pauses or resumes; the gateway refuses a paused endpoint's requests at once."""
    try:
        new_status = Endpoint.Status(status)
    except ValueError as exc:
        allowed = [s.value for s in Endpoint.Status]
        raise InvalidInput(f"status must be one of {allowed}", param="status") from exc
    with transaction.atomic():
        locked = _lock(endpoint)
        if locked.status == new_status:
            return locked
        locked.status = new_status
        locked.save(update_fields=["status", "updated_at"])
        action = "endpoint.paused" if new_status == Endpoint.Status.PAUSED else "endpoint.resumed"
        audit_record(principal=principal, action=action, target=locked, organization=_org(locked))
        _publish_on_commit(locked.id)
    return locked


def endpoint_rollout(
    *, principal: Principal, endpoint: Endpoint, model_version_id: str
) -> Endpoint:
    """Switches the endpoint to another version of its model: a rolling update.

    Requests admitted before the switch run on the old version (their task
    carries it), those after on the new one; nothing is refused or retried.
    """
    org = _org(endpoint)
    version = _servable_version(org, model_version_id)
    with transaction.atomic():
        locked = _lock(endpoint)
        current = locked.model_version
        if version.model_id != current.model_id:
            raise InvalidInput(
                f"model version {version.id!r} is a version of {version.model.name!r}; this "
                f"endpoint serves {current.model.name!r} (create another endpoint for it)",
                param="model_version_id",
            )
        if version.id == current.id:
            raise InvalidInput(
                f"the endpoint already serves model version {version.id!r}",
                param="model_version_id",
            )
        return _switch(locked, version, EndpointRevision.Action.ROLLOUT, principal)


def endpoint_rollback(*, principal: Principal, endpoint: Endpoint) -> Endpoint:
    """Back to the version served before the last switch, in one call (and again undoes it)."""
    with transaction.atomic():
        locked = _lock(endpoint)
        previous = locked.previous_model_version
        if previous is None:
            raise Conflict(
                "the endpoint has served only one version; there is nothing to roll back to",
                param="endpoint_id",
            )
        if previous.status != ModelVersion.Status.READY:
            raise Conflict(
                f"the previous model version {previous.id!r} is {previous.status}; "
                "it can no longer be served",
                param="endpoint_id",
            )
        return _switch(locked, previous, EndpointRevision.Action.ROLLBACK, principal)


def endpoint_delete(*, principal: Principal, endpoint: Endpoint) -> None:
    """Deletes the endpoint; requests already dispatched still finish."""
    org = _org(endpoint)
    with transaction.atomic():
        locked = _lock(endpoint)
        audit_record(
            principal=principal,
            action="endpoint.deleted",
            target=locked,
            organization=org,
            metadata={"name": locked.name, "model_version_id": locked.model_version_id},
        )
        endpoint_id = locked.id
        locked.delete()
        transaction.on_commit(lambda: endpoint_unpublish(endpoint_id))
    logger.info("endpoint %s deleted from %s", endpoint_id, org.id)


def endpoint_unpublish(endpoint_id: str) -> None:
    """Replaces the gateway's cached spec with a tombstone (specs.UNKNOWN) for a while.

    Not a plain delete: a gateway that read the spec from the database just before the
    delete committed fills the cache only where the key is absent, so it cannot bring the
    endpoint back; after the tombstone expires the database says it is gone anyway.
    """
    get_redis().set(specs.endpoint_key(endpoint_id), specs.UNKNOWN, ex=specs.DELETED_TTL_S)


def _switch(locked: Endpoint, version: ModelVersion, action: str, principal: Principal) -> Endpoint:
    old = locked.model_version
    locked.previous_model_version = old
    locked.model_version = version
    locked.save(update_fields=["model_version", "previous_model_version", "updated_at"])
    revision = _revision(locked, version, action, principal)
    rolled = "rolled_back" if action == EndpointRevision.Action.ROLLBACK else "rolled_out"
    audit_record(
        principal=principal,
        action=f"endpoint.{rolled}",
        target=locked,
        organization=_org(locked),
        metadata={"from": old.id, "to": version.id, "revision": revision.number},
    )
    _publish_on_commit(locked.id)
    logger.info("endpoint %s: %s %s -> %s", locked.id, action, old.id, version.id)
    return locked


def _revision(
    endpoint: Endpoint, version: ModelVersion, action: str, principal: Principal
) -> EndpointRevision:
    last = (
        EndpointRevision.objects.filter(endpoint=endpoint)
        .order_by("-number")
        .values_list("number", flat=True)
        .first()
    )
    return EndpointRevision.objects.create(
        endpoint=endpoint,
        number=(last or 0) + 1,
        model_version=version,
        action=action,
        created_by=principal.label,
    )


def _lock(endpoint: Endpoint) -> Endpoint:
    return (
        Endpoint.objects.select_for_update(of=("self",))
        .select_related("model_version__model", "previous_model_version", "pool", "organization")
        .get(pk=endpoint.pk)
    )


def _org(endpoint: Endpoint) -> Organization:
    org = endpoint.organization
    if org is None:  # public endpoints are the platform's, never reachable through here
        raise InvalidInput("public endpoints are managed by the operator", param="endpoint_id")
    return org


def _servable_version(org: Organization, model_version_id: str) -> ModelVersion:
    version = model_version_for(org, model_version_id)
    if version.status != ModelVersion.Status.READY:
        raise InvalidInput(
            f"model version {version.id!r} is {version.status}; only ready versions can be served",
            param="model_version_id",
        )
    return version


def _clean_endpoint_name(value: str) -> str:
    cleaned = value.strip()
    if not cleaned:
        raise InvalidInput("name must not be empty", param="name")
    if len(cleaned) > 120:
        raise InvalidInput("name must be at most 120 characters", param="name")
    return cleaned


def _default(name: str) -> int:
    field = Endpoint._meta.get_field(name)
    assert isinstance(field, models.Field)
    return int(field.get_default())


def endpoint_publish_on_commit(endpoint_id: str) -> None:
    """Publishes the endpoint's spec (or its tombstone) once the current transaction
    commits: for writes elsewhere that change what its spec carries (catalog/providers.py)."""
    _publish_on_commit(endpoint_id)


def _publish_on_commit(endpoint_id: str) -> None:
    # Read again after commit: of two quick changes, whichever callback runs last
    # still publishes the state that is current.
    def publish() -> None:
        endpoint = (
            Endpoint.objects.select_related("model_version__model", "pool")
            .filter(pk=endpoint_id)
            .first()
        )
        if endpoint is None:
            endpoint_unpublish(endpoint_id)
        else:
            endpoint_publish(endpoint)

    transaction.on_commit(publish)
