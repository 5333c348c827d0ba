"""The open inference protocol (KServe / Triton v2, JSON) for tensor models, at /v2.

Its own wire types, errors and routes, over the same pipeline as /v1 (gateway.pipeline).
"""

from __future__ import annotations

import base64
import json
import logging
import math
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Annotated, Any

import numpy as np
from django.conf import settings
from django.http import HttpRequest, HttpResponse, HttpResponseBase
from django.urls import path, re_path
from django.views.decorators.csrf import csrf_exempt
from pydantic import BaseModel, ConfigDict, Field

from catalog.models import Model
from catalog.selectors import endpoint_spec, endpoints_visible_to
from catalog.specs import EndpointSpec
from core import metrics
from core.redis import get_async_redis
from gateway.backends import (
    DATABASE_DOWN,
    REDIS_DOWN,
    database_read,
    database_unavailable,
    forget_idle_redis_connections,
    redis_unavailable,
)
from gateway.errors import OpenAIError, internal_error, invalid
from gateway.pipeline import (
    admit,
    billing_identity,
    limits_for,
    model_ref,
    parse_request,
    request_id_of,
    require_method,
    result_of,
    send,
    settle,
)
from gateway.resolve import resolve
from workers import contract

logger = logging.getLogger(__name__)

View = Callable[..., Coroutine[Any, Any, HttpResponseBase]]

PLATFORM = "onnxruntime_onnx"  # what Triton calls an ONNX model served by ONNX Runtime
_UNSUPPORTED_PARAMETERS = (
    "binary_data",
    "binary_data_size",
    "binary_data_output",
    "shared_memory_region",
)


# --- request shapes ------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class V2Input(_Strict):
    name: str = Field(min_length=1, max_length=256)
    shape: list[Annotated[int, Field(ge=0)]] = Field(max_length=16)
    datatype: str = Field(min_length=1, max_length=16)
    parameters: dict[str, Any] | None = None
    data: Any


class V2Output(_Strict):
    name: str = Field(min_length=1, max_length=256)
    parameters: dict[str, Any] | None = None


class V2InferRequest(_Strict):
    id: str | None = Field(default=None, max_length=256)
    parameters: dict[str, Any] | None = None
    inputs: list[V2Input] = Field(min_length=1, max_length=64)
    outputs: list[V2Output] | None = Field(default=None, max_length=64)


# --- plumbing ------------------------------------------------------------------------------


