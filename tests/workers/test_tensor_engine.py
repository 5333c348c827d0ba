"""The tensor engine on a real ONNX Runtime session: v2 tensors in and out, dynamic batching."""

from __future__ import annotations

import base64
import dataclasses
import json
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from tests.factories import tensor_artifact
from tests.workers.test_streams import usage
from workers.contract import (
    USAGE_STREAM,
    BillingIdentity,
    InferRequest,
    ModelRef,
    Runtime,
    Tensor,
    UsageEvent,
    from_payload,
    response_stream_key,
    to_payload,
)
from workers.engine.base import RequestResult
from workers.engine.tensor import TensorEngine
from workers.serving import WorkerRuntime
from workers.settings import WorkerSettings
from workers.streams import ResponseWriter

IDENTITY = BillingIdentity("org-1", "proj-1", "key-1", "ep-1", "mv-t", "ranker")


def tensor(name: str, array: np.ndarray, datatype: str = "FP32") -> Tensor:
    data = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
    return Tensor(name, datatype, tuple(array.shape), base64.b64encode(data).decode())


def infer_request(
    rid: str,
    rows: np.ndarray,
    *,
    outputs: tuple[str, ...] = (),
    deadline: float | None = None,
    location: str = "/nowhere",
    inputs: tuple[Tensor, ...] | None = None,
) -> InferRequest:
    return InferRequest(
        request_id=rid,
        model=ModelRef("mv-t", Runtime.TENSOR.value, Path(location).name, location),
        identity=IDENTITY,
        inputs=inputs if inputs is not None else (tensor("features", rows),),
        outputs=outputs,
        deadline=time.time() + 60 if deadline is None else deadline,
    )


def events(client: Any, rid: str) -> list[dict[str, str]]:
    return [fields for _, fields in client.xrange(response_stream_key(rid))]


def outputs_of(event: dict[str, str]) -> dict[str, np.ndarray]:
    out = {}
    for item in json.loads(event["outputs"]):
        raw = base64.b64decode(item["data"])
        out[item["name"]] = np.frombuffer(raw, dtype="<f4").reshape(item["shape"])
        assert item["datatype"] == "FP32"
    return out


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tensor-store")


@pytest.fixture(scope="module")
def ranker(store: Path) -> dict[str, Any]:
    return tensor_artifact(store, offset=1.5)


@pytest.fixture
def engines() -> Iterator[list[TensorEngine]]:
    started: list[TensorEngine] = []
    yield started
    for engine in started:
        engine.stop()


