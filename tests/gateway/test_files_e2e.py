"""The Files API end to end: the official `openai` client against a real gateway process, and
a raw-socket client that keeps sending an upload's body until the gateway answers."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
from django.conf import settings
from openai import OpenAI

from accounts.models import ApiKey, Organization
from gateway import files
from gateway.models import File
from tests.factories import OrganizationFactory, make_api_key
from tests.support.raw_http import CHUNK, Reply, request_head, send_until_answered
from tests.support.stack import Process, Stack

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True), pytest.mark.timeout(300)]

SMALL_LIMIT = 64 * 1024  # MANTLE_MAX_BODY_BYTES of the gateway under test
# MANTLE_FILE_MAX_BYTES: past FILE_UPLOAD_MAX_MEMORY_SIZE (2.5 MiB), so Django's parser writes
# a file this large to a temporary file.
FILE_LIMIT = 3 * 1024 * 1024
MAX_FILES = 6  # MANTLE_FILES_ORG_MAX_COUNT
MAX_STORED = 3 * FILE_LIMIT  # MANTLE_FILES_ORG_MAX_BYTES
ATTACK_BYTES = 64 * 1024 * 1024  # far beyond every limit and any socket buffers
BATCH_LINES = b'{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions"}\n' * 3


@dataclass
class Gateway:
    url: str
    process: Process
    store: Path  # MANTLE_FILE_STORE
    spool: Path  # its TMPDIR: where Django spools bodies and uploads


@dataclass
class Tenant:
    org: Organization
    key: ApiKey
    secret: str
    gateway: Gateway

    def client(self) -> OpenAI:
        return OpenAI(
            base_url=f"{self.gateway.url}/v1", api_key=self.secret, max_retries=0, timeout=60
        )


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory, django_db_setup: None, django_db_blocker: Any
) -> Iterator[Gateway]:
    spool = tmp_path_factory.mktemp("files-spool")
    store = Path(settings.MANTLE_FILE_STORE)  # this run's, shared with the test process
    with django_db_blocker.unblock():
        stack = Stack.for_tests()
    try:
        process, url = stack.gateway(
            "gateway-files",
            TMPDIR=str(spool),
            MANTLE_FILE_STORE=str(store),
            MANTLE_MAX_BODY_BYTES=str(SMALL_LIMIT),
            MANTLE_FILE_MAX_BYTES=str(FILE_LIMIT),
            MANTLE_FILES_ORG_MAX_COUNT=str(MAX_FILES),
            MANTLE_FILES_ORG_MAX_BYTES=str(MAX_STORED),
        )
        yield Gateway(url=url, process=process, store=store, spool=spool)
    finally:
        stack.stop_all()


def tenant(gateway: Gateway, scopes: tuple[str, ...] = ("inference",)) -> Tenant:
    org = OrganizationFactory()
    key, secret = make_api_key(org, scopes=scopes)
    return Tenant(org=org, key=key, secret=secret, gateway=gateway)


@pytest.fixture
def acme(gateway: Gateway) -> Tenant:
    return tenant(gateway)


@pytest.fixture
def globex(gateway: Gateway) -> Tenant:
    return tenant(gateway)


def stored(gateway: Gateway, org: Organization) -> list[str]:
    """The organization's files in the store."""
    root = gateway.store / org.id
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def spooled(gateway: Gateway) -> list[str]:
    return sorted(str(p.relative_to(gateway.spool)) for p in gateway.spool.rglob("*"))


# --- the SDK's five calls ------------------------------------------------------------------


