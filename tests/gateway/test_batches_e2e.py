"""The Batch API end to end with the official `openai` client: a real gateway, a real worker,
real batch runner processes (killed mid-batch too), real models, the real usage stream."""

from __future__ import annotations

import io
import json
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from django.utils import timezone
from openai import OpenAI
from openai.types import Batch

from catalog.models import Endpoint
from catalog.services import endpoint_publish, pool_ensure
from core.redis import get_redis
from gateway.models import Batch as BatchModel
from gateway.models import BatchLine
from tests.factories import OrganizationFactory, make_api_key
from tests.gateway.conftest import CHAT, ECHO, EMBED, Served
from tests.support.stack import Process
from workers.contract import USAGE_STREAM

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True), pytest.mark.models]

FAST = {"MANTLE_BATCH_LEASE_S": "3", "MANTLE_BATCH_POLL_S": "0.2"}


@pytest.fixture
def runner(served: Served) -> Iterator[Process]:
    proc = served.live.stack.batch_runner("batch-runner", **FAST)
    yield proc
    served.live.stack.stop(proc)


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


def chat_line(
    custom_id: str, content: str, max_tokens: int = 8, model: str = CHAT
) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {
            "model": model,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens,
            "temperature": 0,
        },
    }


def upload(client: OpenAI, data: bytes, name: str = "batch.jsonl") -> str:
    return client.files.create(file=(name, io.BytesIO(data)), purpose="batch").id


def wait_for(client: OpenAI, batch_id: str, statuses: set[str], timeout: float = 240) -> Batch:
    deadline = time.time() + timeout
    while time.time() < deadline:
        batch = client.batches.retrieve(batch_id)
        if batch.status in statuses:
            return batch
        time.sleep(0.3)
    raise AssertionError(f"batch {batch_id} still {batch.status} after {timeout}s")


def lines_of(client: OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if not file_id:
        return []
    return [json.loads(x) for x in client.files.content(file_id).content.splitlines() if x]


def batch_usage(batch_id: str) -> Counter[int]:
    """Usage events of the batch's lines on the usage stream, counted by line number."""
    prefix = f"req_{batch_id.removeprefix('batch_')}_"
    counted: Counter[int] = Counter()
    for _, fields in get_redis().xrange(USAGE_STREAM):
        rid = str(fields.get("request_id", ""))  # type: ignore[union-attr]
        if rid.startswith(prefix):
            assert fields.get("service_class") == "batch", fields  # type: ignore[union-attr]
            counted[int(rid.removeprefix(prefix).split("_")[0])] += 1
    return counted


def test_a_chat_batch_answers_every_line_once_as_online_would(
    served: Served, runner: Process
) -> None:
    client = served.client()
    questions = ["What is the capital of France?", "Name a color.", "Say hello.", "2+2=?"]
    data = jsonl([chat_line(f"q-{i}", q) for i, q in enumerate(questions)])
    created = client.batches.create(
        input_file_id=upload(client, data),
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"team": "eval"},
    )
    assert created.status == "validating"
    assert created.metadata == {"team": "eval"}

    done = wait_for(client, created.id, {"completed", "failed"})

    assert done.status == "completed", done.errors
    assert done.request_counts is not None
    assert (done.request_counts.total, done.request_counts.completed) == (4, 4)
    assert done.request_counts.failed == 0
    assert done.error_file_id is None
    assert done.in_progress_at and done.finalizing_at and done.completed_at
    output = lines_of(client, done.output_file_id)
    assert sorted(line["custom_id"] for line in output) == [f"q-{i}" for i in range(4)]
    by_id = {line["custom_id"]: line for line in output}
    first = by_id["q-0"]["response"]
    assert first["status_code"] == 200
    assert first["body"]["object"] == "chat.completion"
    # The same greedy answer as the same request online.
    online = client.chat.completions.create(
        model=CHAT,
        messages=[{"role": "user", "content": questions[0]}],
        max_tokens=8,
        temperature=0,
    )
    assert first["body"]["choices"][0]["message"]["content"] == online.choices[0].message.content
    # Each line billed exactly once, as batch work; the stored lines are gone.
    time.sleep(0.5)
    assert batch_usage(done.id) == Counter({1: 1, 2: 1, 3: 1, 4: 1})
    assert not BatchLine.objects.filter(batch_id=done.id).exists()
    listed = client.batches.list(limit=5)
    assert done.id in [b.id for b in listed.data]


