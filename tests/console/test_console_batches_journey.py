"""The Batches page in a real browser (Debian's Chromium) against the real server: upload,
create, watch progress refresh by itself, download the output, cancel."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
from django.utils import timezone
from playwright.sync_api import Page, expect

from accounts.permissions import Role
from gateway import files
from gateway.batches import Status
from gateway.models import Batch
from tests.conftest import OrgWorld
from tests.factories import make_api_key
from tests.support.browser import AppServer, login_as, screenshot

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True), pytest.mark.browser]

AREA = "console"
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
    for n in range(4)
)


def test_upload_create_watch_progress_download_and_cancel(
    page: Page, app_server: AppServer, world: OrgWorld, tmp_path: Path
) -> None:
    key, _ = make_api_key(world.org, scopes=["inference"])
    key.name = "batch runner"
    key.save(update_fields=["name"])
    answers = b'{"id": "batch_req_1", "custom_id": "earlier", "response": {"status_code": 200}}\n'
    out = files.write_file(
        organization_id=world.org.id,
        purpose="batch_output",
        filename="batch_earlier_output.jsonl",
        chunks=[answers],
        expires_at=None,
    )
    created = timezone.now() - timedelta(hours=2)
    Batch.objects.create(
        id="batch_earlier000000000000",
        organization=world.org,
        project_id=key.project_id,
        api_key_id=key.id,
        endpoint="/v1/chat/completions",
        input_file_id="file-gone",
        status=Status.COMPLETED,
        request_total=1,
        request_completed=1,
        output_file_id=out.id,
        created_at=created,
        expires_at=created + timedelta(hours=24),
        completed_at=created + timedelta(minutes=5),
    )
    login_as(page, world.users[Role.DEVELOPER], app_server)

    page.goto(f"/console/o/{world.org.id}/")
    page.click("nav >> text=Batches")
    expect(page.locator("h1")).to_have_text("Batches")

    source = tmp_path / "requests.jsonl"
    source.write_bytes(LINES)
    page.set_input_files("#id_file", str(source))
    page.click("button:has-text('Upload')")
    expect(page.locator(".messages")).to_contain_text("Uploaded requests.jsonl")
    uploaded = files.list_files(world.org.id, purpose="batch", limit=1).files[0]
    expect(page.locator("#id_input_file")).to_have_value(uploaded.id)

    page.select_option("#id_endpoint", "/v1/chat/completions")
    page.select_option("#id_api_key", key.id)
    page.fill("#id_description", "journey batch")
    page.click("button:has-text('Create batch')")
    expect(page.locator(".messages")).to_contain_text("created")
    batch = Batch.objects.get(organization=world.org, input_file_id=uploaded.id)
    assert batch.api_key_id == key.id
    row = page.locator(f"#batch-{batch.id}")
    expect(row).to_contain_text("validating the input…")
    expect(row).to_contain_text("journey batch")
    screenshot(page, "batches-created", AREA)

    # A runner takes it: the table refreshes by itself.
    Batch.objects.filter(id=batch.id).update(
        status=Status.IN_PROGRESS, request_total=4, request_completed=2, request_failed=1
    )
    expect(page.locator(f"#batch-{batch.id}")).to_contain_text("3 / 4", timeout=10_000)
    expect(page.locator(f"#batch-{batch.id} progress")).to_have_attribute("value", "3")
    screenshot(page, "batches-progress", AREA)

    with page.expect_download() as download:
        page.click("#batch-batch_earlier000000000000 >> text=Output")
    assert download.value.suggested_filename == "batch_earlier_output.jsonl"
    assert Path(download.value.path()).read_bytes() == answers

    page.once("dialog", lambda dialog: dialog.accept())
    page.click(f"#batch-{batch.id} >> text=Cancel")
    expect(page.locator(f"#batch-{batch.id}")).to_contain_text("cancelling")
    assert Batch.objects.get(id=batch.id).status == Status.CANCELLING
    screenshot(page, "batches-cancelled", AREA)
