"""Endpoint pages: create from a model on a pool, limits, pause, delete; compile jobs."""

from __future__ import annotations

from typing import Any

import pytest

from accounts.models import AuditLog
from accounts.permissions import Role
from catalog.models import CompileJob, Endpoint
from tests.conftest import OrgWorld
from tests.console.support import org_url
from tests.console.test_console_playground import _endpoint

pytestmark = pytest.mark.django_db


@pytest.fixture
def public_chat(db: None) -> Endpoint:
    return _endpoint("chat-public")


def _create(
    world: OrgWorld, public_chat: Endpoint, role: Role = Role.DEVELOPER, **data: Any
) -> Any:
    form = {
        "name": "support-bot",
        "model_version": public_chat.model_version_id,
        "pool": "cpu",
        "rpm_limit": "120",
        **data,
    }
    return world.client_for(role).post(org_url("console-endpoints", world.org.id), form)


def test_create_an_endpoint_from_a_model_on_a_pool(world: OrgWorld, public_chat: Endpoint) -> None:
    response = _create(world, public_chat)
    endpoint = Endpoint.objects.get(organization=world.org)
    assert response.status_code == 302
    assert response["Location"] == org_url(
        "console-endpoint", world.org.id, endpoint_id=endpoint.id
    )
    assert (endpoint.name, endpoint.model_version_id, endpoint.pool.name, endpoint.rpm_limit) == (
        "support-bot",
        public_chat.model_version_id,
        "cpu",
        120,
    )
    assert AuditLog.objects.filter(action="endpoint.created", target_id=endpoint.id).count() == 1
    page = world.client_for(Role.VIEWER).get(org_url("console-endpoints", world.org.id))
    assert endpoint.id in page.content.decode()
    assert "Create endpoint" not in page.content.decode()


@pytest.mark.parametrize(
    ("data", "status", "message"),
    [
        ({"name": ""}, 400, "This field is required."),
        (
            {"pool": "h200-mars"},
            400,
            "pool &#x27;h200-mars&#x27; is not available in this organization&#x27;s region",
        ),
        ({"rpm_limit": "0"}, 400, "Ensure this value is greater than or equal to 1."),
    ],
)
def test_bad_endpoint_input_creates_nothing(
    world: OrgWorld, public_chat: Endpoint, data: dict[str, str], status: int, message: str
) -> None:
    response = _create(world, public_chat, **data)
    assert response.status_code == status
    assert message in response.content.decode()
    assert not Endpoint.objects.filter(organization=world.org).exists()


def test_another_organizations_model_version_is_404(
    world: OrgWorld, other_world: OrgWorld, public_chat: Endpoint
) -> None:
    theirs = _endpoint("their-model", org=other_world.org)
    response = _create(world, public_chat, model_version=theirs.model_version_id)
    assert response.status_code == 404
    assert not Endpoint.objects.filter(organization=world.org).exists()


def test_viewer_cannot_create_endpoints(world: OrgWorld, public_chat: Endpoint) -> None:
    assert _create(world, public_chat, role=Role.VIEWER).status_code == 403
    assert not Endpoint.objects.filter(organization=world.org).exists()


def test_pause_resume_limits_and_delete(world: OrgWorld, public_chat: Endpoint) -> None:
    _create(world, public_chat)
    endpoint = Endpoint.objects.get(organization=world.org)
    client = world.client_for(Role.ADMIN)

    def url(name: str) -> str:
        return org_url(name, world.org.id, endpoint_id=endpoint.id)

    client.post(url("console-endpoint-status"), {"status": "paused"})
    endpoint.refresh_from_db()
    assert endpoint.status == Endpoint.Status.PAUSED
    client.post(url("console-endpoint-status"), {"status": "active"})
    endpoint.refresh_from_db()
    assert endpoint.status == Endpoint.Status.ACTIVE
    client.post(url("console-endpoint-limits"), {"rpm_limit": "30", "tpm_limit": "9000"})
    endpoint.refresh_from_db()
    assert (endpoint.rpm_limit, endpoint.tpm_limit) == (30, 9000)
    response = client.post(url("console-endpoint-limits"), {"rpm_limit": "-1", "tpm_limit": "1"})
    endpoint.refresh_from_db()
    assert (endpoint.rpm_limit, endpoint.tpm_limit) == (30, 9000)
    assert "greater than or equal to 1" in client.get(response["Location"]).content.decode()
    assert "cannot be undone" in client.get(url("console-endpoint-delete")).content.decode()
    assert Endpoint.objects.filter(id=endpoint.id).exists()
    response = client.post(url("console-endpoint-delete"))
    assert response["Location"] == org_url("console-endpoints", world.org.id)
    assert not Endpoint.objects.filter(id=endpoint.id).exists()


@pytest.mark.parametrize(
    "name", ["console-endpoint-status", "console-endpoint-limits", "console-endpoint-delete"]
)
def test_another_organizations_or_a_public_endpoint_cannot_be_changed(
    world: OrgWorld, other_world: OrgWorld, public_chat: Endpoint, name: str
) -> None:
    theirs = _endpoint("their-chat", org=other_world.org)
    client = world.client_for(Role.OWNER)
    data = {"status": "paused", "rpm_limit": "1", "tpm_limit": "1"}
    for endpoint in (theirs, public_chat):
        response = client.post(org_url(name, world.org.id, endpoint_id=endpoint.id), data)
        assert response.status_code == 404
        endpoint.refresh_from_db()
        assert (endpoint.status, endpoint.rpm_limit) == ("active", 600)


def test_compile_job_shows_its_steps_and_logs(world: OrgWorld, other_world: OrgWorld) -> None:
    job = CompileJob.objects.create(
        organization=world.org,
        model_name="my-encoder",
        kind="embedding",
        source="onnx",
        status="running",
        steps=[
            {"name": "import", "status": "succeeded", "duration_s": 1.25, "log": "read 3 files"},
            {"name": "optimize", "status": "running", "log": "level basic"},
        ],
    )
    client = world.client_for(Role.VIEWER)
    listing = client.get(org_url("console-endpoints", world.org.id)).content.decode()
    assert job.id in listing
    response = client.get(org_url("console-compile-job", world.org.id, job_id=job.id))
    body = response.content.decode()
    assert response.status_code == 200
    assert "read 3 files" in body and "level basic" in body and "1.3 s" in body
    assert 'hx-trigger="every 3s"' in body  # a running job refreshes itself
    partial = client.get(
        org_url("console-compile-job", world.org.id, job_id=job.id), HTTP_HX_REQUEST="true"
    )
    assert partial.content.decode().startswith('<div id="compile-job"')
    theirs = CompileJob.objects.create(
        organization=other_world.org, model_name="x", kind="embedding", source="onnx"
    )
    missing = client.get(org_url("console-compile-job", world.org.id, job_id=theirs.id))
    assert missing.status_code == 404
