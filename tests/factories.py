"""factory_boy factories for the suite's rows."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import factory
from django.utils import timezone

from accounts import services
from accounts.models import ApiKey, Membership, Organization, Project, User
from accounts.permissions import Role
from accounts.principal import SYSTEM, Principal


class UserFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = User

    email = factory.Sequence(lambda n: f"user{n}@example.com")
    full_name = factory.Faker("name")
    password = "correct horse battery"
    # Accounts made by the console are verified (docs/console.md); tests of unverified
    # accounts pass email_verified_at=None.
    email_verified_at = factory.LazyFunction(timezone.now)

    @classmethod
    def _create(cls, model_class: type[User], *args: Any, **kwargs: Any) -> User:
        return User.objects.create_user(*args, **kwargs)


class OrganizationFactory(factory.Factory):
    """Through the service, so every organization has its owner and default project."""

    class Meta:
        model = Organization

    name = factory.Sequence(lambda n: f"Org {n}")
    owner = factory.SubFactory(UserFactory)

    @classmethod
    def _create(cls, model_class: type, *args: Any, **kwargs: Any) -> Organization:
        return services.organization_create(
            principal=SYSTEM, name=kwargs["name"], owner=kwargs["owner"]
        )


def add_member(org: Organization, role: Role, user: User | None = None) -> User:
    user = user or UserFactory()
    Membership.objects.create(organization=org, user=user, role=role)
    return user


def default_project(org: Organization) -> Project:
    return Project.objects.get(organization=org, is_default=True)


def make_api_key(
    org: Organization,
    *,
    scopes: Sequence[str] = ("inference",),
    project: Project | None = None,
    by: User | None = None,
    **kwargs: Any,
) -> tuple[ApiKey, str]:
    """A key of `org`, created by `by` (a member), else by the system.

    Only an owner or admin may create an admin-scoped key, and the key acts with its
    creator's role: without `by`, such a key is created by the organization's owner.
    """
    if by is None and "admin" in scopes:
        owners = Membership.objects.filter(organization=org, role=Role.OWNER)
        by = owners.earliest("created_at").user
    return services.api_key_create(
        principal=Principal(user=by) if by is not None else SYSTEM,
        project=project or default_project(org),
        name="test key",
        scopes=list(scopes),
        **kwargs,
    )


# --- catalog: pools, tensor models, endpoints -------------------------------------------


def make_pool(name: str = "cpu", *, region: str = "local", **kwargs: Any) -> Any:
    from catalog.services import DEFAULT_POOL_PROVIDERS, pool_ensure

    providers = kwargs.pop("providers", DEFAULT_POOL_PROVIDERS)
    return pool_ensure(name=name, region=region, providers=providers, **kwargs)


def tensor_artifact(
    store: Any, *, offset: float = 1.0, static_batch: int | None = None, name: str = "ranker"
) -> dict[str, Any]:
    """A real ONNX graph in the artifact store: shifted = features + offset, score = sum(shifted).

    Built with onnx.helper (no download); `static_batch` fixes the first dimension,
    which makes the graph unbatchable. Returns the manifest, with `location`.
    """
    from pathlib import Path

    import onnx
    from onnx import TensorProto, helper

    from workers.compile import artifacts

    batch: int | str = static_batch if static_batch is not None else "batch"
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["features", "offset"], ["shifted"]),
            helper.make_node("ReduceSum", ["shifted", "axes"], ["score"], keepdims=0),
        ],
        name,
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, [batch, 4])],
        [
            helper.make_tensor_value_info("shifted", TensorProto.FLOAT, [batch, 4]),
            helper.make_tensor_value_info("score", TensorProto.FLOAT, [batch]),
        ],
        initializer=[
            helper.make_tensor("offset", TensorProto.FLOAT, [1], [offset]),
            helper.make_tensor("axes", TensorProto.INT64, [1], [1]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    shape = [batch, 4]
    manifest = {
        "name": name,
        "kind": "tensor",
        "runtime": "onnx-tensor",
        "model_file": "model.onnx",
        "context_length": 0,
        "io": {
            "inputs": {"features": {"dtype": "float32", "shape": shape}},
            "outputs": {
                "shifted": {"dtype": "float32", "shape": shape},
                "score": {"dtype": "float32", "shape": [batch]},
            },
        },
        "source": {"test": f"offset={offset}"},
    }
    store = Path(store)
    with artifacts.staging_dir(store, "tensor") as staging:
        onnx.save(model, str(staging / "model.onnx"))
        path = artifacts.commit_artifact(store, staging, manifest)
    return {**artifacts.read_manifest(path), "location": str(path)}


# A model version's manifest for control-plane tests: nothing is ever loaded from it.
UNSERVED_ENCODER: dict[str, Any] = {
    "name": "ranker",
    "kind": "embedding",
    "runtime": "onnx-encoder",
    "sha256": "0" * 64,
    "location": "/nonexistent/ranker",
}


def make_model_version(
    org: Organization | None,
    manifest: dict[str, Any],
    *,
    model_name: str | None = None,
    priced: bool = True,
) -> Any:
    """A ready model version (and its model, created on first use) for an artifact manifest.

    A model created here is priced (`price_model`) unless `priced=False`: admission
    refuses a model without a price (403 model_not_priced).
    """
    from catalog.models import Model, ModelVersion

    model, created = Model.objects.get_or_create(
        name=model_name or str(manifest["name"]),
        defaults={
            "organization": org,
            "kind": manifest["kind"],
            "context_length": int(manifest.get("context_length") or 0),
        },
    )
    if created and priced:
        price_model(model.name, model.kind)
    latest = model.versions.order_by("-version").values_list("version", flat=True).first()
    return ModelVersion.objects.create(
        model=model,
        version=(latest or 0) + 1,
        runtime=manifest["runtime"],
        sha256=manifest["sha256"],
        size_bytes=int(manifest.get("size_bytes") or 0),
        location=manifest["location"],
        tokenizer_file=str(manifest.get("tokenizer_file") or ""),
        manifest=manifest,
    )


# Long before any test's usage, so every hour a test rates is priced.
PRICED_SINCE = "2020-01-01T00:00:00+00:00"


def list_price(name: str, unit: str, unit_price: str, *, reason: str = "test price") -> None:
    """A list price of `name` per `unit` from PRICED_SINCE, written directly (not through
    `price_set`, which refuses the past and audits), as a seeded price book would be."""
    from datetime import datetime
    from decimal import Decimal

    from billing.models import Price

    Price.objects.get_or_create(
        model_name=name,
        token_kind=unit,
        effective_from=datetime.fromisoformat(PRICED_SINCE),
        defaults={"unit_price": Decimal(unit_price), "reason": reason},
    )


def price_model(name: str, kind: str, *, unit_price: str = "0.1") -> None:
    """List prices for every unit a model of `kind` is billed by."""
    from billing.pricing import billed_units

    for unit in billed_units(kind):
        list_price(name, unit, unit_price)


def price_builtin_models() -> None:
    """The built-in models at their starter prices (what `bin/run`'s seed_prices gives):
    their online units and the batch twin of each."""
    from decimal import Decimal

    from billing.starter_prices import (
        STARTER_CACHED_INPUT_PRICES,
        STARTER_PRICES,
        with_batch_prices,
    )

    for name, (price_in, price_out) in STARTER_PRICES.items():
        online = [("input", Decimal(price_in)), ("output", Decimal(price_out))]
        if name in STARTER_CACHED_INPUT_PRICES:
            online.append(("cached_input", Decimal(STARTER_CACHED_INPUT_PRICES[name])))
        for unit, price in with_batch_prices(online):
            list_price(name, unit, str(price), reason="starter price (test)")
