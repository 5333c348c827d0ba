"""A request through the serving runtime (no Celery): claim, engine, events, usage."""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pytest

from tests.workers.fakes_support import FakeCausalLM, FakeEncoder, decode, reference, spec
from workers.contract import (
    BATCH_STREAM_DONE_TTL_S,
    RESPONSE_STREAM_DONE_TTL_S,
    USAGE_STREAM,
    BillingIdentity,
    EmbedRequest,
    GenerateRequest,
    ModelRef,
    SamplingParams,
    ServiceClass,
    UsageEvent,
    cancel_key,
    response_stream_key,
    task_claim_key,
    usage_emitted_key,
    worker_info_key,
)
from workers.engine.causal_lm import CausalLMEngine
from workers.engine.encoder import EncoderEngine
from workers.serving import WorkerRuntime
from workers.settings import WorkerSettings
from workers.streams import emit_usage

IDENTITY = BillingIdentity("org-1", "proj-1", "key-1", "ep-1", "mv-1", "echo-model")
ECHO = ModelRef("echo-1", "echo", "e" * 64, "")
FAKE_LM = ModelRef("fake-lm", "onnx-causal-lm", "f" * 64, "/nonexistent")
FAKE_ENCODER = ModelRef("fake-enc", "onnx-encoder", "c" * 64, "/nonexistent")


def settings(**overrides: Any) -> WorkerSettings:
    base = WorkerSettings(
        broker_url="redis://127.0.0.1:6379/13",
        redis_url="redis://127.0.0.1:6379/13",
        pool="testpool",
        node="node-test",
        max_batch=8,
        max_prefill_tokens=4096,
        embed_max_batch=8,
        embed_max_wait_ms=1.0,
        concurrency=8,
        visibility_timeout_s=60,
        task_time_limit_s=60,
    )
    return dataclasses.replace(base, **overrides)


@pytest.fixture
def runtime(redis_client: Any) -> Iterator[WorkerRuntime]:
    rt = WorkerRuntime(settings(), redis_client)
    yield rt
    rt.stop_engines()


def gen(
    rid: str = "req-1",
    prompt: tuple[int, ...] = (5, 6, 7, 8),
    max_tokens: int = 3,
    model: ModelRef = ECHO,
    deadline: float | None = None,
) -> GenerateRequest:
    return GenerateRequest(
        request_id=rid,
        model=model,
        identity=IDENTITY,
        prompt_token_ids=prompt,
        sampling=SamplingParams(max_tokens=max_tokens, temperature=0.0),
        deadline=time.time() + 30 if deadline is None else deadline,
        enqueued_at=time.time() - 0.01,
    )


def embed(rid: str, *, service_class: str = ServiceClass.ONLINE.value) -> EmbedRequest:
    return EmbedRequest(
        rid,
        FAKE_ENCODER,
        IDENTITY,
        ((1, 2, 3),),
        deadline=time.time() + 30,
        service_class=service_class,
    )


def events(client: Any, rid: str) -> list[dict[str, str]]:
    return [fields for _, fields in client.xrange(response_stream_key(rid))]


def usages(client: Any) -> list[UsageEvent]:
    return [UsageEvent.from_fields(f) for _, f in client.xrange(USAGE_STREAM)]


def test_echo_request_streams_and_bills_once(runtime: WorkerRuntime, redis_client: Any) -> None:
    outcome = runtime.serve_generate(gen())
    assert outcome.status == "length" and outcome.usage_emitted
    assert events(redis_client, "req-1") == [
        {"type": "started", "worker": "node-test", "pool": "testpool"},
        {"type": "delta", "text": "5 6 7", "tokens": "3"},
        {"type": "done", "finish_reason": "length", "prompt_tokens": "4", "completion_tokens": "3"},
    ]
    (usage,) = usages(redis_client)
    assert (usage.request_id, usage.organization_id, usage.endpoint_id) == (
        "req-1",
        "org-1",
        "ep-1",
    )
    assert (usage.input_tokens, usage.output_tokens, usage.status) == (4, 3, "length")
    assert usage.worker == "node-test" and usage.queue_ms >= 10


def test_echo_stops_at_the_end_of_the_prompt(runtime: WorkerRuntime, redis_client: Any) -> None:
    runtime.serve_generate(gen(max_tokens=100))
    assert events(redis_client, "req-1")[-1]["finish_reason"] == "stop"