def test_a_bad_input_file_fails_with_its_line_numbers_and_nothing_runs(
    served: Served, runner: Process
) -> None:
    client = served.client()
    raw = (
        json.dumps(chat_line("a", "hi")).encode()
        + b"\n{not json\n"
        + json.dumps(chat_line("a", "again")).encode()
        + b"\n"
        + json.dumps({**chat_line("c", "hi"), "url": "/v1/embeddings"}).encode()
        + b"\n"
        + json.dumps(
            {**chat_line("d", "hi"), "body": {"model": "no-such-model", "messages": []}}
        ).encode()
        + b"\n"
    )
    created = client.batches.create(
        input_file_id=upload(client, raw), endpoint="/v1/chat/completions", completion_window="24h"
    )

    done = wait_for(client, created.id, {"completed", "failed"})

    assert done.status == "failed"
    assert done.errors is not None and done.errors.data is not None
    found = {(e.line, e.code) for e in done.errors.data}
    assert found == {
        (2, "invalid_json_line"),
        (3, "duplicate_custom_id"),
        (4, "invalid_url"),
        (5, "model_not_found"),
    }
    assert done.output_file_id is None and done.error_file_id is None
    time.sleep(0.3)
    assert batch_usage(done.id) == Counter()


def test_the_batch_queue_limit_fails_a_batch_over_it(served: Served) -> None:
    stack = served.live.stack
    small = stack.batch_runner("batch-runner-small", **FAST, MANTLE_BATCH_QUEUE_TOKENS="50")
    try:
        client = served.client()
        data = jsonl([chat_line(f"q-{i}", "Say hello.", max_tokens=16) for i in range(4)])
        created = client.batches.create(
            input_file_id=upload(client, data),
            endpoint="/v1/chat/completions",
            completion_window="24h",
        )
        done = wait_for(client, created.id, {"completed", "failed"})
    finally:
        stack.stop(small)
    assert done.status == "failed"
    assert done.errors is not None and done.errors.data is not None
    assert [e.code for e in done.errors.data] == ["token_limit_exceeded"]
    assert CHAT in (done.errors.data[0].message or "")


def test_another_organizations_batch_is_not_found(served: Served, runner: Process) -> None:
    client = served.client()
    data = jsonl([chat_line("only", "Say hello.")])
    mine = client.batches.create(
        input_file_id=upload(client, data), endpoint="/v1/chat/completions", completion_window="24h"
    )
    _, other_secret = make_api_key(OrganizationFactory(), scopes=["inference"])
    other = served.client(other_secret)
    import openai

    with pytest.raises(openai.NotFoundError):
        other.batches.retrieve(mine.id)
    with pytest.raises(openai.NotFoundError):
        other.batches.cancel(mine.id)
    # Nor may it run a batch over this organization's file.
    with pytest.raises(openai.NotFoundError):
        other.batches.create(
            input_file_id=mine.input_file_id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
        )
    assert mine.id not in [b.id for b in other.batches.list().data]
    wait_for(client, mine.id, {"completed"})


def test_cancel_keeps_finished_lines_and_writes_the_rest_as_cancelled(
    served: Served, runner: Process
) -> None:
    client = served.client()
    # More lines than finish while a cancel takes effect, whatever the engine's speed (80
    # once all finished first on a faster machine): only those in flight run to the end.
    data = jsonl([chat_line(f"q-{i}", "Write a long story.", max_tokens=64) for i in range(400)])
    created = client.batches.create(
        input_file_id=upload(client, data), endpoint="/v1/chat/completions", completion_window="24h"
    )
    wait_for(client, created.id, {"in_progress"})
    deadline = time.time() + 120
    while time.time() < deadline:
        counts = client.batches.retrieve(created.id).request_counts
        if counts is not None and counts.completed >= 2:
            break
        time.sleep(0.2)

    cancelling = client.batches.cancel(created.id)
    assert cancelling.status == "cancelling"
    done = wait_for(client, created.id, {"cancelled"})

    output = lines_of(client, done.output_file_id)
    errors = lines_of(client, done.error_file_id)
    ids = [line["custom_id"] for line in output + errors]
    assert sorted(ids) == sorted(f"q-{i}" for i in range(400))  # each exactly once
    assert len(output) >= 2
    assert errors and {line["error"]["code"] for line in errors} == {"batch_cancelled"}
    assert all(line["response"] is None for line in errors)
    # What ran is billed, once; what did not run is not.
    time.sleep(0.5)
    billed = batch_usage(done.id)
    assert set(billed.values()) == {1}
    assert len(billed) == len(output)


