"""The Files API's service (gateway/files.py): the store, quotas, expiry, tenant scoping, and
the interface the batch runner reads and writes files through."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.db import connection, connections, transaction
from django.utils import timezone
from pytest_django.fixtures import Settings as SettingsWrapper

from accounts.models import Organization
from config.celery import app
from core.errors import InvalidInput
from gateway import files
from gateway.files import (
    FileCountQuotaExceeded,
    FileStorageQuotaExceeded,
    FileTooLarge,
    LineTooLong,
    Owner,
)
from gateway.models import File
from gateway.tasks import files_expire
from tests.factories import OrganizationFactory


@pytest.fixture(autouse=True)
def store(settings: SettingsWrapper, tmp_path: Path) -> Path:
    root = tmp_path / "files"
    settings.MANTLE_FILE_STORE = str(root)
    return root


def on_disk(root: Path) -> list[str]:
    """Every file under the store, relative to it."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def write(org: Organization, data: bytes, **kwargs: Any) -> File:
    fields: dict[str, Any] = {
        "purpose": "batch_output",
        "filename": "out.jsonl",
        "expires_at": None,
    }
    fields.update(kwargs)
    return files.write_file(organization_id=org.id, chunks=iter([data[:3], data[3:]]), **fields)


def upload(org: Organization, data: bytes, **kwargs: Any) -> File:
    fields: dict[str, Any] = {
        "purpose": "user_data",
        "filename": "notes.txt",
        "expires_after_s": None,
    }
    fields.update(kwargs)
    return files.file_upload(owner=Owner(org.id, "proj_x", "key_x"), chunks=iter([data]), **fields)


# --- the batch runner's interface ----------------------------------------------------------


@pytest.mark.django_db
def test_write_file_streams_the_chunks_under_the_organization_and_file_id(store: Path) -> None:
    org = OrganizationFactory()
    later = timezone.now() + timedelta(days=1)

    file = write(org, b'{"a": 1}\n{"b": 2}\n', expires_at=later)

    assert file.id.startswith("file-") and len(file.id) == 29
    assert (file.organization_id, file.purpose, file.filename) == (
        org.id,
        "batch_output",
        "out.jsonl",
    )
    assert (file.bytes, file.status, file.expires_at) == (18, "processed", later)
    assert (file.project_id, file.api_key_id) == ("", "")
    assert file.location == f"{store}/{org.id}/{file.id}"
    assert on_disk(store) == [f"{org.id}/{file.id}"]
    assert (store / org.id / file.id).read_bytes() == b'{"a": 1}\n{"b": 2}\n'
    assert files.get_file(org.id, file.id) == file
    assert list(files.iter_lines(file)) == [b'{"a": 1}', b'{"b": 2}']


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("data", "lines"),
    [
        (b"a\nbb\r\n\nccc", [b"a", b"bb", b"", b"ccc"]),
        (b"a\n", [b"a"]),
        (b"\n", [b""]),
        (b"", []),
        (b"abcdefghij\nk\r\n", [b"abcdefghij", b"k"]),
        (b"\r\n\r\n", [b"", b""]),
    ],
)
def test_iter_lines_joins_lines_across_chunks(
    monkeypatch: pytest.MonkeyPatch, data: bytes, lines: list[bytes]
) -> None:
    monkeypatch.setattr(files, "CHUNK_BYTES", 3)
    file = write(OrganizationFactory(), data)

    assert list(files.iter_lines(file)) == lines


