"""Suite-wide fixtures: a clean Redis database per test, API clients, organizations."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from django.test import Client

from accounts.models import ApiKey, Organization, User
from accounts.permissions import Role
from tests.factories import OrganizationFactory, UserFactory, add_member, make_api_key

# The markers bin/test reads (browser, rabbitmq, models), kept true at collection.
pytest_plugins = ["tests.support.needs"]


@pytest.fixture(autouse=True)
def _clean_redis(request: pytest.FixtureRequest) -> Iterator[None]:
    # End-to-end tests share Redis with live worker processes (their heartbeats
    # live there); they use fresh organizations and keys instead of a wipe. So do
    # transactional tests marked keeps_redis: pytest-django runs transactional tests
    # after the others, among the end-to-end ones, where a wipe would make a live pool
    # look empty until its next heartbeat.
    # Other wipes spare the heartbeats all the same: a transactional test may still run
    # beside a live worker, which must not look gone for a beat.
    marked = request.node.get_closest_marker
    if marked("e2e") is None and marked("keeps_redis") is None:
        from core.redis import get_redis

        wipe_sparing_heartbeats(get_redis())
    yield


def wipe_sparing_heartbeats(client: Any) -> None:
    """Empties the Redis database but for the heartbeats of the worker processes this
    session started (tests.support.stack): their info keys and their entries in their pools'
    listings. Heartbeats that tests wrote themselves go with the rest."""
    from tests.support.stack import is_stack_node
    from workers.contract import POOL_LIVE_PREFIX, WORKER_INFO_PREFIX

    infos = [
        key
        for key in client.scan_iter(match=f"{WORKER_INFO_PREFIX}*", count=1000)
        if is_stack_node(key.removeprefix(WORKER_INFO_PREFIX))
    ]
    if not infos:
        client.flushdb()
        return
    listings = list(client.scan_iter(match=f"{POOL_LIVE_PREFIX}*", count=1000))
    pipe = client.pipeline(transaction=False)
    for key in infos:
        pipe.get(key)
        pipe.pttl(key)
    replies = pipe.execute()
    pipe = client.pipeline(transaction=False)
    for key in listings:
        pipe.zrange(key, 0, -1, withscores=True)
    members = pipe.execute()
    beats = {
        key: (value, ttl)
        for key, value, ttl in zip(infos, replies[0::2], replies[1::2], strict=True)
        if value is not None and ttl > 0
    }
    live_nodes = {key.removeprefix(WORKER_INFO_PREFIX) for key in beats}
    client.flushdb()
    pipe = client.pipeline(transaction=False)
    for key, (value, ttl) in beats.items():
        pipe.set(key, value, px=ttl, nx=True)  # a beat since the read wins
    for key, entries in zip(listings, members, strict=True):
        kept = {node: score for node, score in entries if node in live_nodes}
        if kept:
            pipe.zadd(key, kept, gt=True)
    pipe.execute()


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
