"""POST /v1/files's form, its refusals in OpenAI's shape, and the Files API in the /v1 OpenAPI
document (the SDK's calls against a real server: tests/gateway/test_files_e2e.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client
from pytest_django.fixtures import Settings as SettingsWrapper

from gateway.models import File
from gateway.openapi import document
from tests.factories import OrganizationFactory, make_api_key

# The gateway reads keys and files on executor threads: rows must be committed to be seen.
pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def store(settings: SettingsWrapper, tmp_path: Path) -> Path:
    settings.MANTLE_FILE_STORE = str(tmp_path / "files")
    return tmp_path / "files"


@pytest.fixture
def client() -> Client:
    _, secret = make_api_key(OrganizationFactory())
    return Client(headers={"authorization": f"Bearer {secret}"})


def upload(name: str = "notes.txt", data: bytes = b"hello") -> SimpleUploadedFile:
    return SimpleUploadedFile(name, data, content_type="application/octet-stream")


def error_of(response: Any) -> dict[str, Any]:
    body: dict[str, Any] = response.json()["error"]
    assert body["type"] == "invalid_request_error"
    return body


def test_expires_after_may_come_as_brackets_or_as_one_json_part(client: Client) -> None:
    brackets = client.post(
        "/v1/files",
        {
            "purpose": "user_data",
            "file": upload(),
            "expires_after[anchor]": "created_at",
            "expires_after[seconds]": "7200",
        },
    )
    whole = client.post(
        "/v1/files",
        {
            "purpose": "user_data",
            "file": upload(),
            "expires_after": json.dumps({"anchor": "created_at", "seconds": 7200}),
        },
    )

    for response in (brackets, whole):
        assert response.status_code == 200, response.content
        created = response.json()
        assert created["expires_at"] == created["created_at"] + 7200
        assert list(created) == [
            "id",
            "object",
            "bytes",
            "created_at",
            "expires_at",
            "filename",
            "purpose",
            "status",
            "status_details",
        ]


@pytest.mark.parametrize(
    ("form", "param", "message"),
    [
        ({"file": upload()}, "purpose", "Missing required parameter: 'purpose'."),
        ({"purpose": "user_data"}, "file", "Missing required parameter: 'file'"),
        ({"purpose": "user_data", "file": "not a file part"}, "file", "Missing required"),
        (
            {"purpose": "user_data", "file": upload(), "model": "gpt"},
            "model",
            "Unrecognized request argument supplied: model",
        ),
        (
            {"purpose": "user_data", "file": upload(), "other": upload()},
            "other",
            "Unrecognized request argument supplied: other",
        ),
        (
            {"purpose": "user_data", "file": [upload(), upload()]},
            "file",
            "Upload one file per request.",
        ),
        (
            {"purpose": "user_data", "file": upload(), "expires_after[anchor]": "created_at"},
            "expires_after.seconds",
            "Missing required parameter: 'expires_after.seconds'.",
        ),
        (
            {
                "purpose": "user_data",
                "file": upload(),
                "expires_after[anchor]": "last_active_at",
                "expires_after[seconds]": "3600",
            },
            "expires_after.anchor",
            "Invalid value for 'expires_after.anchor'",
        ),
        (
            {"purpose": "user_data", "file": upload(), "expires_after": "{"},
            "expires_after",
            "Invalid value for 'expires_after': not a JSON object.",
        ),
        ({"purpose": "assistants", "file": upload()}, "purpose", "Invalid value for 'purpose'"),
    ],
)
def test_a_form_the_api_does_not_take_is_a_400_naming_the_field(
    client: Client, store: Path, form: dict[str, Any], param: str, message: str
) -> None:
    response = client.post("/v1/files", form)

    assert response.status_code == 400, response.content
    error = error_of(response)
    assert error["param"] == param
    assert error["message"].startswith(message), error["message"]
    assert not File.objects.exists()
    assert not store.exists() or not any(p.is_file() for p in store.rglob("*"))


def test_a_body_that_is_not_multipart_is_a_400(client: Client) -> None:
    response = client.post("/v1/files", {"purpose": "batch"}, content_type="application/json")

    assert response.status_code == 400
    assert error_of(response)["param"] == "file"


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("put", "/v1/files"),
        ("post", "/v1/files/file-x"),
        ("delete", "/v1/files/file-x/content"),
    ],
)
def test_other_methods_are_openai_shaped_405s(client: Client, method: str, path: str) -> None:
    response = getattr(client, method)(path)

    assert response.status_code == 405
    assert response.json()["error"]["code"] == "method_not_allowed"


def test_a_key_is_needed() -> None:
    response = Client().get("/v1/files")

    assert response.status_code == 401
    assert response.json()["error"]["code"] == "missing_api_key"


@pytest.mark.parametrize(
    ("query", "param"),
    [
        ("limit=0", "limit"),
        ("limit=10001", "limit"),
        ("limit=x", "limit"),
        ("order=newest", "order"),
        ("after=file-unknown", "after"),
        ("after=" + "a" * 200, "after"),
        ("purpose=" + "p" * 65, "purpose"),
    ],
)
def test_list_queries_are_checked(client: Client, query: str, param: str) -> None:
    response = client.get(f"/v1/files?{query}")

    assert response.status_code == 400
    assert error_of(response)["param"] == param


def test_an_id_longer_than_any_file_id_is_the_same_404(client: Client) -> None:
    long_id = "file-" + "x" * 500
    for response in (
        client.get(f"/v1/files/{long_id}"),
        client.get(f"/v1/files/{long_id}/content"),
        client.delete(f"/v1/files/{long_id}"),
    ):
        assert response.status_code == 404
        assert error_of(response)["message"] == f"No such File object: {long_id[:100]}..."


# --- the OpenAPI document ------------------------------------------------------------------


def test_the_documents_file_schemas_are_the_bounds_the_gateway_enforces() -> None:
    doc = document()
    schemas: dict[str, Any] = doc["components"]["schemas"]
    create = schemas["FileCreateRequest"]
    assert create["additionalProperties"] is False
    assert create["required"] == ["purpose", "file"]
    assert create["properties"]["purpose"]["enum"] == ["batch", "user_data"]
    assert create["properties"]["file"] == {"format": "binary", "title": "File", "type": "string"}
    assert schemas["FileExpiresAfter"]["properties"]["seconds"] == {
        "maximum": 2592000,
        "minimum": 3600,
        "title": "Seconds",
        "type": "integer",
    }
    assert schemas["FileObject"]["required"] == [
        "id",
        "object",
        "bytes",
        "created_at",
        "expires_at",
        "filename",
        "purpose",
        "status",
        "status_details",
    ]
    assert schemas["FileObject"]["additionalProperties"] is False
    listing = doc["paths"]["/v1/files"]["get"]["parameters"]
    assert [p["name"] for p in listing] == ["purpose", "limit", "order", "after"]
    assert listing[1]["schema"]["maximum"] == 10_000


def test_the_files_and_batches_surface_has_a_rate_per_organization(
    settings: SettingsWrapper,
) -> None:
    """MANTLE_FILES_BATCHES_RPM requests a minute per organization over /v1/files and
    /v1/batches together, whichever key sends them; then a 429 with retry-after that names
    the setting. Another organization is not slowed."""
    from core.redis import get_redis

    settings.MANTLE_FILES_BATCHES_RPM = 4
    org = OrganizationFactory()
    for key in get_redis().scan_iter(f"mantle:files-batches-rpm:{org.id}:*"):
        get_redis().delete(key)
    first = Client(headers={"authorization": f"Bearer {make_api_key(org)[1]}"})
    second = Client(headers={"authorization": f"Bearer {make_api_key(org)[1]}"})

    answers = [
        first.get("/v1/files").status_code,
        second.get("/v1/batches").status_code,
        first.post("/v1/files", {"purpose": "user_data", "file": upload()}).status_code,
        second.get("/v1/files").status_code,
    ]
    refused = first.get("/v1/batches")
    upload_refused = second.post("/v1/files", {"purpose": "user_data", "file": upload()})

    assert answers == [200, 200, 200, 200]
    assert (refused.status_code, upload_refused.status_code) == (429, 429)
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert "MANTLE_FILES_BATCHES_RPM" in refused.json()["error"]["message"]
    assert 1 <= int(refused["retry-after"]) <= 61
    assert File.objects.filter(organization=org).count() == 1  # the refused upload stored nothing
    _, other = make_api_key(OrganizationFactory())
    assert Client(headers={"authorization": f"Bearer {other}"}).get("/v1/files").status_code == 200