def _json(body: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> HttpResponse:
    # Strict JSON: Python would write NaN / Infinity, which JSON has not and most parsers refuse.
    response = HttpResponse(
        json.dumps(body, allow_nan=False), status=status, content_type="application/json"
    )
    for name, value in (headers or {}).items():
        response[name] = value
    return response


def _error(exc: OpenAIError) -> HttpResponse:
    """The protocol's error object (`{"error": "<message>"}`), plus Mantle's code and param."""
    metrics.GATEWAY_REJECTIONS.labels(exc.code or exc.type).inc()
    body = {"error": exc.message, "code": exc.code, "param": exc.param}
    return _json(body, exc.status, exc.headers)


def v2_view(view: View) -> View:
    @csrf_exempt
    async def wrapper(request: HttpRequest, **kwargs: str) -> HttpResponseBase:
        metrics.INFLIGHT.inc()
        try:
            return await view(request, **kwargs)
        except OpenAIError as exc:
            return _error(exc)
        except REDIS_DOWN as exc:
            logger.warning("redis unreachable: %s", exc)
            await forget_idle_redis_connections()
            return _error(redis_unavailable())
        except DATABASE_DOWN as exc:
            logger.warning("database unreachable: %s", exc)
            return _error(database_unavailable())
        except Exception:
            # The traceback goes to the log under the request id, never to the client.
            logger.exception("unexpected error in %s", view.__name__)
            return _error(internal_error(request_id_of(request)))
        finally:
            metrics.INFLIGHT.dec()

    wrapper.__name__ = view.__name__
    wrapper.__doc__ = view.__doc__
    return wrapper


def _not_a_tensor_model(name: str, spec: EndpointSpec) -> OpenAIError:
    return OpenAIError(
        404,
        f"The model `{name}` is a {spec.kind} model; the v2 protocol serves tensor models. "
        "Call it through /v1.",
        param="model_name",
        code="model_not_supported",
    )


async def _tensor_spec(request: HttpRequest, name: str, version: str | None) -> Any:
    identity, spec = await resolve(request, name)
    assert spec is not None
    if spec.kind != Model.Kind.TENSOR:
        raise _not_a_tensor_model(name, spec)
    if version is not None and version != str(spec.version):
        raise OpenAIError(
            404,
            f"The model `{name}` serves version {spec.version}, not {version}.",
            param="model_version",
            code="model_version_not_found",
        )
    return identity, spec


def _dims(shape: Sequence[Any]) -> list[int]:
    return [d if isinstance(d, int) and d >= 0 else -1 for d in shape]


def _io_list(io: Mapping[str, Any], which: str) -> list[dict[str, Any]]:
    # By name: the manifest sits in a jsonb column, which keeps no key order.
    out = []
    for name, meta in sorted((io.get(which) or {}).items()):
        datatype = _DATATYPE_OF.get(str(meta.get("dtype")), "BYTES")
        out.append({"name": name, "datatype": datatype, "shape": _dims(meta.get("shape") or [])})
    return out


_DATATYPE_OF = {dtype: datatype for datatype, dtype in contract.V2_DATATYPES.items()}


# --- health and metadata -------------------------------------------------------------------


@v2_view
async def server_metadata(request: HttpRequest) -> HttpResponse:
    require_method(request, "GET")
    return _json({"name": "mantle", "version": "1", "extensions": []})


@v2_view
async def server_live(request: HttpRequest) -> HttpResponse:
    require_method(request, "GET")
    return _json({"live": True})


@v2_view
async def server_ready(request: HttpRequest) -> HttpResponse:
    require_method(request, "GET")
    return _json({"ready": True})


def _tensor_specs(organization_id: str) -> list[EndpointSpec]:
    return [
        endpoint_spec(e)
        for e in endpoints_visible_to(organization_id).filter(
            model_version__model__kind=Model.Kind.TENSOR
        )
    ]


@v2_view
async def model_list(request: HttpRequest) -> HttpResponse:
    """The tensor models this key may call (Triton's repository index, as a GET)."""
    require_method(request, "GET")
    identity, _ = await resolve(request, None)
    found = await database_read(_tensor_specs, identity.organization_id)
    models = [
        {"name": s.public_id, "version": str(s.version), "state": "READY" if s.active else "PAUSED"}
        for s in found
    ]
    return _json({"models": models})


@v2_view
async def model_metadata(
    request: HttpRequest, name: str, version: str | None = None
) -> HttpResponse:
    require_method(request, "GET")
    _, spec = await _tensor_spec(request, name, version)
    return _json(
        {
            "name": name,
            "versions": [str(spec.version)],
            "platform": PLATFORM,
            "inputs": _io_list(spec.io, "inputs"),
            "outputs": _io_list(spec.io, "outputs"),
        }
    )


@v2_view
async def model_ready(request: HttpRequest, name: str, version: str | None = None) -> HttpResponse:
    """200 when the endpoint is active and its pool has a live worker; otherwise 400."""
    require_method(request, "GET")
    try:
        _, spec = await _tensor_spec(request, name, version)
    except OpenAIError as exc:
        if exc.code != "endpoint_paused":
            raise
        return _json({"name": name, "ready": False, "reason": "the endpoint is paused"}, 400)
    horizon = time.time() - contract.HEARTBEAT_TTL_S
    live = await get_async_redis().zcount(contract.pool_live_key(spec.pool), horizon, "+inf")
    if not live:
        reason = f"no worker of pool `{spec.pool}` is serving right now"
        return _json({"name": name, "ready": False, "reason": reason}, 400)
    return _json({"name": name, "ready": True})


# --- inference -----------------------------------------------------------------------------


def _refuse_binary(parameters: Mapping[str, Any] | None, param: str) -> None:
    for key in _UNSUPPORTED_PARAMETERS:
        if parameters and parameters.get(key) not in (None, False):
            raise invalid(
                f"The parameter `{key}` is not supported: Mantle speaks the JSON form of the "
                "protocol only (no binary tensor data, no shared memory).",
                f"{param}.{key}",
            )


def _array(item: V2Input, index: int, meta: Mapping[str, Any] | None) -> np.ndarray:
    """The input's data as an array of its datatype, refused by name when anything disagrees."""
    where = f"inputs.{index}"
    dtype = contract.V2_DATATYPES.get(item.datatype)
    if dtype is None:
        raise invalid(
            f"Input `{item.name}`: datatype {item.datatype!r} is not supported; use one of "
            f"{sorted(contract.V2_DATATYPES)}.",
            f"{where}.datatype",
        )
    if meta is not None:
        expected = str(meta.get("dtype"))
        if expected != dtype:
            raise invalid(
                f"Input `{item.name}` must be {_DATATYPE_OF.get(expected, expected)}, "
                f"not {item.datatype}.",
                f"{where}.datatype",
            )
        model_shape = list(meta.get("shape") or [])
        if len(model_shape) != len(item.shape):
            raise invalid(
                f"Input `{item.name}` must have {len(model_shape)} dimensions "
                f"(shape {_dims(model_shape)}), not {len(item.shape)}.",
                f"{where}.shape",
            )
        for axis, (got, want) in enumerate(zip(item.shape, model_shape, strict=True)):
            if isinstance(want, int) and want >= 0 and got != want:
                raise invalid(
                    f"Input `{item.name}`: dimension {axis} must be {want}, not {got}.",
                    f"{where}.shape.{axis}",
                )
    try:
        raw = np.asarray(item.data)
    except (ValueError, TypeError) as exc:
        raise invalid(
            f"Input `{item.name}`: data must be a list of numbers (flat or nested, row-major).",
            f"{where}.data",
        ) from exc
    target = np.dtype(dtype)
    if not _fits(raw, target):
        raise invalid(
            f"Input `{item.name}`: data holds values that are not {item.datatype}.",
            f"{where}.data",
        )
    if target.kind == "f" and raw.size and not _finite_in(raw, target):
        # Else the cast makes them ±inf (1e39 as FP32), or JSON's 1e999 arrives as inf.
        raise invalid(
            f"Input `{item.name}`: data holds values outside the finite range of "
            f"{item.datatype} (±{np.finfo(target).max}).",
            f"{where}.data",
        )
    count = math.prod(item.shape)
    if raw.size != count:
        raise invalid(
            f"Input `{item.name}`: shape {item.shape} needs {count} values, data holds {raw.size}.",
            f"{where}.data",
        )
    return raw.astype(target).reshape(item.shape)


def _fits(raw: np.ndarray, target: np.dtype[Any]) -> bool:
    kind = raw.dtype.kind
    if raw.size == 0:
        return kind in "biuf"  # an empty list: numpy says float64
    if target.kind == "b":
        return kind == "b"
    if target.kind in "iu":
        if kind not in "iu":
            return False
        info = np.iinfo(target)
        return bool(info.min <= raw.min() and raw.max() <= info.max)
    return kind in "iuf"


def _finite_in(raw: np.ndarray, target: np.dtype[Any]) -> bool:
    """Whether every value is a finite number within the float dtype's range (NaN is not)."""
    limit = float(np.finfo(target).max)
    return bool(np.all(np.abs(raw.astype(np.float64)) <= limit))


def _tensors(
    body: V2InferRequest, spec: EndpointSpec
) -> tuple[tuple[contract.Tensor, ...], tuple[str, ...]]:
    inputs_meta: Mapping[str, Any] = spec.io.get("inputs") or {}
    outputs_meta: Mapping[str, Any] = spec.io.get("outputs") or {}
    _refuse_binary(body.parameters, "parameters")
    seen: set[str] = set()
    tensors = []
    for index, item in enumerate(body.inputs):
        _refuse_binary(item.parameters, f"inputs.{index}.parameters")
        if item.name in seen:
            raise invalid(f"Input `{item.name}` is given twice.", f"inputs.{index}.name")
        seen.add(item.name)
        if inputs_meta and item.name not in inputs_meta:
            raise invalid(
                f"The model has no input `{item.name}`; its inputs are {sorted(inputs_meta)}.",
                f"inputs.{index}.name",
            )
        array = _array(item, index, inputs_meta.get(item.name))
        data = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
        tensors.append(
            contract.Tensor(
                name=item.name,
                datatype=item.datatype,
                shape=tuple(item.shape),
                data=base64.b64encode(data).decode("ascii"),
            )
        )
    missing = [name for name in inputs_meta if name not in seen]
    if missing:
        raise invalid(f"Input `{missing[0]}` is missing.", "inputs")
    wanted = []
    for index, out in enumerate(body.outputs or ()):
        _refuse_binary(out.parameters, f"outputs.{index}.parameters")
        if outputs_meta and out.name not in outputs_meta:
            raise invalid(
                f"The model has no output `{out.name}`; its outputs are {sorted(outputs_meta)}.",
                f"outputs.{index}.name",
            )
        wanted.append(out.name)
    return tuple(tensors), tuple(wanted)


# JSON has no NaN or infinities: a model's non-finite outputs are written as these strings,
# as the protobuf JSON mapping (the protocol's gRPC form) writes them; numpy reads them back
# (np.asarray(data, dtype=np.float32)).
_NON_FINITE = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}


