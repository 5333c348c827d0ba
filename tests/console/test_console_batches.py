"""The Batches page: upload an input file, create a batch under a key, follow its progress,
download its files, cancel it; other organizations' batches and files are 404; the roles."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from django.conf import settings
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client
from django.utils import timezone
from pytest_django.fixtures import Settings as SettingsWrapper

from accounts import services as account_services
from accounts.models import ApiKey, AuditLog
from accounts.permissions import Role
from accounts.principal import SYSTEM
from config.asgi import upload_limit_for
from console.views.batches import MULTIPART_OVERHEAD_BYTES, upload_body_limit
from gateway import files
from gateway.batches import Status
from gateway.models import Batch, File
from tests.conftest import OrgWorld
from tests.console.support import logged_in, org_url
from tests.factories import make_api_key

pytestmark = pytest.mark.django_db

LINES = b"".join(
    json.dumps(
        {
            "custom_id": f"request-{n}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": "chat-small", "messages": [{"role": "user", "content": "hi"}]},
        }
    ).encode()
    + b"\n"
    for n in range(3)
)


@pytest.fixture(autouse=True)
def store(settings: SettingsWrapper, tmp_path: Path) -> Path:
    root = tmp_path / "files"
    settings.MANTLE_FILE_STORE = str(root)
    return root


@pytest.fixture
def key(world: OrgWorld) -> ApiKey:
    made, _ = make_api_key(world.org, scopes=["inference"])
    return made


def batch_of(world: OrgWorld, key: ApiKey, **fields: Any) -> Batch:
    """A batch as the runner leaves it (a status, counts, files), created `age` ago."""
    age: timedelta = fields.pop("age", timedelta(0))
    created = timezone.now() - age
    values: dict[str, Any] = {
        "id": f"batch_{Batch.objects.count():04d}{world.org.id[-8:]}",
        "organization": world.org,
        "project_id": key.project_id,
        "api_key_id": key.id,
        "endpoint": "/v1/chat/completions",
        "input_file_id": "file-gone",
        "status": Status.IN_PROGRESS,
        "created_at": created,
        "expires_at": created + timedelta(hours=24),
        **fields,
    }
    return Batch.objects.create(**values)


def output_file(world: OrgWorld, name: str, data: bytes) -> File:
    return files.write_file(
        organization_id=world.org.id,
        purpose="batch_output",
        filename=name,
        chunks=iter([data[:5], data[5:]]),
        expires_at=None,
    )


def upload(
    client: Client, world: OrgWorld, data: bytes = LINES, name: str = "requests.jsonl"
) -> Any:
    return client.post(
        org_url("console-batch-upload", world.org.id),
        {"file": SimpleUploadedFile(name, data, content_type="application/jsonl")},
    )


def create(client: Client, world: OrgWorld, **data: str) -> Any:
    return client.post(
        org_url("console-batches", world.org.id),
        {"endpoint": "/v1/chat/completions", "description": "", **data},
    )


def download(response: Any) -> bytes:
    content: Iterator[bytes] = response.streaming_content
    return b"".join(content)


# --- upload, create, list ------------------------------------------------------------------


def test_a_developer_uploads_a_file_and_creates_a_batch_under_the_chosen_key(
    world: OrgWorld, key: ApiKey, store: Path
) -> None:
    client = world.client_for(Role.DEVELOPER)
    uploaded = upload(client, world)
    assert uploaded.status_code == 302
    file = File.objects.get(organization=world.org)
    assert uploaded["Location"] == f"{org_url('console-batches', world.org.id)}?file={file.id}"
    assert (file.purpose, file.filename, file.bytes) == ("batch", "requests.jsonl", len(LINES))
    assert (store / world.org.id / file.id).read_bytes() == LINES
    audit = AuditLog.objects.get(action="file.uploaded", target_id=file.id)
    assert audit.actor_user == world.users[Role.DEVELOPER]

    page = client.get(uploaded["Location"])
    assert page.context["form"]["input_file"].value() == file.id
    assert f'<option value="{key.id}">' in page.content.decode()

    created = create(client, world, input_file=file.id, api_key=key.id, description="nightly evals")
    assert created.status_code == 302
    batch = Batch.objects.get(organization=world.org)
    assert (batch.api_key_id, batch.project_id, batch.input_file_id) == (
        key.id,
        key.project_id,
        file.id,
    )
    assert (batch.status, batch.endpoint) == (Status.VALIDATING, "/v1/chat/completions")
    assert json.loads(batch.metadata_json) == {"user": {"description": "nightly evals"}}
    audit = AuditLog.objects.get(action="batch.created", target_id=batch.id)
    assert audit.metadata["api_key_id"] == key.id
    assert audit.actor_user == world.users[Role.DEVELOPER]

    listing = client.get(created["Location"]).content.decode()
    assert batch.id in listing
    assert "validating the input…" in listing
    assert "nightly evals" in listing
    assert 'hx-trigger="every 3s"' in listing  # a validating batch is active: it polls


@pytest.mark.parametrize(
    ("name", "data", "status", "message"),
    [
        ("requests.csv", LINES, 400, "Must be .jsonl"),
        ("requests.jsonl", b"custom_id,body\n", 400, "each line must be a JSON object"),
        ("requests.jsonl", b"", 400, "The submitted file is empty."),
    ],
)
def test_an_upload_the_files_api_refuses_shows_why_and_stores_nothing(
    world: OrgWorld, store: Path, name: str, data: bytes, status: int, message: str
) -> None:
    response = upload(world.client_for(Role.DEVELOPER), world, data, name)
    assert response.status_code == status
    assert message in response.content.decode()
    assert File.objects.count() == 0
    assert not AuditLog.objects.filter(action="file.uploaded").exists()
    assert not any(p.is_file() for p in store.rglob("*"))


def test_an_upload_over_the_file_limit_is_413_and_leaves_nothing(
    world: OrgWorld, store: Path, settings: SettingsWrapper
) -> None:
    settings.MANTLE_FILE_MAX_BYTES = len(LINES) - 1
    response = upload(world.client_for(Role.DEVELOPER), world)
    assert response.status_code == 413
    assert "MANTLE_FILE_MAX_BYTES" in response.content.decode()
    assert File.objects.count() == 0
    assert not any(p.is_file() for p in store.rglob("*"))


def test_only_the_organizations_usable_inference_keys_are_offered(
    world: OrgWorld, other_world: OrgWorld, key: ApiKey
) -> None:
    usage_only, _ = make_api_key(world.org, scopes=["read-usage"])
    revoked, _ = make_api_key(world.org, scopes=["inference"])
    account_services.api_key_revoke(principal=SYSTEM, key=revoked)
    expiring, _ = make_api_key(
        world.org, scopes=["inference"], expires_at=timezone.now() + timedelta(hours=1)
    )
    ApiKey.objects.filter(id=expiring.id).update(expires_at=timezone.now() - timedelta(seconds=1))
    client = world.client_for(Role.DEVELOPER)
    offered = dict(
        client.get(org_url("console-batches", world.org.id))
        .context["form"]
        .fields["api_key"]
        .choices
    )
    assert set(offered) == {key.id, world.admin_key.id}

    file = files.file_upload(
        owner=files.Owner(world.org.id, "", ""),
        purpose="batch",
        filename="a.jsonl",
        chunks=[LINES],
        expires_after_s=None,
    )
    for refused in (usage_only, revoked, expiring, other_world.admin_key):
        response = create(client, world, input_file=file.id, api_key=refused.id)
        assert response.status_code == 400
        assert "Select a valid choice." in response.content.decode()
    assert Batch.objects.count() == 0


def test_the_list_shows_progress_newest_first_a_page_at_a_time(
    world: OrgWorld, key: ApiKey
) -> None:
    oldest = batch_of(world, key, status=Status.COMPLETED, age=timedelta(days=2))
    for n in range(19):
        batch_of(world, key, status=Status.COMPLETED, age=timedelta(hours=30 - n))
    running = batch_of(
        world, key, request_total=10, request_completed=3, request_failed=1, age=timedelta(0)
    )
    client = world.client_for(Role.VIEWER)
    first = client.get(org_url("console-batches", world.org.id))
    rows = [r.batch.id for r in first.context["rows"]]
    assert rows[0] == running.id and len(rows) == 20 and oldest.id not in rows
    html = first.content.decode()
    assert '<progress max="10" value="4">40%</progress> 4 / 10' in html
    assert "(1 failed)" in html
    assert 'hx-trigger="every 3s"' in html
    second = client.get(org_url("console-batches", world.org.id) + "?page=2")
    assert [r.batch.id for r in second.context["rows"]] == [oldest.id]
    assert 'hx-trigger="every 3s"' not in second.content.decode()  # nothing active there

    # htmx's poll gets the table alone.
    poll = client.get(org_url("console-batches", world.org.id), headers={"HX-Request": "true"})
    assert next(t.name for t in poll.templates) == "console/batches/_table.html"
    assert "<h1>" not in poll.content.decode()


def test_a_finished_batchs_output_and_error_files_download_as_attachments(
    world: OrgWorld, key: ApiKey
) -> None:
    answers = b'{"id": "batch_req_1", "custom_id": "a", "response": {"status_code": 200}}\n'
    failures = b'{"id": "batch_req_2", "custom_id": "b", "error": {"code": "x"}}\n'
    out = output_file(world, "batch_x_output.jsonl", answers)
    err = output_file(world, "batch_x_error.jsonl", failures)
    batch = batch_of(
        world,
        key,
        status=Status.COMPLETED,
        request_total=2,
        request_completed=1,
        request_failed=1,
        output_file_id=out.id,
        error_file_id=err.id,
        completed_at=timezone.now(),
    )
    client = world.client_for(Role.DEVELOPER)
    listing = client.get(org_url("console-batches", world.org.id)).content.decode()
    out_url = org_url("console-file-content", world.org.id, file_id=out.id)
    err_url = org_url("console-file-content", world.org.id, file_id=err.id)
    assert f'href="{out_url}"' in listing and f'href="{err_url}"' in listing
    assert 'hx-trigger="every 3s"' not in listing

    for url, name, data in (
        (out_url, "batch_x_output.jsonl", answers),
        (err_url, "batch_x_error.jsonl", failures),
    ):
        response = client.get(url)
        assert response.status_code == 200
        assert response["Content-Disposition"] == f'attachment; filename="{name}"'
        assert response["Content-Length"] == str(len(data))
        assert response["Content-Type"] == "application/octet-stream"
        assert download(response) == data

    detail = client.get(org_url("console-batch", world.org.id, batch_id=batch.id))
    assert detail.status_code == 200
    html = detail.content.decode()
    assert "batch_x_output.jsonl" in html and f'href="{err_url}"' in html


def test_a_failed_batch_shows_its_validation_errors_by_line(world: OrgWorld, key: ApiKey) -> None:
    errors = [
        {"code": "invalid_json", "message": "Line 2 is not JSON.", "param": None, "line": 2},
        {
            "code": "duplicate_custom_id",
            "message": "custom_id 'a' appears twice (2 errors in all)",
            "param": "custom_id",
            "line": 5,
        },
    ]
    batch = batch_of(
        world, key, status=Status.FAILED, request_total=5, errors_json=json.dumps(errors)
    )
    client = world.client_for(Role.VIEWER)
    listing = client.get(org_url("console-batches", world.org.id)).content.decode()
    assert "line 2: Line 2 is not JSON." in listing
    assert "nothing ran" in listing
    detail = client.get(org_url("console-batch", world.org.id, batch_id=batch.id)).content.decode()
    assert (
        '<td class="num">2</td><td><code>invalid_json</code></td><td>Line 2 is not JSON.</td>'
        in detail
    )
    assert '<td class="num">5</td><td><code>duplicate_custom_id</code></td>' in detail


# --- cancel --------------------------------------------------------------------------------


def test_cancel_asks_first_then_cancels_once_and_audits_it(world: OrgWorld, key: ApiKey) -> None:
    batch = batch_of(world, key, request_total=4, request_completed=1)
    client = world.client_for(Role.DEVELOPER)
    url = org_url("console-batch-cancel", world.org.id, batch_id=batch.id)
    confirm = client.get(url)
    assert confirm.status_code == 200
    assert Batch.objects.get(id=batch.id).status == Status.IN_PROGRESS

    assert client.post(url).status_code == 302
    cancelled = Batch.objects.get(id=batch.id)
    assert cancelled.status == Status.CANCELLING
    assert cancelled.cancelling_at is not None
    assert client.post(url).status_code == 302  # again: nothing more to do
    audits = AuditLog.objects.filter(action="batch.cancelled", target_id=batch.id)
    assert [a.metadata for a in audits] == [{"status_before": "in_progress"}]


def test_cancel_through_htmx_swaps_the_row(world: OrgWorld, key: ApiKey) -> None:
    batch = batch_of(world, key, status=Status.VALIDATING)
    response = world.client_for(Role.OWNER).post(
        org_url("console-batch-cancel", world.org.id, batch_id=batch.id),
        headers={"HX-Request": "true"},
    )
    assert response.status_code == 200
    html = response.content.decode()
    assert html.startswith(f'<tr id="batch-{batch.id}">')
    assert "cancelling" in html and ">Cancel</a>" not in html


def test_a_finished_batch_cannot_be_cancelled(world: OrgWorld, key: ApiKey) -> None:
    batch = batch_of(world, key, status=Status.COMPLETED)
    client = world.client_for(Role.DEVELOPER)
    response = client.post(
        org_url("console-batch-cancel", world.org.id, batch_id=batch.id), follow=True
    )
    assert "Cannot cancel a batch with status &#x27;completed&#x27;." in response.content.decode()
    assert Batch.objects.get(id=batch.id).status == Status.COMPLETED
    assert not AuditLog.objects.filter(action="batch.cancelled").exists()


def test_csrf_is_checked_on_create_and_cancel(world: OrgWorld, key: ApiKey) -> None:
    batch = batch_of(world, key)
    client = logged_in(world.users[Role.DEVELOPER], csrf=True)
    url = org_url("console-batch-cancel", world.org.id, batch_id=batch.id)
    assert client.post(url).status_code == 403
    assert upload(client, world).status_code == 403
    assert Batch.objects.get(id=batch.id).status == Status.IN_PROGRESS
    assert File.objects.count() == 0


# --- other organizations and roles ----------------------------------------------------------


def test_another_organizations_batches_and_files_are_404(
    world: OrgWorld, other_world: OrgWorld, key: ApiKey
) -> None:
    theirs_key, _ = make_api_key(other_world.org, scopes=["inference"])
    theirs_file = output_file(other_world, "secret_output.jsonl", b'{"secret": 1}\n')
    theirs = batch_of(other_world, theirs_key, output_file_id=theirs_file.id)
    client = world.client_for(Role.OWNER)
    org = world.org.id
    for url in (
        org_url("console-batch", org, batch_id=theirs.id),
        org_url("console-batch-cancel", org, batch_id=theirs.id),
        org_url("console-file-content", org, file_id=theirs_file.id),
        org_url("console-file-content", org, file_id="x" * 300),
    ):
        assert client.get(url).status_code == 404
    assert client.post(org_url("console-batch-cancel", org, batch_id=theirs.id)).status_code == 404
    assert Batch.objects.get(id=theirs.id).status == Status.IN_PROGRESS
    listing = client.get(org_url("console-batches", org)).content.decode()
    assert theirs.id not in listing
    # Their file is no choice of ours.
    response = create(client, world, input_file=theirs_file.id, api_key=key.id)
    assert response.status_code == 400
    assert Batch.objects.filter(organization=world.org).count() == 0
    # And someone outside the organization sees none of its pages.
    outsider = other_world.client_for(Role.OWNER)
    assert outsider.get(org_url("console-batches", org)).status_code == 404


@pytest.mark.parametrize("role", [Role.VIEWER, Role.BILLING])
def test_a_viewer_or_billing_member_sees_batches_but_cannot_create_cancel_or_download(
    world: OrgWorld, key: ApiKey, role: Role
) -> None:
    out = output_file(world, "batch_output.jsonl", b"{}\n")
    batch = batch_of(world, key, request_total=2, output_file_id=out.id)
    client = world.client_for(role)
    listing = client.get(org_url("console-batches", world.org.id))
    assert listing.status_code == 200
    html = listing.content.decode()
    assert batch.id in html
    assert "cannot create batches" in html
    assert 'enctype="multipart/form-data"' not in html
    assert "/content/" not in html
    assert ">Cancel</a>" not in html

    file = output_file(world, "in.jsonl", LINES)
    File.objects.filter(id=file.id).update(purpose="batch")
    refused = [
        create(client, world, input_file=file.id, api_key=key.id),
        upload(client, world),
        client.post(org_url("console-batch-cancel", world.org.id, batch_id=batch.id)),
        client.get(org_url("console-file-content", world.org.id, file_id=out.id)),
    ]
    assert [r.status_code for r in refused] == [403, 403, 403, 403]
    assert Batch.objects.count() == 1
    assert Batch.objects.get(id=batch.id).status == Status.IN_PROGRESS
    assert File.objects.filter(organization=world.org).count() == 2


# --- the upload's body limit, before the body -----------------------------------------------


def scope_for(world: OrgWorld, session: str | None) -> dict[str, Any]:
    cookie = f"{settings.SESSION_COOKIE_NAME}={session}".encode() if session else b""
    return {
        "type": "http",
        "method": "POST",
        "path": f"/console/o/{world.org.id}/batches/upload/",
        "query_string": b"",
        "headers": [(b"cookie", cookie), (b"host", b"testserver")],
        "client": ("198.51.100.9", 4000),
        "server": ("testserver", 80),
    }


def session_of(client: Client) -> str:
    return client.cookies[settings.SESSION_COOKIE_NAME].value


@pytest.mark.django_db(transaction=True)
def test_only_a_member_who_may_create_batches_gets_the_files_upload_limit(
    world: OrgWorld, other_world: OrgWorld, settings: SettingsWrapper
) -> None:
    developer = session_of(world.client_for(Role.DEVELOPER))
    mine = async_to_sync(upload_body_limit)(scope_for(world, developer), world.org.id)
    assert mine is not None
    assert (mine.allowed, mine.reason) == (
        settings.MANTLE_FILE_MAX_BYTES + MULTIPART_OVERHEAD_BYTES,
        "MANTLE_FILE_MAX_BYTES",
    )
    # The wiring sends the console's upload path there.
    wired = async_to_sync(upload_limit_for)(scope_for(world, developer))
    assert (wired.allowed, wired.reason) == (mine.allowed, mine.reason)
    default = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
    for session in (
        session_of(world.client_for(Role.VIEWER)),  # a member whose role may not
        session_of(other_world.client_for(Role.OWNER)),  # not a member
        "not-a-session",
        None,
    ):
        assert async_to_sync(upload_body_limit)(scope_for(world, session), world.org.id) is None
        assert async_to_sync(upload_limit_for)(scope_for(world, session)).allowed == default
    # An organization that holds all the files it may gets the default (the view says why).
    settings.MANTLE_FILES_ORG_MAX_COUNT = 0
    assert async_to_sync(upload_body_limit)(scope_for(world, developer), world.org.id) is None
