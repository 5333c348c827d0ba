"""Serving a request on this node: claim it, run it on its model's engine, account for it."""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from workers import metrics
from workers.contract import (
    BATCH_STREAM_DONE_TTL_S,
    EVENT_DELTA,
    FINAL_EVENTS,
    BillingIdentity,
    EmbedRequest,
    FinishReason,
    GenerateRequest,
    InferRequest,
    ModelRef,
    Runtime,
    ServiceClass,
    UsageEvent,
    cancel_key,
    response_stream_key,
    task_claim_key,
    usage_emitted_key,
    worker_info_key,
)
from workers.engine.base import EventSink, RequestHandle, RequestResult
from workers.engine.priority import OnlineActivity, batch_row_limit, is_batch
from workers.heartbeat import NodeStats
from workers.settings import WorkerSettings
from workers.streams import ResponseWriter, emit_usage_durably, waive_usage

if TYPE_CHECKING:
    import redis

logger = logging.getLogger(__name__)

CLAIM_TTL_S = 24 * 3600
"""Longer than the broker's visibility timeout, so every redelivered copy finds the claim."""

CRASH_ENV = "MANTLE_WORKER_CRASH_AT"
CRASH_POINTS = ("before_claim", "after_claim")
"""Test hook: with MANTLE_WORKER_CRASH_AT set to one of these, the worker process exits at
once (os._exit) at that point of its next request: taken from the broker, but not claimed
yet or claimed and nothing written. The fault tests use it; nothing else sets it."""
CRASH_AFTER_ANSWER = "after_answer"
"""The same hook, at the moment the engine has answered (the final event is in Redis) and
the task has not yet acknowledged its message: the request must be billed all the same."""

# Takes a claim over from a dead owner, only if that node wrote nothing for the
# request (no response stream) and nothing of it was billed (no usage guard).
_TAKE_OVER_LUA = """
if redis.call('get', KEYS[1]) ~= ARGV[1] then return 0 end
if redis.call('exists', KEYS[2]) == 1 or redis.call('exists', KEYS[3]) == 1 then return 0 end
redis.call('set', KEYS[1], ARGV[2], 'EX', ARGV[3])
return 1
"""

WAIT_GRACE_S = 30.0
"""How long past a request's deadline a task still waits for its engine before giving up."""

ONLINE_THREAD_SHARE = 0.25
"""The share of the node's task threads (Celery's -c) batch lines never take: a message is
held by its thread while it waits in an engine, so lines could otherwise leave online
requests sitting unseen in the broker."""


class _Engine(Protocol):
    name: str
    max_batch: int

    def submit(self, request: Any, sink: EventSink) -> RequestHandle: ...

    @property
    def free_slots(self) -> int: ...

    def tokens_per_s(self) -> float: ...

    def stop(self, timeout: float = ...) -> None: ...


class RequestRejected(Exception):
    """The request cannot run on this node (unknown runtime, artifact missing...)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a task did with a request (for logs and tests)."""

    status: str  # "duplicate", "expired", "cancelled-queued", "rejected", or a FinishReason value
    usage_emitted: bool = False
    result: RequestResult | None = None