def output_values(values: np.ndarray) -> list[Any]:
    if values.dtype.kind != "f" or np.isfinite(values).all():
        return values.tolist()
    return [v if math.isfinite(v) else _NON_FINITE[str(v)] for v in values.tolist()]


def _decode_outputs(raw: str) -> list[dict[str, Any]]:
    outputs = []
    for item in json.loads(raw):
        dtype = np.dtype(contract.V2_DATATYPES[item["datatype"]]).newbyteorder("<")
        values = np.frombuffer(base64.b64decode(item["data"]), dtype=dtype)
        outputs.append(
            {
                "name": item["name"],
                "datatype": item["datatype"],
                "shape": item["shape"],
                "data": output_values(values),
            }
        )
    return outputs


@v2_view
async def model_infer(request: HttpRequest, name: str, version: str | None = None) -> HttpResponse:
    require_method(request, "POST")
    body = parse_request(request, V2InferRequest)
    identity, spec = await _tensor_spec(request, name, version)
    inputs, wanted = _tensors(body, spec)
    limits = limits_for(identity, spec)
    # No tokens: a tensor request takes one request from the RPM buckets and is billed
    # per request and per compute millisecond (the usage event's compute_ms). Its worst
    # case, reserved against the wallet, is one request computing until its deadline.
    request_id = request_id_of(request)
    budget_ms = int(settings.MANTLE_REQUEST_TIMEOUT_S * 1000)
    admission = await admit(
        limits,
        spec,
        identity.organization_id,
        0,
        0,
        request_id,
        requests=1,
        compute_ms=budget_ms,
    )
    started = time.monotonic()
    deadline = time.time() + settings.MANTLE_REQUEST_TIMEOUT_S
    payload = contract.InferRequest(
        request_id=request_id,
        model=model_ref(spec),
        identity=billing_identity(identity, spec),
        inputs=inputs,
        outputs=wanted,
        deadline=deadline,
        enqueued_at=time.time(),
    )
    ticket = await send(
        contract.TaskName.INFER,
        payload,
        spec=spec,
        request_id=request_id,
        deadline=deadline,
        # Never dispatched: nothing computed, nothing to pay.
        on_refused=lambda: settle(identity.organization_id, request_id, admission, 0, 0),
    )
    try:
        event = await result_of(ticket, contract.EVENT_TENSORS)
    finally:
        # Parked until the drain counts the worker's own figures: the time waited bounds
        # the compute from above, so the parked cost is never less than the real one.
        waited_ms = min(budget_ms, math.ceil((time.monotonic() - started) * 1000))
        await settle(
            identity.organization_id,
            request_id,
            admission,
            0,
            0,
            requests=1,
            compute_ms=waited_ms,
        )
    if event is None:
        raise OpenAIError(500, "The worker returned no outputs.", type_="server_error")
    outputs = _decode_outputs(event["outputs"])
    return _json(
        {
            "model_name": name,
            "model_version": str(spec.version),
            "id": body.id if body.id is not None else request_id,
            "outputs": outputs,
        },
        headers=admission.headers(),
    )


