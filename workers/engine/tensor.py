"""Any ONNX graph behind the v2 protocol: named tensors in and out, dynamically batched."""

from __future__ import annotations

import base64
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, cast

import numpy as np

from workers.contract import V2_DATATYPES, FinishReason, InferRequest, Tensor
from workers.engine.base import EventSink, RequestHandle, RequestResult
from workers.engine.batching import DynamicBatcher, Pending

if TYPE_CHECKING:
    from workers.runtime.models import LoadedModel

logger = logging.getLogger(__name__)

# ONNX Runtime's type strings for the numpy dtypes the v2 protocol can carry.
_ORT_TYPES = {
    "tensor(bool)": "bool",
    "tensor(uint8)": "uint8",
    "tensor(uint16)": "uint16",
    "tensor(uint32)": "uint32",
    "tensor(uint64)": "uint64",
    "tensor(int8)": "int8",
    "tensor(int16)": "int16",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(float16)": "float16",
    "tensor(float)": "float32",
    "tensor(double)": "float64",
}
_DATATYPE_OF = {dtype: datatype for datatype, dtype in V2_DATATYPES.items()}
_MAX_ERROR_CHARS = 500


class TensorSession(Protocol):
    """The part of `onnxruntime.InferenceSession` the engine uses."""

    def run(self, output_names: Sequence[str] | None, input_feed: Mapping[str, Any]) -> list[Any]:
        """Runs the graph."""

    def get_inputs(self) -> Sequence[Any]:
        """NodeArgs with name, type and shape."""

    def get_outputs(self) -> Sequence[Any]:
        """NodeArgs with name, type and shape."""


class TensorSink(EventSink, Protocol):
    def tensors(
        self,
        request_id: str,
        outputs: Sequence[tuple[str, str, tuple[int, ...], bytes]],
        batch_requests: int,
    ) -> None: ...


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One input or output of the graph: numpy dtype name (None: not servable) and shape."""

    name: str
    dtype: str | None
    onnx_type: str
    shape: tuple[int | None, ...]  # None: a dynamic dimension

    @classmethod
    def from_node(cls, node: Any) -> TensorSpec:
        dims = tuple(d if isinstance(d, int) and d >= 0 else None for d in (node.shape or ()))
        return cls(
            name=str(node.name), dtype=_ORT_TYPES.get(node.type), onnx_type=node.type, shape=dims
        )

    @property
    def datatype(self) -> str:
        return _DATATYPE_OF.get(self.dtype or "", "BYTES")


class InvalidTensors(ValueError):
    """The request's tensors do not fit the graph; the message names what is wrong."""


class _Pending(Pending):
    __slots__ = ("compute_s", "feeds", "outputs", "rows", "signature")

    def __init__(
        self,
        request: InferRequest,
        sink: EventSink,
        feeds: dict[str, np.ndarray],
        outputs: tuple[str, ...],
        rows: int,
        weight: int,
        signature: tuple[Any, ...],
    ) -> None:
        super().__init__(request, sink, weight)
        self.feeds = feeds
        self.outputs = outputs
        self.rows = rows
        self.signature = signature
        self.compute_s = 0.0


