"""The playground's key and page (tools and response formats offered), and the catalog pages
(models with prices, endpoints). The playground in a browser: test_console_journeys.py."""

from __future__ import annotations

import json
import re
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.utils import timezone

from accounts import keys
from accounts.models import ApiKey
from accounts.permissions import Role
from catalog.models import AcceleratorPool, Endpoint, Model, ModelVersion
from console.services import SESSION_PLAYGROUND_KEYS, playground_secret
from tests.billing.factories import PriceFactory, price_book
from tests.conftest import OrgWorld
from tests.console.support import org_url
from tests.factories import OrganizationFactory, default_project

pytestmark = pytest.mark.django_db


def _endpoint(name: str, *, org: object = None, kind: str = Model.Kind.CHAT) -> Endpoint:
    pool, _ = AcceleratorPool.objects.get_or_create(
        name="cpu", defaults={"region": "local", "providers": ["CPUExecutionProvider"]}
    )
    model = Model.objects.create(
        name=name, kind=kind, context_length=8192, organization=org, description=f"{name} model"
    )
    version = ModelVersion.objects.create(
        model=model, version=1, runtime="causal_lm", sha256="ab" * 32, location="x"
    )
    return Endpoint.objects.create(name=name, organization=org, model_version=version, pool=pool)


def test_playground_key_is_short_lived_inference_only_and_reused(
    world: OrgWorld, settings: object
) -> None:
    client = world.client_for(Role.DEVELOPER)
    url = org_url("console-playground-key", world.org.id)
    first = client.post(url)
    assert first.status_code == 200
    assert first["Cache-Control"] == "no-store"
    data = first.json()
    key = ApiKey.objects.get(id=data["key_id"])
    assert key.digest == keys.secret_digest(data["secret"])
    assert key.scopes == ["inference"]
    assert key.project == default_project(world.org)
    assert key.name == f"Playground · {world.users[Role.DEVELOPER].email}"
    assert timedelta(minutes=59) < key.expires_at - timezone.now() <= timedelta(hours=1)
    again = client.post(url).json()
    assert again["secret"] == data["secret"]
    assert ApiKey.objects.filter(name__startswith="Playground").count() == 1


def test_playground_key_is_replaced_when_revoked(world: OrgWorld) -> None:
    client = world.client_for(Role.OWNER)
    url = org_url("console-playground-key", world.org.id)
    first = client.post(url).json()
    ApiKey.objects.filter(id=first["key_id"]).update(revoked_at=timezone.now())
    second = client.post(url).json()
    assert second["key_id"] != first["key_id"]


@pytest.mark.parametrize("role", [Role.VIEWER, Role.BILLING])
def test_roles_that_cannot_create_keys_get_no_playground_key(world: OrgWorld, role: Role) -> None:
    _endpoint("chat-public")
    before = ApiKey.objects.count()
    response = world.client_for(role).post(org_url("console-playground-key", world.org.id))
    assert response.status_code == 403
    assert ApiKey.objects.count() == before
    page = world.client_for(role).get(org_url("console-playground", world.org.id))
    assert "may look but not run requests" in page.content.decode()


def test_playground_key_for_another_organizations_project_is_404(
    world: OrgWorld, other_world: OrgWorld
) -> None:
    before = ApiKey.objects.count()
    response = world.client_for(Role.OWNER).post(
        org_url("console-playground-key", world.org.id),
        {"project": default_project(other_world.org).id},
    )
    assert response.status_code == 404
    assert ApiKey.objects.count() == before


def test_playground_key_needs_a_post(world: OrgWorld) -> None:
    response = world.client_for(Role.OWNER).get(org_url("console-playground-key", world.org.id))
    assert response.status_code == 405
    assert ApiKey.objects.filter(name__startswith="Playground").count() == 0


def test_playground_lists_chat_endpoints_with_the_real_id_in_the_snippets(world: OrgWorld) -> None:
    chat = _endpoint("chat-public")
    _endpoint("embed-public", kind=Model.Kind.EMBEDDING)
    own = _endpoint("our-chat", org=world.org)
    theirs = _endpoint("their-chat", org=OrganizationFactory())
    response = world.client_for(Role.DEVELOPER).get(
        org_url("console-playground", world.org.id), {"endpoint": own.id}
    )
    rows = [r.endpoint.id for r in response.context["rows"]]
    assert rows == [chat.id, own.id]
    assert theirs.id not in response.content.decode()
    assert response.context["selected"].endpoint == own
    assert f'model="{own.id}"' in response.content.decode()