def test_redelivered_task_does_nothing(runtime: WorkerRuntime, redis_client: Any) -> None:
    runtime.serve_generate(gen())
    before = events(redis_client, "req-1")
    again = runtime.serve_generate(gen())
    assert again.status == "duplicate" and not again.usage_emitted
    assert events(redis_client, "req-1") == before
    assert len(usages(redis_client)) == 1


class HeldLM(FakeCausalLM):
    """Stops in its first run until released: a request provably still running."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()

    def run(self, output_names: Sequence[str], feeds: Mapping[str, Any]) -> list[np.ndarray]:
        self.entered.set()
        assert self.release.wait(10), "never released"
        return super().run(output_names, feeds)


def test_redelivery_while_the_first_copy_still_runs_does_nothing(
    runtime: WorkerRuntime, redis_client: Any
) -> None:
    model = HeldLM()
    runtime._engines[FAKE_LM.version_id] = CausalLMEngine(
        model, spec(), decode, redis_client=redis_client
    ).start()
    first: dict[str, Any] = {}
    thread = threading.Thread(
        target=lambda: first.update(o=runtime.serve_generate(gen(model=FAKE_LM, max_tokens=40)))
    )
    thread.start()
    try:
        # The first copy is inside the model (claimed, started), held there until released.
        assert model.entered.wait(10), "the first copy never reached the model"
        assert runtime.serve_generate(gen(model=FAKE_LM, max_tokens=40)).status == "duplicate"
        assert thread.is_alive()  # answered while the first copy still ran
    finally:
        model.release.set()
    thread.join(10)
    assert first["o"].status == "length"
    kinds = [e["type"] for e in events(redis_client, "req-1")]
    assert kinds.count("started") == 1 and kinds.count("done") == 1
    assert len(usages(redis_client)) == 1


def test_expired_request_answers_an_error_and_bills_nothing(
    runtime: WorkerRuntime, redis_client: Any
) -> None:
    outcome = runtime.serve_generate(gen(deadline=time.time() - 1))
    assert outcome.status == "expired"
    assert events(redis_client, "req-1") == [
        {
            "type": "error",
            "code": "deadline_exceeded",
            "message": "the request waited past its deadline",
        }
    ]
    assert usages(redis_client) == []


def test_request_cancelled_in_the_queue_never_runs(
    runtime: WorkerRuntime, redis_client: Any
) -> None:
    redis_client.set(cancel_key("req-1"), "1")
    assert runtime.serve_generate(gen()).status == "cancelled-queued"
    assert events(redis_client, "req-1") == [
        {
            "type": "done",
            "finish_reason": "cancelled",
            "prompt_tokens": "0",
            "completion_tokens": "0",
        }
    ]
    assert usages(redis_client) == []


@pytest.mark.parametrize(
    ("model", "code"),
    [
        (ModelRef("x", "onnx-encoder", "a" * 64, "/nowhere"), "invalid_request"),
        (ModelRef("x", "tensor", "a" * 64, "/nowhere"), "invalid_request"),
        (
            ModelRef("missing", "onnx-causal-lm", "a" * 64, "/nowhere/" + "a" * 64),
            "model_unavailable",
        ),
    ],
)
def test_a_model_that_cannot_run_here_is_an_error_without_usage(
    runtime: WorkerRuntime, redis_client: Any, model: ModelRef, code: str
) -> None:
    outcome = runtime.serve_generate(gen(model=model))
    assert outcome.status == "rejected"
    ((fields),) = events(redis_client, "req-1")
    assert (fields["type"], fields["code"]) == ("error", code)
    assert usages(redis_client) == []


def test_engine_failure_gives_an_error_event_and_an_error_usage(
    runtime: WorkerRuntime, redis_client: Any
) -> None:
    runtime._engines[FAKE_LM.version_id] = CausalLMEngine(
        FakeCausalLM(fail_on_call=3), spec(), decode
    ).start()
    outcome = runtime.serve_generate(gen(model=FAKE_LM, max_tokens=20))
    assert outcome.status == "error" and outcome.usage_emitted
    kinds = [e["type"] for e in events(redis_client, "req-1")]
    assert kinds[0] == "started" and kinds[-1] == "error" and "done" not in kinds
    (usage,) = usages(redis_client)
    assert (usage.status, usage.input_tokens, usage.output_tokens) == ("error", 4, 3)


def test_cancelled_request_bills_the_tokens_it_generated(
    runtime: WorkerRuntime, redis_client: Any
) -> None:
    runtime._engines[FAKE_LM.version_id] = CausalLMEngine(
        FakeCausalLM(delay_s=0.002),
        spec(),
        decode,
        redis_client=redis_client,
        cancel_check_interval_s=0.01,
    ).start()
    threading.Timer(0.1, lambda: redis_client.set(cancel_key("req-1"), "1")).start()
    outcome = runtime.serve_generate(gen(model=FAKE_LM, max_tokens=100_000))
    assert outcome.status == "cancelled"
    (usage,) = usages(redis_client)
    streamed = sum(int(e.get("tokens", 0)) for e in events(redis_client, "req-1"))
    assert usage.status == "cancelled" and usage.output_tokens >= streamed > 0


def test_generated_tokens_through_the_writer(runtime: WorkerRuntime, redis_client: Any) -> None:
    runtime._engines[FAKE_LM.version_id] = CausalLMEngine(FakeCausalLM(), spec(), decode).start()
    runtime.serve_generate(gen(model=FAKE_LM, prompt=(5, 9, 3), max_tokens=12))
    text = "".join(e.get("text", "") for e in events(redis_client, "req-1"))
    assert text == decode(reference([5, 9, 3], 12))


def test_redelivery_after_the_owner_died_closes_the_stream_once(
    runtime: WorkerRuntime, redis_client: Any
) -> None:
    # Given a request claimed by a node that has no heartbeat any more, which
    # streamed 4 tokens and then vanished
    redis_client.set(task_claim_key("req-1"), "ghost")
    redis_client.xadd(
        response_stream_key("req-1"), {"type": "started", "worker": "ghost", "pool": "p"}
    )
    redis_client.xadd(response_stream_key("req-1"), {"type": "delta", "text": "ab", "tokens": "4"})
    # When the broker redelivers it (twice)
    first = runtime.serve_generate(gen())
    second = runtime.serve_generate(gen())
    # Then the client gets one error, billing one event for what was streamed
    kinds = [e["type"] for e in events(redis_client, "req-1")]
    assert kinds == ["started", "delta", "error"]
    assert events(redis_client, "req-1")[-1]["code"] == "worker_lost"
    assert first.usage_emitted and not second.usage_emitted
    (usage,) = usages(redis_client)
    assert (usage.status, usage.input_tokens, usage.output_tokens, usage.worker) == (
        "error",
        4,
        4,
        "ghost",
    )


def test_a_batch_lines_usage_event_carries_its_class(
    runtime: WorkerRuntime, redis_client: Any
) -> None:
    """Billing rates batch lines at batch prices by the event's service_class."""
    runtime._engines[FAKE_ENCODER.version_id] = EncoderEngine(
        FakeEncoder(), dimensions=4, max_input_tokens=16, max_wait_ms=1.0
    ).start()
    batch_line = dataclasses.replace(gen(), service_class=ServiceClass.BATCH.value)
    batch_embed = embed("emb-1", service_class=ServiceClass.BATCH.value)

    runtime.serve_generate(batch_line)
    runtime.serve_generate(gen("req-2"))  # an online request beside it
    runtime.serve_embed(batch_embed)
    runtime.serve_embed(embed("emb-2"))

    assert [(u.request_id, u.service_class) for u in usages(redis_client)] == [
        ("req-1", "batch"),
        ("req-2", "online"),
        ("emb-1", "batch"),
        ("emb-2", "online"),
    ]