class TensorEngine(DynamicBatcher[_Pending]):
    """Runs a tensor model's requests, stacking compatible ones along the batch dimension.

    A graph is batchable when every input and output has a dynamic first
    dimension: requests whose inputs agree on everything but that dimension
    are concatenated into one run, and the outputs are cut back by rows.
    Otherwise every request runs alone. `max_batch` counts rows; compute time
    of a shared run is split between its requests by their rows.
    """

    def __init__(
        self,
        session: TensorSession,
        *,
        name: str = "tensor",
        max_batch: int = 64,
        max_wait_ms: float = 5.0,
    ) -> None:
        super().__init__(name=name, max_batch=max_batch, max_wait_ms=max_wait_ms)
        self._session = session
        self.inputs = {s.name: s for s in map(TensorSpec.from_node, session.get_inputs())}
        self.outputs = {s.name: s for s in map(TensorSpec.from_node, session.get_outputs())}
        self._output_names = list(self.outputs)
        self.batchable = all(
            spec.shape and spec.shape[0] is None
            for spec in (*self.inputs.values(), *self.outputs.values())
        )

    @classmethod
    def from_model(cls, model: LoadedModel, *, max_batch: int, max_wait_ms: float) -> TensorEngine:
        return cls(
            model.session, name=model.ref.version_id, max_batch=max_batch, max_wait_ms=max_wait_ms
        )

    def start(self) -> TensorEngine:
        super().start()
        return self

    def submit(self, request: InferRequest, sink: EventSink) -> RequestHandle:
        """Queues the request; `sink` must also take `tensors` events (ResponseWriter does)."""
        try:
            feeds, outputs, rows = self.check(request)
        except InvalidTensors as exc:
            pending = _Pending(request, sink, {}, (), 0, 1, ())
            return self._refuse(pending, "invalid_request", str(exc))
        if self.batchable:
            signature: tuple[Any, ...] = tuple(
                (name, array.dtype.str, array.shape[1:]) for name, array in sorted(feeds.items())
            )
            weight = max(1, rows)
        else:
            # A weight of a whole batch: it neither joins nor is joined.
            signature, weight = (request.request_id,), self.max_batch
        return self._enqueue(_Pending(request, sink, feeds, outputs, rows, weight, signature))

    def check(self, request: InferRequest) -> tuple[dict[str, np.ndarray], tuple[str, ...], int]:
        """The request's inputs as arrays, the outputs it wants, and its rows (batch dimension)."""
        given = [t.name for t in request.inputs]
        duplicate = next((n for n in given if given.count(n) > 1), None)
        if duplicate is not None:
            raise InvalidTensors(f"input {duplicate!r} is given more than once")
        unknown = next((n for n in given if n not in self.inputs), None)
        if unknown is not None:
            raise InvalidTensors(
                f"the model has no input {unknown!r}; its inputs are {sorted(self.inputs)}"
            )
        missing = next((n for n in self.inputs if n not in given), None)
        if missing is not None:
            raise InvalidTensors(f"input {missing!r} is missing")
        feeds: dict[str, np.ndarray] = {}
        for tensor in request.inputs:
            spec = self.inputs[tensor.name]
            feeds[tensor.name] = _decode(tensor, spec)
        rows = 0
        if self.batchable:
            counts = {array.shape[0] for array in feeds.values()}
            if len(counts) > 1:
                raise InvalidTensors(
                    f"inputs disagree on the batch dimension (first dimension): {sorted(counts)}"
                )
            rows = counts.pop() if counts else 0
        wanted = tuple(request.outputs) or tuple(self._output_names)
        for name in wanted:
            spec_out = self.outputs.get(name)
            if spec_out is None:
                raise InvalidTensors(
                    f"the model has no output {name!r}; its outputs are {self._output_names}"
                )
            if spec_out.dtype is None:
                raise InvalidTensors(f"output {name!r} is {spec_out.onnx_type}, not servable")
        return feeds, wanted, rows

    # --- the engine thread ----------------------------------------------------------

    def _run(self, batch: list[_Pending]) -> None:
        live = self._live(batch)
        groups: dict[tuple[Any, ...], list[_Pending]] = {}
        for pending in live:
            groups.setdefault(pending.signature, []).append(pending)
        for group in groups.values():
            self._run_group(group)

    def _run_group(self, group: list[_Pending]) -> None:
        started = time.time()
        if len(group) == 1:
            feeds = group[0].feeds
        else:
            feeds = {
                name: np.concatenate([p.feeds[name] for p in group], axis=0)
                for name in group[0].feeds
            }
        try:
            results = self._session.run(self._output_names, feeds)
            self.runs += 1
        except Exception as exc:
            if len(group) > 1:
                # One bad request must not fail its neighbours: run each alone.
                logger.warning("tensor %s: batched run failed, retrying one by one", self.name)
                for pending in group:
                    self._run_group([pending])
                return
            logger.info("tensor %s: run failed: %s", self.name, exc)
            message = f"the model could not run on this input: {exc}"[:_MAX_ERROR_CHARS]
            self._fail(group, "invalid_request", message)
            return
        elapsed = time.time() - started
        arrays = {
            name: np.asarray(value) for name, value in zip(self._output_names, results, strict=True)
        }
        total = sum(p.rows for p in group)
        if len(group) > 1 and any(a.ndim == 0 or a.shape[0] != total for a in arrays.values()):
            # The graph's first dimension is not really the batch: stop stacking.
            logger.warning("tensor %s: outputs do not follow the batch; batching off", self.name)
            self.batchable = False
            for pending in group:
                self._run_group([pending])
            return
        answered = [p for p in group if p.handle.claim()]
        offset = 0
        offsets = {}
        for pending in group:
            offsets[id(pending)] = offset
            offset += pending.rows
        finished = []
        for pending in answered:
            start = offsets[id(pending)]
            pending.compute_s = elapsed * (pending.rows / total if total else 1.0 / len(group))
            out = []
            for name in pending.outputs:
                value = arrays[name]
                if len(group) > 1:
                    value = value[start : start + pending.rows]
                dtype = self.outputs[name].dtype or str(value.dtype)
                data = np.ascontiguousarray(value, dtype=np.dtype(dtype).newbyteorder("<"))
                out.append((name, _DATATYPE_OF[dtype], tuple(data.shape), data.tobytes()))
            rid = pending.request.request_id
            sink = cast(TensorSink, pending.sink)
            sink.tensors(rid, out, len(group))
            result = self._result(pending, FinishReason.STOP, started, "", "")
            sink.done(rid, FinishReason.STOP.value, 0, 0, result=result)
            finished.append((pending, result))
        self._flush_and_complete(finished)

    def _result(
        self, pending: _Pending, reason: FinishReason, started: float, code: str, message: str
    ) -> RequestResult:
        return RequestResult(
            finish_reason=reason.value,
            prompt_tokens=0,
            completion_tokens=0,
            admitted_at=started,
            finished_at=time.time(),
            error_code=code,
            error_message=message,
            compute_s=pending.compute_s if started else None,
        )


