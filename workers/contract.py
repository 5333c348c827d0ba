"""The wire contract between the control plane and the workers: names, queues, payloads."""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

# This module is a leaf: the gateway imports it on every request and the workers
# import it at start-up, so it must never pull in Django, onnxruntime or Celery.

CONTRACT_VERSION = 1


class Queue(enum.StrEnum):
    """Celery queues. Work is split by who may run it and how long it takes.

    Inference runs on one queue per accelerator pool (`inference.<pool>`), so a
    pool's nodes only ever receive work for the models placed on that pool;
    compile jobs are long and need the export stack, so they get their own
    nodes; control and billing tasks touch the database and run Django-side.
    """

    CONTROL = "control"
    BILLING = "billing"
    COMPILE = "compile"


def inference_queue(pool: str) -> str:
    return f"inference.{pool}"


def priority_queue(pool: str) -> str:
    """The pool's queue for the priority tier and provisioned traffic: every node of the
    pool consumes it beside `inference_queue(pool)`, so such a request is taken by the next
    free task slot instead of waiting behind the default tier's backlog."""
    return f"inference.{pool}.priority"


class TaskName(enum.StrEnum):
    """Task names are part of the wire format: never rename one once shipped."""

    GENERATE = "mantle.inference.generate"
    EMBED = "mantle.inference.embed"
    INFER = "mantle.inference.infer"
    COMPILE_MODEL = "mantle.compile.model"
    COMPILE_FINISHED = "mantle.control.compile_finished"
    # The compile pipeline (workers/compile/tasks.py) and its progress reports,
    # handled Django-side (catalog/tasks.py). COMPILE_MODEL above was never consumed.
    COMPILE_RUN = "mantle.compile.run"
    COMPILE_STEP = "mantle.control.compile_step"


class Runtime(enum.StrEnum):
    """How a worker executes a model version."""

    CAUSAL_LM = "onnx-causal-lm"
    ENCODER = "onnx-encoder"
    ECHO = "echo"  # zero-compute: replays the prompt; measures platform overhead
    TENSOR = "onnx-tensor"  # any ONNX graph, named tensors in and out (the v2 protocol)
    # No artifact: a model served only by upstream providers (the gateway's relay,
    # docs/providers.md). No worker ever runs it.
    UPSTREAM = "upstream"


class FinishReason(enum.StrEnum):
    STOP = "stop"
    LENGTH = "length"
    CANCELLED = "cancelled"
    ERROR = "error"


# --- Redis keys shared by the gateway and the workers -------------------------


def response_stream_key(request_id: str) -> str:
    """Stream of events for one request, written by the worker, read by the gateway."""
    return f"mantle:resp:{request_id}"


def cancel_key(request_id: str) -> str:
    """Set by the gateway when the client went away; the worker stops generating."""
    return f"mantle:cancel:{request_id}"


# Appends a usage event unless one was appended for its request id: KEYS[1] the guard
# (`usage_emitted_key`), KEYS[2] the usage stream; ARGV[1] the guard's TTL, then the
# event's field/value pairs. Shared by the workers and the gateway's provider relay, so
# a request is metered once whoever emits it.
EMIT_USAGE_LUA = """
if redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then
  return redis.call('XADD', KEYS[2], '*', unpack(ARGV, 2))
end
return false
"""
USAGE_GUARD_TTL_S = 7 * 24 * 3600


def usage_emitted_key(request_id: str) -> str:
    """Guard that makes the usage event of a request be written at most once."""
    return f"mantle:usage:emitted:{request_id}"


def task_claim_key(request_id: str) -> str:
    """First worker to claim a request runs it; a redelivered copy is dropped."""
    return f"mantle:claim:{request_id}"


USAGE_STREAM = "mantle:usage"
"""Durable stream of usage events (one per finished request), drained by billing."""

POOL_LIVE_PREFIX = "mantle:pool-live:"
"""Sorted set per pool: member = worker node id, score = unix time of last heartbeat."""

WORKER_INFO_PREFIX = "mantle:worker:"
"""String key per worker node (JSON `WorkerHeartbeat`), expires when heartbeats stop."""

HEARTBEAT_INTERVAL_S = 2.0
HEARTBEAT_TTL_S = 10.0
"""A worker whose last heartbeat is older than this is dead for admission."""

RESPONSE_STREAM_TTL_S = 300
RESPONSE_STREAM_DONE_TTL_S = 30
"""After its final event a stream lives this long: the gateway has read it by then
(it reads as events arrive), so it is left to expire rather than deleted per request."""