def test_a_lost_batch_attempt_is_not_billed_on_redelivery(
    runtime: WorkerRuntime, redis_client: Any
) -> None:
    # Given a batch line claimed by a node that has no heartbeat any more, which
    # streamed 4 tokens and then vanished
    redis_client.set(task_claim_key("req-1"), "ghost")
    redis_client.xadd(
        response_stream_key("req-1"), {"type": "started", "worker": "ghost", "pool": "p"}
    )
    redis_client.xadd(response_stream_key("req-1"), {"type": "delta", "text": "ab", "tokens": "4"})
    line = dataclasses.replace(gen(), service_class=ServiceClass.BATCH.value)
    # When the broker redelivers it (twice)
    first = runtime.serve_generate(line)
    second = runtime.serve_generate(line)
    # Then the runner reads one worker_lost error, and nothing is billed: the partial
    # output reached no customer (the runner runs the line again under a new id)
    assert (first.status, first.usage_emitted) == ("duplicate", False)
    assert (second.status, second.usage_emitted) == ("duplicate", False)
    stream = events(redis_client, "req-1")
    assert [e["type"] for e in stream] == ["started", "delta", "error"]
    assert stream[-1]["code"] == "worker_lost"
    assert usages(redis_client) == []
    # and nothing can bill it later: the guard is set (the "dead" node finishing after all)
    assert redis_client.exists(usage_emitted_key("req-1"))
    late = UsageEvent.from_fields(
        {"request_id": "req-1", "organization_id": "org-1", "model_name": "m", "input_tokens": "4"}
    )
    assert not emit_usage(redis_client, late)
    assert usages(redis_client) == []
    # The stream is kept for the batch runner as long as a finished line's
    assert redis_client.ttl(response_stream_key("req-1")) > RESPONSE_STREAM_DONE_TTL_S


