"""The back office's batches and files: every organization's, read-only, for staff in a
role; a batch links to its usage in the explorer."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from django.urls import reverse
from django.utils import timezone
from pytest_django.fixtures import Settings as SettingsWrapper

from accounts.models import Organization
from gateway import files
from gateway.admin import batch_usage_url
from gateway.batches import Status
from gateway.models import Batch, File
from tests.backoffice.support import Staff, client_for
from tests.factories import OrganizationFactory, make_api_key

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def store(settings: SettingsWrapper, tmp_path: Path) -> Path:
    root = tmp_path / "files"
    settings.MANTLE_FILE_STORE = str(root)
    return root


def batch_in(org: Organization, status: str = Status.IN_PROGRESS, **fields: Any) -> Batch:
    key, _ = make_api_key(org, scopes=["inference"])
    created = fields.pop("created_at", timezone.now())
    return Batch.objects.create(
        id=f"batch_{org.id[-10:]}{Batch.objects.count():03d}",
        organization=org,
        project_id=key.project_id,
        api_key_id=key.id,
        endpoint="/v1/embeddings" if status == Status.COMPLETED else "/v1/chat/completions",
        input_file_id="file-in",
        status=status,
        request_total=10,
        request_completed=7,
        request_failed=1,
        created_at=created,
        expires_at=created + timedelta(hours=24),
        **fields,
    )


def file_in(org: Organization) -> File:
    return files.write_file(
        organization_id=org.id,
        purpose="batch_output",
        filename=f"{org.name}.jsonl",
        chunks=[b"{}\n"],
        expires_at=None,
    )


@pytest.fixture
def two(db: None) -> tuple[Batch, Batch]:
    return (
        batch_in(OrganizationFactory(name="Acme")),
        batch_in(OrganizationFactory(name="Globex"), Status.COMPLETED),
    )


BATCHES = reverse("admin:gateway_batch_changelist")
FILES = reverse("admin:gateway_file_changelist")


@pytest.mark.parametrize("role", ["billing_admin", "support", "superuser"])
def test_staff_see_every_organizations_batches_and_files(
    staff: Staff, two: tuple[Batch, Batch], role: str
) -> None:
    acme, globex = two
    acme_file, globex_file = file_in(acme.organization), file_in(globex.organization)
    client = client_for(getattr(staff, role))

    listed = client.get(BATCHES)
    assert listed.status_code == 200
    html = listed.content.decode()
    assert acme.id in html and globex.id in html
    assert "Acme" in html and "Globex" in html
    assert [b.id for b in listed.context["cl"].result_list] == [globex.id, acme.id]

    filtered = client.get(BATCHES, {"status": Status.COMPLETED})
    assert [b.id for b in filtered.context["cl"].result_list] == [globex.id]
    by_endpoint = client.get(BATCHES, {"endpoint": "/v1/chat/completions"})
    assert [b.id for b in by_endpoint.context["cl"].result_list] == [acme.id]
    searched = client.get(BATCHES, {"q": acme.organization_id})
    assert [b.id for b in searched.context["cl"].result_list] == [acme.id]

    detail = client.get(reverse("admin:gateway_batch_change", args=[acme.id]))
    assert detail.status_code == 200
    assert batch_usage_url(acme).replace("&", "&amp;") in detail.content.decode()

    listed_files = client.get(FILES)
    assert listed_files.status_code == 200
    assert {f.id for f in listed_files.context["cl"].result_list} == {
        acme_file.id,
        globex_file.id,
    }


def test_nobody_adds_changes_or_deletes_batches_or_files(
    staff: Staff, two: tuple[Batch, Batch]
) -> None:
    acme, _ = two
    file = file_in(acme.organization)
    client = client_for(staff.superuser)
    for url in (
        reverse("admin:gateway_batch_add"),
        reverse("admin:gateway_batch_delete", args=[acme.id]),
        reverse("admin:gateway_file_add"),
        reverse("admin:gateway_file_delete", args=[file.id]),
    ):
        assert client.get(url).status_code == 403, url
        assert client.post(url, {"post": "yes"}).status_code == 403, url
    change = reverse("admin:gateway_batch_change", args=[acme.id])
    assert client.post(change, {"status": Status.CANCELLED}).status_code == 403
    assert Batch.objects.get(id=acme.id).status == Status.IN_PROGRESS
    assert File.objects.filter(id=file.id).exists()
    assert "Save" not in client.get(change).content.decode()


def test_staff_without_a_role_and_customers_see_no_batches(
    staff: Staff, two: tuple[Batch, Batch]
) -> None:
    acme, _ = two
    urls = (BATCHES, FILES, reverse("admin:gateway_batch_change", args=[acme.id]))
    for url in urls:
        assert client_for(staff.no_role).get(url).status_code == 403, url
        for outsider in (client_for(staff.customer), client_for(None)):
            response = outsider.get(url)
            assert response.status_code == 302
            assert response["Location"].startswith(f"{reverse('admin:login')}?next=")
    # Staff who have not passed the second factor are sent to log in too.
    unverified = client_for(staff.support, verified=False).get(BATCHES)
    assert unverified.status_code == 302


def test_a_batch_links_to_its_keys_usage_over_the_hours_it_ran(staff: Staff) -> None:
    org = OrganizationFactory(name="Acme")
    batch = batch_in(
        org,
        Status.COMPLETED,
        created_at=datetime(2025, 3, 4, 10, 25, tzinfo=UTC),
        completed_at=datetime(2025, 3, 4, 12, 5, tzinfo=UTC),
    )
    url = batch_usage_url(batch)
    parts = urlsplit(url)
    assert parts.path == reverse("admin:backoffice-usage")
    assert parse_qs(parts.query) == {
        "org": [org.id],
        "key": [batch.api_key_id],
        "start": ["2025-03-04T10:00"],
        "end": ["2025-03-04T13:00"],
    }
    explorer = client_for(staff.support).get(url)
    assert explorer.status_code == 200
    shown = explorer.context["filter"]
    assert (shown.organization_id, shown.api_key_id) == (org.id, batch.api_key_id)
    assert (shown.start, shown.end) == (
        datetime(2025, 3, 4, 10, tzinfo=UTC),
        datetime(2025, 3, 4, 13, tzinfo=UTC),
    )
    # A running batch's hours reach up to now.
    running = batch_in(org, created_at=datetime(2025, 3, 4, 10, 25, tzinfo=UTC))
    now = datetime(2025, 3, 5, 8, 30, tzinfo=UTC)
    assert parse_qs(urlsplit(batch_usage_url(running, now=now)).query)["end"] == [
        "2025-03-05T09:00"
    ]


def test_the_customer_page_links_to_the_customers_batches(
    staff: Staff, two: tuple[Batch, Batch]
) -> None:
    acme, _ = two
    page = client_for(staff.support).get(
        reverse("admin:backoffice-customer", args=[acme.organization_id])
    )
    link = f"{BATCHES}?q={acme.organization_id}"
    assert f'href="{link}"' in page.content.decode()
    listed = client_for(staff.support).get(link)
    assert [b.id for b in listed.context["cl"].result_list] == [acme.id]
