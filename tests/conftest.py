"""Suite-wide fixtures: a clean Redis database per test, API clients, organizations."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from django.test import Client

from accounts.models import ApiKey, Organization, User
from accounts.permissions import Role
from tests.factories import OrganizationFactory, UserFactory, add_member, make_api_key


@pytest.fixture(autouse=True)
def _clean_redis(request: pytest.FixtureRequest) -> Iterator[None]:
    # End-to-end tests share Redis with live worker processes (their heartbeats
    # live there); they use fresh organizations and keys instead of a wipe. So do
    # transactional tests marked keeps_redis: pytest-django runs transactional tests
    # after the others, among the end-to-end ones, where a wipe would make a live pool
    # look empty until its next heartbeat.
    marked = request.node.get_closest_marker
    if marked("e2e") is None and marked("keeps_redis") is None:
        from config.redis import get_redis

        get_redis().flushdb()
    yield


@dataclass
class OrgWorld:
    """An organization with one member of each role and an admin API key."""

    org: Organization
    users: dict[Role, User]
    admin_key: ApiKey
    admin_secret: str

    def client_for(self, role: Role) -> Client:
        client = Client()
        client.force_login(self.users[role])
        return client

    def key_client(self) -> Client:
        return Client(headers={"authorization": f"Bearer {self.admin_secret}"})


def build_world(name: str) -> OrgWorld:
    owner = UserFactory()
    org = OrganizationFactory(name=name, owner=owner)
    users = {Role.OWNER: owner}
    for role in Role:
        if role != Role.OWNER:
            users[role] = add_member(org, role)
    key, secret = make_api_key(org, scopes=["admin", "inference"])
    return OrgWorld(org=org, users=users, admin_key=key, admin_secret=secret)


@pytest.fixture
def world(db: None) -> OrgWorld:
    return build_world("Acme")


@pytest.fixture
def other_world(db: None) -> OrgWorld:
    return build_world("Globex")
