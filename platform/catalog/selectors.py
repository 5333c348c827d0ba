"""Reads of the catalog; customer-reachable ones are scoped by organization."""

from __future__ import annotations

from django.db.models import Q, QuerySet

from catalog.models import Endpoint, Model
from catalog.specs import EndpointSpec


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
    )


def endpoint_spec_load(ref: str) -> EndpointSpec | None:
    """The gateway's cache-miss path: an endpoint by id (`ep-...`) or public name."""
    qs = Endpoint.objects.select_related("model_version__model", "pool")
    if ref.startswith("ep-"):
        endpoint = qs.filter(id=ref).first()
    else:
        endpoint = qs.filter(name=ref, organization__isnull=True).first()
    return endpoint_spec(endpoint) if endpoint is not None else None