@v2_view
async def no_route(request: HttpRequest) -> HttpResponse:
    """Any other path under /v2: the protocol's 404, not Django's HTML page."""
    shown = request.path if len(request.path) <= 200 else f"{request.path[:200]}..."
    raise OpenAIError(
        404,
        f"No /v2 route matches `{shown}`. The routes are /v2/, /v2/health/live, "
        "/v2/health/ready, /v2/models and /v2/models/{name}[/versions/{version}]"
        "[/ready | /infer]; a model name holds no `/` (not even as %2F).",
        code="route_not_found",
    )


urlpatterns = [
    path("", server_metadata, name="v2-server"),
    path("health/live", server_live, name="v2-live"),
    path("health/ready", server_ready, name="v2-ready"),
    path("models", model_list, name="v2-models"),
    path("models/<str:name>", model_metadata, name="v2-model"),
    path("models/<str:name>/ready", model_ready, name="v2-model-ready"),
    path("models/<str:name>/infer", model_infer, name="v2-model-infer"),
    path("models/<str:name>/versions/<str:version>", model_metadata, name="v2-version"),
    path("models/<str:name>/versions/<str:version>/ready", model_ready, name="v2-version-ready"),
    path("models/<str:name>/versions/<str:version>/infer", model_infer, name="v2-version-infer"),
    # Last: whatever the others do not match, newlines included (`.` stops at one; Django
    # cannot reverse an inline `(?s)`).
    re_path(r"^[\s\S]*$", no_route, name="v2-no-route"),
]
