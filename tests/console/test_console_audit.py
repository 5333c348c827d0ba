"""The console's audit log page: filters, paging, the CSV download, who may see it."""

from __future__ import annotations

import csv
import io

import pytest

from accounts.models import AuditLog
from accounts.permissions import Role
from tests.conftest import OrgWorld
from tests.console.support import org_url

pytestmark = pytest.mark.django_db


def add(world: OrgWorld, n: int, **fields: str) -> list[AuditLog]:
    return [
        AuditLog.objects.create(
            organization=world.org,
            actor_label=fields.get("actor", "ada@example.com"),
            action=fields.get("action", "thing.done"),
            target_type="thing",
            target_id=f"t{i}",
        )
        for i in range(n)
    ]


def test_the_page_filters_pages_and_links_the_csv(world: OrgWorld) -> None:
    made = add(world, 60)
    add(world, 2, actor="=cmd|' /C calc'!A0", action="other.thing")
    client = world.client_for(Role.ADMIN)
    url = org_url("console-audit", world.org.id)
    first = client.get(url, {"action": "thing.done"})
    assert first.status_code == 200
    assert len(first.context["entries"]) == 50
    assert first.context["next_url"]
    second = client.get(first.context["next_url"])
    assert second.status_code == 200
    ids = [e.id for e in first.context["entries"]] + [e.id for e in second.context["entries"]]
    assert sorted(ids) == sorted(e.id for e in made)
    assert second.context["next_url"] is None

    csv_url = first.context["csv_url"]
    assert csv_url.startswith(org_url("console-audit-csv", world.org.id))
    assert csv_url in first.content.decode()
    download = client.get(csv_url)
    assert download.status_code == 200
    rows = list(csv.reader(io.StringIO(b"".join(download.streaming_content).decode())))
    assert len(rows) == 61  # the header and the 60 that match
    crafted = client.get(org_url("console-audit-csv", world.org.id), {"action": "other.thing"})
    body = b"".join(crafted.streaming_content).decode()
    assert "'=cmd|' /C calc'!A0" in body
    page = client.get(url, {"action": "other.thing"}).content.decode()
    assert "=cmd|&#x27; /C calc&#x27;!A0" in page  # escaped as HTML, shown as typed

    bad = client.get(url, {"since": "not a time"})
    assert bad.status_code == 400
    assert "since must be a time" in bad.content.decode()


def test_who_sees_the_page(world: OrgWorld, other_world: OrgWorld) -> None:
    for role, status in [(Role.OWNER, 200), (Role.ADMIN, 200), (Role.DEVELOPER, 403)]:
        client = world.client_for(role)
        assert client.get(org_url("console-audit", world.org.id)).status_code == status
        assert client.get(org_url("console-audit-csv", world.org.id)).status_code == status
    viewer = world.client_for(Role.VIEWER)
    assert viewer.get(org_url("console-audit", world.org.id)).status_code == 403
    owner = world.client_for(Role.OWNER)
    assert owner.get(org_url("console-audit", other_world.org.id)).status_code == 404
    assert owner.get(org_url("console-audit-csv", other_world.org.id)).status_code == 404
