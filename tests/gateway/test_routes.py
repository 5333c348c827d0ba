"""Every path under /v1 answers in OpenAI's JSON shape, never Django's HTML 404."""

from __future__ import annotations

import pytest
from django.test import Client

from tests.factories import OrganizationFactory, make_api_key

# The gateway reads in its own thread (so a transaction), beside live workers (keeps_redis).
pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.keeps_redis]


@pytest.mark.parametrize(
    "path", ["/v1/nope", "/v1/chat/completions/extra", "/v1/models/", "/v1/a%0Ab", "/v1/"]
)
def test_unknown_paths_are_openai_shaped_404s(path: str) -> None:
    response = Client().get(path)
    assert response.status_code == 404
    assert response["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["message"].startswith("Invalid URL (GET /v1/")


def test_a_model_id_with_a_newline_is_a_model_not_found() -> None:
    _, secret = make_api_key(OrganizationFactory(), scopes=["inference"])
    response = Client(headers={"authorization": f"Bearer {secret}"}).get("/v1/models/a%0Ab")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"
