"""Keys at a real gateway process: each key's power, removal and demotion, the playground's session.

Issue 13, item 2: removing or demoting a member takes effect at once at every gateway (the
cache entry of each of their keys is rewritten); item 9: the playground's key leaves no
usable secret in the database-backed session.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from django.contrib.sessions.backends.db import SessionStore
from django.db import connection

from accounts.permissions import Role, Scope, key_scopes_allowed
from tests.conftest import OrgWorld, build_world
from tests.console.support import org_url
from tests.factories import default_project
from tests.security.test_key_privileges import api, bearer
from tests.security.test_key_privileges import membership as member
from tests.support.stack import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


@pytest.fixture(scope="module")
def gateway(django_db_setup: None, django_db_blocker: Any) -> Iterator[str]:
    """A gateway process alone: /v1/models needs a key and the database, not a worker.

    Its guessing limit is raised so that the playground test may try every value in a
    session row without the address being blocked (which would hide a 200 behind a 429).
    """
    stack = Stack.for_tests()
    try:
        _, url = stack.gateway(name="privileges-gateway", MANTLE_KEY_FAILURE_LIMIT="1000")
        yield url
    finally:
        stack.stop_all()


@pytest.fixture
def acme(gateway: str) -> OrgWorld:
    return build_world("Acme")


def at_gateway(url: str, secret: str) -> httpx.Response:
    return httpx.get(f"{url}/v1/models", headers={"authorization": f"Bearer {secret}"}, timeout=30)


def create_key(world: OrgWorld, role: Role, scopes: list[str]) -> str:
    project = default_project(world.org)
    response = api(
        world.client_for(role),
        "post",
        f"/organizations/{world.org.id}/projects/{project.id}/api-keys",
        {"name": f"{role} {'+'.join(scopes)}", "scopes": scopes},
    )
    assert response.status_code == 201, response.content
    secret: str = response.json()["secret"]
    return secret


CREATIONS = [
    (role, scope)
    for role in (Role.OWNER, Role.ADMIN, Role.DEVELOPER)
    for scope in Scope
    if scope in key_scopes_allowed(role)
]


@pytest.mark.parametrize(("creator", "scope"), CREATIONS, ids=lambda v: str(v))
def test_what_each_created_key_can_do(
    gateway: str, acme: OrgWorld, creator: Role, scope: Scope
) -> None:
    secret = create_key(acme, creator, [scope.value])
    models = at_gateway(gateway, secret)
    if scope == Scope.INFERENCE:
        assert models.status_code == 200, models.text
    else:
        assert models.status_code == 403
        assert models.json()["error"]["code"] == "insufficient_scope"
    org = f"/organizations/{acme.org.id}"
    if scope != Scope.ADMIN:
        assert api(bearer(secret), "get", org).status_code == 401
        return
    # An admin key made by an owner or admin acts as an admin: it runs the organization,
    # but never moves money, mints admin keys or touches people.
    viewer = member(acme, Role.VIEWER)
    project = default_project(acme.org)
    results = {
        "rename": api(bearer(secret), "patch", org, {"name": "Renamed"}).status_code,
        "budgets": api(
            bearer(secret), "put", f"{org}/billing/budgets", {"budgets": []}
        ).status_code,
        "admin key": api(
            bearer(secret),
            "post",
            f"{org}/projects/{project.id}/api-keys",
            {"name": "x", "scopes": ["admin"]},
        ).status_code,
        "promote": api(
            bearer(secret), "patch", f"{org}/members/{viewer.id}", {"role": "admin"}
        ).status_code,
        "invite": api(
            bearer(secret), "post", f"{org}/members", {"email": "x@example.com", "role": "admin"}
        ).status_code,
    }
    assert results == {
        "rename": 200,
        "budgets": 403,
        "admin key": 403,
        "promote": 403,
        "invite": 403,
    }
    viewer.refresh_from_db()
    assert viewer.role == Role.VIEWER


def test_removed_members_keys_are_refused_by_the_gateway_at_once(
    gateway: str, acme: OrgWorld
) -> None:
    developer_key = create_key(acme, Role.DEVELOPER, ["inference"])
    admin_key = create_key(acme, Role.ADMIN, ["admin", "inference"])
    owner_key = create_key(acme, Role.OWNER, ["inference"])
    # Warm: every key is cached as usable at the gateway before the removal.
    for secret in (developer_key, admin_key, owner_key):
        assert at_gateway(gateway, secret).status_code == 200
    owner = acme.client_for(Role.OWNER)
    org = f"/organizations/{acme.org.id}"

    assert (
        api(owner, "delete", f"{org}/members/{member(acme, Role.DEVELOPER).id}").status_code == 204
    )
    refused = at_gateway(gateway, developer_key)
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "invalid_api_key"
    assert at_gateway(gateway, admin_key).status_code == 200

    assert api(owner, "delete", f"{org}/members/{member(acme, Role.ADMIN).id}").status_code == 204
    assert at_gateway(gateway, admin_key).status_code == 401
    assert api(bearer(admin_key), "get", org).status_code == 401
    assert at_gateway(gateway, owner_key).status_code == 200  # nobody else's keys change


def test_demoted_members_keys_are_narrowed_at_the_gateway_at_once(
    gateway: str, acme: OrgWorld
) -> None:
    both = create_key(acme, Role.ADMIN, ["admin", "inference"])
    admin_only = create_key(acme, Role.ADMIN, ["admin"])
    inference = create_key(acme, Role.ADMIN, ["inference"])
    assert [at_gateway(gateway, s).status_code for s in (both, admin_only, inference)] == [
        200,
        403,
        200,
    ]
    owner = acme.client_for(Role.OWNER)
    org = f"/organizations/{acme.org.id}"
    target = f"{org}/members/{member(acme, Role.ADMIN).id}"

    assert api(owner, "patch", target, {"role": "developer"}).status_code == 200
    # The admin scope is gone (the key no longer manages anything); inference remains.
    assert [at_gateway(gateway, s).status_code for s in (both, admin_only, inference)] == [
        200,
        401,
        200,
    ]
    assert api(bearer(both), "get", org).status_code == 401

    assert api(owner, "patch", target, {"role": "viewer"}).status_code == 200
    assert [at_gateway(gateway, s).status_code for s in (both, inference)] == [401, 401]


def strings_in(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from strings_in(k)
            yield from strings_in(v)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from strings_in(item)


def test_the_playground_session_row_holds_no_usable_secret(gateway: str, acme: OrgWorld) -> None:
    client = acme.client_for(Role.DEVELOPER)
    url = org_url("console-playground-key", acme.org.id)
    issued = client.post(url).json()
    secret = issued["secret"]
    assert at_gateway(gateway, secret).status_code == 200
    assert client.post(url).json()["secret"] == secret  # reused, without being stored

    with connection.cursor() as cursor:
        cursor.execute("SELECT session_key, session_data FROM django_session")
        rows = cursor.fetchall()
    assert rows, "the console's session is stored in the database"
    candidates: set[str] = set()
    for session_key, data in rows:
        assert secret not in data
        decoded = SessionStore().decode(data)
        assert "console_playground_keys" in decoded
        found = set(strings_in(decoded))
        assert secret not in found
        assert not any(secret[12:] in s for s in found)
        candidates |= {session_key, data, *found}
    tried = {value: at_gateway(gateway, value).status_code for value in sorted(candidates)}
    assert set(tried.values()) == {401}, tried
    assert at_gateway(gateway, secret).status_code == 200