def test_playground_offers_tools_and_response_formats_without_inline_script(
    world: OrgWorld,
) -> None:
    _endpoint("chat-public")
    response = world.client_for(Role.DEVELOPER).get(org_url("console-playground", world.org.id))
    page = response.content.decode()
    for control in (
        'id="add-tool"',
        'id="tool_choice"',
        'id="parallel_tool_calls"',
        'id="response_format"',
        'id="schema_name"',
        'id="schema"',
        'id="schema_strict"',
        'id="stream"',
        '<template id="tool-template">',
    ):
        assert control in page, control
    for value in ("auto", "none", "required", "text", "json_object", "json_schema"):
        assert f'<option value="{value}"' in page
    # The page's CSP allows scripts from 'self' (and a nonce): nothing inline, no handlers.
    assert "script-src 'self' 'nonce-" in response["Content-Security-Policy"]
    scripts = re.findall(r"<script\b[^>]*>", page)
    assert scripts and all(" src=" in tag for tag in scripts)
    assert not re.search(r"\son[a-z]+=", page)


def test_models_page_shows_context_and_this_organizations_prices(world: OrgWorld) -> None:
    _endpoint("chat-public")
    price_book("chat-public", "0.15", "0.6")
    _endpoint("private-model", org=OrganizationFactory())
    response = world.client_for(Role.VIEWER).get(org_url("console-models", world.org.id))
    entries = {e.model.name: e for e in response.context["entries"]}
    assert set(entries) == {"chat-public"}
    assert (entries["chat-public"].input_price, entries["chat-public"].output_price) == (
        Decimal("0.150000000"),
        Decimal("0.600000000"),
    )
    page = response.content.decode()
    assert "8192 tokens" in page and "$0.15" in page and "$0.6" in page


@pytest.mark.parametrize(("cached", "shown"), [("0.075", Decimal("0.075")), ("0.2", None)])
def test_models_page_shows_the_cached_input_price_where_it_applies(
    world: OrgWorld, cached: str, shown: Decimal | None
) -> None:
    # A cached price above the input price does not apply: cached tokens cost the input price.
    _endpoint("chat-public")
    price_book("chat-public", "0.15", "0.6")
    PriceFactory(model_name="chat-public", token_kind="cached_input", unit_price=Decimal(cached))

    response = world.client_for(Role.VIEWER).get(org_url("console-models", world.org.id))

    [entry] = response.context["entries"]
    assert entry.cached_input_price == shown
    page = response.content.decode()
    if shown is None:
        assert 'data-testid="cached-input-price"' not in page
    else:
        assert (
            '<small class="muted" data-testid="cached-input-price">cached $0.0750</small>' in page
        )


def test_endpoints_page_and_detail(world: OrgWorld, other_world: OrgWorld) -> None:
    public = _endpoint("chat-public")
    own = _endpoint("our-chat", org=world.org)
    theirs = _endpoint("their-chat", org=other_world.org)
    client = world.client_for(Role.VIEWER)
    response = client.get(org_url("console-endpoints", world.org.id))
    assert [r.endpoint for r in response.context["own"]] == [own]
    assert [r.endpoint for r in response.context["public"]] == [public]
    assert "no live worker" in response.content.decode()
    detail = client.get(org_url("console-endpoint", world.org.id, endpoint_id=own.id))
    assert detail.status_code == 200
    assert own.id in detail.content.decode()
    public_url = org_url("console-endpoint", world.org.id, endpoint_id=public.id)
    assert client.get(public_url).status_code == 200
    missing = client.get(org_url("console-endpoint", world.org.id, endpoint_id=theirs.id))
    assert missing.status_code == 404


def test_playground_session_keeps_a_seed_not_the_secret(world: OrgWorld) -> None:
    client = world.client_for(Role.DEVELOPER)
    issued = client.post(org_url("console-playground-key", world.org.id)).json()
    stored = client.session[SESSION_PLAYGROUND_KEYS]
    (entry,) = stored.values()
    assert set(entry) == {"key_id", "seed", "expires_at"}
    assert issued["secret"] not in json.dumps(stored)
    assert playground_secret(entry["seed"]) == issued["secret"]


def test_playground_key_is_replaced_when_the_secret_key_rotates(
    world: OrgWorld, settings: Any
) -> None:
    client = world.client_for(Role.DEVELOPER)
    url = org_url("console-playground-key", world.org.id)
    first = client.post(url).json()
    old = settings.SECRET_KEY
    settings.SECRET_KEY = "a rotated secret key, long enough to be a real one " * 2
    settings.SECRET_KEY_FALLBACKS = [old]  # keeps the session signed in
    second = client.post(url).json()
    assert second["key_id"] != first["key_id"]
    key = ApiKey.objects.get(id=second["key_id"])
    assert key.digest == keys.secret_digest(second["secret"])


def test_playground_drops_entries_that_held_a_secret(world: OrgWorld) -> None:
    client = world.client_for(Role.DEVELOPER)
    session = client.session
    session[SESSION_PLAYGROUND_KEYS] = {
        "old:slot": {"key_id": "key_x", "secret": "sk-" + "a" * 48, "expires_at": "2030-01-01"}
    }
    session.save()
    client.post(org_url("console-playground-key", world.org.id))
    stored = client.session[SESSION_PLAYGROUND_KEYS]
    assert "old:slot" not in stored
    assert "sk-" + "a" * 48 not in json.dumps(stored)
