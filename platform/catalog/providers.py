"""Writes of upstream providers and route targets (docs/providers.md).

Every write is one transaction with an audit entry. A provider's credential is write-only:
it is sealed (`core.secretbox`) on the way in, a blank value keeps the stored one, and
nothing here returns, logs or audits it. Every change that alters an endpoint's targets as
the gateway sees them (its targets, a provider's enabled flag) rewrites that endpoint's
cached spec once the transaction commits (`catalog.services._publish_on_commit`).
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import urlsplit

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models.deletion import ProtectedError

from accounts.models import Organization
from accounts.principal import Principal
from accounts.services import audit_record
from catalog import services
from catalog.models import AcceleratorPool, Endpoint, Model, ModelVersion, Provider, RouteTarget
from core import outbound, secretbox
from core.errors import Conflict, InvalidInput, PermissionDenied
from workers.contract import Runtime

logger = logging.getLogger(__name__)

UPSTREAM_POOL = "upstream"
MAX_TARGETS = 16
MAX_WEIGHT = 10_000
MAX_POSITION = 1_000
MAX_UPSTREAM_MODEL = 200
MAX_CREDENTIAL = 4096
# Costs: currency per token, as RouteTarget stores them (20 digits, 9 decimal places).
MAX_COST = Decimal("1000")
COST_PLACES = Decimal("0.000000001")
# An Azure deployment name goes into the request's path.
AZURE_DEPLOYMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
BYOK_OFF = (
    "organizations may not bring their own providers on this platform "
    "(the operator has not enabled MANTLE_PROVIDER_BYOK)"
)


@dataclass(frozen=True)
class TargetIn:
    """One route target as `route_targets_set` takes it."""

    kind: str
    provider_id: str | None = None
    upstream_model: str = ""
    position: int = 0
    weight: int = 1
    cost_input: Decimal | str | int = 0
    cost_output: Decimal | str | int = 0
    cost_cached_input: Decimal | str | int = 0
    enabled: bool = True

    @classmethod
    def of(cls, value: TargetIn | Mapping[str, Any]) -> TargetIn:
        if isinstance(value, TargetIn):
            return value
        known = {k: v for k, v in value.items() if k in cls.__dataclass_fields__}
        return cls(**known)


# --- Providers -------------------------------------------------------------------------------


def provider_create(
    *,
    principal: Principal,
    organization: Organization | None,
    name: str,
    kind: str,
    base_url: str,
    api_version: str = "",
    credential: str = "",
    connect_timeout_s: float = 5.0,
    first_byte_timeout_s: float = 30.0,
    max_concurrency: int = 64,
    enabled: bool = True,
) -> Provider:
    """A provider of the operator (`organization` None) or of an organization (only while
    MANTLE_PROVIDER_BYOK is on)."""
    if organization is not None and not settings.MANTLE_PROVIDER_BYOK:
        raise PermissionDenied(BYOK_OFF)
    fields = _clean_provider(
        {
            "name": name,
            "kind": kind,
            "base_url": base_url,
            "api_version": api_version,
            "connect_timeout_s": connect_timeout_s,
            "first_byte_timeout_s": first_byte_timeout_s,
            "max_concurrency": max_concurrency,
        },
        trusted=organization is None,
    )

    secret = _clean_credential(credential)
    if not secret and fields["kind"] != Provider.Kind.OPENAI_COMPATIBLE:
        raise InvalidInput(f"a {fields['kind']} provider needs a credential", param="credential")
    try:
        with transaction.atomic():
            provider = Provider.objects.create(
                organization=organization,
                credential_encrypted=secretbox.seal(secret),
                enabled=bool(enabled),
                **fields,
            )
            audit_record(
                principal=principal,
                action="provider.created",
                target=provider,
                organization=organization,
                metadata={**_described(fields), "has_credential": bool(secret)},
            )
    except IntegrityError as exc:
        raise Conflict(f"a provider named {fields['name']!r} already exists", param="name") from exc
    logger.info(
        "provider %s created (%s, %s)", provider.id, provider.kind, provider.organization_id
    )
    return provider


def provider_update(
    *,
    principal: Principal,
    provider: Provider,
    name: str | None = None,
    kind: str | None = None,
    base_url: str | None = None,
    api_version: str | None = None,
    credential: str | None = None,
    connect_timeout_s: float | None = None,
    first_byte_timeout_s: float | None = None,
    max_concurrency: int | None = None,
) -> Provider:
    """Changes the fields given. `credential`: a new value replaces the stored one; None or
    blank keeps it (it is never read back). The gateways see the change within their
    provider cache's lifetime (docs/providers.md)."""
    given = {
        "name": name,
        "kind": kind,
        "base_url": base_url,
        "api_version": api_version,
        "connect_timeout_s": connect_timeout_s,
        "first_byte_timeout_s": first_byte_timeout_s,
        "max_concurrency": max_concurrency,
    }
    secret = _clean_credential(credential or "")
    try:
        with transaction.atomic():
            locked = Provider.objects.select_for_update().get(pk=provider.pk)
            current = {field: getattr(locked, field) for field in given}
            merged = _clean_provider(
                {f: (current[f] if v is None else v) for f, v in given.items()},
                trusted=locked.organization_id is None,
            )
            if (
                locked.credential_encrypted
                and not secret
                and _origin(merged["base_url"]) != _origin(locked.base_url)
            ):
                # The stored key never follows the URL to another host: whoever may edit a
                # provider would otherwise point it at their own server and receive the key.
                raise InvalidInput(
                    "base_url moves the provider to another host: give its credential again",
                    param="credential",
                )
            if merged["kind"] == Provider.Kind.AZURE_OPENAI and merged["kind"] != locked.kind:
                _check_azure_deployments(locked)
            changed = {f: v for f, v in merged.items() if current[f] != v}
            for field, value in changed.items():
                setattr(locked, field, value)
            if secret:
                locked.credential_encrypted = secretbox.seal(secret)
            if not changed and not secret:
                return locked
            locked.save()
            audit_record(
                principal=principal,
                action="provider.updated",
                target=locked,
                organization=locked.organization,
                metadata={**_described(changed), "credential_replaced": bool(secret)},
            )
    except IntegrityError as exc:
        raise Conflict(f"a provider named {merged['name']!r} already exists", param="name") from exc
    return locked