def _decode(tensor: Tensor, spec: TensorSpec) -> np.ndarray:
    name, datatype, shape = tensor.name, tensor.datatype, tensor.shape
    dtype = V2_DATATYPES.get(datatype)
    if dtype is None:
        raise InvalidTensors(f"input {name!r}: datatype {datatype!r} is not supported")
    if spec.dtype is None:
        raise InvalidTensors(f"input {name!r} is {spec.onnx_type}, which the v2 API cannot feed")
    if dtype != spec.dtype:
        raise InvalidTensors(f"input {name!r} must be {_DATATYPE_OF[spec.dtype]}, not {datatype}")
    if len(shape) != len(spec.shape):
        raise InvalidTensors(
            f"input {name!r} must have {len(spec.shape)} dimensions, not {len(shape)}"
        )
    for axis, (got, want) in enumerate(zip(shape, spec.shape, strict=True)):
        if got < 0 or (want is not None and got != want):
            raise InvalidTensors(
                f"input {name!r}: dimension {axis} is {got}, the model expects "
                f"{want if want is not None else 'a size >= 0'}"
            )
    try:
        raw = base64.b64decode(tensor.data, validate=True)
    except ValueError as exc:
        raise InvalidTensors(f"input {name!r}: data is not valid base64") from exc
    array = np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<"))
    count = int(np.prod(shape, dtype=np.int64))
    if array.size != count:
        raise InvalidTensors(
            f"input {name!r}: shape {list(shape)} needs {count} elements, data holds {array.size}"
        )
    return array.reshape(tuple(shape)).astype(np.dtype(dtype), copy=False)
