"""Stored responses expire: the control task deletes those past their retention period, on
the schedule beat gives it, and reads never see an expired one."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.conf import settings
from django.utils import timezone

from config.celery import app
from gateway import responses_store
from gateway.models import StoredResponse
from gateway.tasks import responses_expire
from tests.factories import OrganizationFactory

pytestmark = pytest.mark.django_db


def _stored(organization_id: str, response_id: str, *, age: timedelta) -> None:
    responses_store.response_store(
        response_id=response_id,
        owner=responses_store.Owner(organization_id, "proj_x", "key_x"),
        model="m",
        input_items=[{"type": "message", "id": "msg_1"}],
        output=[],
        response={"id": response_id},
        created_at=timezone.now() - age,
    )


def test_retention_is_the_setting_and_expired_rows_are_deleted() -> None:
    org = OrganizationFactory()
    days = settings.MANTLE_RESPONSES_RETENTION_DAYS
    _stored(org.id, "resp_old", age=timedelta(days=days, seconds=1))
    _stored(org.id, "resp_new", age=timedelta(days=days) - timedelta(minutes=1))
    row = StoredResponse.objects.get(id="resp_new")
    assert row.expires_at - row.created_at == timedelta(days=days)

    # Expired but not yet deleted: already invisible.
    assert responses_store.response_load(response_id="resp_old", organization_id=org.id) is None
    assert responses_store.response_delete(response_id="resp_old", organization_id=org.id) is False

    assert responses_expire.delay().get() == 1
    assert list(StoredResponse.objects.values_list("id", flat=True)) == ["resp_new"]
    assert responses_expire.delay().get() == 0


def test_reads_and_deletes_are_the_organizations_own() -> None:
    mine, theirs = OrganizationFactory(), OrganizationFactory()
    _stored(mine.id, "resp_mine", age=timedelta())
    assert responses_store.response_load(response_id="resp_mine", organization_id=theirs.id) is None
    assert not responses_store.response_delete(response_id="resp_mine", organization_id=theirs.id)
    found = responses_store.response_load(response_id="resp_mine", organization_id=mine.id)
    assert found is not None and found.input_items == [{"type": "message", "id": "msg_1"}]
    assert responses_store.response_delete(response_id="resp_mine", organization_id=mine.id)
    assert not StoredResponse.objects.exists()


def test_expiry_runs_hourly_on_the_control_queue() -> None:
    entry = settings.CELERY_BEAT_SCHEDULE["responses-delete-expired"]
    assert entry == {
        "task": "mantle.control.responses_delete_expired",
        "schedule": 3600.0,
        "options": {"queue": "control"},
    }
    app.loader.import_default_modules()
    task = app.tasks["mantle.control.responses_delete_expired"]
    assert task.queue == "control"


def test_a_large_backlog_is_deleted_in_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(responses_store, "DELETE_BATCH", 2)
    org = OrganizationFactory()
    for i in range(5):
        _stored(org.id, f"resp_{i}", age=timedelta(days=400))
    assert responses_store.responses_delete_expired() == 5
    assert not StoredResponse.objects.exists()