def provider_set_enabled(*, principal: Principal, provider: Provider, enabled: bool) -> Provider:
    """Enables or disables a provider: a disabled one's targets drop out of every endpoint's
    spec at once (the endpoints using it are published again)."""
    with transaction.atomic():
        locked = Provider.objects.select_for_update().get(pk=provider.pk)
        if locked.enabled == bool(enabled):
            return locked
        locked.enabled = bool(enabled)
        locked.save(update_fields=["enabled", "updated_at"])
        audit_record(
            principal=principal,
            action="provider.enabled" if enabled else "provider.disabled",
            target=locked,
            organization=locked.organization,
        )
        _publish_endpoints(
            RouteTarget.objects.filter(provider=locked).values_list("endpoint_id", flat=True)
        )
    return locked


def provider_delete(*, principal: Principal, provider: Provider) -> None:
    """Deletes a provider no route target uses (remove it from the endpoints' targets first)."""
    with transaction.atomic():
        locked = Provider.objects.select_for_update().get(pk=provider.pk)
        used_by = sorted(
            set(RouteTarget.objects.filter(provider=locked).values_list("endpoint_id", flat=True))
        )
        if used_by:
            shown = ", ".join(used_by[:5]) + (" ..." if len(used_by) > 5 else "")
            raise Conflict(
                f"provider {locked.name!r} is a route target of {len(used_by)} endpoint(s) "
                f"({shown}); remove it from their targets first",
                param="provider_id",
            )
        audit_record(
            principal=principal,
            action="provider.deleted",
            target=locked,
            organization=locked.organization,
            metadata={"name": locked.name, "kind": locked.kind},
        )
        try:
            locked.delete()
        except ProtectedError as exc:  # a target added since the check above
            raise Conflict(
                f"provider {locked.name!r} is in use by a route target", param="provider_id"
            ) from exc


# --- Route targets -----------------------------------------------------------------------------


