"""Request bodies are bounded as they stream in, before authentication, against a real server.

Each attack talks to a real uvicorn process over a raw socket and keeps sending its body
until the server answers: a server that read (and spooled) whole bodies before looking
at them would take every byte before its reply, so `sent` would reach the full body.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from onnx import numpy_helper

from catalog.models import CompileJob
from tests.conftest import OrgWorld, build_world
from tests.support.raw_http import (
    CHUNK,
    Reply,
    chunked_body,
    plain_body,
    request_head,
    send_until_answered,
)
from tests.support.stack import Process, Stack
from tests.workers.compile_support import ranker_model, tree

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True), pytest.mark.timeout(300)]

SMALL_LIMIT = 64 * 1024  # MANTLE_MAX_BODY_BYTES of the server under test
UPLOAD_LIMIT = 1024 * 1024  # MANTLE_MAX_UPLOAD_BYTES
ATTACK_BYTES = 64 * 1024 * 1024  # far beyond both limits and any socket buffers
BOGUS_KEY = "sk-" + "0" * 48


@dataclass
class Server:
    url: str
    process: Process
    spool: Path  # the server's TMPDIR: where Django spools bodies
    uploads: Path  # MANTLE_UPLOAD_DIR: where uploads are staged


def start_server(
    tmp_path_factory: pytest.TempPathFactory, django_db_blocker: Any, name: str, **extra: str
) -> Iterator[Server]:
    root = tmp_path_factory.mktemp(name)
    spool, uploads = root / "spool", root / "uploads"
    spool.mkdir()
    with django_db_blocker.unblock():
        stack = Stack.for_tests()
    try:
        process, url = stack.gateway(
            name,
            TMPDIR=str(spool),
            MANTLE_UPLOAD_DIR=str(uploads),
            MANTLE_MAX_BODY_BYTES=str(SMALL_LIMIT),
            MANTLE_MAX_UPLOAD_BYTES=str(UPLOAD_LIMIT),
            **extra,
        )
        yield Server(url=url, process=process, spool=spool, uploads=uploads)
    finally:
        stack.stop_all()


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, django_db_setup: None, django_db_blocker: Any
) -> Iterator[Server]:
    yield from start_server(tmp_path_factory, django_db_blocker, "gateway-body-limits")


@pytest.fixture(scope="module")
def h11_server(
    tmp_path_factory: pytest.TempPathFactory, django_db_setup: None, django_db_blocker: Any
) -> Iterator[Server]:
    """uvicorn's pure-Python HTTP parser (`--http h11`, its fallback without httptools)."""
    yield from start_server(
        tmp_path_factory, django_db_blocker, "gateway-body-limits-h11", UVICORN_HTTP="h11"
    )


def upload_path(org_id: str) -> str:
    return f"/api/v1/organizations/{org_id}/compile-jobs/upload?model_name=ranker&kind=tensor"


def assert_too_large(reply: Reply, limit: int) -> None:
    assert reply.status == 413, reply
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["code"] == "payload_too_large"
    assert str(limit) in error["message"]
    assert reply.headers.get("connection") == "close"
    # Answered while the body was still coming: far from all of it was taken in.
    assert reply.sent < ATTACK_BYTES // 2, reply.sent


def on_disk(server: Server) -> tuple[list[str], list[str], int]:
    """What the server has spooled and staged, and the compile jobs it created."""
    return tree(server.spool), tree(server.uploads), CompileJob.objects.count()


ATTACKS = [
    pytest.param("/v1/chat/completions", None, id="gateway-no-key"),
    pytest.param("/v1/embeddings", f"Bearer {BOGUS_KEY}", id="gateway-bogus-key"),
    pytest.param("/v2/models/m/infer", f"Bearer {BOGUS_KEY}", id="v2-bogus-key"),
    pytest.param("/api/v1/organizations", None, id="management-no-key"),
    pytest.param(upload_path("org_nope"), None, id="upload-no-key"),
    pytest.param(upload_path("org_nope"), f"Bearer {BOGUS_KEY}", id="upload-bogus-key"),
]


@pytest.mark.parametrize(("path", "authorization"), ATTACKS)
def test_a_huge_declared_body_is_refused_before_it_is_sent(
    server: Server, path: str, authorization: str | None
) -> None:
    before = on_disk(server)
    head = request_head(server.url, path, authorization=authorization, length=ATTACK_BYTES)

    reply = send_until_answered(server.url, head, plain_body(ATTACK_BYTES))

    assert_too_large(reply, SMALL_LIMIT)
    assert on_disk(server) == before


@pytest.mark.parametrize(("path", "authorization"), ATTACKS)
def test_a_chunked_body_is_refused_as_soon_as_it_passes_the_limit(
    server: Server, path: str, authorization: str | None
) -> None:
    before = on_disk(server)
    head = request_head(server.url, path, authorization=authorization, length=None)

    reply = send_until_answered(server.url, head, chunked_body(ATTACK_BYTES))

    assert_too_large(reply, SMALL_LIMIT)
    assert on_disk(server) == before


