"""Writes of the catalog: pools, models and versions, endpoints, and the built-in models."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from django.conf import settings
from django.db import transaction

from catalog import specs
from catalog.models import AcceleratorPool, Endpoint, Model, ModelVersion
from catalog.selectors import endpoint_spec
from config.redis import get_redis
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
    pipe.set(specs.endpoint_key(spec.id), spec.to_json(), ex=SPEC_TTL_S)
    if spec.public:
        pipe.set(specs.endpoint_name_key(spec.name), spec.to_json(), ex=SPEC_TTL_S)
    pipe.execute()


def endpoints_publish_all() -> int:
    count = 0
    for endpoint in Endpoint.objects.select_related("model_version__model", "pool"):
        endpoint_publish(endpoint)
        count += 1
    return count


def _model_version_from_manifest(
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
        version = _model_version_from_manifest(model=model, manifest=manifest, runtime=runtime)
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