@pytest.mark.django_db
def test_a_line_over_the_bound_raises_naming_it_and_reads_no_further(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(files, "CHUNK_BYTES", 4)
    org = OrganizationFactory()
    file = write(org, b"abcd\r\nab\nabcdef\nafter\n")
    lines = files.iter_lines(file, max_line_bytes=4)

    assert [next(lines), next(lines)] == [b"abcd", b"ab"]
    with pytest.raises(LineTooLong) as raised:
        next(lines)
    assert (raised.value.line, raised.value.limit) == (3, 4)
    assert raised.value.message == "Line 3 of the file is longer than 4 bytes."

    # A line with no end at all stops the read at the bound, not at the end of the file.
    reads: list[int] = []
    endless = write(org, b"x" * 4096)
    real_chunks = files.iter_chunks

    def counted(file: File, chunk_bytes: int | None = None) -> Iterator[bytes]:
        for chunk in real_chunks(file, chunk_bytes):
            reads.append(len(chunk))
            yield chunk

    monkeypatch.setattr(files, "iter_chunks", counted)
    with pytest.raises(LineTooLong) as raised:
        list(files.iter_lines(endless, max_line_bytes=10))
    assert raised.value.line == 1
    assert sum(reads) <= 16


@pytest.mark.django_db
def test_iter_lines_bound_defaults_to_the_request_body_limit(settings: SettingsWrapper) -> None:
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 8
    file = write(OrganizationFactory(), b"12345678\n123456789\n")
    lines = files.iter_lines(file)
    assert next(lines) == b"12345678"
    with pytest.raises(LineTooLong):
        next(lines)


@pytest.mark.django_db
def test_get_file_is_none_for_another_organization_an_unknown_id_and_an_expired_file() -> None:
    mine, theirs = OrganizationFactory(), OrganizationFactory()
    file = write(mine, b"x")
    expired = write(mine, b"y", expires_at=timezone.now() - timedelta(seconds=1))

    assert files.get_file(theirs.id, file.id) is None
    assert files.get_file(mine.id, "file-nope") is None
    assert files.get_file(mine.id, expired.id) is None
    assert files.get_file(mine.id, file.id) == file


@pytest.mark.django_db
def test_write_file_refuses_an_unknown_purpose_and_an_empty_filename(store: Path) -> None:
    org = OrganizationFactory()
    with pytest.raises(InvalidInput) as raised:
        write(org, b"x", purpose="fine-tune")
    assert raised.value.param == "purpose"
    with pytest.raises(InvalidInput) as raised:
        write(org, b"x", filename=" /\x00 ")
    assert raised.value.param == "file"
    assert on_disk(store) == [] and not File.objects.exists()


# --- quotas --------------------------------------------------------------------------------


@pytest.mark.django_db
def test_the_file_count_quota_counts_every_purpose(settings: SettingsWrapper, store: Path) -> None:
    settings.MANTLE_FILES_ORG_MAX_COUNT = 2
    org, other = OrganizationFactory(), OrganizationFactory()
    write(org, b"x")  # the batch runner's output counts
    upload(org, b"y")
    before = on_disk(store)

    with pytest.raises(FileCountQuotaExceeded) as raised:
        upload(org, b"z")
    assert raised.value.status == 403
    assert "MANTLE_FILES_ORG_MAX_COUNT" in raised.value.message
    with pytest.raises(FileCountQuotaExceeded):
        write(org, b"z")
    assert on_disk(store) == before
    assert File.objects.filter(organization=org).count() == 2
    assert files.upload_allowance(org.id) is None
    upload(other, b"z")  # another organization's quota is its own


@pytest.mark.django_db
def test_the_stored_bytes_quota_refuses_a_file_that_would_pass_it(
    settings: SettingsWrapper, store: Path
) -> None:
    settings.MANTLE_FILES_ORG_MAX_BYTES = 10
    org = OrganizationFactory()
    write(org, b"123456")
    before = on_disk(store)
    assert files.upload_allowance(org.id) == (4, "MANTLE_FILES_ORG_MAX_BYTES")

    for attempt in (upload, write):
        with pytest.raises(FileStorageQuotaExceeded) as raised:
            attempt(org, b"12345")
        assert raised.value.status == 413
        assert "MANTLE_FILES_ORG_MAX_BYTES" in raised.value.message
    assert on_disk(store) == before
    upload(org, b"1234")  # exactly what is left
    assert files.usage_of(org.id) == files.Usage(files=2, bytes=10)


@pytest.mark.django_db
def test_expired_files_do_not_count(settings: SettingsWrapper) -> None:
    settings.MANTLE_FILES_ORG_MAX_COUNT = 1
    org = OrganizationFactory()
    write(org, b"x", expires_at=timezone.now() - timedelta(seconds=1))
    upload(org, b"y")
    assert files.usage_of(org.id) == files.Usage(files=1, bytes=1)


@pytest.mark.django_db(transaction=True)
def test_concurrent_writes_cannot_both_take_the_last_place(
    settings: SettingsWrapper, store: Path
) -> None:
    """Both writers have streamed their bytes and counted the quota before either inserts:
    holding the organization's row while they start makes sure both get that far. Without
    the lock both would count one file and insert."""
    settings.MANTLE_FILES_ORG_MAX_COUNT = 2
    org = OrganizationFactory()
    write(org, b"first")
    outcomes: list[str] = []

    def writer(data: bytes) -> None:
        try:
            write(org, data)
            outcomes.append("written")
        except FileCountQuotaExceeded:
            outcomes.append("refused")
        finally:
            connections.close_all()

    threads = [threading.Thread(target=writer, args=(data,)) for data in (b"a", b"b")]
    with transaction.atomic():
        Organization.objects.select_for_update().get(id=org.id)
        for thread in threads:
            thread.start()
        deadline = time.time() + 20
        while _waiting_on_locks() < 2 and time.time() < deadline:
            time.sleep(0.05)
        waiting = _waiting_on_locks()
    for thread in threads:
        thread.join(timeout=20)

    assert waiting == 2
    assert sorted(outcomes) == ["refused", "written"]
    assert File.objects.filter(organization=org).count() == 2
    assert len(on_disk(store)) == 2


def _waiting_on_locks() -> int:
    with connection.cursor() as cursor:
        # Within a transaction the activity view is a snapshot unless cleared.
        cursor.execute("SELECT pg_stat_clear_snapshot()")
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock'"
        )
        return int(cursor.fetchone()[0])


