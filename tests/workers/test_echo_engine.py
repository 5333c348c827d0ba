"""The zero-compute echo engine: n choices, and what it cannot do without logits."""

from __future__ import annotations

import time

from tests.workers.fakes_support import RecordingSink
from workers.contract import BillingIdentity, GenerateRequest, ModelRef, SamplingParams
from workers.engine.echo import EchoEngine

REF = ModelRef("echo-v1", "echo", "0" * 64, "")


def generate(**sampling: object) -> GenerateRequest:
    return GenerateRequest(
        request_id="r1",
        model=REF,
        identity=BillingIdentity("org", "proj", "key", "ep", "echo-v1", "echo"),
        prompt_token_ids=(5, 6, 7),
        sampling=SamplingParams(max_tokens=2, **sampling),  # type: ignore[arg-type]
        deadline=time.time() + 60,
    )


def test_one_choice_keeps_its_events() -> None:
    sink = RecordingSink()
    result = EchoEngine.from_ref(REF).submit(generate(), sink).wait(1)
    assert [e[0] for e in sink.events] == ["delta", "done"]
    assert sink.events[0][2] == {"text": "5 6", "tokens": 2}
    assert result is not None and result.completion_tokens == 2
    assert sink.results[result_rid(sink)] is result  # given with the final event


def test_n_choices_each_replay_and_bill_every_choice() -> None:
    sink = RecordingSink()
    result = EchoEngine.from_ref(REF).submit(generate(n=3), sink).wait(1)
    kinds = [(kind, fields.get("index")) for kind, _, fields in sink.events]
    assert kinds == [
        ("delta", 0),
        ("choice_done", 0),
        ("delta", 1),
        ("choice_done", 1),
        ("delta", 2),
        ("choice_done", 2),
        ("done", None),
    ]
    done = sink.events[-1][2]
    assert done["completion_tokens"] == 6 and done["prompt_tokens"] == 3
    assert result is not None and result.completion_tokens == 6


def test_grammars_and_log_probabilities_are_refused() -> None:
    for sampling in ({"grammar": "start: /a/"}, {"logprobs": 0}, {"prompt_logprobs": 1}):
        sink = RecordingSink()
        result = EchoEngine.from_ref(REF).submit(generate(**sampling), sink).wait(1)
        assert [e[0] for e in sink.events] == ["error"]
        assert sink.events[0][2]["code"] == "invalid_request"
        assert result is not None and result.completion_tokens == 0
        assert sink.results[result_rid(sink)] is result


def result_rid(sink: RecordingSink) -> str:
    """The request id of the sink's final event."""
    return sink.events[-1][1]