@pytest.mark.parametrize(("path", "authorization"), ATTACKS[:1] + ATTACKS[3:4])
@pytest.mark.parametrize(
    ("which", "status"), [("server", 400), ("h11_server", 413)], ids=["httptools", "h11"]
)
def test_a_small_content_length_does_not_hide_a_chunked_body(
    request: pytest.FixtureRequest, which: str, status: int, path: str, authorization: str | None
) -> None:
    # h11 reads a body by Transfer-Encoding whatever Content-Length says (httptools
    # refuses the pair): trusting the small length would let the whole body be spooled.
    server: Server = request.getfixturevalue(which)
    before = on_disk(server)
    head = request_head(
        server.url, path, authorization=authorization, length=None, extra="Content-Length: 10"
    )

    reply = send_until_answered(server.url, head, chunked_body(ATTACK_BYTES))

    assert reply.status == status, reply
    if status == 413:
        assert_too_large(reply, SMALL_LIMIT)
    assert reply.sent < ATTACK_BYTES // 2, reply.sent
    assert on_disk(server) == before


def test_an_expect_continue_client_is_refused_before_it_sends_anything(server: Server) -> None:
    head = request_head(
        server.url,
        "/v1/chat/completions",
        authorization=None,
        length=ATTACK_BYTES,
        extra="Expect: 100-continue",
    )

    reply = send_until_answered(server.url, head, iter(()))

    assert_too_large(reply, SMALL_LIMIT)


def test_small_bodies_still_reach_authentication(server: Server) -> None:
    body = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}'
    head = request_head(server.url, "/v1/chat/completions", authorization=None, length=len(body))

    reply = send_until_answered(server.url, head, iter([body]))

    assert reply.status == 401
    assert reply.json()["error"]["code"] == "missing_api_key"


# --- Uploads: their own limit, only for a caller that may upload ----------------------------


@pytest.fixture
def uploader() -> tuple[OrgWorld, str]:
    world = build_world("Uploads Co")
    return world, f"Bearer {world.admin_secret}"


def onnx_upload(size: int) -> bytes:
    """A valid ONNX graph of about `size` bytes (a padding initializer)."""
    model = ranker_model()
    pad = np.zeros(max(0, size // 4 - 64), np.float32)
    model.graph.initializer.append(numpy_helper.from_array(pad, "pad"))
    return model.SerializeToString()


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_an_upload_over_the_small_limit_is_accepted_with_a_valid_key(
    server: Server, uploader: tuple[OrgWorld, str], chunked: bool
) -> None:
    world, authorization = uploader
    body = onnx_upload(4 * SMALL_LIMIT)
    assert SMALL_LIMIT < len(body) < UPLOAD_LIMIT
    head = request_head(
        server.url,
        upload_path(world.org.id),
        authorization=authorization,
        length=None if chunked else len(body),
    )
    pieces = [body[i : i + CHUNK] for i in range(0, len(body), CHUNK)]
    frames = [b"%x\r\n" % len(p) + p + b"\r\n" for p in pieces] + [b"0\r\n\r\n"]

    reply = send_until_answered(server.url, head, iter(frames if chunked else pieces))

    assert reply.status == 201, reply
    job = CompileJob.objects.get(organization=world.org)
    assert reply.json()["id"] == job.id
    assert job.source_detail["upload_bytes"] == len(body)
    assert reply.sent == len(b"".join(frames if chunked else pieces))
    shutil.rmtree(job.source_detail["path"])  # the job owns it; no compile node runs here


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_valid_keys_upload_is_refused_past_the_upload_limit(
    server: Server, uploader: tuple[OrgWorld, str], chunked: bool
) -> None:
    world, authorization = uploader
    before = on_disk(server)
    head = request_head(
        server.url,
        upload_path(world.org.id),
        authorization=authorization,
        length=None if chunked else ATTACK_BYTES,
    )

    reply = send_until_answered(
        server.url, head, chunked_body(ATTACK_BYTES) if chunked else plain_body(ATTACK_BYTES)
    )

    assert_too_large(reply, UPLOAD_LIMIT)
    assert "MANTLE_MAX_UPLOAD_BYTES" in reply.json()["error"]["message"]
    assert on_disk(server) == before


def test_a_key_without_the_right_to_upload_gets_only_the_small_limit(
    server: Server, uploader: tuple[OrgWorld, str]
) -> None:
    world, _ = uploader
    other = build_world("Other Co")
    before = on_disk(server)
    head = request_head(
        server.url,
        upload_path(world.org.id),  # another organization's admin key: not a member
        authorization=f"Bearer {other.admin_secret}",
        length=ATTACK_BYTES,
    )

    reply = send_until_answered(server.url, head, plain_body(ATTACK_BYTES))

    assert_too_large(reply, SMALL_LIMIT)
    assert on_disk(server) == before