# --- uploads -------------------------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("filename", "shown"),
    [
        ("../../../../etc/cron.d/evil.jsonl", "evil.jsonl"),
        ("..\\..\\windows\\evil.jsonl", "evil.jsonl"),
        ("/abs/olute.jsonl", "olute.jsonl"),
        ("..", ".."),
        ("in\x00put\u202e\nlsonj.jsonl", "inputlsonj.jsonl"),
        ("é" * 300 + ".jsonl", "é" * 249 + ".jsonl"),
    ],
)
def test_the_filename_never_reaches_the_stores_path(
    store: Path, tmp_path: Path, filename: str, shown: str
) -> None:
    org = OrganizationFactory()

    file = upload(
        org,
        b'{"x": 1}\n',
        purpose="batch" if shown.endswith(".jsonl") else "user_data",
        filename=filename,
    )

    assert file.filename == shown
    assert file.location == f"{store}/{org.id}/{file.id}"
    assert on_disk(store) == [f"{org.id}/{file.id}"]
    # Nothing was written beside the store.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["files"]


def test_a_location_is_made_of_platform_ids_only() -> None:
    for org_id, file_id in (("../x", "file-a"), ("org_a", "file-a/../../b"), ("org_a", "")):
        with pytest.raises(ValueError, match="not an id"):
            files.location_of(org_id, file_id)


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("fields", "data", "param", "code"),
    [
        ({"purpose": "batch_output"}, b"x", "purpose", "invalid_request"),
        ({"purpose": "fine-tune"}, b"x", "purpose", "invalid_request"),
        ({"purpose": "batch", "filename": "in.csv"}, b"{}", "file", "invalid_file_format"),
        ({"purpose": "batch", "filename": "in.jsonl"}, b" \n[1]\n", "file", "invalid_file_format"),
        ({"purpose": "batch", "filename": "in.jsonl"}, b"", "file", "invalid_file_format"),
        ({"filename": ""}, b"x", "file", "invalid_request"),
    ],
)
def test_uploads_are_checked_cheaply_and_a_refusal_leaves_nothing(
    store: Path, fields: dict[str, Any], data: bytes, param: str, code: str
) -> None:
    with pytest.raises(InvalidInput) as raised:
        upload(OrganizationFactory(), data, **fields)
    assert (raised.value.param, raised.value.code) == (param, code)
    assert on_disk(store) == [] and not File.objects.exists()


@pytest.mark.django_db
def test_an_upload_past_the_file_limit_is_cut_and_removed(
    settings: SettingsWrapper, store: Path
) -> None:
    settings.MANTLE_FILE_MAX_BYTES = 10
    org = OrganizationFactory()
    with pytest.raises(FileTooLarge) as raised:
        files.file_upload(
            owner=Owner(org.id, "p", "k"),
            purpose="user_data",
            filename="big.bin",
            chunks=iter([b"x" * 6, b"x" * 6, b"never read"]),
            expires_after_s=None,
        )
    assert raised.value.status == 413 and "MANTLE_FILE_MAX_BYTES" in raised.value.message
    assert on_disk(store) == [] and not File.objects.exists()
    assert upload(org, b"x" * 10).bytes == 10


@pytest.mark.django_db
def test_expiry_is_expires_after_else_the_default_retention(settings: SettingsWrapper) -> None:
    org = OrganizationFactory()
    kept = upload(org, b"x")
    assert kept.expires_at is None  # MANTLE_FILES_DEFAULT_RETENTION_DAYS is 0: kept
    asked = upload(org, b"x", expires_after_s=7200)
    assert asked.expires_at == asked.created_at + timedelta(seconds=7200)
    settings.MANTLE_FILES_DEFAULT_RETENTION_DAYS = 7
    retained = upload(org, b"x")
    assert retained.expires_at == retained.created_at + timedelta(days=7)


# --- lists, deletes, expiry ----------------------------------------------------------------


