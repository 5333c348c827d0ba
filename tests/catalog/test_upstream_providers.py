"""Providers and route targets through the services (catalog/providers.py): validation,
organizations kept apart, the credential write-only, the gateway's spec published."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import pytest
from django.test import override_settings

from accounts.models import AuditLog, Organization
from accounts.principal import SYSTEM
from catalog import providers as svc
from catalog import specs
from catalog.models import Endpoint, ModelVersion, Provider, RouteTarget
from catalog.services import endpoint_create
from catalog.specs import EndpointSpec
from core import secretbox
from core.errors import Conflict, InvalidInput, PermissionDenied
from core.redis import get_redis
from tests.factories import UNSERVED_ENCODER, OrganizationFactory, make_model_version, make_pool

pytestmark = pytest.mark.django_db

SECRET = "sk-upstream-very-secret-4f9a"


@pytest.fixture
def committed(django_capture_on_commit_callbacks: Any) -> Callable[..., Any]:
    """Runs a service and what it scheduled on commit (the Redis publish)."""

    def do(fn: Callable[..., Any], **kwargs: Any) -> Any:
        with django_capture_on_commit_callbacks(execute=True):
            return fn(**kwargs)

    return do


@pytest.fixture
def byok() -> Iterator[None]:
    with override_settings(MANTLE_PROVIDER_BYOK=True):
        yield


def operator_provider(name: str = "openai", **extra: Any) -> Provider:
    return svc.provider_create(
        principal=SYSTEM,
        organization=None,
        name=name,
        kind=extra.pop("kind", "openai"),
        base_url=extra.pop("base_url", "https://api.openai.com/v1"),
        credential=extra.pop("credential", SECRET),
        **extra,
    )


def org_provider(org: Organization, name: str = "own") -> Provider:
    with override_settings(MANTLE_PROVIDER_BYOK=True):
        return svc.provider_create(
            principal=SYSTEM,
            organization=org,
            name=name,
            kind="openai-compatible",
            base_url="https://vllm.example.com/v1",
            credential="key-of-" + org.id,
        )


def org_endpoint(org: Organization, name: str = "ranker") -> Endpoint:
    make_pool("cpu")
    version = make_model_version(
        org, {**UNSERVED_ENCODER, "sha256": org.id.ljust(64, "0")[:64]}, model_name=f"m-{org.id}"
    )
    return endpoint_create(
        principal=SYSTEM, org=org, name=name, model_version_id=version.id, pool="cpu"
    )


def published(endpoint_id: str) -> EndpointSpec:
    raw = get_redis().get(specs.endpoint_key(endpoint_id))
    assert raw and raw != specs.UNKNOWN
    return EndpointSpec.from_json(raw)


def provider_target(provider: Provider, model: str = "gpt-4o-mini", **extra: Any) -> Any:
    return {"kind": "provider", "provider_id": provider.id, "upstream_model": model, **extra}


# --- providers -------------------------------------------------------------------------------


def test_create_seals_the_credential_and_audits_without_it() -> None:
    provider = operator_provider(connect_timeout_s=2, max_concurrency=8)
    provider.refresh_from_db()
    assert provider.credential_encrypted and SECRET not in provider.credential_encrypted
    assert secretbox.unseal(provider.credential_encrypted) == SECRET
    assert (provider.base_url, provider.connect_timeout_s, provider.max_concurrency) == (
        "https://api.openai.com/v1",
        2.0,
        8,
    )
    audit = AuditLog.objects.get(action="provider.created")
    assert audit.metadata["has_credential"] is True
    assert SECRET not in str(audit.metadata)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"name": " "}, "name"),
        ({"kind": "anthropic"}, "kind"),
        ({"base_url": "http://api.openai.com/v1"}, "base_url"),
        ({"base_url": "ftp://api.openai.com/v1"}, "base_url"),
        ({"base_url": "https:///v1"}, "base_url"),
        ({"base_url": "https://user:pw@api.openai.com/v1"}, "base_url"),
        ({"base_url": "https://api.openai.com/v1?x=1"}, "base_url"),
        ({"credential": "sk-a\r\nX-Injected: 1"}, "credential"),
        ({"credential": ""}, "credential"),  # openai needs one
        ({"api_version": "2024-10-21"}, "api_version"),  # only azure
        ({"kind": "azure-openai", "base_url": "https://r.openai.azure.com"}, "api_version"),
        ({"connect_timeout_s": 0}, "connect_timeout_s"),
        ({"first_byte_timeout_s": 10_000}, "first_byte_timeout_s"),
        ({"max_concurrency": 0}, "max_concurrency"),
    ],
)
def test_create_refuses_bad_fields_naming_them(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidInput) as refused:
        operator_provider(**{"name": fields.pop("name", "p"), **fields})
    assert refused.value.param == param
    assert not Provider.objects.exists()


@pytest.mark.parametrize(
    "base_url",
    [
        "https://127.0.0.1/v1",
        "https://169.254.169.254/latest",
        "https://10.1.2.3:8443/v1",
        "https://[::1]/v1",
        "https://2130706433/v1",  # 127.0.0.1 as one number
        "https://[::ffff:192.168.0.1]/v1",
    ],
)
def test_addresses_that_are_not_public_are_refused_unless_allowed(base_url: str) -> None:
    with pytest.raises(InvalidInput, match="not a public address") as refused:
        operator_provider(base_url=base_url)
    assert refused.value.param == "base_url"
    with override_settings(
        MANTLE_PROVIDER_ALLOWED_PRIVATE=[
            "127.0.0.0/8",
            "169.254.0.0/16",
            "10.0.0.0/8",
            "::1/128",
            "192.168.0.0/16",
            "::ffff:192.168.0.0/120",
        ]
    ):
        assert operator_provider(base_url=base_url).base_url == base_url


def test_plain_http_only_to_allow_listed_hosts() -> None:
    with override_settings(MANTLE_PROVIDER_ALLOWED_HTTP=["vllm.internal:8000"]):
        provider = operator_provider(
            kind="openai-compatible", base_url="http://vllm.internal:8000/v1/", credential=""
        )
    assert provider.base_url == "http://vllm.internal:8000/v1"
    assert provider.credential_encrypted == ""


def test_names_are_unique_per_owner() -> None:
    operator_provider("shared")
    with pytest.raises(Conflict) as refused:
        operator_provider("shared")
    assert refused.value.param == "name"
    org = OrganizationFactory()
    assert org_provider(org, "shared").organization_id == org.id


def test_organizations_bring_their_own_only_when_the_operator_allows_it() -> None:
    org = OrganizationFactory()
    with pytest.raises(PermissionDenied, match="MANTLE_PROVIDER_BYOK"):
        svc.provider_create(
            principal=SYSTEM,
            organization=org,
            name="own",
            kind="openai",
            base_url="https://api.openai.com/v1",
            credential=SECRET,
        )
    assert org_provider(org).organization_id == org.id


def test_update_replaces_the_credential_only_when_a_new_one_is_given() -> None:
    provider = operator_provider()
    sealed = provider.credential_encrypted
    svc.provider_update(principal=SYSTEM, provider=provider, credential="", max_concurrency=3)
    provider.refresh_from_db()
    assert provider.credential_encrypted == sealed
    assert provider.max_concurrency == 3
    svc.provider_update(principal=SYSTEM, provider=provider, credential="sk-new-one")
    provider.refresh_from_db()
    assert secretbox.unseal(provider.credential_encrypted) == "sk-new-one"
    audits = AuditLog.objects.filter(action="provider.updated").order_by("id")
    assert [a.metadata.get("credential_replaced") for a in audits] == [False, True]
    assert all("sk-new-one" not in str(a.metadata) for a in audits)


def test_update_validates_the_merged_provider() -> None:
    provider = operator_provider()
    with pytest.raises(InvalidInput) as refused:
        svc.provider_update(principal=SYSTEM, provider=provider, kind="azure-openai")
    assert refused.value.param == "api_version"
    # Another host: the stored credential does not follow the URL (whoever may edit the
    # provider would receive it at their own server); it must be given again.
    with pytest.raises(InvalidInput) as refused:
        svc.provider_update(
            principal=SYSTEM,
            provider=provider,
            kind="azure-openai",
            api_version="2024-10-21",
            base_url="https://acme.openai.azure.com",
        )
    assert refused.value.param == "credential"
    changed = svc.provider_update(
        principal=SYSTEM,
        provider=provider,
        kind="azure-openai",
        api_version="2024-10-21",
        base_url="https://acme.openai.azure.com",
        credential="azure-key-2",
    )
    assert (changed.kind, changed.api_version) == ("azure-openai", "2024-10-21")


def test_an_organizations_provider_gets_no_use_of_the_operators_allow_list(
    settings: Any,
) -> None:
    """The operator allow-lists an internal host for its own providers; an organization's
    own provider may not name it (it would read the platform's internal network)."""
    settings.MANTLE_PROVIDER_BYOK = True
    settings.MANTLE_PROVIDER_ALLOWED_PRIVATE = ["10.0.0.0/8"]
    settings.MANTLE_PROVIDER_ALLOWED_HTTP = ["10.0.0.5"]
    operator = svc.provider_create(
        principal=SYSTEM,
        organization=None,
        name="internal-vllm",
        kind="openai-compatible",
        base_url="http://10.0.0.5:8000/v1",
    )
    assert operator.base_url == "http://10.0.0.5:8000/v1"
    for url in ("http://10.0.0.5:8000/v1", "https://10.0.0.5/v1"):
        with pytest.raises(InvalidInput) as refused:
            svc.provider_create(
                principal=SYSTEM,
                organization=OrganizationFactory(),
                name="mine",
                kind="openai-compatible",
                base_url=url,
            )
        assert refused.value.param == "base_url"


def test_organizations_providers_have_allow_lists_of_their_own(settings: Any) -> None:
    """MANTLE_PROVIDER_BYOK_ALLOWED_* (empty by default) let organizations' providers reach
    a listed internal host; they never widen what the operator's providers may reach."""
    settings.MANTLE_PROVIDER_BYOK = True
    settings.MANTLE_PROVIDER_BYOK_ALLOWED_PRIVATE = ["10.0.0.7"]
    settings.MANTLE_PROVIDER_BYOK_ALLOWED_HTTP = ["10.0.0.7:8000"]
    org = OrganizationFactory()
    owned = svc.provider_create(
        principal=SYSTEM,
        organization=org,
        name="team-vllm",
        kind="openai-compatible",
        base_url="http://10.0.0.7:8000/v1",
    )
    assert owned.base_url == "http://10.0.0.7:8000/v1"
    for organization, url in (
        (org, "https://10.0.0.8/v1"),  # not listed
        (org, "http://10.0.0.7:8001/v1"),  # http to another port
        (None, "http://10.0.0.7:8000/v1"),  # the operator's: its own lists, empty here
    ):
        with pytest.raises(InvalidInput) as refused:
            svc.provider_create(
                principal=SYSTEM,
                organization=organization,
                name="other",
                kind="openai-compatible",
                base_url=url,
            )
        assert refused.value.param == "base_url"


def test_a_provider_name_with_a_line_break_is_refused() -> None:
    with pytest.raises(InvalidInput) as refused:
        svc.provider_create(
            principal=SYSTEM,
            organization=None,
            name="evil\r\nx-injected: 1",
            kind="openai-compatible",
            base_url="https://api.example.com/v1",
        )
    assert refused.value.param == "name"


def test_delete_is_refused_while_a_target_uses_the_provider(committed: Any) -> None:
    provider = operator_provider()
    endpoint = org_endpoint(OrganizationFactory())
    committed(
        svc.route_targets_set,
        principal=SYSTEM,
        endpoint=endpoint,
        targets=[provider_target(provider)],
    )
    with pytest.raises(Conflict, match=endpoint.id):
        svc.provider_delete(principal=SYSTEM, provider=provider)
    committed(svc.route_targets_set, principal=SYSTEM, endpoint=endpoint, targets=[])
    svc.provider_delete(principal=SYSTEM, provider=provider)
    assert not Provider.objects.exists()
    assert AuditLog.objects.filter(action="provider.deleted").count() == 1


def test_disabling_a_provider_drops_its_targets_from_the_published_spec(committed: Any) -> None:
    provider = operator_provider()
    endpoint = org_endpoint(OrganizationFactory())
    committed(
        svc.route_targets_set,
        principal=SYSTEM,
        endpoint=endpoint,
        targets=[{"kind": "pool"}, provider_target(provider, position=1)],
    )
    assert [t["kind"] for t in published(endpoint.id).targets] == ["pool", "provider"]
    committed(svc.provider_set_enabled, principal=SYSTEM, provider=provider, enabled=False)
    assert [t["kind"] for t in published(endpoint.id).targets] == ["pool"]
    committed(svc.provider_set_enabled, principal=SYSTEM, provider=provider, enabled=True)
    assert [t["kind"] for t in published(endpoint.id).targets] == ["pool", "provider"]
    actions = AuditLog.objects.filter(action__startswith="provider.").values_list("action")
    assert [a for (a,) in actions.order_by("id")][-2:] == ["provider.disabled", "provider.enabled"]


# --- route targets ------------------------------------------------------------------------------


def test_targets_are_replaced_atomically_and_published(committed: Any) -> None:
    provider = operator_provider()
    endpoint = org_endpoint(OrganizationFactory())
    committed(
        svc.route_targets_set,
        principal=SYSTEM,
        endpoint=endpoint,
        targets=[
            {"kind": "pool", "position": 0},
            provider_target(
                provider,
                position=1,
                weight=3,
                cost_input="0.00000015",
                cost_output=Decimal("0.0000006"),
            ),
            provider_target(provider, "gpt-4o", position=1, weight=1),
        ],
    )
    spec = published(endpoint.id)
    assert [(t["kind"], t["model"], t["position"], t["weight"]) for t in spec.targets] == [
        ("pool", "", 0, 1),
        ("provider", "gpt-4o-mini", 1, 3),
        ("provider", "gpt-4o", 1, 1),
    ]
    assert Decimal(spec.targets[1]["cost_input"]) == Decimal("0.00000015")
    # A refused change leaves the targets as they were, in the database and in Redis.
    before = list(RouteTarget.objects.filter(endpoint=endpoint).values_list("id", flat=True))
    with pytest.raises(InvalidInput):
        committed(
            svc.route_targets_set,
            principal=SYSTEM,
            endpoint=endpoint,
            targets=[provider_target(provider), provider_target(provider, weight=0)],
        )
    assert list(RouteTarget.objects.filter(endpoint=endpoint).values_list("id", flat=True)) == (
        before
    )
    assert len(published(endpoint.id).targets) == 3
    committed(svc.route_targets_set, principal=SYSTEM, endpoint=endpoint, targets=[])
    assert published(endpoint.id).targets == ()
    audit = AuditLog.objects.filter(action="endpoint.targets_set").order_by("id")
    assert [len(a.metadata["targets"]) for a in audit] == [3, 0]


@pytest.mark.parametrize(
    ("target", "param"),
    [
        ({"kind": "gpu"}, "targets[0].kind"),
        ({"upstream_model": ""}, "targets[0].upstream_model"),
        ({"upstream_model": "x" * 201}, "targets[0].upstream_model"),
        ({"upstream_model": "gpt 4"}, "targets[0].upstream_model"),
        ({"weight": 0}, "targets[0].weight"),
        ({"weight": 10_001}, "targets[0].weight"),
        ({"position": -1}, "targets[0].position"),
        ({"cost_input": "-0.1"}, "targets[0].cost_input"),
        ({"cost_output": "abc"}, "targets[0].cost_output"),
        ({"cost_cached_input": "0.0000000001"}, "targets[0].cost_cached_input"),
        ({"cost_input": "NaN"}, "targets[0].cost_input"),
        ({"provider_id": "prov_nonexistent"}, "targets[0].provider_id"),
    ],
)
def test_target_validation_names_the_field(target: dict[str, Any], param: str) -> None:
    provider = operator_provider()
    endpoint = org_endpoint(OrganizationFactory())
    with pytest.raises(InvalidInput) as refused:
        svc.route_targets_set(
            principal=SYSTEM, endpoint=endpoint, targets=[{**provider_target(provider), **target}]
        )
    assert refused.value.param == param
    assert not RouteTarget.objects.exists()


def test_target_set_rules() -> None:
    provider = operator_provider()
    endpoint = org_endpoint(OrganizationFactory())
    cases: list[tuple[list[Any], str]] = [
        ([provider_target(provider, f"m{i}") for i in range(17)], "targets"),
        ([{"kind": "pool"}, {"kind": "pool", "position": 1}], "targets[1].kind"),
        ([provider_target(provider), provider_target(provider, position=2)], "targets[1]"),
        ([{"kind": "pool", "provider_id": provider.id}], "targets[0].provider_id"),
        ([{"kind": "pool", "cost_input": "0.1"}], "targets[0].cost_input"),
    ]
    for targets, param in cases:
        with pytest.raises(InvalidInput) as refused:
            svc.route_targets_set(principal=SYSTEM, endpoint=endpoint, targets=targets)
        assert (refused.value.param or "").startswith(param), (targets, refused.value.message)
    assert not RouteTarget.objects.exists()


def test_azure_targets_name_a_deployment() -> None:
    azure = operator_provider(
        "azure",
        kind="azure-openai",
        base_url="https://acme.openai.azure.com",
        api_version="2024-10-21",
    )
    endpoint = org_endpoint(OrganizationFactory())
    with pytest.raises(InvalidInput) as refused:
        svc.route_targets_set(
            principal=SYSTEM, endpoint=endpoint, targets=[provider_target(azure, "../../admin")]
        )
    assert refused.value.param == "targets[0].upstream_model"
    [row] = svc.route_targets_set(
        principal=SYSTEM, endpoint=endpoint, targets=[provider_target(azure, "gpt4o-prod")]
    )
    assert row.upstream_model == "gpt4o-prod"


def test_an_organizations_provider_serves_only_its_own_endpoints() -> None:
    acme, globex = OrganizationFactory(name="Acme"), OrganizationFactory(name="Globex")
    acme_provider = org_provider(acme)
    globex_endpoint = org_endpoint(globex)
    with pytest.raises(InvalidInput, match="not found") as refused:
        svc.route_targets_set(
            principal=SYSTEM, endpoint=globex_endpoint, targets=[provider_target(acme_provider)]
        )
    assert refused.value.param == "targets[0].provider_id"
    # Nor a public endpoint, which every organization calls.
    public = svc.upstream_model_register(
        principal=SYSTEM,
        name="gpt-4o-mini",
        kind="chat",
        context_length=128_000,
        targets=[provider_target(operator_provider())],
    )
    with pytest.raises(InvalidInput, match="not found"):
        svc.route_targets_set(
            principal=SYSTEM, endpoint=public, targets=[provider_target(acme_provider)]
        )
    # Its own endpoint, yes; the operator's providers only when allowed.
    acme_endpoint = org_endpoint(acme)
    assert svc.route_targets_set(
        principal=SYSTEM,
        endpoint=acme_endpoint,
        targets=[provider_target(acme_provider)],
        operator_providers=False,
    )
    operator = Provider.objects.get(organization=None)
    with pytest.raises(InvalidInput, match="not found"):
        svc.route_targets_set(
            principal=SYSTEM,
            endpoint=acme_endpoint,
            targets=[provider_target(operator)],
            operator_providers=False,
        )


def test_a_provider_only_model_is_registered_with_its_targets(committed: Any) -> None:
    provider = operator_provider()
    endpoint = committed(
        svc.upstream_model_register,
        principal=SYSTEM,
        name="gpt-4o-mini",
        kind="chat",
        context_length=128_000,
        targets=[provider_target(provider, cost_input="0.00000015")],
    )
    version = endpoint.model_version
    assert (version.runtime, version.location, version.model.organization_id) == (
        "upstream",
        "",
        None,
    )
    assert (endpoint.organization_id, endpoint.pool.name, endpoint.name) == (
        None,
        "upstream",
        "gpt-4o-mini",
    )
    spec = published(endpoint.id)
    assert spec.runtime == "upstream" and spec.relayed
    assert get_redis().get(specs.endpoint_name_key("gpt-4o-mini"))
    # Again: same model, version and endpoint; the targets replaced.
    again = committed(
        svc.upstream_model_register,
        principal=SYSTEM,
        name="gpt-4o-mini",
        kind="chat",
        context_length=128_000,
        targets=[provider_target(provider, "gpt-4o-mini-2024-07-18")],
    )
    assert again.id == endpoint.id
    assert ModelVersion.objects.filter(model=version.model).count() == 1
    assert [t["model"] for t in published(endpoint.id).targets] == ["gpt-4o-mini-2024-07-18"]
    # A provider-only model never gets a pool target, and keeps a provider target.
    for targets in ([{"kind": "pool"}, provider_target(provider)], []):
        with pytest.raises(InvalidInput):
            svc.route_targets_set(principal=SYSTEM, endpoint=endpoint, targets=targets)


def test_registering_over_a_pool_model_is_refused() -> None:
    org = OrganizationFactory()
    make_model_version(None, {**UNSERVED_ENCODER, "sha256": "9" * 64}, model_name="builtin")
    with pytest.raises(Conflict):
        svc.upstream_model_register(
            principal=SYSTEM,
            name="builtin",
            kind="embedding",
            context_length=512,
            targets=[provider_target(operator_provider())],
        )
    assert org.id  # nothing else was created
    assert not Endpoint.objects.filter(name="builtin").exists()
