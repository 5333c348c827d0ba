"""Regressions the /v2 fuzzing (tests/security/test_fuzzing.py) found: replies stay strict JSON.

- An FP32 input of 1e39 (or JSON's 1e999, which Python reads as inf) was cast to inf and
  served; the answer then held `Infinity`, which is not JSON. Such values are now refused.
- A model's non-finite outputs (finite inputs can overflow) are written as the protobuf JSON
  mapping writes them: "NaN", "Infinity", "-Infinity".
- A path under /v2 that no route matches (a model name with a `/`, even as %2F, or a
  newline) got Django's HTML 404; it now gets the protocol's error object.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import numpy as np
import pytest

from gateway.v2 import output_values
from tests.gateway import test_v2_e2e as v2_e2e
from tests.gateway.conftest import LiveStack
from tests.gateway.test_v2_e2e import Tenant, bucket_exists, infer_body

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True), pytest.mark.models]

# The v2 tests' tensor model (shifted = features + 1, score = sum of a row) and its worker.
artifacts = v2_e2e.artifacts
tensor_worker = v2_e2e.tensor_worker
tenant = v2_e2e.tenant

FP32_MAX = float(np.finfo(np.float32).max)


def _strict(text: str) -> Any:
    """JSON as the standard has it: NaN and Infinity are not values."""

    def refuse(constant: str) -> Any:
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize(
    "raw",
    [
        json.dumps(infer_body(np.array([[1e39, 0.0, 0.0, 0.0]]))),
        # Python's json reads an overflowing literal as inf.
        '{"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", '
        '"data": [0, 1e999, 0, 0]}]}',
    ],
    ids=["beyond-fp32", "json-overflow"],
)
def test_inputs_outside_the_datatypes_finite_range_are_refused_by_name(
    tenant: Tenant, raw: str
) -> None:
    response = tenant.client().post(
        f"/v2/models/{tenant.endpoint_id}/infer",
        content=raw,
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 400
    assert _strict(response.text) == {
        "error": "Input `features`: data holds values outside the finite range of FP32 "
        f"(±{np.finfo(np.float32).max}).",
        "code": None,
        "param": "inputs.0.data",
    }
    assert bucket_exists(tenant.key) is False


def test_outputs_that_overflow_are_written_as_strict_json(tenant: Tenant) -> None:
    # Every input is a finite FP32; the sums of the rows are not.
    x = np.array([[FP32_MAX / 2] * 4, [-FP32_MAX / 2] * 4], dtype=np.float32)
    response = tenant.client().post(
        f"/v2/models/{tenant.endpoint_id}/infer", json=infer_body(x, outputs=[{"name": "score"}])
    )
    assert response.status_code == 200, response.text
    (score,) = _strict(response.text)["outputs"]
    assert (score["name"], score["shape"], score["data"]) == (
        "score",
        [2],
        ["Infinity", "-Infinity"],
    )
    np.testing.assert_array_equal(np.asarray(score["data"], dtype=np.float32), [np.inf, -np.inf])


def test_non_finite_values_are_named_and_finite_ones_kept() -> None:
    values = np.array([np.nan, np.inf, -np.inf, 1.5, -0.0], dtype=np.float16)
    assert output_values(values) == ["NaN", "Infinity", "-Infinity", 1.5, -0.0]
    assert output_values(np.array([1, 2], dtype=np.int64)) == [1, 2]
    assert output_values(np.array([True, False])) == [True, False]


@pytest.mark.parametrize(
    "path",
    ["/v2/models/org%2Franker", "/v2/models/org/ranker/infer", "/v2/metadata", "/v2/x%0Ay"],
)
def test_paths_no_route_matches_get_the_protocols_404(live: LiveStack, path: str) -> None:
    response = httpx.post(f"{live.url}{path}", json={"inputs": []}, timeout=30)
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/json"
    body = _strict(response.text)
    assert (body["code"], body["param"]) == ("route_not_found", None)
    shown = path.replace("%2F", "/").replace("%0A", "\n")
    assert body["error"].startswith(f"No /v2 route matches `{shown}`.")