@pytest.mark.parametrize(
    ("service_class", "low", "high"),
    [
        ("online", 1, RESPONSE_STREAM_DONE_TTL_S),
        ("batch", BATCH_STREAM_DONE_TTL_S - 60, BATCH_STREAM_DONE_TTL_S),
    ],
)
def test_a_batch_lines_stream_outlives_its_final_event(
    runtime: WorkerRuntime, redis_client: Any, service_class: str, low: int, high: int
) -> None:
    request = dataclasses.replace(gen(), service_class=service_class)
    assert runtime.serve_generate(request).status == "length"
    assert events(redis_client, "req-1")[-1]["type"] == "done"
    assert low <= redis_client.ttl(response_stream_key("req-1")) <= high
    # The next request of the process gets the usual expiry again (nothing left behind).
    runtime.serve_generate(gen("req-2"))
    assert redis_client.ttl(response_stream_key("req-2")) <= RESPONSE_STREAM_DONE_TTL_S
    assert runtime.writer._done_ttl == {}


def test_redelivery_after_the_owner_died_before_writing_runs_it_here(
    runtime: WorkerRuntime, redis_client: Any
) -> None:
    # Given a request claimed by a node that died before it wrote or billed anything
    redis_client.set(task_claim_key("req-1"), "ghost")
    # When a copy arrives here, this node takes the claim over and runs it, once
    first = runtime.serve_generate(gen())
    second = runtime.serve_generate(gen())
    assert first.status == "length" and first.usage_emitted
    assert second.status == "duplicate" and not second.usage_emitted
    assert redis_client.get(task_claim_key("req-1")) == "node-test"
    kinds = [e["type"] for e in events(redis_client, "req-1")]
    assert kinds == ["started", "delta", "done"]
    (usage,) = usages(redis_client)
    assert (usage.worker, usage.input_tokens, usage.output_tokens) == ("node-test", 4, 3)


def test_a_dead_owners_request_is_not_run_again_once_billed(
    runtime: WorkerRuntime, redis_client: Any
) -> None:
    # It finished, then its stream expired: only the usage guard is left.
    runtime.serve_generate(gen())
    redis_client.delete(response_stream_key("req-1"))
    redis_client.set(task_claim_key("req-1"), "ghost")
    assert runtime.serve_generate(gen()).status == "duplicate"
    assert events(redis_client, "req-1") == []
    assert len(usages(redis_client)) == 1
    assert redis_client.get(task_claim_key("req-1")) == "ghost"


def test_a_dead_owners_request_cancelled_meanwhile_is_not_run(
    runtime: WorkerRuntime, redis_client: Any
) -> None:
    redis_client.set(task_claim_key("req-1"), "ghost")
    redis_client.set(cancel_key("req-1"), "1")
    assert runtime.serve_generate(gen()).status == "cancelled-queued"
    assert usages(redis_client) == []


def test_redelivery_while_the_owner_is_alive_is_ignored(
    runtime: WorkerRuntime, redis_client: Any
) -> None:
    redis_client.set(task_claim_key("req-1"), "other-node")
    redis_client.set(worker_info_key("other-node"), "{}")
    redis_client.xadd(
        response_stream_key("req-1"), {"type": "started", "worker": "other-node", "pool": "p"}
    )
    assert runtime.serve_generate(gen()).status == "duplicate"
    assert [e["type"] for e in events(redis_client, "req-1")] == ["started"]
    assert usages(redis_client) == []