def test_the_sdk_uploads_retrieves_reads_lists_and_deletes(acme: Tenant) -> None:
    client = acme.client()

    created = client.files.create(file=("requests.jsonl", BATCH_LINES), purpose="batch")

    assert created.id.startswith("file-")
    assert (created.object, created.purpose, created.filename) == (
        "file",
        "batch",
        "requests.jsonl",
    )
    assert (created.bytes, created.status, created.status_details) == (
        len(BATCH_LINES),
        "processed",
        None,
    )
    assert created.expires_at is None  # MANTLE_FILES_DEFAULT_RETENTION_DAYS is 0
    row = File.objects.get(id=created.id)
    assert (row.organization_id, row.project_id, row.api_key_id) == (
        acme.org.id,
        acme.key.project_id,
        acme.key.id,
    )
    assert int(row.created_at.timestamp()) == created.created_at
    assert row.location == f"{acme.gateway.store}/{acme.org.id}/{created.id}"
    assert stored(acme.gateway, acme.org) == [created.id]

    assert client.files.retrieve(created.id) == created
    assert client.files.content(created.id).content == BATCH_LINES
    raw = client.files.with_raw_response.content(created.id)
    assert raw.headers["content-type"] == "application/octet-stream"
    assert raw.headers["content-length"] == str(len(BATCH_LINES))
    assert [f.id for f in client.files.list()] == [created.id]

    deleted = client.files.delete(created.id)

    assert (deleted.id, deleted.object, deleted.deleted) == (created.id, "file", True)
    assert stored(acme.gateway, acme.org) == []
    assert not File.objects.filter(id=created.id).exists()
    with pytest.raises(openai.NotFoundError) as raised:
        client.files.retrieve(created.id)
    assert raised.value.body == {
        "message": f"No such File object: {created.id}",
        "type": "invalid_request_error",
        "param": "id",
        "code": None,
    }


def test_a_large_upload_streams_through_the_store_and_back(acme: Tenant) -> None:
    data = secrets.token_bytes(FILE_LIMIT)
    client = acme.client()

    created = client.files.create(file=("blob.bin", data), purpose="user_data")

    assert created.bytes == FILE_LIMIT
    assert (acme.gateway.store / acme.org.id / created.id).read_bytes() == data
    assert client.files.content(created.id).content == data
    # The spooled body and the parser's temporary file went with the request.
    assert spooled(acme.gateway) == []


def test_expires_after_sets_expires_at_and_is_bounded(acme: Tenant) -> None:
    client = acme.client()

    created = client.files.create(
        file=("notes.txt", b"hello"),
        purpose="user_data",
        expires_after={"anchor": "created_at", "seconds": 3600},
    )

    assert created.expires_at == created.created_at + 3600
    for seconds, param in ((3599, "expires_after.seconds"), (2592001, "expires_after.seconds")):
        with pytest.raises(openai.BadRequestError) as raised:
            client.files.create(
                file=("notes.txt", b"hello"),
                purpose="user_data",
                expires_after={"anchor": "created_at", "seconds": seconds},
            )
        assert raised.value.body["param"] == param  # type: ignore[index]
    assert stored(acme.gateway, acme.org) == [created.id]