def route_targets_set(
    *,
    principal: Principal,
    endpoint: Endpoint,
    targets: Sequence[TargetIn | Mapping[str, Any]],
    operator_providers: bool = True,
) -> list[RouteTarget]:
    """Replaces the endpoint's route targets with `targets`, atomically, and publishes its spec.

    A provider target's provider is the operator's or the endpoint's own organization's
    (an organization's provider never serves another organization's or a public endpoint);
    `operator_providers` False (an organization's own management API) refuses the operator's
    providers, but for the operator's targets the endpoint already has (the same provider and
    upstream model): those may stay, be moved, re-weighted, disabled or removed, and keep the
    costs the operator set (what the operator pays is not the organization's to change).
    An endpoint of a provider-only model (runtime `upstream`) has no pool target and at
    least one provider target. An empty list: the pool only.
    """
    cleaned = [TargetIn.of(t) for t in targets]
    if len(cleaned) > MAX_TARGETS:
        raise InvalidInput(f"an endpoint has at most {MAX_TARGETS} targets", param="targets")
    with transaction.atomic():
        locked = (
            Endpoint.objects.select_for_update(of=("self",))
            .select_related("model_version__model", "organization")
            .get(pk=endpoint.pk)
        )
        wanted_ids = {t.provider_id for t in cleaned if t.provider_id}
        providers = {
            p.id: p for p in Provider.objects.select_for_update().filter(id__in=sorted(wanted_ids))
        }
        kept = (
            {}
            if operator_providers
            else {
                (t.provider_id, t.upstream_model): t
                for t in RouteTarget.objects.filter(
                    endpoint=locked, kind=RouteTarget.Kind.PROVIDER, provider__organization=None
                )
            }
        )
        rows = [
            _target_row(locked, t, i, providers, operator_providers=operator_providers, kept=kept)
            for i, t in enumerate(cleaned)
        ]
        _check_target_set(locked, rows)
        RouteTarget.objects.filter(endpoint=locked).delete()
        created = [RouteTarget.objects.create(**row) for row in rows]
        audit_record(
            principal=principal,
            action="endpoint.targets_set",
            target=locked,
            organization=locked.organization,
            metadata={"targets": [_target_described(t) for t in created]},
        )
        services.endpoint_publish_on_commit(locked.id)
    logger.info("endpoint %s: %d route targets", locked.id, len(created))
    return created


def upstream_model_register(
    *,
    principal: Principal,
    name: str,
    kind: str,
    context_length: int,
    targets: Sequence[TargetIn | Mapping[str, Any]],
    description: str = "",
    family: str = "",
) -> Endpoint:
    """A public model served only by providers: the Model, a version of runtime `upstream`
    (no artifact), a public endpoint of the same name on the pool `upstream` (made on
    demand; no worker serves it), and its targets. Run again for the same name, it keeps
    the model and endpoint and replaces the targets. Give the model a price in the price
    book before customers call it."""
    name = _clean_model_name(name)
    if kind not in Model.Kind.values or kind == Model.Kind.TENSOR:
        allowed = [k for k in Model.Kind.values if k != Model.Kind.TENSOR]
        raise InvalidInput(f"kind must be one of {allowed}", param="kind")
    if not isinstance(context_length, int) or not 1 <= context_length <= 10_000_000:
        raise InvalidInput(
            "context_length must be a whole number of tokens, 1 or more", param="context_length"
        )
    with transaction.atomic():
        pool = AcceleratorPool.objects.filter(name=UPSTREAM_POOL).first() or services.pool_ensure(
            name=UPSTREAM_POOL,
            region=settings.MANTLE_DEFAULT_REGION,
            providers=[],
            description="Provider-only models (runtime upstream); no worker serves it",
        )
        model = Model.objects.select_for_update().filter(name=name).first()
        if model is None:
            model = Model.objects.create(
                name=name,
                organization=None,
                kind=kind,
                context_length=context_length,
                family=family[:64],
                description=description or "Served by upstream providers",
            )
        elif model.organization_id is not None or model.kind != kind:
            raise Conflict(f"a model named {name!r} already exists", param="name")
        else:
            model.context_length = context_length
            model.description = description or model.description
            model.save(update_fields=["context_length", "description"])
        sha = hashlib.sha256(f"upstream:{name}".encode()).hexdigest()
        version = ModelVersion.objects.filter(model=model, runtime=Runtime.UPSTREAM).first()
        if version is None:
            if model.versions.exists():
                raise Conflict(
                    f"model {name!r} has versions served by pools; route its endpoint's "
                    "targets instead",
                    param="name",
                )
            version = ModelVersion.objects.create(
                model=model,
                version=1,
                runtime=Runtime.UPSTREAM,
                sha256=sha,
                location="",
                manifest={"runtime": Runtime.UPSTREAM.value, "kind": kind},
                status=ModelVersion.Status.READY,
            )
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
            raise Conflict(
                f"the public endpoint {name!r} serves another version; route its targets instead",
                param="name",
            )
        audit_record(
            principal=principal,
            action="model.upstream_registered",
            target=endpoint,
            organization=None,
            metadata={"name": name, "kind": kind, "context_length": context_length},
        )
        route_targets_set(principal=principal, endpoint=endpoint, targets=targets)
    return endpoint