def test_embed_request_with_a_generation_model_is_refused(
    runtime: WorkerRuntime, redis_client: Any
) -> None:
    request = EmbedRequest("emb-1", ECHO, IDENTITY, ((1, 2),), deadline=time.time() + 30)
    assert runtime.serve_embed(request).status == "rejected"
    assert events(redis_client, "emb-1")[0]["code"] == "invalid_request"


def test_stats_count_tasks_in_flight(runtime: WorkerRuntime) -> None:
    runtime.serve_generate(gen())
    stats = runtime.stats()
    assert (stats.free_slots, stats.total_slots) == (8, 8)
    assert stats.models_loaded == ("echo-1",)
    assert "CPUExecutionProvider" in stats.providers


def test_batch_capacity_is_the_engines_room_and_leaves_threads_to_online(
    redis_client: Any,
) -> None:
    # -c 64 and MANTLE_MAX_BATCH 32 (the Procfile's): with no online traffic, a full batch,
    # and a quarter of the threads kept for online messages either way.
    big = WorkerRuntime(settings(concurrency=64, max_batch=32), redis_client)
    assert (big.stats().batch_capacity, big.stats().batch_in_flight) == (32, 0)
    small = WorkerRuntime(settings(concurrency=8, max_batch=8), redis_client)
    assert small.stats().batch_capacity == 8 - 2  # the threads' room: 8 less 2 kept


@pytest.mark.parametrize("service_class", ["online", "batch"])
def test_the_heartbeat_counts_batch_lines_and_shrinks_their_room_beside_online(
    runtime: WorkerRuntime, redis_client: Any, service_class: str
) -> None:
    # Given a request of `service_class` held inside the engine
    model = HeldLM()
    runtime._engines[FAKE_LM.version_id] = CausalLMEngine(
        model, spec(), decode, redis_client=redis_client
    ).start()
    request = dataclasses.replace(gen(model=FAKE_LM, max_tokens=5), service_class=service_class)
    thread = threading.Thread(target=runtime.serve_generate, args=(request,))
    thread.start()
    try:
        assert model.entered.wait(10), "the request never reached the model"
        stats = runtime.stats()
    finally:
        model.release.set()
    thread.join(10)
    if service_class == "batch":
        # A running line counts in the lines the node accepts (6 with nothing online).
        assert (stats.batch_in_flight, stats.batch_capacity) == (1, 6)
        assert runtime.stats().batch_capacity == 6
    else:
        # Beside an online request: a quarter of max_batch 8
        assert (stats.batch_in_flight, stats.batch_capacity) == (0, 2)
        # and still for ONLINE_LINGER_S after it left, then the whole room again.
        assert runtime.stats().batch_capacity == 2
        runtime._online.linger_s = 0.0
        assert runtime.stats().batch_capacity == 6
    assert runtime.stats().batch_in_flight == 0


def test_n_choices_stream_through_the_writer_and_bill_every_choice_once(
    runtime: WorkerRuntime, redis_client: Any
) -> None:
    runtime._engines[FAKE_LM.version_id] = CausalLMEngine(FakeCausalLM(), spec(), decode).start()
    request = gen(model=FAKE_LM, prompt=(5, 9, 3), max_tokens=6)
    request = dataclasses.replace(
        request,
        sampling=dataclasses.replace(request.sampling, n=3, temperature=1.0, seed=11, logprobs=1),
    )
    outcome = runtime.serve_generate(request)
    assert outcome.result is not None
    stream = events(redis_client, "req-1")
    deltas = [e for e in stream if e["type"] == "delta"]
    assert {e["index"] for e in deltas} == {"0", "1", "2"}
    choice_done = [e for e in stream if e["type"] == "choice_done"]
    assert sorted(e["index"] for e in choice_done) == ["0", "1", "2"]
    per_choice = sum(int(e["completion_tokens"]) for e in choice_done)
    done = stream[-1]
    assert done["type"] == "done" and done["prompt_tokens"] == "3"
    assert int(done["completion_tokens"]) == per_choice == outcome.result.completion_tokens
    # Every generated token that has text comes with its entry, in compact JSON.
    entries = [entry for e in deltas for entry in json.loads(e["logprobs"])]
    # (the EOS that ends a choice with "stop" has none)
    stops = sum(1 for e in choice_done if e["finish_reason"] == "stop")
    assert len(entries) == per_choice - stops
    assert all(len(entry) == 4 and len(entry[3]) == 1 for entry in entries)
    (usage,) = usages(redis_client)
    assert (usage.input_tokens, usage.output_tokens) == (3, per_choice)
