"""Response stream events and the exactly-once usage event, on a real Redis."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np

from workers.contract import (
    RESPONSE_STREAM_DONE_TTL_S,
    RESPONSE_STREAM_TTL_S,
    USAGE_STREAM,
    UsageEvent,
    response_stream_key,
    usage_emitted_key,
)
from workers.engine.base import RequestResult
from workers.streams import USAGE_GUARD_TTL_S, ResponseWriter, emit_usage


def usage(request_id: str = "req-1", output_tokens: int = 5) -> UsageEvent:
    return UsageEvent(
        request_id=request_id,
        organization_id="org",
        project_id="proj",
        api_key_id="key",
        endpoint_id="ep",
        model_version_id="mv",
        model_name="m",
        input_tokens=3,
        output_tokens=output_tokens,
        status="stop",
        started_at=1.5,
        finished_at=2.5,
        queue_ms=4,
        compute_ms=1000,
        worker="node-1",
    )


def test_usage_is_emitted_exactly_once(redis_client: Any) -> None:
    assert emit_usage(redis_client, usage()) is True
    assert emit_usage(redis_client, usage(output_tokens=99)) is False
    entries = redis_client.xrange(USAGE_STREAM)
    assert len(entries) == 1
    assert UsageEvent.from_fields(entries[0][1]) == usage()
    ttl = redis_client.ttl(usage_emitted_key("req-1"))
    assert USAGE_GUARD_TTL_S - 10 < ttl <= USAGE_GUARD_TTL_S


def test_usage_of_different_requests_are_separate(redis_client: Any) -> None:
    assert emit_usage(redis_client, usage("a"))
    assert emit_usage(redis_client, usage("b"))
    assert redis_client.xlen(USAGE_STREAM) == 2


def test_writer_batches_a_step_into_one_flush(redis_client: Any) -> None:
    writer = ResponseWriter(redis_client)
    writer.started("a", worker="n1", pool="cpu")
    writer.delta("a", "Hel", 1)
    writer.delta("b", "lo", 2)
    assert redis_client.exists(response_stream_key("a")) == 0  # buffered until the flush
    writer.flush()
    writer.done("a", "stop", 3, 1)
    writer.error("b", "internal_error", "boom")
    writer.flush()
    writer.flush()  # nothing pending: no-op
    a = [fields for _, fields in redis_client.xrange(response_stream_key("a"))]
    b = [fields for _, fields in redis_client.xrange(response_stream_key("b"))]
    assert a == [
        {"type": "started", "worker": "n1", "pool": "cpu"},
        {"type": "delta", "text": "Hel", "tokens": "1"},
        {"type": "done", "finish_reason": "stop", "prompt_tokens": "3", "completion_tokens": "1"},
    ]
    assert b == [
        {"type": "delta", "text": "lo", "tokens": "2"},
        {"type": "error", "code": "internal_error", "message": "boom"},
    ]
    # Finished streams are left to expire soon (the gateway does not delete them).
    for key in (response_stream_key("a"), response_stream_key("b")):
        assert RESPONSE_STREAM_DONE_TTL_S - 5 < redis_client.ttl(key) <= RESPONSE_STREAM_DONE_TTL_S


def test_unfinished_stream_keeps_the_long_expiry(redis_client: Any) -> None:
    writer = ResponseWriter(redis_client)
    writer.started("c", worker="n1", pool="cpu")
    writer.delta("c", "x", 1)
    writer.flush()
    ttl = redis_client.ttl(response_stream_key("c"))
    assert RESPONSE_STREAM_TTL_S - 5 < ttl <= RESPONSE_STREAM_TTL_S


def test_embeddings_event_is_little_endian_float32(redis_client: Any) -> None:
    writer = ResponseWriter(redis_client)
    vectors = np.arange(6, dtype=np.float32).reshape(2, 3) / 7
    writer.embeddings("e", vectors, prompt_tokens=11)
    writer.flush()
    ((_, fields),) = redis_client.xrange(response_stream_key("e"))
    assert (fields["type"], fields["count"], fields["dims"], fields["prompt_tokens"]) == (
        "embeddings",
        "2",
        "3",
        "11",
    )
    decoded = np.frombuffer(base64.b64decode(fields["data"]), dtype="<f4").reshape(2, 3)
    np.testing.assert_array_equal(decoded, vectors)


def _through_proxy(proxy: Any) -> Any:
    import redis as redis_lib

    from tests.workers.conftest import TEST_REDIS_URL

    db = int(TEST_REDIS_URL.rsplit("/", 1)[1] or 0)
    return redis_lib.Redis(
        host="127.0.0.1", port=proxy.port, db=db, socket_timeout=1, socket_connect_timeout=1
    )


def test_usage_is_written_once_redis_is_back(redis_client: Any) -> None:
    import threading
    import time

    from tests.reliability.support import TcpProxy
    from workers.streams import emit_usage_durably

    port = redis_client.connection_pool.connection_kwargs["port"]
    proxy = TcpProxy(port)
    client = _through_proxy(proxy)
    outcome: dict[str, bool] = {}
    try:
        proxy.cut()
        worker = threading.Thread(
            target=lambda: outcome.update(ok=emit_usage_durably(client, usage(), within_s=30))
        )
        worker.start()
        time.sleep(0.5)  # the first attempts fail against the cut proxy
        assert worker.is_alive()
        proxy.restore()
        worker.join(timeout=40)
    finally:
        proxy.close()
        client.close()
    assert outcome == {"ok": True}
    assert redis_client.xlen(USAGE_STREAM) == 1


def test_usage_that_cannot_be_written_is_logged_whole(redis_client: Any, caplog: Any) -> None:
    import pytest
    import redis as redis_lib

    from tests.reliability.support import TcpProxy
    from workers.streams import emit_usage_durably

    proxy = TcpProxy(redis_client.connection_pool.connection_kwargs["port"])
    client = _through_proxy(proxy)
    try:
        proxy.cut()
        with pytest.raises(redis_lib.ConnectionError):
            emit_usage_durably(client, usage("req-lost"), within_s=0.3)
    finally:
        proxy.close()
        client.close()
    critical = [r.getMessage() for r in caplog.records if r.levelname == "CRITICAL"]
    assert len(critical) == 1
    assert '"request_id": "req-lost"' in critical[0]
    assert redis_client.xlen(USAGE_STREAM) == 0


def test_writer_writes_choices_and_logprobs(redis_client: Any) -> None:
    writer = ResponseWriter(redis_client)
    entry = ["é", [195, 169], -0.25, [["é", [195, 169], -0.25], ["e", [101], -1.5]]]
    writer.prompt_logprobs("p", [None, entry])
    writer.delta("p", "é", 1, index=2, logprobs=[entry])
    writer.delta("p", "", 0, logprobs=[])
    writer.choice_done("p", 2, "length", 7)
    writer.delta("p", "plain", 1)
    writer.flush()
    assert [fields for _, fields in redis_client.xrange(response_stream_key("p"))] == [
        {
            "type": "prompt_logprobs",
            "logprobs": '[null,["é",[195,169],-0.25,[["é",[195,169],-0.25],["e",[101],-1.5]]]]',
        },
        {
            "type": "delta",
            "text": "é",
            "tokens": "1",
            "index": "2",
            "logprobs": '[["é",[195,169],-0.25,[["é",[195,169],-0.25],["e",[101],-1.5]]]]',
        },
        {"type": "delta", "text": "", "tokens": "0", "logprobs": "[]"},
        {"type": "choice_done", "index": "2", "finish_reason": "length", "completion_tokens": "7"},
        {"type": "delta", "text": "plain", "tokens": "1"},
    ]
    # choice_done is not a final event: the stream keeps its long expiry.
    assert redis_client.ttl(response_stream_key("p")) > RESPONSE_STREAM_DONE_TTL_S


def result_of(output_tokens: int) -> RequestResult:
    return RequestResult(
        finish_reason="stop",
        prompt_tokens=3,
        completion_tokens=output_tokens,
        admitted_at=1.5,
        finished_at=2.5,
    )


def billed_from(result: RequestResult, request_id: str = "req-1") -> UsageEvent:
    return usage(request_id, output_tokens=result.completion_tokens)


def test_a_final_event_with_its_result_is_written_with_its_usage_event(redis_client: Any) -> None:
    """The usage event goes in the flush that carries the final event, not after it: a
    worker killed once the answer is out has billed it already."""
    writer = ResponseWriter(redis_client)
    writer.bill_with_final("req-1", billed_from)
    writer.started("req-1", worker="n1", pool="cpu")
    writer.delta("req-1", "Hello", 5)
    writer.flush()
    assert redis_client.xlen(USAGE_STREAM) == 0  # not with the deltas
    assert writer.billing_outcome("req-1") is None
    writer.done("req-1", "stop", 3, 5, result=result_of(5))
    assert redis_client.xlen(USAGE_STREAM) == 0  # buffered with the final event
    writer.flush()
    entries = redis_client.xrange(USAGE_STREAM)
    assert [UsageEvent.from_fields(fields) for _, fields in entries] == [usage()]
    assert redis_client.exists(usage_emitted_key("req-1"))
    assert [f["type"] for _, f in redis_client.xrange(response_stream_key("req-1"))] == [
        "started",
        "delta",
        "done",
    ]
    assert writer.billing_outcome("req-1") is True
    assert writer.billing_outcome("req-1") is None  # told once
    # Afterwards the submitter's own emit (a retry, a redelivered copy) adds nothing.
    assert emit_usage(redis_client, usage()) is False
    assert redis_client.xlen(USAGE_STREAM) == 1


def test_a_request_billed_already_is_not_billed_again_by_its_final_event(
    redis_client: Any,
) -> None:
    assert emit_usage(redis_client, usage("req-2"))
    writer = ResponseWriter(redis_client)
    writer.bill_with_final("req-2", lambda r: billed_from(r, "req-2"))
    writer.error("req-2", "internal_error", "boom", result=result_of(9))
    writer.flush()
    assert writer.billing_outcome("req-2") is False
    entries = redis_client.xrange(USAGE_STREAM)
    assert [UsageEvent.from_fields(f).output_tokens for _, f in entries] == [5]


def test_final_events_without_a_result_or_without_billing_write_no_usage(
    redis_client: Any,
) -> None:
    writer = ResponseWriter(redis_client)
    writer.bill_with_final("a", billed_from)
    writer.done("a", "stop", 3, 5)  # answered by the task itself: it emits on its own
    writer.done("b", "stop", 3, 5, result=result_of(5))  # nobody asked to bill b here
    writer.flush()
    assert redis_client.xlen(USAGE_STREAM) == 0
    assert writer.billing_outcome("a") is None
    assert writer.billing_outcome("b") is None
    writer.forget_billing("a")
    writer.done("a", "stop", 3, 5, result=result_of(5))  # forgotten: no longer billed here
    writer.flush()
    assert redis_client.xlen(USAGE_STREAM) == 0


def test_several_requests_billed_in_one_flush_each_get_their_own_event(
    redis_client: Any,
) -> None:
    writer = ResponseWriter(redis_client)
    for rid in ("x", "y", "z"):
        writer.bill_with_final(rid, lambda r, rid=rid: billed_from(r, rid))
        writer.delta(rid, "hi", 1)
    writer.embeddings("x", np.ones((1, 2), np.float32), 3, result=result_of(0))
    writer.done("y", "length", 3, 1, result=result_of(1))
    writer.error("z", "timeout", "late", result=result_of(2))
    writer.flush()
    found = {
        UsageEvent.from_fields(f).request_id: UsageEvent.from_fields(f).output_tokens
        for _, f in redis_client.xrange(USAGE_STREAM)
    }
    assert found == {"x": 0, "y": 1, "z": 2}
    assert [writer.billing_outcome(rid) for rid in ("x", "y", "z")] == [True, True, True]


def test_a_flush_after_its_submitter_gave_up_bills_once_and_keeps_no_outcome(
    redis_client: Any,
) -> None:
    """The engine's final event (with its usage) was buffered, then the task stopped waiting
    (`forget_billing`) before the flush: the usage is still written with the event, once,
    and no outcome is kept for a submitter that will never ask."""
    writer = ResponseWriter(redis_client)
    writer.bill_with_final("late", lambda r: billed_from(r, "late"))
    writer.done("late", "stop", 3, 5, result=result_of(5))
    writer.forget_billing("late")
    writer.flush()
    assert [UsageEvent.from_fields(f).request_id for _, f in redis_client.xrange(USAGE_STREAM)] == [
        "late"
    ]
    assert writer.billing_outcome("late") is None
    assert writer._billed == {} and writer._awaiting == set()


def test_a_usage_event_that_cannot_be_made_leaves_the_answer_whole(redis_client: Any) -> None:
    def broken(result: RequestResult) -> UsageEvent:
        raise ValueError("no identity")

    writer = ResponseWriter(redis_client)
    writer.bill_with_final("r", broken)
    writer.done("r", "stop", 3, 5, result=result_of(5))
    writer.flush()
    assert [f["type"] for _, f in redis_client.xrange(response_stream_key("r"))] == ["done"]
    assert redis_client.xlen(USAGE_STREAM) == 0
    assert writer.billing_outcome("r") is None  # the task emits it itself
