"""The console's batch upload through the real ASGI server: past the default body limit for
a member who may create batches, cut at it for anyone else (core/body_limit.py)."""

from __future__ import annotations

import json
import re

import httpx
import pytest
from django.conf import settings
from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY
from django.contrib.sessions.backends.db import SessionStore

from accounts.models import User
from accounts.permissions import Role
from gateway import files
from gateway.models import File
from tests.conftest import OrgWorld
from tests.support.browser import AppServer

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

LINE = json.dumps(
    {
        "custom_id": "request",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "m", "messages": [{"role": "user", "content": "x" * 900}]},
    }
).encode()


def big_file() -> bytes:
    """Past MANTLE_MAX_BODY_BYTES, so only the upload's own limit lets it through."""
    lines = settings.DATA_UPLOAD_MAX_MEMORY_SIZE // len(LINE) + 100
    return b"\n".join(LINE for _ in range(lines)) + b"\n"


def session_client(server: AppServer, user: User | None) -> httpx.Client:
    """A client with `user`'s console session (none for None) and a CSRF cookie."""
    client = httpx.Client(base_url=server.url, timeout=60)
    if user is not None:
        session = SessionStore()
        session[SESSION_KEY] = str(user.pk)
        session[BACKEND_SESSION_KEY] = "accounts.backends.ThrottledModelBackend"
        session[HASH_SESSION_KEY] = user.get_session_auth_hash()
        session.save()
        assert session.session_key is not None
        client.cookies.set(settings.SESSION_COOKIE_NAME, session.session_key)
    return client


def upload(client: httpx.Client, world: OrgWorld, data: bytes) -> httpx.Response:
    page = client.get(f"/console/o/{world.org.id}/batches/")
    found = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text)
    token = found.group(1) if found else "none"
    return client.post(
        f"/console/o/{world.org.id}/batches/upload/",
        data={"csrfmiddlewaretoken": token},
        files={"file": ("requests.jsonl", data, "application/jsonl")},
        headers={"referer": f"{client.base_url}/console/o/{world.org.id}/batches/"},
    )


def test_a_developer_uploads_past_the_default_body_limit_and_others_are_cut_at_it(
    app_server: AppServer, world: OrgWorld
) -> None:
    data = big_file()
    assert len(data) > settings.DATA_UPLOAD_MAX_MEMORY_SIZE

    with session_client(app_server, world.users[Role.DEVELOPER]) as developer:
        response = upload(developer, world, data)
    assert response.status_code == 302, response.text[:500]
    file = File.objects.get(organization=world.org)
    assert response.headers["location"].endswith(f"/batches/?file={file.id}")
    assert file.bytes == len(data)
    assert b"".join(files.iter_chunks(file)) == data

    for user in (world.users[Role.VIEWER], None):
        with session_client(app_server, user) as other:
            refused = upload(other, world, data)
        assert refused.status_code == 413
        assert "MANTLE_MAX_BODY_BYTES" in refused.text
    assert File.objects.filter(organization=world.org).count() == 1