BATCH_STREAM_DONE_TTL_S = 900
"""A batch line's stream lives this long after its final event: a batch runner that died
after the worker finished and before it stored the line reads the answer again from it
(the same request id; the worker never runs or bills it twice)."""


class ServiceClass(enum.StrEnum):
    """The class of work a request belongs to. Online traffic comes in three service
    tiers (OpenAI's `service_tier`, docs/service_tiers.md): `online` is the default tier,
    `priority` is admitted first and priced at a premium, `flex` is admitted last, priced
    at a discount, and refused with a 429 when it cannot start before its queue deadline.
    `provisioned` is traffic within an organization's provisioned throughput units
    (docs/provisioned.md): admitted first like `priority`, billed per unit-hour rather than
    per token. A batch line runs on what online traffic leaves idle (docs/batches.md) and is
    billed at batch prices. Any value a node does not know is served as `online`."""

    ONLINE = "online"
    PRIORITY = "priority"
    FLEX = "flex"
    PROVISIONED = "provisioned"
    BATCH = "batch"


SERVICE_TIERS: dict[str, ServiceClass] = {
    "default": ServiceClass.ONLINE,
    "priority": ServiceClass.PRIORITY,
    "flex": ServiceClass.FLEX,
}
"""OpenAI's `service_tier` values (besides `auto`) and the class each runs as."""


def tier_of(service_class: str) -> str:
    """The `service_tier` a response reports for a request of `service_class`
    (provisioned traffic reports `scale`, OpenAI's name for its provisioned Scale Tier)."""
    if service_class in (ServiceClass.PRIORITY, ServiceClass.FLEX):
        return str(service_class)
    if service_class == ServiceClass.PROVISIONED:
        return "scale"
    return "default"


def pool_live_key(pool: str) -> str:
    return f"{POOL_LIVE_PREFIX}{pool}"


def worker_info_key(node: str) -> str:
    return f"{WORKER_INFO_PREFIX}{node}"


# --- Events on the response stream ---------------------------------------------
# Every entry of `mantle:resp:<request_id>` is a flat string map with a field
# "type"; the other fields by type:
#   started:    worker (node id), pool
#   delta:      text (decoded text since the last delta), tokens (count); with n > 1
#               index (the choice); when logprobs were asked for, logprobs (a JSON list,
#               one entry per token since the last delta: `logprob_entry`)
#   prompt_logprobs: logprobs (JSON list of entries for the prompt's tokens, the first
#               null), sent once before the first delta when asked for
#   choice_done: index, finish_reason, completion_tokens: one choice of n > 1 ended
#   done:       finish_reason, prompt_tokens, completion_tokens (with n > 1: every
#               choice's tokens together; finish_reason is choice 0's), cached_tokens
#               (the prompt tokens served from the prefix cache; absent when none)
#   embeddings: data (base64 of little-endian float32, row-major), count, dims,
#               prompt_tokens
#   error:      code, message
#   tensors:    outputs (JSON list of {name, datatype, shape, data: base64 of
#               little-endian row-major bytes}), batch_requests (how many requests
#               shared the session run); always followed by `done` in the same flush
EVENT_STARTED = "started"
EVENT_DELTA = "delta"
EVENT_DONE = "done"
EVENT_EMBEDDINGS = "embeddings"
EVENT_ERROR = "error"
EVENT_TENSORS = "tensors"
EVENT_PROMPT_LOGPROBS = "prompt_logprobs"
EVENT_CHOICE_DONE = "choice_done"
FINAL_EVENTS = frozenset({EVENT_DONE, EVENT_ERROR, EVENT_EMBEDDINGS})
"""The events that end a request's stream: nothing follows one of them."""

MAX_CHOICES = 8
"""The most choices (`n`) one request may ask for."""
MAX_TOP_LOGPROBS = 20
"""The most alternatives per token (chat's top_logprobs); completions' integer logprobs: 5."""


def logprob_entry(
    token: str, token_bytes: bytes, logprob: float, top: list[tuple[str, bytes, float]]
) -> list[Any]:
    """One token's log probability on the wire: [token, bytes, logprob, [[token, bytes,
    logprob], ...]] (bytes as a list of ints: a token may be part of a character)."""
    return [
        token,
        list(token_bytes),
        logprob,
        [[t, list(b), lp] for t, b, lp in top],
    ]


# --- Tensors of the open inference protocol (KServe / Triton v2) ----------------