# --- Validation ----------------------------------------------------------------------------


def _clean_model_name(value: str) -> str:
    cleaned = (value or "").strip()
    if not cleaned or len(cleaned) > 120 or any(not (33 <= ord(c) < 127) for c in cleaned):
        raise InvalidInput("name must be 1-120 printable characters with no spaces", param="name")
    return cleaned


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    return parts.scheme.lower(), (parts.hostname or "").lower(), parts.port


def _clean_provider(fields: Mapping[str, Any], *, trusted: bool = True) -> dict[str, Any]:
    name = str(fields["name"] or "").strip()
    if not name:
        raise InvalidInput("name must not be empty", param="name")
    if len(name) > 120:
        raise InvalidInput("name must be at most 120 characters", param="name")
    if any(not c.isprintable() for c in name):
        # It is sent in a response header (x-mantle-served-by).
        raise InvalidInput("name must not contain control characters", param="name")
    if not name.isascii():
        raise InvalidInput("name must be ASCII (it is sent in a header)", param="name")
    kind = str(fields["kind"] or "")
    if kind not in Provider.Kind.values:
        raise InvalidInput(f"kind must be one of {list(Provider.Kind.values)}", param="kind")
    base_url = check_base_url(str(fields["base_url"] or ""), trusted=trusted)
    api_version = str(fields["api_version"] or "").strip()
    if kind == Provider.Kind.AZURE_OPENAI:
        if not re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}(-preview)?", api_version):
            raise InvalidInput(
                "an azure-openai provider needs api_version, e.g. 2024-10-21",
                param="api_version",
            )
    elif api_version:
        raise InvalidInput("api_version applies only to azure-openai", param="api_version")
    return {
        "name": name,
        "kind": kind,
        "base_url": base_url,
        "api_version": api_version,
        "connect_timeout_s": _bounded_float(fields["connect_timeout_s"], "connect_timeout_s", 60),
        "first_byte_timeout_s": _bounded_float(
            fields["first_byte_timeout_s"], "first_byte_timeout_s", 600
        ),
        "max_concurrency": _bounded_int(fields["max_concurrency"], "max_concurrency", 1, 100_000),
    }


def check_base_url(value: str, *, trusted: bool = True) -> str:
    """A provider's base URL as the relay may call it: the outbound layer's rules
    (`core.outbound.check_url`: https, or http to allow-listed hosts; a host; no credentials
    or fragment; an address written in the URL must be public unless allow-listed; the
    resolved addresses are checked again at every request), and no query (paths are
    appended to it)."""
    url = value.strip().rstrip("/")
    if not url:
        raise InvalidInput("base_url must not be empty", param="base_url")
    if len(url) > 500:
        raise InvalidInput("base_url must be at most 500 characters", param="base_url")
    if any(ord(c) < 33 or ord(c) == 127 for c in url):
        raise InvalidInput(
            "base_url must not contain spaces or control characters", param="base_url"
        )
    try:
        # An organization's own provider: public https only (the operator's allow-lists
        # are for the operator's providers).
        outbound.check_url(url, trusted=trusted)
    except outbound.DestinationRefused as exc:
        raise InvalidInput(f"base_url: {exc}", param="base_url") from exc
    if "?" in url:
        raise InvalidInput("base_url must have no query", param="base_url")
    return url


