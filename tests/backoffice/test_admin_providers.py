"""Upstream providers and route targets in the back office (catalog/admin.py): the billing
admin creates, edits, disables and deletes providers and sets an endpoint's targets through
the services; the credential is never rendered; support reads; others are refused."""

from __future__ import annotations

from typing import Any

import pytest
from django.test import Client
from django.urls import reverse

from accounts.models import AuditLog
from accounts.principal import SYSTEM
from catalog import providers as svc
from catalog import specs
from catalog.models import Endpoint, Provider, RouteTarget
from catalog.services import endpoint_create
from catalog.specs import EndpointSpec
from core import secretbox
from core.redis import get_redis
from tests.backoffice.support import Staff, client_for
from tests.factories import UNSERVED_ENCODER, OrganizationFactory, make_model_version, make_pool

pytestmark = pytest.mark.django_db

SECRET = "sk-operator-azure-key-71c0"
ADD = reverse("admin:catalog_provider_add")
LIST = reverse("admin:catalog_provider_changelist")


@pytest.fixture(autouse=True)
def _run_on_commit(
    monkeypatch: pytest.MonkeyPatch, django_capture_on_commit_callbacks: Any
) -> None:
    """Every request and every service call of a test runs what it scheduled on commit (the
    services publish endpoints' specs once their transaction commits; the test's own
    transaction never does)."""

    def committing(fn: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            with django_capture_on_commit_callbacks(execute=True):
                return fn(*args, **kwargs)

        return call

    monkeypatch.setattr(Client, "request", committing(Client.request))
    for name in ("route_targets_set", "provider_set_enabled", "provider_create"):
        monkeypatch.setattr(svc, name, committing(getattr(svc, name)))


def change_url(provider: Provider) -> str:
    return reverse("admin:catalog_provider_change", args=[provider.pk])


def targets_url(endpoint: Endpoint) -> str:
    return reverse("admin:catalog_endpoint_targets", args=[endpoint.pk])


def provider_form(**extra: str) -> dict[str, str]:
    return {
        "name": "azure-eu",
        "kind": "azure-openai",
        "base_url": "https://acme-eu.openai.azure.com",
        "api_version": "2024-10-21",
        "credential": SECRET,
        "connect_timeout_s": "5",
        "first_byte_timeout_s": "30",
        "max_concurrency": "32",
        "enabled": "on",
        **extra,
    }


def an_endpoint() -> Endpoint:
    org = OrganizationFactory(name="Routed Co")
    make_pool("cpu")
    version = make_model_version(org, UNSERVED_ENCODER, model_name="routed-ranker")
    return endpoint_create(
        principal=SYSTEM, org=org, name="ranker", model_version_id=version.id, pool="cpu"
    )


def an_operator_provider(**extra: Any) -> Provider:
    return svc.provider_create(
        principal=SYSTEM,
        organization=None,
        name=extra.pop("name", "openai"),
        kind="openai",
        base_url="https://api.openai.com/v1",
        credential=SECRET,
        **extra,
    )


def published(endpoint_id: str) -> EndpointSpec:
    raw = get_redis().get(specs.endpoint_key(endpoint_id))
    assert raw and raw != specs.UNKNOWN
    return EndpointSpec.from_json(raw)


def no_secret(response: Any) -> str:
    html: str = response.content.decode()
    assert SECRET not in html
    for provider in Provider.objects.exclude(credential_encrypted=""):
        assert provider.credential_encrypted not in html
    return html


def targets_form(rows: list[dict[str, str]], *, initial: int = 0) -> dict[str, str]:
    data = {
        "form-TOTAL_FORMS": str(len(rows)),
        "form-INITIAL_FORMS": str(initial),
        "form-MIN_NUM_FORMS": "0",
        "form-MAX_NUM_FORMS": "16",
    }
    for i, row in enumerate(rows):
        full = {
            "kind": "provider",
            "provider_id": "",
            "upstream_model": "",
            "position": "0",
            "weight": "1",
            "cost_input": "0",
            "cost_output": "0",
            "cost_cached_input": "0",
            "enabled": "on",
            **row,
        }
        data.update({f"form-{i}-{k}": v for k, v in full.items() if v is not None})
    return data


def test_the_billing_admin_creates_and_edits_a_provider_without_ever_seeing_the_credential(
    staff: Staff,
) -> None:
    admin = client_for(staff.billing_admin)
    page = admin.get(ADD)
    assert page.status_code == 200
    assert 'type="password"' in page.content.decode()

    response = admin.post(ADD, provider_form())
    assert response.status_code == 302, response.content.decode()[:2000]
    provider = Provider.objects.get(name="azure-eu")
    assert provider.organization_id is None
    assert (provider.kind, provider.api_version, provider.max_concurrency) == (
        "azure-openai",
        "2024-10-21",
        32,
    )
    assert secretbox.unseal(provider.credential_encrypted) == SECRET
    audit = AuditLog.objects.get(action="provider.created")
    assert audit.actor_user_id == staff.billing_admin.id

    html = no_secret(admin.get(LIST))
    assert "azure-eu" in html and ">set<" in html
    html = no_secret(admin.get(change_url(provider)))
    assert "Credential: set" in html

    # Blank keeps the credential; a new value replaces it; a refused change names its field.
    kept = admin.post(change_url(provider), provider_form(credential="", max_concurrency="8"))
    assert kept.status_code == 302
    provider.refresh_from_db()
    assert provider.max_concurrency == 8
    assert secretbox.unseal(provider.credential_encrypted) == SECRET
    admin.post(change_url(provider), provider_form(credential="sk-rotated"))
    provider.refresh_from_db()
    assert secretbox.unseal(provider.credential_encrypted) == "sk-rotated"
    refused = admin.post(change_url(provider), provider_form(base_url="http://10.0.0.1/v1"))
    assert refused.status_code == 400
    assert "must use https" in refused.content.decode()
    assert "sk-rotated" not in refused.content.decode()


def test_the_billing_admin_routes_an_endpoint_and_the_spec_is_republished(staff: Staff) -> None:
    admin = client_for(staff.billing_admin)
    provider = an_operator_provider()
    endpoint = an_endpoint()
    page = admin.get(targets_url(endpoint))
    assert page.status_code == 200
    assert "Save targets" in page.content.decode()  # the editor, not the read-only table

    rows = [
        {"kind": "pool", "position": "0"},
        {
            "provider_id": provider.id,
            "upstream_model": "gpt-4o-mini",
            "position": "1",
            "weight": "3",
            "cost_input": "0.00000015",
            "cost_output": "0.0000006",
        },
        {"kind": "provider", "position": "0", "weight": "1", "enabled": "on"},  # blank extra
    ]
    response = admin.post(targets_url(endpoint), targets_form(rows))
    assert response.status_code == 302, response.content.decode()[:3000]
    saved = list(RouteTarget.objects.filter(endpoint=endpoint).order_by("position"))
    assert [(t.kind, t.provider_id, t.weight) for t in saved] == [
        ("pool", None, 1),
        ("provider", provider.id, 3),
    ]
    assert [t["kind"] for t in published(endpoint.id).targets] == ["pool", "provider"]
    audit = AuditLog.objects.get(action="endpoint.targets_set")
    assert audit.actor_user_id == staff.billing_admin.id
    html = no_secret(admin.get(targets_url(endpoint)))
    assert "0.00000015" in html

    # A provider target without its model is refused with the service's message.
    bad = admin.post(targets_url(endpoint), targets_form([{"provider_id": provider.id}]))
    assert bad.status_code == 400
    assert "upstream_model is required" in bad.content.decode()
    assert RouteTarget.objects.filter(endpoint=endpoint).count() == 2

    # Removing every row: the pool only again.
    cleared = admin.post(
        targets_url(endpoint),
        targets_form(
            [
                {"kind": "pool", "DELETE": "on"},
                {"provider_id": provider.id, "upstream_model": "gpt-4o-mini", "DELETE": "on"},
            ],
            initial=2,
        ),
    )
    assert cleared.status_code == 302
    assert not RouteTarget.objects.filter(endpoint=endpoint).exists()
    assert published(endpoint.id).targets == ()


def test_disable_enable_and_delete_through_the_list(staff: Staff) -> None:
    admin = client_for(staff.billing_admin)
    provider = an_operator_provider()
    endpoint = an_endpoint()
    svc.route_targets_set(
        principal=SYSTEM,
        endpoint=endpoint,
        targets=[{"kind": "provider", "provider_id": provider.id, "upstream_model": "gpt-4o"}],
    )
    assert published(endpoint.id).targets

    action = {"action": "disable_selected", "_selected_action": [provider.id]}
    assert admin.post(LIST, action).status_code == 302
    provider.refresh_from_db()
    assert not provider.enabled
    assert published(endpoint.id).targets == ()
    admin.post(LIST, {**action, "action": "enable_selected"})
    provider.refresh_from_db()
    assert provider.enabled

    delete = reverse("admin:catalog_provider_delete", args=[provider.pk])
    refused = admin.post(delete, {"post": "yes"}, follow=True)
    assert "remove it from their targets first" in refused.content.decode()
    assert Provider.objects.filter(pk=provider.pk).exists()
    svc.route_targets_set(principal=SYSTEM, endpoint=endpoint, targets=[])
    assert admin.post(delete, {"post": "yes"}).status_code == 302
    assert not Provider.objects.filter(pk=provider.pk).exists()
    assert AuditLog.objects.filter(action="provider.deleted").count() == 1


def test_support_reads_but_changes_nothing(staff: Staff) -> None:
    support = client_for(staff.support)
    provider = an_operator_provider()
    endpoint = an_endpoint()

    assert support.get(ADD).status_code == 403
    assert support.post(ADD, provider_form(name="sneaky")).status_code == 403
    html = no_secret(support.get(change_url(provider)))  # the read-only detail
    assert "not set" not in html and "set" in html
    assert support.post(change_url(provider), provider_form(max_concurrency="1")).status_code == 403
    page = support.get(targets_url(endpoint))
    assert page.status_code == 200
    assert "Save targets" not in page.content.decode()  # the read-only table
    rows = [{"provider_id": provider.id, "upstream_model": "gpt-4o"}]
    assert support.post(targets_url(endpoint), targets_form(rows)).status_code == 403
    action = {"action": "disable_selected", "_selected_action": [provider.id]}
    support.post(LIST, action)
    delete = reverse("admin:catalog_provider_delete", args=[provider.pk])
    assert support.post(delete, {"post": "yes"}).status_code == 403
    provider.refresh_from_db()
    assert (provider.enabled, provider.max_concurrency) == (True, 64)
    assert not Provider.objects.filter(name="sneaky").exists()
    assert not RouteTarget.objects.exists()


@pytest.mark.parametrize("who", ["no_role", "unverified"])
def test_staff_without_a_role_or_the_second_factor_are_refused(staff: Staff, who: str) -> None:
    provider = an_operator_provider()
    endpoint = an_endpoint()
    client: Client = (
        client_for(staff.no_role)
        if who == "no_role"
        else client_for(staff.billing_admin, verified=False)
    )
    for url in (LIST, ADD, change_url(provider), targets_url(endpoint)):
        response = client.get(url)
        if who == "no_role":
            assert response.status_code == 403, url
        else:  # admin_view sends them to sign in (the second step)
            assert response.status_code == 302, url
            assert "/login/" in response["location"] or "two-factor" in response["location"]
    response = client.post(ADD, provider_form(name="sneaky"))
    assert response.status_code in (302, 403)
    assert not Provider.objects.filter(name="sneaky").exists()


def test_the_billing_admin_registers_a_provider_only_model(staff: Staff) -> None:
    admin = client_for(staff.billing_admin)
    provider = an_operator_provider()
    url = reverse("admin:catalog_provider_register_model")
    assert "register-model" in admin.get(LIST).content.decode()  # the list's button
    assert admin.get(url).status_code == 200
    form = {
        "name": "gpt-4o-mini",
        "kind": "chat",
        "context_length": "128000",
        "provider_id": provider.id,
        "upstream_model": "gpt-4o-mini",
        "cost_input": "0.00000015",
        "cost_output": "0.0000006",
        "cost_cached_input": "0",
    }
    refused = admin.post(url, {**form, "upstream_model": "gpt 4o"})
    assert refused.status_code == 400
    assert "printable ASCII" in refused.content.decode()
    assert not Endpoint.objects.filter(name="gpt-4o-mini").exists()

    response = admin.post(url, form)
    assert response.status_code == 302, response.content.decode()[:2000]
    endpoint = Endpoint.objects.get(name="gpt-4o-mini", organization=None)
    assert response["location"] == targets_url(endpoint)
    assert (endpoint.model_version.runtime, endpoint.pool.name) == ("upstream", "upstream")
    spec = published(endpoint.id)
    assert [(t["kind"], t["model"]) for t in spec.targets] == [("provider", "gpt-4o-mini")]
    assert client_for(staff.support).get(url).status_code == 403