def test_a_runner_killed_mid_batch_is_resumed_and_every_line_is_billed_once(
    served: Served,
) -> None:
    stack = served.live.stack
    client = served.client()
    count = 24
    data = jsonl([chat_line(f"q-{i}", f"Count to {i + 3}.", max_tokens=24) for i in range(count)])
    first = stack.batch_runner("batch-runner-a", **FAST)
    created = client.batches.create(
        input_file_id=upload(client, data), endpoint="/v1/chat/completions", completion_window="24h"
    )
    deadline = time.time() + 180
    while time.time() < deadline:
        counts = client.batches.retrieve(created.id).request_counts
        if counts is not None and counts.completed >= 3:
            break
        time.sleep(0.1)
    stack.kill(first)  # SIGKILL: lines in flight, lines stored, the lease held
    second = stack.batch_runner("batch-runner-b", **FAST)
    try:
        done = wait_for(client, created.id, {"completed", "failed"})
    finally:
        stack.stop(second)

    assert done.status == "completed", done.errors
    output = lines_of(client, done.output_file_id)
    assert Counter(line["custom_id"] for line in output) == Counter(f"q-{i}" for i in range(count))
    assert all(line["response"]["status_code"] == 200 for line in output)
    time.sleep(0.5)
    assert batch_usage(done.id) == Counter(dict.fromkeys(range(1, count + 1), 1))


def test_an_embeddings_batch_and_an_echo_batch_run(served: Served, runner: Process) -> None:
    client = served.client()
    embed = jsonl(
        [
            {
                "custom_id": f"e-{i}",
                "method": "POST",
                "url": "/v1/embeddings",
                "body": {"model": EMBED, "input": f"sentence number {i}"},
            }
            for i in range(5)
        ]
    )
    echo = jsonl(
        [
            {
                "custom_id": f"x-{i}",
                "method": "POST",
                "url": "/v1/completions",
                "body": {"model": ECHO, "prompt": f"line {i}", "max_tokens": 4},
            }
            for i in range(50)
        ]
    )
    a = client.batches.create(
        input_file_id=upload(client, embed), endpoint="/v1/embeddings", completion_window="24h"
    )
    b = client.batches.create(
        input_file_id=upload(client, echo), endpoint="/v1/completions", completion_window="24h"
    )
    done_a = wait_for(client, a.id, {"completed", "failed"})
    done_b = wait_for(client, b.id, {"completed", "failed"})
    assert (done_a.status, done_b.status) == ("completed", "completed")
    vectors = lines_of(client, done_a.output_file_id)
    assert len(vectors) == 5
    assert len(vectors[0]["response"]["body"]["data"][0]["embedding"]) == 384
    assert len(lines_of(client, done_b.output_file_id)) == 50


def test_a_batch_past_its_window_expires_with_the_rest_written_as_expired(
    served: Served, runner: Process
) -> None:
    client = served.client()
    data = jsonl([chat_line(f"q-{i}", "Write a long story.", max_tokens=64) for i in range(80)])
    created = client.batches.create(
        input_file_id=upload(client, data), endpoint="/v1/chat/completions", completion_window="24h"
    )
    wait_for(client, created.id, {"in_progress"})
    BatchModel.objects.filter(id=created.id).update(expires_at=timezone.now())

    done = wait_for(client, created.id, {"expired"})

    assert done.expired_at is not None
    output = lines_of(client, done.output_file_id)
    errors = lines_of(client, done.error_file_id)
    assert sorted(line["custom_id"] for line in output + errors) == sorted(
        f"q-{i}" for i in range(80)
    )
    assert errors and {line["error"]["code"] for line in errors} == {"batch_expired"}


def test_a_worker_killed_mid_batch_loses_no_line_and_bills_each_once(served: Served) -> None:
    stack = served.live.stack
    pool = pool_ensure(name="batchpool", region="local", providers=["CPUExecutionProvider"])
    endpoint = Endpoint.objects.create(
        organization=served.org,
        name="batch-chat",
        pool=pool,
        model_version=served.endpoints[CHAT].model_version,
    )
    endpoint_publish(endpoint)
    first = stack.worker("batchpool", concurrency=8, node="batch-node-a")
    runner = stack.batch_runner("batch-runner-w", **FAST)
    try:
        client = served.client()
        count = 16
        story = "Write a long story about a dragon."
        lines = [chat_line(f"q-{i}", story, 64, model=endpoint.id) for i in range(count)]
        created = client.batches.create(
            input_file_id=upload(client, jsonl(lines)),
            endpoint="/v1/chat/completions",
            completion_window="24h",
        )
        deadline = time.time() + 120
        while time.time() < deadline:
            counts = client.batches.retrieve(created.id).request_counts
            if counts is not None and counts.completed >= 2:
                break
            time.sleep(0.1)
        stack.kill(first)  # SIGKILL with lines mid-generation
        second = stack.worker("batchpool", concurrency=8, node="batch-node-b")
        done = wait_for(client, created.id, {"completed", "failed"}, timeout=400)
        stack.stop(second)
    finally:
        stack.stop(runner)

    assert done.status == "completed", done.errors
    output = lines_of(client, done.output_file_id)
    errors = lines_of(client, done.error_file_id)
    assert sorted(line["custom_id"] for line in output + errors) == sorted(
        f"q-{i}" for i in range(count)
    )
    assert all(line["response"]["status_code"] == 200 for line in output)
    assert not errors  # the lost lines ran again on the new worker
    time.sleep(0.5)
    # One billed event per line: the attempts lost with the worker were not billed.
    billed = batch_usage(done.id)
    assert billed == Counter(dict.fromkeys(range(1, count + 1), 1))