def _clean_credential(value: str) -> str:
    secret = (value or "").strip()
    if len(secret) > MAX_CREDENTIAL:
        raise InvalidInput(
            f"credential must be at most {MAX_CREDENTIAL} characters", param="credential"
        )
    # It goes into a request header: printable ASCII only (no line breaks, no controls).
    if any(not (32 <= ord(c) < 127) for c in secret):
        raise InvalidInput(
            "credential must be printable ASCII with no line breaks", param="credential"
        )
    return secret


def _bounded_float(value: Any, param: str, most: float) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"{param} must be a number of seconds", param=param) from exc
    if not 0.1 <= number <= most:
        raise InvalidInput(f"{param} must be between 0.1 and {most:g} seconds", param=param)
    return number


def _bounded_int(value: Any, param: str, least: int, most: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            value = int(str(value).strip())
        except ValueError as exc:
            raise InvalidInput(f"{param} must be a whole number", param=param) from exc
    if not least <= value <= most:
        raise InvalidInput(f"{param} must be between {least} and {most}", param=param)
    return int(value)


def _cost(value: Any, param: str) -> Decimal:
    try:
        cost = Decimal(str(value).strip() or "0")
    except InvalidOperation as exc:
        raise InvalidInput(f"{param} must be a decimal number", param=param) from exc
    if not cost.is_finite() or cost < 0:
        raise InvalidInput(f"{param} must be 0 or more (currency per token)", param=param)
    if cost > MAX_COST:
        raise InvalidInput(f"{param} is per token: at most {MAX_COST}", param=param)
    if cost != cost.quantize(COST_PLACES):
        raise InvalidInput(f"{param} has at most 9 decimal places", param=param)
    return cost.quantize(COST_PLACES)


def _target_row(
    endpoint: Endpoint,
    target: TargetIn,
    index: int,
    providers: Mapping[str, Provider],
    *,
    operator_providers: bool,
    kept: Mapping[tuple[str | None, str], RouteTarget],
) -> dict[str, Any]:
    at = f"targets[{index}]"
    if target.kind not in RouteTarget.Kind.values:
        raise InvalidInput(f"{at}.kind must be 'pool' or 'provider'", param=f"{at}.kind")
    row: dict[str, Any] = {
        "endpoint": endpoint,
        "kind": target.kind,
        "position": _bounded_int(target.position, f"{at}.position", 0, MAX_POSITION),
        "weight": _bounded_int(target.weight, f"{at}.weight", 1, MAX_WEIGHT),
        "enabled": bool(target.enabled),
    }
    costs = {
        f: _cost(getattr(target, f), f"{at}.{f}")
        for f in ("cost_input", "cost_output", "cost_cached_input")
    }
    if target.kind == RouteTarget.Kind.POOL:
        if target.provider_id:
            raise InvalidInput(f"{at}: a pool target names no provider", param=f"{at}.provider_id")
        if (target.upstream_model or "").strip():
            raise InvalidInput(
                f"{at}: a pool target has no upstream_model", param=f"{at}.upstream_model"
            )
        if any(costs.values()):
            raise InvalidInput(
                f"{at}: costs are a provider's charges; a pool target has none",
                param=f"{at}.cost_input",
            )
        return {**row, "provider": None, "upstream_model": "", **costs}
    provider = providers.get(target.provider_id or "")
    model = (target.upstream_model or "").strip()
    operator_kept = kept.get((target.provider_id, model))
    # Another organization's provider is refused exactly like one that does not exist.
    visible = provider is not None and (
        provider.organization_id == endpoint.organization_id
        if provider.organization_id is not None
        else operator_providers or operator_kept is not None
    )
    if provider is None or not visible:
        raise InvalidInput(
            f"{at}: provider {target.provider_id!r} not found", param=f"{at}.provider_id"
        )
    if provider.organization_id is None and operator_kept is not None:
        costs = {
            f: getattr(operator_kept, f) for f in ("cost_input", "cost_output", "cost_cached_input")
        }
    if not model:
        raise InvalidInput(
            f"{at}.upstream_model is required (the provider's model or Azure deployment)",
            param=f"{at}.upstream_model",
        )
    if len(model) > MAX_UPSTREAM_MODEL:
        raise InvalidInput(
            f"{at}.upstream_model must be at most {MAX_UPSTREAM_MODEL} characters",
            param=f"{at}.upstream_model",
        )
    if any(not (33 <= ord(c) < 127) for c in model):
        raise InvalidInput(
            f"{at}.upstream_model must be printable ASCII with no spaces",
            param=f"{at}.upstream_model",
        )
    if provider.kind == Provider.Kind.AZURE_OPENAI and not AZURE_DEPLOYMENT.fullmatch(model):
        raise InvalidInput(
            f"{at}.upstream_model must be an Azure deployment name (letters, digits, '.', "
            "'_', '-'; at most 64)",
            param=f"{at}.upstream_model",
        )
    return {**row, "provider": provider, "upstream_model": model, **costs}


def _check_target_set(endpoint: Endpoint, rows: Sequence[Mapping[str, Any]]) -> None:
    pools = [i for i, r in enumerate(rows) if r["kind"] == RouteTarget.Kind.POOL]
    upstream = endpoint.model_version.runtime == Runtime.UPSTREAM
    if upstream and pools:
        raise InvalidInput(
            f"targets[{pools[0]}]: {endpoint.model_version.model.name!r} is served only by "
            "providers (runtime upstream); it has no pool target",
            param=f"targets[{pools[0]}].kind",
        )
    if upstream and not any(r["kind"] == RouteTarget.Kind.PROVIDER for r in rows):
        raise InvalidInput(
            "a provider-only model's endpoint needs at least one provider target",
            param="targets",
        )
    if len(pools) > 1:
        raise InvalidInput(
            f"targets[{pools[1]}]: the endpoint's pool is a target at most once",
            param=f"targets[{pools[1]}].kind",
        )
    seen: set[tuple[str, str]] = set()
    for i, r in enumerate(rows):
        if r["kind"] != RouteTarget.Kind.PROVIDER:
            continue
        key = (r["provider"].id, r["upstream_model"])
        if key in seen:
            raise InvalidInput(
                f"targets[{i}]: {r['upstream_model']!r} of that provider is listed twice",
                param=f"targets[{i}].upstream_model",
            )
        seen.add(key)


def _check_azure_deployments(provider: Provider) -> None:
    for model in RouteTarget.objects.filter(provider=provider).values_list(
        "upstream_model", flat=True
    ):
        if not AZURE_DEPLOYMENT.fullmatch(model):
            raise InvalidInput(
                f"a target names {model!r}, which is not an Azure deployment name; change "
                "the targets first",
                param="kind",
            )


def _described(fields: Mapping[str, Any]) -> dict[str, Any]:
    # What the audit log keeps of a provider's change: never a credential.
    return {k: v for k, v in fields.items() if "credential" not in k}


def _target_described(t: RouteTarget) -> dict[str, Any]:
    return {
        "kind": t.kind,
        "provider_id": t.provider_id,
        "upstream_model": t.upstream_model,
        "position": t.position,
        "weight": t.weight,
        "cost_input": str(t.cost_input),
        "cost_output": str(t.cost_output),
        "cost_cached_input": str(t.cost_cached_input),
        "enabled": t.enabled,
    }


def _publish_endpoints(endpoint_ids: Iterable[str]) -> None:
    for endpoint_id in sorted(set(endpoint_ids)):
        services.endpoint_publish_on_commit(endpoint_id)


def provider_secrets_rotate() -> int:
    """Every stored credential encrypted again under the first configured key, in one
    transaction (a credential no key decrypts stops it and changes nothing). The count."""
    count = 0
    with transaction.atomic():
        for provider in Provider.objects.select_for_update().exclude(credential_encrypted=""):
            provider.credential_encrypted = secretbox.reseal(provider.credential_encrypted)
            provider.save(update_fields=["credential_encrypted", "updated_at"])
            count += 1
    return count