V2_DATATYPES: dict[str, str] = {
    "BOOL": "bool",
    "UINT8": "uint8",
    "UINT16": "uint16",
    "UINT32": "uint32",
    "UINT64": "uint64",
    "INT8": "int8",
    "INT16": "int16",
    "INT32": "int32",
    "INT64": "int64",
    "FP16": "float16",
    "FP32": "float32",
    "FP64": "float64",
}
"""v2 datatype -> numpy dtype name (the names manifests use in `io`). BYTES is not served."""


# --- Payloads --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BillingIdentity:
    organization_id: str
    project_id: str
    api_key_id: str
    endpoint_id: str
    model_version_id: str
    model_name: str


@dataclass(frozen=True, slots=True)
class ModelRef:
    """Enough for a worker to load a model version without asking the control plane."""

    version_id: str
    runtime: str  # a `Runtime` value
    sha256: str
    location: str  # artifact directory (a path on the node; later an fsspec URL)
    providers: tuple[str, ...] = ("CPUExecutionProvider",)


@dataclass(frozen=True, slots=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    # OpenAI's penalties on the logits of tokens already generated: count x frequency,
    # plus presence once a token has appeared (workers/engine/sampling.py).
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    # Added to a token's logit before every choice (OpenAI's -100..100): (token id, bias).
    logit_bias: tuple[tuple[int, float], ...] = ()
    # Choices generated from one prefill of the prompt; choice i > 0 draws from its own
    # generator seeded (seed, i), so a seeded request is reproducible whatever n is.
    n: int = 1
    # -1: no log probabilities; k >= 0: each generated token's, with the k likeliest
    # alternatives (chat's top_logprobs, completions' integer logprobs).
    logprobs: int = -1
    # -1: none; k >= 0: the prompt's own tokens scored too (completions' echo + logprobs).
    prompt_logprobs: int = -1
    # An llguidance grammar (workers/grammar.py) every choice must follow token by token
    # (response_format, forced tool calls); "" leaves decoding free.
    grammar: str = ""


@dataclass(frozen=True, slots=True)
class GenerateRequest:
    request_id: str
    model: ModelRef
    identity: BillingIdentity
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams
    deadline: float  # unix time after which the result is useless to the client
    enqueued_at: float = 0.0
    service_class: str = ServiceClass.ONLINE.value


@dataclass(frozen=True, slots=True)
class EmbedRequest:
    request_id: str
    model: ModelRef
    identity: BillingIdentity
    inputs: tuple[tuple[int, ...], ...]  # token ids, already truncated by the gateway
    deadline: float
    enqueued_at: float = 0.0
    service_class: str = ServiceClass.ONLINE.value


@dataclass(frozen=True, slots=True)
class Tensor:
    """One named tensor: raw bytes travel base64-encoded, never as JSON number lists."""

    name: str
    datatype: str  # a key of V2_DATATYPES
    shape: tuple[int, ...]
    data: str  # base64 of the little-endian, row-major bytes


@dataclass(frozen=True, slots=True)
class InferRequest:
    """A v2 inference request for a tensor model (`Runtime.TENSOR`)."""

    request_id: str
    model: ModelRef
    identity: BillingIdentity
    inputs: tuple[Tensor, ...]  # checked against the model's inputs by the gateway
    outputs: tuple[str, ...]  # names of the outputs to return; empty: all of them
    deadline: float
    enqueued_at: float = 0.0


@dataclass(frozen=True, slots=True)
class UsageEvent:
    request_id: str
    organization_id: str
    project_id: str
    api_key_id: str
    endpoint_id: str
    model_version_id: str
    model_name: str
    input_tokens: int
    output_tokens: int
    status: str  # a `FinishReason` value
    started_at: float
    finished_at: float
    queue_ms: int
    compute_ms: int
    worker: str = ""
    # Prompt tokens whose KV blocks the prefix cache already held: a subset of input_tokens
    # (never more), billed at the cached input price. Last, with a default, so events of a
    # worker that predates it (and positional UsageEvent(*values)) still read.
    cached_input_tokens: int = 0
    # A `ServiceClass` value: batch lines are billed at the model's batch prices. Last,
    # with a default, for the same reason.
    service_class: str = ServiceClass.ONLINE.value
    # A request relayed to an upstream provider (docs/providers.md): 1 when the provider
    # returned no usage and the counts are the gateway's estimate with the model's
    # tokenizer; `cost_nanos` is what the provider charges for it (cost of goods, nanos of
    # the currency), and `provider_id` the provider that served it. Last, with defaults.
    estimated: int = 0
    cost_nanos: int = 0
    provider_id: str = ""

    def to_fields(self) -> dict[str, str]:
        return {k: str(v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_fields(cls, fields: Mapping[str, str]) -> UsageEvent:
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = fields.get(f.name, "")
            if f.type in ("int", int):
                kwargs[f.name] = int(raw or 0)
            elif f.type in ("float", float):
                kwargs[f.name] = float(raw or 0)
            else:
                kwargs[f.name] = raw
        return cls(**kwargs)


@dataclass(frozen=True, slots=True)
class WorkerHeartbeat:
    node: str
    pool: str
    providers: tuple[str, ...]
    models_loaded: tuple[str, ...]
    free_slots: int
    total_slots: int
    tokens_per_s: float
    sent_at: float
    queues: tuple[str, ...] = field(default_factory=tuple)
    # Batch lines running on the node, and how many it would take now: what online
    # traffic leaves it (the batch runners pace themselves by the pool's sum).
    batch_in_flight: int = 0
    batch_capacity: int = 0


class CompileSource(enum.StrEnum):
    """What a compile job starts from."""

    ONNX = "onnx"  # an ONNX graph (uploaded), with its external data and tokenizer beside it
    HF_CHECKPOINT = "hf-checkpoint"  # a Hugging Face-format checkpoint directory


class CompileStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class CompileRequest:
    """One compile job, as the control plane hands it to a compile node (`mantle.compile.run`).

    `source_path` is a directory on the node (a staged upload, or a checkpoint
    already on the node's disk). Staged uploads belong to the job and are
    deleted when it ends (`delete_source`); a checkpoint directory never is.
    """

    job_id: str
    organization_id: str
    model_name: str
    kind: str  # chat | completion | embedding | tensor
    source: str  # a `CompileSource` value
    source_path: str
    model_file: str = "model.onnx"  # ONNX sources: the graph's file inside source_path
    delete_source: bool = False
    quantize: str = ""  # "" (none) | "int8" | "int4" (4-bit weights, causal LMs only)
    optimization: str = "basic"  # none | basic | extended (ORT offline graph optimization)
    tolerance: float | None = None  # the parity gate; None: the pipeline's default for the kind
    store: str = ""  # artifact store (directory or fsspec URL); "": the node's default


@dataclass(frozen=True, slots=True)
class CompileProgress:
    """`mantle.control.compile_step`: every step so far (a JSON object per step), in order.

    `seq` grows with every report of one run: the control queue may deliver
    reports out of order, and an older one must not overwrite a newer one.
    Step keys: name, status, started_at, finished_at, duration_s, log, metrics.
    """

    job_id: str
    seq: int
    steps: tuple[dict[str, Any], ...]


@dataclass(frozen=True, slots=True)
class CompileOutcome:
    """`mantle.control.compile_finished`: the job's end, the final list of steps included."""

    job_id: str
    status: str  # a `CompileStatus` value: succeeded | failed
    steps: tuple[dict[str, Any], ...]
    manifest: dict[str, Any] | None = None  # the artifact's manifest plus "location"
    error: str = ""  # what went wrong, in words a user can act on
    error_code: str = ""  # invalid_model | unsupported_operator | quality_gate_failed | ...


_T = TypeVar("_T")


def to_payload(obj: Any) -> dict[str, Any]:
    """A payload dataclass as JSON-safe primitives (tuples become lists)."""
    return dataclasses.asdict(obj)


def from_payload(cls: type[_T], data: Mapping[str, Any]) -> _T:
    """Rebuild a payload dataclass (nested ones included) from `to_payload` output."""
    return _build(cls, data)


def _build(cls: Any, data: Any) -> Any:
    if not dataclasses.is_dataclass(cls):
        return data
    hints = _resolved_types(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value = data[f.name]
        hint = hints[f.name]
        if hint in _PAYLOAD_CLASSES:
            value = _build(_PAYLOAD_CLASSES[hint], value)
        elif hint.removeprefix("tuple[").removesuffix(", ...]") in _PAYLOAD_CLASSES:
            item_cls = _PAYLOAD_CLASSES[hint.removeprefix("tuple[").removesuffix(", ...]")]
            value = tuple(_build(item_cls, v) for v in value)
        elif hint.startswith("tuple[tuple["):
            value = tuple(tuple(v) for v in value)
        elif hint.startswith("tuple[") and value is not None:
            value = tuple(value)
        kwargs[f.name] = value
    built: Any = cls
    return built(**kwargs)


def _resolved_types(cls: Any) -> dict[str, str]:
    return {f.name: str(f.type) for f in dataclasses.fields(cls)}


_PAYLOAD_CLASSES: dict[str, type] = {
    "BillingIdentity": BillingIdentity,
    "ModelRef": ModelRef,
    "SamplingParams": SamplingParams,
    "Tensor": Tensor,
}