def test_a_responses_batch_runs_each_line_as_the_responses_api(
    served: Served, runner: Process
) -> None:
    client = served.client()
    data = jsonl(
        [
            {
                "custom_id": f"r-{i}",
                "method": "POST",
                "url": "/v1/responses",
                "body": {"model": CHAT, "input": "Say hello.", "max_output_tokens": 16},
            }
            for i in range(2)
        ]
    )
    created = client.batches.create(
        input_file_id=upload(client, data), endpoint="/v1/responses", completion_window="24h"
    )
    done = wait_for(client, created.id, {"completed", "failed"})
    assert done.status == "completed", done.errors
    output = lines_of(client, done.output_file_id)
    assert sorted(line["custom_id"] for line in output) == ["r-0", "r-1"]
    body = output[0]["response"]["body"]
    assert body["object"] == "response"
    # A stored response like any other: readable by its id.
    assert client.responses.retrieve(body["id"]).id == body["id"]


def test_a_runner_stopped_with_sigterm_finishes_its_lines_and_another_resumes(
    served: Served,
) -> None:
    stack = served.live.stack
    client = served.client()
    count = 24
    data = jsonl([chat_line(f"q-{i}", f"Count to {i + 3}.", max_tokens=24) for i in range(count)])
    first = stack.batch_runner("batch-runner-t", **FAST)
    created = client.batches.create(
        input_file_id=upload(client, data), endpoint="/v1/chat/completions", completion_window="24h"
    )
    deadline = time.time() + 180
    while time.time() < deadline:
        counts = client.batches.retrieve(created.id).request_counts
        if counts is not None and counts.completed >= 3:
            break
        time.sleep(0.1)
    stack.stop(first)  # SIGTERM: lines in flight finish, none starts
    second = stack.batch_runner("batch-runner-u", **FAST)
    try:
        done = wait_for(client, created.id, {"completed", "failed"})
    finally:
        stack.stop(second)

    assert done.status == "completed", done.errors
    output = lines_of(client, done.output_file_id)
    assert sorted(line["custom_id"] for line in output) == sorted(f"q-{i}" for i in range(count))
    # No answer cut short by the stop: every line ran to its own end.
    reasons = {line["response"]["body"]["choices"][0]["finish_reason"] for line in output}
    assert reasons <= {"stop", "length"}, reasons
    time.sleep(0.5)
    assert batch_usage(done.id) == Counter(dict.fromkeys(range(1, count + 1), 1))


def test_a_batch_whose_pool_serves_nothing_lets_its_runner_run_other_batches(
    served: Served,
) -> None:
    """A batch on a pool with no capacity for batches (no live node, or nodes full of
    online traffic) would hold a runner's place for its whole window: after
    MANTLE_BATCH_PARK_AFTER_S it lets go for MANTLE_BATCH_PARK_S, and the runner's only
    place runs the next batch meanwhile."""
    stack = served.live.stack
    pool = pool_ensure(name="parkpool", region="local", providers=["CPUExecutionProvider"])
    endpoint = Endpoint.objects.create(
        organization=served.org,
        name="parked-chat",
        pool=pool,
        model_version=served.endpoints[CHAT].model_version,
    )
    endpoint_publish(endpoint)
    runner = stack.batch_runner(
        "batch-runner-park",
        **FAST,
        MANTLE_BATCH_RUNNER_BATCHES="1",
        MANTLE_BATCH_PARK_AFTER_S="1",
        MANTLE_BATCH_PARK_S="600",
    )
    try:
        client = served.client()
        stuck = client.batches.create(
            input_file_id=upload(client, jsonl([chat_line("p-0", "hi", model=endpoint.id)])),
            endpoint="/v1/chat/completions",
            completion_window="24h",
        )
        wait_for(client, stuck.id, {"in_progress"})
        runs = client.batches.create(
            input_file_id=upload(client, jsonl([chat_line(f"r-{i}", "hi") for i in range(3)])),
            endpoint="/v1/chat/completions",
            completion_window="24h",
        )
        done = wait_for(client, runs.id, {"completed", "failed"}, timeout=120)
    finally:
        stack.stop(runner)

    assert done.status == "completed", done.errors
    assert len(lines_of(client, done.output_file_id)) == 3
    parked = BatchModel.objects.get(id=stuck.id)
    assert parked.status == "in_progress" and parked.request_completed == 0
    assert parked.runner == "" and parked.lease_until is not None
    assert parked.lease_until > timezone.now()  # its back-off: no runner takes it before
