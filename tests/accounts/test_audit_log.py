"""The audit log through the management API: filters, cursor paging, the CSV export."""

from __future__ import annotations

import csv
import io
from datetime import timedelta
from typing import Any

import pytest
from django.test import Client
from django.utils import timezone

from accounts.models import AuditLog
from accounts.permissions import Role
from tests.conftest import OrgWorld

pytestmark = pytest.mark.django_db


def entry(world: OrgWorld, **fields: Any) -> AuditLog:
    at = fields.pop("at", None)
    row = AuditLog.objects.create(
        organization=world.org,
        actor_label=fields.pop("actor", "someone@example.com"),
        action=fields.pop("action", "thing.done"),
        target_type=fields.pop("target_type", "thing"),
        target_id=fields.pop("target_id", "t1"),
        metadata=fields.pop("metadata", {}),
        **fields,
    )
    if at is not None:
        AuditLog.objects.filter(pk=row.pk).update(created_at=at)
        row.refresh_from_db()
    return row


def get(client: Client, world: OrgWorld, suffix: str = "", **params: str) -> Any:
    return client.get(f"/api/v1/organizations/{world.org.id}/audit-log{suffix}", params)


def test_filters(world: OrgWorld) -> None:
    now = timezone.now()
    a = entry(world, actor="ada@example.com", action="api_key.created", target_id="k1")
    entry(world, actor="bob@example.com", action="api_key.created", target_id="k2")
    entry(world, actor="ada@example.com", action="member.invited", target_type="invitation")
    old = entry(
        world, actor="ada@example.com", action="api_key.revoked", at=now - timedelta(days=3)
    )
    client = world.client_for(Role.ADMIN)

    def ids(**params: str) -> list[int]:
        response = get(client, world, **params)
        assert response.status_code == 200, response.content
        return [e["id"] for e in response.json()["data"]]

    assert len(ids(actor="ADA@example.com")) == 3
    assert ids(actor="ada@example.com", action="api_key.created") == [a.id]
    assert len(ids(target_type="invitation")) == 1
    assert ids(target_id="k1") == [a.id]
    until = (now - timedelta(days=1)).isoformat()
    assert ids(until=until) == [old.id]
    assert old.id not in ids(since=(now - timedelta(days=1)).isoformat())
    assert ids(since=str(int((now - timedelta(days=4)).timestamp())), until=until) == [old.id]
    for bad in ({"since": "yesterday"}, {"limit": "0"}, {"limit": "501"}, {"actor": "a\x00b"}):
        response = get(client, world, **bad)
        assert response.status_code == 400, bad
        assert response.json()["error"]["param"] == next(iter(bad))


def test_paging_round_trip_reads_each_entry_once(world: OrgWorld) -> None:
    same = timezone.now() - timedelta(hours=1)
    made = [entry(world, target_id=f"t{i}", at=same if i % 3 == 0 else None) for i in range(23)]
    AuditLog.objects.create(organization=None, action="elsewhere", target_type="x", target_id="x")
    client = world.client_for(Role.OWNER)
    seen: list[int] = []
    params: dict[str, str] = {"limit": "5", "action": "thing.done"}
    pages = 0
    while True:
        body = get(client, world, **params).json()
        pages += 1
        assert len(body["data"]) <= 5
        seen += [e["id"] for e in body["data"]]
        if not body["has_more"]:
            assert body["next_cursor"] is None
            break
        params["cursor"] = body["next_cursor"]
        # Written while paging: newer than the first page, never on a later one.
        entry(world, target_id="late")
    assert pages == 5
    assert sorted(seen) == sorted(e.id for e in made)
    assert len(seen) == len(set(seen))
    # A cursor is bound to its filters.
    other = get(client, world, limit="5", action="other", cursor=params["cursor"])
    assert other.status_code == 400
    assert other.json()["error"]["param"] == "cursor"
    assert get(client, world, cursor="not a cursor").status_code == 400


def test_csv_export_and_the_formula_guard(world: OrgWorld) -> None:
    AuditLog.objects.filter(organization=world.org).delete()  # the fixture's own entries
    entry(world, actor='=HYPERLINK("https://evil.example")', target_id="+1+cmd|' /C calc'!A0")
    entry(world, actor="ada@example.com", action="api_key.created", metadata={"name": "@sum"})
    response = get(world.client_for(Role.ADMIN), world, ".csv")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/csv")
    assert "attachment" in response["Content-Disposition"]
    rows = list(csv.reader(io.StringIO(b"".join(response.streaming_content).decode())))
    assert rows[0] == [
        "created_at",
        "id",
        "actor",
        "action",
        "target_type",
        "target_id",
        "ip_address",
        "metadata",
    ]
    assert len(rows) == 3
    newest, crafted = rows[1], rows[2]
    assert newest[2:4] == ["ada@example.com", "api_key.created"]
    assert newest[7] == '{"name":"@sum"}'
    assert crafted[2] == '\'=HYPERLINK("https://evil.example")'
    assert crafted[5] == "'+1+cmd|' /C calc'!A0"
    # Filters apply to the export too.
    filtered = get(world.client_for(Role.ADMIN), world, ".csv", actor="ada@example.com")
    assert len(list(csv.reader(io.StringIO(b"".join(filtered.streaming_content).decode())))) == 2


def test_permissions_and_another_organizations_log(world: OrgWorld, other_world: OrgWorld) -> None:
    entry(other_world, actor="secret@globex.example")
    for suffix in ("", ".csv"):
        assert get(world.client_for(Role.VIEWER), world, suffix).status_code == 403
        assert get(world.client_for(Role.DEVELOPER), world, suffix).status_code == 403
        assert get(world.client_for(Role.ADMIN), world, suffix).status_code == 200
        assert get(world.client_for(Role.OWNER), other_world, suffix).status_code == 404
        assert get(world.key_client(), other_world, suffix).status_code == 404
    assert get(world.key_client(), world).status_code == 200