@pytest.mark.django_db
def test_list_pages_by_creation_with_a_cursor_and_a_purpose() -> None:
    org, other = OrganizationFactory(), OrganizationFactory()
    made = [write(org, b"x") if i % 2 else upload(org, b"x") for i in range(5)]
    write(other, b"x")
    newest_first = [f.id for f in reversed(made)]

    first = files.list_files(org.id, limit=2)
    assert ([f.id for f in first.files], first.has_more) == (newest_first[:2], True)
    second = files.list_files(org.id, limit=2, after=first.files[-1].id)
    assert [f.id for f in second.files] == newest_first[2:4]
    last = files.list_files(org.id, limit=2, after=second.files[-1].id)
    assert ([f.id for f in last.files], last.has_more) == (newest_first[4:], False)
    ascending = files.list_files(org.id, limit=10, order="asc")
    assert [f.id for f in ascending.files] == [f.id for f in made]
    outputs = files.list_files(org.id, limit=10, purpose="batch_output")
    assert {f.id for f in outputs.files} == {f.id for f in made if f.purpose == "batch_output"}
    with pytest.raises(InvalidInput) as raised:
        files.list_files(other.id, limit=2, after=made[0].id)  # not theirs
    assert raised.value.param == "after"


@pytest.mark.django_db
def test_delete_removes_the_row_and_the_bytes_of_the_organizations_own_file(store: Path) -> None:
    mine, theirs = OrganizationFactory(), OrganizationFactory()
    file = upload(mine, b"x")

    assert files.delete_file(theirs.id, file.id) is False
    assert on_disk(store) == [f"{mine.id}/{file.id}"]
    assert files.delete_file(mine.id, file.id) is True
    assert on_disk(store) == [] and not File.objects.exists()
    assert files.delete_file(mine.id, file.id) is False


@pytest.mark.django_db
def test_the_expiry_task_deletes_expired_files_rows_and_bytes(
    monkeypatch: pytest.MonkeyPatch, store: Path
) -> None:
    monkeypatch.setattr(files, "DELETE_BATCH", 2)
    org = OrganizationFactory()
    past = timezone.now() - timedelta(seconds=1)
    for _ in range(5):
        write(org, b"old", expires_at=past)
    kept = [
        write(org, b"kept"),
        write(org, b"later", expires_at=timezone.now() + timedelta(hours=1)),
    ]

    assert files_expire.delay().get() == 5
    assert sorted(File.objects.values_list("id", flat=True)) == sorted(f.id for f in kept)
    assert on_disk(store) == sorted(f"{org.id}/{f.id}" for f in kept)
    assert files_expire.delay().get() == 0


def test_expiry_runs_hourly_on_the_control_queue() -> None:
    entry = settings.CELERY_BEAT_SCHEDULE["files-delete-expired"]
    assert entry == {
        "task": "mantle.control.files_delete_expired",
        "schedule": 3600.0,
        "options": {"queue": "control"},
    }
    app.loader.import_default_modules()
    assert app.tasks["mantle.control.files_delete_expired"].queue == "control"


@pytest.mark.django_db
def test_a_batch_output_is_written_past_a_full_quota_and_counts_afterwards(
    settings: SettingsWrapper, store: Path
) -> None:
    """A batch's answers are paid for: its output file is written whatever the quota says
    (the runner bounds its size, MANTLE_BATCH_OUTPUT_MAX_BYTES), and the organization's
    uploads are refused until it has deleted enough."""
    settings.MANTLE_FILES_ORG_MAX_BYTES = 10
    settings.MANTLE_FILES_ORG_MAX_COUNT = 1
    org = OrganizationFactory()
    upload(org, b"0123456789")
    with pytest.raises(FileCountQuotaExceeded):
        write(org, b"more bytes")

    output = write(org, b'{"id": "batch_req_1"}\n', over_quota=True)

    assert output.bytes == 22 and files.get_file(org.id, output.id) is not None
    assert files.usage_of(org.id).bytes == 32
    with pytest.raises(FileCountQuotaExceeded):
        upload(org, b"x")
    settings.MANTLE_FILES_ORG_MAX_COUNT = 10
    with pytest.raises(FileStorageQuotaExceeded):
        upload(org, b"x")


@pytest.mark.django_db
def test_bytes_no_row_names_are_swept_once_old_and_the_rest_kept(store: Path) -> None:
    """An upload or an output whose process died between the bytes and the row leaves bytes
    no row names: the hourly task deletes them once older than an hour, never a file that
    has its row, nor one still being written."""
    org = OrganizationFactory()
    kept = write(org, b"kept bytes")
    orphan = store / org.id / "file-orphan0000000000000000"
    orphan.write_bytes(b"left by a dead writer")
    fresh = store / org.id / "file-fresh00000000000000000"
    fresh.write_bytes(b"being written now")
    stray = store / "not an id" / "file-x"
    stray.parent.mkdir()
    stray.write_bytes(b"not the store's")
    old = time.time() - 2 * files.ORPHAN_AGE_S
    os.utime(orphan, (old, old))
    os.utime(store / org.id / kept.id, (old, old))
    os.utime(stray, (old, old))

    assert files_expire() == 0

    assert not orphan.exists()
    assert fresh.exists() and stray.exists()
    assert (store / org.id / kept.id).read_bytes() == b"kept bytes"