def start(engines: list[TensorEngine], manifest: dict[str, Any], **kwargs: Any) -> TensorEngine:
    session = ort.InferenceSession(
        str(Path(manifest["location"]) / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    engine = TensorEngine(session, **kwargs).start()
    engines.append(engine)
    return engine


def test_concurrent_requests_share_one_run_and_get_their_own_rows_back(
    engines: list[TensorEngine], ranker: dict[str, Any], redis_client: Any
) -> None:
    # Given an engine whose batch (6 rows) closes long after the three requests arrive
    engine = start(engines, ranker, max_batch=6, max_wait_ms=5000)
    assert engine.batchable is True
    sink = ResponseWriter(redis_client)
    rows = {
        "a": np.arange(4, dtype=np.float32).reshape(1, 4),
        "b": np.arange(8, dtype=np.float32).reshape(2, 4) * 10,
        "c": -np.ones((3, 4), dtype=np.float32),
    }
    # (c billed with its final event, as a worker does: its share of the run's time)
    sink.bill_with_final("c", lambda r: billed(r, "c"))
    # When they are submitted together (six rows: the batch is full at once)
    handles = {rid: engine.submit(infer_request(rid, x), sink) for rid, x in rows.items()}
    results = {rid: h.wait(10) for rid, h in handles.items()}
    # Then one session run served them all, and each got exactly its rows back
    assert engine.runs == 1
    for rid, x in rows.items():
        result = results[rid]
        assert result is not None
        assert result.finish_reason == "stop"
        assert (result.prompt_tokens, result.completion_tokens) == (0, 0)
        stream = events(redis_client, rid)
        assert [e["type"] for e in stream] == ["tensors", "done"]
        assert stream[0]["batch_requests"] == "3"
        got = outputs_of(stream[0])
        np.testing.assert_array_equal(got["shifted"], x + 1.5)
        np.testing.assert_array_equal(got["score"], (x + 1.5).sum(axis=1))
    # And the run's compute time is shared by rows: 1 : 2 : 3
    shares = [results[rid].compute_s for rid in "abc"]  # type: ignore[union-attr]
    assert shares[1] == pytest.approx(2 * shares[0])
    assert shares[2] == pytest.approx(3 * shares[0])
    assert sink.billing_outcome("c") is True
    ((_, usage),) = redis_client.xrange(USAGE_STREAM)
    assert (usage["request_id"], usage["compute_ms"]) == ("c", str(round(shares[2] * 1e6)))


def test_requested_outputs_only(
    engines: list[TensorEngine], ranker: dict[str, Any], redis_client: Any
) -> None:
    engine = start(engines, ranker, max_wait_ms=1)
    x = np.ones((2, 4), dtype=np.float32)
    result = engine.submit(
        infer_request("only", x, outputs=("score",)), ResponseWriter(redis_client)
    ).wait(10)
    assert result is not None and result.finish_reason == "stop"
    got = outputs_of(events(redis_client, "only")[0])
    assert list(got) == ["score"]
    np.testing.assert_array_equal(got["score"], np.array([10.0, 10.0], dtype=np.float32))


def test_a_graph_with_a_fixed_batch_runs_each_request_alone(
    engines: list[TensorEngine], store: Path, redis_client: Any
) -> None:
    fixed = tensor_artifact(store, offset=2.0, static_batch=1, name="fixed")
    engine = start(engines, fixed, max_batch=64, max_wait_ms=200)
    assert engine.batchable is False
    sink = ResponseWriter(redis_client)
    handles = [
        engine.submit(infer_request(f"f{i}", np.full((1, 4), i, dtype=np.float32)), sink)
        for i in range(3)
    ]
    assert all(h.wait(10) is not None for h in handles)
    assert engine.runs == 3
    for i in range(3):
        got = outputs_of(events(redis_client, f"f{i}")[0])
        np.testing.assert_array_equal(got["score"], np.array([4 * (i + 2.0)], dtype=np.float32))


@pytest.mark.parametrize(
    ("inputs", "outputs", "message"),
    [
        (
            (tensor("feature", np.ones((1, 4), np.float32)),),
            (),
            "the model has no input 'feature'; its inputs are ['features']",
        ),
        ((), (), "input 'features' is missing"),
        (
            (tensor("features", np.ones((1, 4), np.int64), "INT64"),),
            (),
            "input 'features' must be FP32, not INT64",
        ),
        (
            (tensor("features", np.ones((1, 4), np.float32), "FP64"),),
            (),
            "input 'features' must be FP32, not FP64",
        ),
        (
            (tensor("features", np.ones((1, 3), np.float32)),),
            (),
            "input 'features': dimension 1 is 3, the model expects 4",
        ),
        (
            (tensor("features", np.ones((4,), np.float32)),),
            (),
            "input 'features' must have 2 dimensions, not 1",
        ),
        (
            (Tensor("features", "FP32", (2, 4), base64.b64encode(b"\0" * 16).decode()),),
            (),
            "input 'features': shape [2, 4] needs 8 elements, data holds 4",
        ),
        (
            (Tensor("features", "BYTES", (1, 4), ""),),
            (),
            "input 'features': datatype 'BYTES' is not supported",
        ),
        (
            (tensor("features", np.ones((1, 4), np.float32)),),
            ("logits",),
            "the model has no output 'logits'; its outputs are ['shifted', 'score']",
        ),
    ],
)
def test_bad_tensors_are_refused_by_name_and_never_run(
    engines: list[TensorEngine],
    ranker: dict[str, Any],
    redis_client: Any,
    inputs: tuple[Tensor, ...],
    outputs: tuple[str, ...],
    message: str,
) -> None:
    engine = start(engines, ranker, max_wait_ms=1)
    request = infer_request("bad", np.zeros(0), inputs=inputs, outputs=outputs)
    result = engine.submit(request, ResponseWriter(redis_client)).wait(10)
    assert result is not None
    assert (result.finish_reason, result.error_code, result.error_message) == (
        "error",
        "invalid_request",
        message,
    )
    assert result.ran is False
    assert events(redis_client, "bad") == [
        {"type": "error", "code": "invalid_request", "message": message}
    ]
    assert engine.runs == 0


def test_a_request_past_its_deadline_is_not_run(
    engines: list[TensorEngine], ranker: dict[str, Any], redis_client: Any
) -> None:
    engine = start(engines, ranker, max_wait_ms=1)
    late = infer_request("late", np.ones((1, 4), np.float32), deadline=time.time() - 1)
    result = engine.submit(late, ResponseWriter(redis_client)).wait(10)
    assert result is not None and result.error_code == "deadline_exceeded"
    assert engine.runs == 0


def test_the_payload_round_trips_through_json(ranker: dict[str, Any]) -> None:
    request = infer_request("rt", np.ones((2, 4), np.float32), outputs=("score",))
    again = from_payload(InferRequest, json.loads(json.dumps(to_payload(request))))
    assert again == request
    assert isinstance(again.inputs[0], Tensor)


def test_serving_meters_requests_by_compute_time_and_no_tokens(
    ranker: dict[str, Any], redis_client: Any
) -> None:
    settings = WorkerSettings(
        broker_url="redis://unused",
        redis_url="redis://unused",
        pool="tensorpool",
        node="node-tensor",
        max_batch=8,
        max_prefill_tokens=4096,
        embed_max_batch=8,
        embed_max_wait_ms=1.0,
        concurrency=8,
        visibility_timeout_s=60,
        task_time_limit_s=60,
        tensor_max_batch=16,
        tensor_max_wait_ms=1.0,
    )
    runtime = WorkerRuntime(settings, redis_client)
    try:
        request = infer_request("served", np.ones((3, 4), np.float32), location=ranker["location"])
        outcome = runtime.serve_infer(request)
        assert (outcome.status, outcome.usage_emitted) == ("stop", True)
        assert [e["type"] for e in events(redis_client, "served")] == ["started", "tensors", "done"]
        ((_, fields),) = redis_client.xrange(USAGE_STREAM)
        usage = UsageEvent.from_fields(fields)
        assert (usage.request_id, usage.model_name, usage.status) == ("served", "ranker", "stop")
        assert (usage.input_tokens, usage.output_tokens) == (0, 0)
        assert outcome.result is not None and outcome.result.compute_s is not None
        # Billed in whole milliseconds rounded up: a sub-millisecond run is 1 ms, never 0.
        assert usage.compute_ms == max(1, math.ceil(outcome.result.compute_s * 1000)) >= 1
        # A second delivery of the same request runs nothing and bills nothing.
        assert runtime.serve_infer(request).status == "duplicate"
        assert redis_client.xlen(USAGE_STREAM) == 1
    finally:
        runtime.stop_engines()


def test_an_idle_version_is_unloaded_but_never_while_a_request_uses_it(
    ranker: dict[str, Any], redis_client: Any
) -> None:
    from workers.runtime.models import loaded_models

    settings = WorkerSettings(
        broker_url="redis://unused",
        redis_url="redis://unused",
        pool="tensorpool",
        node="node-evict",
        max_batch=8,
        max_prefill_tokens=4096,
        embed_max_batch=8,
        embed_max_wait_ms=1.0,
        concurrency=8,
        visibility_timeout_s=60,
        task_time_limit_s=60,
        tensor_max_wait_ms=1.0,
        engine_idle_s=60.0,
    )
    runtime = WorkerRuntime(settings, redis_client)
    try:
        first = infer_request("e1", np.ones((1, 4), np.float32), location=ranker["location"])
        assert runtime.serve_infer(first).status == "stop"
        version = first.model.version_id
        assert version in [m.ref.version_id for m in loaded_models()]
        later = time.monotonic() + 61
        # In use (a request between acquire and release): kept, however old.
        engine = runtime._acquire(first.model)
        assert runtime.evict_idle_engines(now=later + 3600) == []
        runtime._release(first.model)
        # Not yet idle long enough: kept.
        assert runtime.evict_idle_engines(now=time.monotonic() + 30) == []
        assert runtime.evict_idle_engines(now=later + 3600) == [version]
        assert runtime.stats().models_loaded == ()
        assert version not in [m.ref.version_id for m in loaded_models()]
        with pytest.raises(RuntimeError, match="is stopped"):
            engine.submit(first, ResponseWriter(redis_client))
        # The next request loads it again.
        again = infer_request("e2", np.ones((1, 4), np.float32), location=ranker["location"])
        assert runtime.serve_infer(again).status == "stop"
        assert runtime.stats().models_loaded == (version,)
    finally:
        runtime.stop_engines()


def billed(result: RequestResult, request_id: str) -> UsageEvent:
    """A usage event carrying the result's compute time (in microseconds, to compare)."""
    return dataclasses.replace(usage(request_id), compute_ms=round((result.compute_s or 0.0) * 1e6))