class WorkerRuntime:
    """Everything one worker process shares: Redis, the stream writer, the engines."""

    def __init__(self, settings: WorkerSettings, client: redis.Redis) -> None:
        self.settings = settings
        self.redis = client
        self.writer = ResponseWriter(client)
        self._engines: dict[str, _Engine] = {}
        self._lock = threading.Lock()
        self._in_flight = 0
        self._batch_in_flight = 0  # of _in_flight, batch lines
        self._online = OnlineActivity()
        # Per model version: requests using its engine now, and when one last began.
        self._users: dict[str, int] = {}
        self._last_used: dict[str, float] = {}
        self.total_slots = settings.concurrency
        self._crash_at = os.environ.get(CRASH_ENV, "")
        points = (*CRASH_POINTS, CRASH_AFTER_ANSWER)
        if self._crash_at and self._crash_at not in points:
            raise ValueError(f"{CRASH_ENV} must be one of {points}")

    # --- engines ----------------------------------------------------------------

    def engine_for(self, ref: ModelRef) -> _Engine:
        engine = self._engines.get(ref.version_id)
        if engine is not None:
            return engine
        with self._lock:
            engine = self._engines.get(ref.version_id)
            if engine is None:
                engine = self._create_engine(ref)
                self._engines[ref.version_id] = engine
        return engine

    def _create_engine(self, ref: ModelRef) -> _Engine:
        # Engines import numpy/onnxruntime/tokenizers; keep them off the import
        # path of the Celery app so that `celery inspect` and friends stay light.
        from workers.engine.causal_lm import CausalLMEngine
        from workers.engine.echo import EchoEngine
        from workers.engine.encoder import EncoderEngine
        from workers.engine.tensor import TensorEngine
        from workers.runtime.models import ModelLoadError, load_model

        s = self.settings
        if ref.runtime == Runtime.ECHO:
            return EchoEngine.from_ref(ref)
        if ref.runtime not in (Runtime.CAUSAL_LM, Runtime.ENCODER, Runtime.TENSOR):
            raise RequestRejected("model_unavailable", f"unknown runtime {ref.runtime!r}")
        try:
            model = load_model(ref)
        except ModelLoadError as exc:
            logger.error("cannot load model version %s: %s", ref.version_id, exc)
            raise RequestRejected("model_unavailable", str(exc)) from exc
        if ref.runtime == Runtime.CAUSAL_LM:
            return CausalLMEngine.from_model(
                model,
                max_batch=s.max_batch,
                max_prefill_tokens=s.max_prefill_tokens,
                redis_client=self.redis,
                fair_sharing=s.fair_sharing,
                flex_max_wait_s=s.flex_max_wait_s,
            ).start()
        if ref.runtime == Runtime.TENSOR:
            return TensorEngine.from_model(
                model, max_batch=s.tensor_max_batch, max_wait_ms=s.tensor_max_wait_ms
            ).start()
        return EncoderEngine.from_model(
            model, max_batch=s.embed_max_batch, max_wait_ms=s.embed_max_wait_ms
        ).start()

    def _acquire(self, ref: ModelRef, *, batch: bool = False) -> _Engine:
        """The engine for `ref`, counted as in use until `_release`: never evicted meanwhile.

        This is what keeps an old version serving its requests after a rolling
        update moved the endpoint on: its engine goes only once nothing uses it.
        """
        while True:
            engine = self.engine_for(ref)
            with self._lock:
                if self._engines.get(ref.version_id) is not engine:
                    continue  # evicted between the lookup and here: load it again
                self._users[ref.version_id] = self._users.get(ref.version_id, 0) + 1
                self._last_used[ref.version_id] = time.monotonic()
                self._in_flight += 1
                if batch:
                    self._batch_in_flight += 1
                else:
                    self._online.touch()
                return engine

    def _release(self, ref: ModelRef, *, batch: bool = False) -> None:
        with self._lock:
            self._users[ref.version_id] -= 1
            self._in_flight -= 1
            if batch:
                self._batch_in_flight -= 1
            else:
                self._online.touch()

    def batch_capacity(self) -> int:
        """The batch lines this node accepts now, in total (running ones included): a batch
        runner keeps at most the sum over a pool's live nodes in flight, and sends none
        while that sum is at or below what it has in flight (nothing is cut short).

        The smaller of two rooms. The engine's: MANTLE_MAX_BATCH with no online request
        here now or in the last ONLINE_LINGER_S, else what the engine would admit beside
        them (`priority.batch_row_limit`: a quarter of the batch at most, and none of the
        rows online requests hold). The threads': the task threads (-c) less the online
        requests running and a reserve of ONLINE_THREAD_SHARE kept for online messages.
        """
        with self._lock:
            online = self._in_flight - self._batch_in_flight
        present = online > 0 or self._online.recent()
        engine_room = batch_row_limit(self.settings.max_batch, online, present)
        reserve = max(1, int(self.total_slots * ONLINE_THREAD_SHARE))
        thread_room = self.total_slots - reserve - online
        return max(0, min(engine_room, thread_room))

    def evict_idle_engines(self, now: float | None = None) -> list[str]:
        """Stops the engines of versions nothing has used for `engine_idle_s` (0: never).

        After a rollout the old version's requests drain, and its session (hundreds
        of megabytes for a language model) is freed here rather than held forever.
        """
        idle_s = self.settings.engine_idle_s
        if idle_s <= 0:
            return []
        now = time.monotonic() if now is None else now
        with self._lock:
            doomed = [
                version
                for version in self._engines
                if not self._users.get(version)
                and now - self._last_used.get(version, now) >= idle_s
            ]
            engines = [self._engines.pop(version) for version in doomed]
            for version in doomed:
                self._users.pop(version, None)
                self._last_used.pop(version, None)
        if doomed:
            from workers.runtime.models import unload_model

            for engine in engines:
                engine.stop()
            for version in doomed:
                unload_model(version)
            logger.info("unloaded idle model versions %s", doomed)
        return doomed

    def beat_stats(self) -> NodeStats:
        """What the heartbeat reports; each beat (every 2 s) also sweeps idle engines."""
        try:
            self.evict_idle_engines()
        except Exception:
            logger.exception("evicting idle engines failed")
        return self.stats()

    def stop_engines(self) -> None:
        with self._lock:
            engines, self._engines = list(self._engines.values()), {}
        for engine in engines:
            engine.stop()

    def engines(self) -> dict[str, _Engine]:
        """The engines loaded now, by model version (a snapshot, for metrics)."""
        return dict(self._engines)

    def in_flight(self) -> int:
        """Requests this process runs now (busy task threads)."""
        return self._in_flight

    def stats(self) -> NodeStats:
        from workers.runtime.models import loaded_models

        models = loaded_models()
        providers = sorted({m.provider for m in models})
        if not providers:
            import onnxruntime as ort

            providers = list(ort.get_available_providers())
        engines = list(self._engines.values())
        return NodeStats(
            providers=tuple(providers),
            models_loaded=tuple(sorted(self._engines)),
            free_slots=max(0, self.total_slots - self._in_flight),
            total_slots=self.total_slots,
            tokens_per_s=sum(e.tokens_per_s() for e in engines),
            batch_in_flight=self._batch_in_flight,
            batch_capacity=self.batch_capacity(),
        )

    # --- requests ---------------------------------------------------------------

    def claim(self, request_id: str) -> tuple[bool, bool]:
        """Claim the request; returns (claimed, already cancelled by the client).

        First delivery wins; the claim holds the node id so that a redelivered
        copy can tell who ran it. The cancel flag comes in the same round trip.
        """
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(task_claim_key(request_id), self.settings.node, nx=True, ex=CLAIM_TTL_S)
        pipe.exists(cancel_key(request_id))
        claimed, cancelled = pipe.execute()
        return bool(claimed), bool(cancelled)

    def serve_generate(self, request: GenerateRequest) -> Outcome:
        """Run a generation request end to end (the GENERATE task's whole body).

        Idempotent per request id: only the first delivery runs. Once the
        `started` event is out, the request gets exactly one final event (done
        or error) and exactly one usage event, whatever happens in the engine.
        """
        runtimes = (Runtime.CAUSAL_LM, Runtime.ECHO)
        return self._serve(request, request.identity, len(request.prompt_token_ids), runtimes)

    def serve_embed(self, request: EmbedRequest) -> Outcome:
        """Run an embedding request end to end; the same guarantees as `serve_generate`."""
        prompt_tokens = sum(len(ids) for ids in request.inputs)
        return self._serve(request, request.identity, prompt_tokens, (Runtime.ENCODER,))

    def serve_infer(self, request: InferRequest) -> Outcome:
        """Run a v2 tensor inference end to end; the same guarantees as `serve_generate`.

        Metered by request and compute time: a tensor request counts no tokens.
        """
        return self._serve(request, request.identity, 0, (Runtime.TENSOR,))

    def _serve(
        self,
        request: GenerateRequest | EmbedRequest | InferRequest,
        identity: BillingIdentity,
        prompt_tokens: int,
        runtimes: tuple[Runtime, ...],
    ) -> Outcome:
        if not is_batch(_service_class(request)):
            return self._serve_once(request, identity, prompt_tokens, runtimes, batch=False)
        # A batch line's stream outlives its final event long enough for a batch runner
        # that died meanwhile to read the answer again under the same request id.
        self.writer.keep_after_final(request.request_id, BATCH_STREAM_DONE_TTL_S)
        try:
            return self._serve_once(request, identity, prompt_tokens, runtimes, batch=True)
        finally:
            self.writer.forget(request.request_id)

    def _serve_once(
        self,
        request: GenerateRequest | EmbedRequest | InferRequest,
        identity: BillingIdentity,
        prompt_tokens: int,
        runtimes: tuple[Runtime, ...],
        *,
        batch: bool,
    ) -> Outcome:
        rid = request.request_id
        started_at = time.time()
        self._crash("before_claim")
        claimed, cancelled = self.claim(rid)
        if claimed:
            self._crash("after_claim")
        else:
            duplicate = self._redelivered(request, identity, prompt_tokens, batch=batch)
            if duplicate is not None:
                return duplicate
            cancelled = bool(self.redis.exists(cancel_key(rid)))
        if cancelled:
            # The client left while the request sat in the queue: nothing ran.
            logger.info("request %s was cancelled in the queue; dropped", rid)
            self.writer.done(rid, FinishReason.CANCELLED.value, 0, 0)
            self.writer.flush()
            return Outcome(status="cancelled-queued")
        if request.deadline and request.deadline < started_at:
            # Nothing ran, so nothing is billed: no usage event, only the answer.
            logger.info("request %s expired in the queue; dropped", rid)
            self._answer_error(rid, "deadline_exceeded", "the request waited past its deadline")
            return Outcome(status="expired")
        try:
            if request.model.runtime not in runtimes:
                raise RequestRejected(
                    "invalid_request", f"model runtime {request.model.runtime!r} cannot serve this"
                )
            engine = self._acquire(request.model, batch=batch)
        except RequestRejected as exc:
            self._answer_error(rid, exc.code, exc.message)
            return Outcome(status="rejected")
        # Not flushed on its own: the engine's next flush (its first step, or the
        # whole answer for echo) carries it, saving a round trip per request. Until
        # it arrives the gateway watches the pool's liveness instead of this node's.
        self.writer.started(rid, worker=self.settings.node, pool=self.settings.pool)

        def usage_of(result: RequestResult) -> UsageEvent:
            return self._usage(request, identity, result, started_at)

        # The engine's final event carries its result, and the writer appends the usage
        # event in the same transaction: no moment where the answer is out but unbilled.
        self.writer.bill_with_final(rid, usage_of)
        try:
            result = self._run_on(engine, request)
            emitted = self.writer.billing_outcome(rid)
        finally:
            self._release(request.model, batch=batch)
            self.writer.forget_billing(rid)
        self._crash(CRASH_AFTER_ANSWER)
        usage = usage_of(result)
        if emitted is None:
            # The final event went without a result (this task answered it, or the engine
            # refused the request), or its flush failed: emit here, retried.
            emitted = emit_usage_durably(self.redis, usage)
        metrics.observe_request(
            pool=self.settings.pool,
            tier=usage.service_class,
            outcome=result.finish_reason,
            queue_s=usage.queue_ms / 1000,
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
        )
        return Outcome(status=result.finish_reason, usage_emitted=emitted, result=result)

    def _usage(
        self,
        request: GenerateRequest | EmbedRequest | InferRequest,
        identity: BillingIdentity,
        result: RequestResult,
        started_at: float,
    ) -> UsageEvent:
        # Counts are what was actually computed: a request dropped while it
        # waited for a batch slot (or whose prompt failed) processed no input.
        ran = result.ran
        return UsageEvent(
            request_id=request.request_id,
            organization_id=identity.organization_id,
            project_id=identity.project_id,
            api_key_id=identity.api_key_id,
            endpoint_id=identity.endpoint_id,
            model_version_id=identity.model_version_id,
            model_name=identity.model_name,
            input_tokens=result.prompt_tokens if ran else 0,
            output_tokens=result.completion_tokens,
            status=result.finish_reason,
            started_at=result.admitted_at if ran else started_at,
            finished_at=result.finished_at,
            queue_ms=_ms(
                (result.admitted_at if ran else result.finished_at)
                - (request.enqueued_at or started_at)
            ),
            compute_ms=_compute_ms(
                result.compute_s
                if result.compute_s is not None
                else result.finished_at - result.admitted_at
            )
            if ran
            else 0,
            worker=self.settings.node,
            cached_input_tokens=min(result.cached_tokens, result.prompt_tokens) if ran else 0,
            service_class=_service_class(request),
        )

    def _run_on(
        self, engine: _Engine, request: GenerateRequest | EmbedRequest | InferRequest
    ) -> RequestResult:
        rid = request.request_id
        try:
            handle = engine.submit(request, self.writer)
        except Exception:
            logger.exception("request %s: engine %s refused it", rid, engine.name)
            self._answer_error(rid, "internal_error", "the worker could not run the request")
            return _never_ran(FinishReason.ERROR)
        timeout = (
            max(request.deadline - time.time(), 0.0) + WAIT_GRACE_S if request.deadline else None
        )
        result = handle.wait(timeout)
        if result is not None:
            return result
        if handle.claim():
            # The engine is stuck or far behind: answer the client rather than
            # leave it hanging; the engine drops the request when it sees the claim.
            logger.error("request %s: engine %s did not finish in time", rid, engine.name)
            self._answer_error(rid, "timeout", "the worker did not finish the request in time")
            return _never_ran(FinishReason.ERROR)
        # The engine claimed it at the last moment; its result follows the flush.
        final = handle.wait(WAIT_GRACE_S)
        return final if final is not None else _never_ran(FinishReason.ERROR)

    def _redelivered(
        self,
        request: GenerateRequest | EmbedRequest | InferRequest,
        identity: BillingIdentity,
        prompt_tokens: int,
        *,
        batch: bool = False,
    ) -> Outcome | None:
        """A second delivery of a claimed request: never run it twice.

        If the node that claimed it is gone and the client never got a final
        event, that node died mid-request: close the stream with an error and
        account for what it had streamed (the usage guard keeps this to one
        event even if the dead node had written its own). A batch line's
        partial output reaches no customer (its runner runs the line again
        under a new request id), so that attempt is not billed: its usage guard
        is set without an event, and nothing can bill it afterwards. If the
        node died before it wrote anything, nothing reached the client and
        nothing was billed: this node takes the claim over and runs it
        (returns None).
        """
        rid = request.request_id
        owner_node = _text(self.redis.get(task_claim_key(rid)))
        if owner_node == self.settings.node or self.redis.exists(worker_info_key(owner_node)):
            logger.info("request %s is already claimed by %s; redelivery ignored", rid, owner_node)
            return Outcome(status="duplicate")
        entries = self.redis.xrange(response_stream_key(rid)) or []
        events = [{_text(k): _text(v) for k, v in (fields or {}).items()} for _, fields in entries]
        types = {e.get("type") for e in events}
        if types & FINAL_EVENTS:
            logger.info("request %s redelivered after it finished; ignored", rid)
            return Outcome(status="duplicate")
        if not events:
            if self._take_over(rid, owner_node):
                logger.warning(
                    "request %s: worker %s died before starting it; running it here",
                    rid,
                    owner_node,
                )
                return None
            # Someone else took it over, or it finished long enough ago that its
            # stream expired (its usage guard says so): nothing to do.
            logger.info("request %s: not taken over from %s; redelivery ignored", rid, owner_node)
            return Outcome(status="duplicate")
        streamed = sum(int(e.get("tokens") or 0) for e in events if e.get("type") == EVENT_DELTA)
        logger.warning("request %s: worker %s died while running it", rid, owner_node)
        if batch:
            # The guard before the answer: once the stream has its final event, a later
            # copy takes the request as finished and would never set it.
            waive_usage(self.redis, rid)
            self._answer_error(rid, "worker_lost", "the worker running this request stopped")
            return Outcome(status="duplicate")
        self._answer_error(rid, "worker_lost", "the worker running this request stopped")
        now = time.time()
        emitted = emit_usage_durably(
            self.redis,
            UsageEvent(
                request_id=rid,
                organization_id=identity.organization_id,
                project_id=identity.project_id,
                api_key_id=identity.api_key_id,
                endpoint_id=identity.endpoint_id,
                model_version_id=identity.model_version_id,
                model_name=identity.model_name,
                input_tokens=prompt_tokens,
                output_tokens=streamed,
                status=FinishReason.ERROR.value,
                started_at=now,
                finished_at=now,
                queue_ms=0,
                compute_ms=0,
                worker=owner_node,
                service_class=_service_class(request),
            ),
        )
        return Outcome(status="duplicate", usage_emitted=emitted)

    def _crash(self, point: str) -> None:
        if self._crash_at == point:
            logger.warning("%s=%s: exiting now (test hook)", CRASH_ENV, point)
            logging.shutdown()
            os._exit(1)

    def _take_over(self, request_id: str, owner_node: str) -> bool:
        script = self.redis.register_script(_TAKE_OVER_LUA)
        keys = [
            task_claim_key(request_id),
            response_stream_key(request_id),
            usage_emitted_key(request_id),
        ]
        return bool(script(keys=keys, args=[owner_node, self.settings.node, CLAIM_TTL_S]))

    def _answer_error(self, request_id: str, code: str, message: str) -> None:
        self.writer.error(request_id, code, message)
        self.writer.flush()


def _never_ran(reason: FinishReason) -> RequestResult:
    return RequestResult(
        finish_reason=reason.value,
        prompt_tokens=0,
        completion_tokens=0,
        admitted_at=0.0,
        finished_at=time.time(),
    )


def _text(value: object) -> str:
    """A Redis reply as text, whether or not the client decodes responses."""
    if isinstance(value, bytes):
        return value.decode()
    return "" if value is None else str(value)


def _ms(seconds: float) -> int:
    return max(0, round(seconds * 1000))


def _compute_ms(seconds: float) -> int:
    """Compute time as billed: whole milliseconds, rounded up, so a run that took any
    time at all is never billed as none (a small tensor model runs in well under 1 ms)."""
    return max(1, math.ceil(seconds * 1000))


def _service_class(request: GenerateRequest | EmbedRequest | InferRequest) -> str:
    """The request's class of work, which its usage event carries (batch lines are billed
    at batch prices); tensor requests (/v2) are never batch lines."""
    return getattr(request, "service_class", ServiceClass.ONLINE.value)