@pytest.mark.parametrize(
    ("purpose", "filename", "data", "param"),
    [
        ("batch_output", "out.jsonl", BATCH_LINES, "purpose"),
        ("fine-tune", "train.jsonl", BATCH_LINES, "purpose"),
        ("batch", "requests.csv", BATCH_LINES, "file"),
        ("batch", "requests.jsonl", b"not json\n", "file"),
    ],
)
def test_uploads_the_platform_does_not_take_are_400s_and_leave_nothing(
    acme: Tenant, purpose: str, filename: str, data: bytes, param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        acme.client().files.create(file=(filename, data), purpose=purpose)  # type: ignore[arg-type]
    assert raised.value.body["param"] == param  # type: ignore[index]
    assert stored(acme.gateway, acme.org) == []
    assert not File.objects.filter(organization=acme.org).exists()


def test_the_list_pages_with_the_sdks_cursor(acme: Tenant) -> None:
    client = acme.client()
    made = [client.files.create(file=(f"f{i}.txt", b"x"), purpose="user_data").id for i in range(3)]
    made.append(client.files.create(file=("in.jsonl", BATCH_LINES), purpose="batch").id)

    assert [f.id for f in client.files.list(limit=1)] == made[::-1]  # page by page
    first = client.files.list(limit=2)
    assert ([f.id for f in first.data], first.has_more) == (made[:1:-1], True)
    assert [f.id for f in client.files.list(order="asc")] == made
    assert [f.id for f in client.files.list(purpose="batch")] == made[3:]
    with pytest.raises(openai.BadRequestError) as raised:
        client.files.list(limit=0)
    assert raised.value.body["param"] == "limit"  # type: ignore[index]


# --- tenants -------------------------------------------------------------------------------


def test_another_organizations_file_is_404_for_retrieve_content_and_delete(
    acme: Tenant, globex: Tenant
) -> None:
    mine = acme.client().files.create(file=("secret.txt", b"acme only"), purpose="user_data")
    theirs = globex.client()

    for call in (theirs.files.retrieve, theirs.files.content, theirs.files.delete):
        with pytest.raises(openai.NotFoundError) as raised:
            call(mine.id)
        assert raised.value.body["message"] == f"No such File object: {mine.id}"  # type: ignore[index]
    assert list(theirs.files.list()) == []

    assert stored(acme.gateway, acme.org) == [mine.id]
    assert acme.client().files.content(mine.id).content == b"acme only"


def test_batch_output_files_are_read_by_their_organization_only(
    acme: Tenant, globex: Tenant
) -> None:
    output = files.write_file(
        organization_id=acme.org.id,
        purpose="batch_output",
        filename="batch_abc_output.jsonl",
        chunks=iter([b'{"id": "line-1"}\n', b'{"id": "line-2"}\n']),
        expires_at=None,
    )

    got = acme.client().files.retrieve(output.id)
    assert (got.purpose, got.filename, got.bytes) == ("batch_output", "batch_abc_output.jsonl", 34)
    assert acme.client().files.content(output.id).content == b'{"id": "line-1"}\n{"id": "line-2"}\n'
    with pytest.raises(openai.NotFoundError):
        globex.client().files.content(output.id)


def test_the_filename_is_shown_cleaned_and_never_makes_the_path(acme: Tenant) -> None:
    created = acme.client().files.create(
        file=("../../../../tmp/evil\u202egnp.jsonl", BATCH_LINES), purpose="batch"
    )

    assert created.filename == "evilgnp.jsonl"
    assert stored(acme.gateway, acme.org) == [created.id]
    assert File.objects.get(id=created.id).location.endswith(f"/{acme.org.id}/{created.id}")


# --- quotas --------------------------------------------------------------------------------


def test_the_file_count_quota_is_an_openai_shaped_403(acme: Tenant) -> None:
    client = acme.client()
    for i in range(MAX_FILES):
        client.files.create(file=(f"f{i}.txt", b"x"), purpose="user_data")

    with pytest.raises(openai.PermissionDeniedError) as raised:
        client.files.create(file=("one-more.txt", b"x"), purpose="user_data")

    error = raised.value.body
    assert error["code"] == "file_count_quota_exceeded"  # type: ignore[index]
    assert "MANTLE_FILES_ORG_MAX_COUNT" in error["message"]  # type: ignore[index]
    assert len(stored(acme.gateway, acme.org)) == MAX_FILES


def test_the_stored_bytes_quota_is_a_413_naming_it(acme: Tenant) -> None:
    client = acme.client()
    for i in range(3):
        client.files.create(file=(f"f{i}.bin", b"x" * FILE_LIMIT), purpose="user_data")

    with pytest.raises(openai.APIStatusError) as raised:
        client.files.create(file=("more.bin", b"x" * 10), purpose="user_data")

    assert raised.value.status_code == 413
    assert raised.value.body["code"] == "file_storage_quota_exceeded"  # type: ignore[index]
    assert "MANTLE_FILES_ORG_MAX_BYTES" in raised.value.body["message"]  # type: ignore[index]
    assert len(stored(acme.gateway, acme.org)) == 3


def test_a_file_past_the_file_limit_within_the_framing_is_refused(acme: Tenant) -> None:
    with pytest.raises(openai.APIStatusError) as raised:
        acme.client().files.create(file=("big.bin", b"x" * (FILE_LIMIT + 1)), purpose="user_data")

    assert raised.value.status_code == 413
    assert raised.value.body["code"] == "file_too_large"  # type: ignore[index]
    assert stored(acme.gateway, acme.org) == []


# --- the body limit, before the body is read -----------------------------------------------

BOUNDARY = "mantle-test-boundary"


def multipart_head(filename: str = "in.bin", purpose: str = "user_data") -> bytes:
    return (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\n{purpose}\r\n'
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()


MULTIPART_TAIL = f"\r\n--{BOUNDARY}--\r\n".encode()


def upload_head(gateway: Gateway, authorization: str | None, length: int | None) -> bytes:
    return request_head(
        gateway.url,
        "/v1/files",
        authorization=authorization,
        length=length,
        content_type=f"multipart/form-data; boundary={BOUNDARY}",
    )


def endless(chunked: bool) -> Iterator[bytes]:
    """A multipart upload whose file never ends."""
    pieces: list[bytes] = [multipart_head()]
    pieces += [b"x" * CHUNK] * (ATTACK_BYTES // CHUNK)
    for piece in pieces:
        yield b"%x\r\n" % len(piece) + piece + b"\r\n" if chunked else piece


def assert_too_large(reply: Reply, limit: int, reason: str) -> None:
    assert reply.status == 413, reply
    error = reply.json()["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", "payload_too_large")
    assert f"{limit} bytes allowed ({reason})" in error["message"]
    assert reply.headers.get("connection") == "close"
    assert reply.sent < ATTACK_BYTES // 2, reply.sent


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize("key", ["valid", "none", "bogus", "admin-only"])
def test_an_endless_upload_is_cut_at_the_limit_its_key_earns(
    gateway: Gateway, key: str, chunked: bool
) -> None:
    authorization = {
        "valid": f"Bearer {tenant(gateway).secret}",
        "none": None,
        "bogus": "Bearer sk-" + "0" * 48,
        "admin-only": f"Bearer {tenant(gateway, ('admin',)).secret}",
    }[key]
    head = upload_head(gateway, authorization, None if chunked else ATTACK_BYTES)
    stored_before = sorted(p.name for p in gateway.store.rglob("*"))

    reply = send_until_answered(gateway.url, head, endless(chunked))

    if key == "valid":
        assert_too_large(reply, FILE_LIMIT + 64 * 1024, "MANTLE_FILE_MAX_BYTES")
    else:
        assert_too_large(reply, SMALL_LIMIT, "MANTLE_MAX_BODY_BYTES")
    assert sorted(p.name for p in gateway.store.rglob("*")) == stored_before
    assert spooled(gateway) == []


def test_an_organization_at_its_file_count_gets_only_the_small_limit(acme: Tenant) -> None:
    client = acme.client()
    for i in range(MAX_FILES):
        client.files.create(file=(f"f{i}.txt", b"x"), purpose="user_data")
    head = upload_head(acme.gateway, f"Bearer {acme.secret}", ATTACK_BYTES)

    reply = send_until_answered(acme.gateway.url, head, endless(chunked=False))

    assert_too_large(reply, SMALL_LIMIT, "MANTLE_MAX_BODY_BYTES")


def test_a_chunked_upload_over_the_small_limit_is_taken_whole(acme: Tenant) -> None:
    data = secrets.token_bytes(4 * SMALL_LIMIT)
    body = multipart_head("chunked.bin") + data + MULTIPART_TAIL
    pieces = [body[i : i + CHUNK] for i in range(0, len(body), CHUNK)]
    frames = [b"%x\r\n" % len(p) + p + b"\r\n" for p in pieces] + [b"0\r\n\r\n"]
    head = upload_head(acme.gateway, f"Bearer {acme.secret}", None)

    reply = send_until_answered(acme.gateway.url, head, iter(frames))

    assert reply.status == 200, reply
    created = json.loads(reply.body)
    assert (created["bytes"], created["filename"]) == (len(data), "chunked.bin")
    assert (acme.gateway.store / acme.org.id / created["id"]).read_bytes() == data
