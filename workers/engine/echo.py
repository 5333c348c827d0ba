"""Zero-compute `echo` runtime: replays the prompt, to measure the platform's own overhead."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from workers.contract import FinishReason, GenerateRequest, ModelRef
from workers.engine.base import EventSink, RateMeter, RequestHandle, RequestResult
from workers.engine.text import StopFilter

logger = logging.getLogger(__name__)


def _ids_as_text(ids: Sequence[int]) -> str:
    return " ".join(str(i) for i in ids)


class EchoEngine:
    """Replays the first `max_tokens` prompt token ids as the completion, in the calling thread.

    The text is the ids decoded with `tokenizer.json` when the model's location
    has one (so a real tokenizer's round trip is measured too), and otherwise
    the ids written as decimal numbers separated by spaces ("1 2 3"), which
    needs no files at all. Everything goes out as one delta and one done event
    in a single flush: there is nothing to stream, and the point is to see
    what the platform costs without a model. Stop strings apply to that text;
    EOS ids do not (there is no manifest to name them).
    """

    def __init__(self, decode: Callable[[Sequence[int]], str], *, name: str = "echo") -> None:
        self.name = name
        self.max_batch = 0  # not a batching engine: it never holds a request
        self.free_slots = 0
        self._decode = decode
        self.meter = RateMeter()

    @classmethod
    def from_ref(cls, ref: ModelRef) -> EchoEngine:
        tokenizer_path = (
            Path(ref.location).expanduser() / "tokenizer.json" if ref.location else None
        )
        if tokenizer_path is not None and tokenizer_path.is_file():
            from tokenizers import Tokenizer  # native import, only for echo models that ship one

            tokenizer = Tokenizer.from_file(str(tokenizer_path))

            def decode(ids: Sequence[int]) -> str:
                return tokenizer.decode(list(ids), skip_special_tokens=True)

            return cls(decode, name=ref.version_id)
        return cls(_ids_as_text, name=ref.version_id)

    def start(self) -> EchoEngine:
        return self

    def stop(self, timeout: float = 0.0) -> None:
        return None

    def tokens_per_s(self) -> float:
        return self.meter.rate()

    def submit(self, request: GenerateRequest, sink: EventSink) -> RequestHandle:
        handle = RequestHandle(request.request_id)
        started = time.time()
        prompt = request.prompt_token_ids
        max_tokens = max(0, request.sampling.max_tokens)
        ids = prompt[:max_tokens]
        reason = FinishReason.LENGTH if len(prompt) > max_tokens else FinishReason.STOP
        stops = StopFilter(request.sampling.stop)
        text = stops.push(self._decode(ids))
        text += stops.finish()
        if stops.matched:
            reason = FinishReason.STOP
        handle.claim()
        sampling = request.sampling
        if sampling.grammar or sampling.logprobs >= 0 or sampling.prompt_logprobs >= 0:
            message = "the echo model has no logits: no grammars and no log probabilities"
            refused = RequestResult(
                finish_reason=FinishReason.ERROR.value,
                prompt_tokens=len(prompt),
                completion_tokens=0,
                admitted_at=0.0,
                finished_at=time.time(),
                error_code="invalid_request",
                error_message=message,
            )
            sink.error(request.request_id, "invalid_request", message, result=refused)
            sink.flush()
            handle.complete(refused)
            return handle
        n = max(1, sampling.n)
        if n == 1:
            if text:
                sink.delta(request.request_id, text, len(ids))
        else:
            # Every choice is the same replay, each with its own events.
            for index in range(n):
                if text:
                    sink.delta(request.request_id, text, len(ids), index=index)
                sink.choice_done(request.request_id, index, reason.value, len(ids))
        finished = time.time()
        result = RequestResult(
            finish_reason=reason.value,
            prompt_tokens=len(prompt),
            completion_tokens=n * len(ids),
            admitted_at=started,
            finished_at=finished,
            first_token_at=finished,
        )
        sink.done(request.request_id, reason.value, len(prompt), n * len(ids), result=result)
        sink.flush()
        self.meter.add(n * len(ids))
        handle.complete(result)
        return handle
