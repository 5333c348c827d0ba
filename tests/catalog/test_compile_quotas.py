"""Per-organization compile quotas: jobs queued or running at once, and bytes of staged uploads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from django.test import Client
from django.test.utils import override_settings

from accounts.permissions import Role
from catalog.compile_api import upload_body_limit
from catalog.models import CompileJob
from tests.conftest import OrgWorld
from tests.workers.compile_support import ranker_bytes, tree

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def upload_dir(tmp_path: Path) -> Any:
    uploads = tmp_path / "uploads"
    with override_settings(MANTLE_UPLOAD_DIR=uploads, MANTLE_ARTIFACT_DIR=tmp_path / "store"):
        yield uploads


def upload(client: Client, world: OrgWorld, name: str) -> tuple[int, dict[str, Any]]:
    response = client.post(
        f"/api/v1/organizations/{world.org.id}/compile-jobs/upload?model_name={name}&kind=tensor",
        data=ranker_bytes(),
        content_type="application/octet-stream",
    )
    return response.status_code, response.json()


@override_settings(MANTLE_COMPILE_MAX_ACTIVE_JOBS=2)
def test_an_organization_may_run_only_so_many_compile_jobs_at_once(
    world: OrgWorld, other_world: OrgWorld, upload_dir: Path
) -> None:
    client = world.client_for(Role.DEVELOPER)
    assert upload(client, world, "r1")[0] == 201
    assert upload(client, world, "r2")[0] == 201
    staged = tree(upload_dir)

    status, body = upload(client, world, "r3")

    assert status == 429, body
    assert body["error"]["code"] == "compile_quota_exceeded"
    assert "MANTLE_COMPILE_MAX_ACTIVE_JOBS" in body["error"]["message"]
    assert CompileJob.objects.filter(organization=world.org).count() == 2
    assert tree(upload_dir) == staged  # nothing of the refused upload was staged
    # Another organization has its own quota.
    assert upload(other_world.client_for(Role.DEVELOPER), other_world, "o1")[0] == 201
    # A job that ended frees its place.
    CompileJob.objects.filter(model_name="r1").update(status=CompileJob.Status.SUCCEEDED)
    assert upload(client, world, "r3")[0] == 201


def test_staged_bytes_are_bounded_per_organization(world: OrgWorld, upload_dir: Path) -> None:
    client = world.client_for(Role.DEVELOPER)
    size = len(ranker_bytes())
    with override_settings(MANTLE_COMPILE_MAX_STAGED_BYTES=size + size // 2):
        assert upload(client, world, "r1")[0] == 201
        staged = tree(upload_dir)

        status, body = upload(client, world, "r2")

    assert status == 413, body
    assert body["error"]["code"] == "payload_too_large"
    assert "MANTLE_COMPILE_MAX_STAGED_BYTES" in body["error"]["message"]
    assert CompileJob.objects.filter(organization=world.org).count() == 1
    assert tree(upload_dir) == staged


def scope_for(world: OrgWorld, authorization: str) -> dict[str, Any]:
    return {
        "type": "http",
        "method": "POST",
        "path": f"/api/v1/organizations/{world.org.id}/compile-jobs/upload",
        "query_string": b"model_name=r&kind=tensor",
        "headers": [(b"authorization", authorization.encode()), (b"host", b"testserver")],
        "client": ("198.51.100.9", 4000),
        "server": ("testserver", 80),
    }


@pytest.mark.django_db(transaction=True)
def test_only_a_caller_that_may_upload_gets_the_upload_limit(
    world: OrgWorld, other_world: OrgWorld, settings: Any
) -> None:
    mine = async_to_sync(upload_body_limit)(
        scope_for(world, f"Bearer {world.admin_secret}"), world.org.id
    )
    assert mine is not None
    assert (mine.allowed, mine.reason) == (
        settings.MANTLE_MAX_UPLOAD_BYTES,
        "MANTLE_MAX_UPLOAD_BYTES",
    )
    for authorization in (f"Bearer {other_world.admin_secret}", "Bearer sk-" + "0" * 48, ""):
        assert (
            async_to_sync(upload_body_limit)(scope_for(world, authorization), world.org.id) is None
        )
    # At its job limit, an organization's uploads get only the small limit (the view says why).
    settings.MANTLE_COMPILE_MAX_ACTIVE_JOBS = 0
    assert (
        async_to_sync(upload_body_limit)(
            scope_for(world, f"Bearer {world.admin_secret}"), world.org.id
        )
        is None
    )
