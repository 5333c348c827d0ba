"""Dynamic batching for embedding models: gather inputs briefly, run once, split back."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from workers.contract import EmbedRequest, FinishReason
from workers.engine.base import EventSink, RequestHandle, RequestResult
from workers.engine.batching import DynamicBatcher, Pending
from workers.engine.causal_lm import Session

if TYPE_CHECKING:
    from workers.runtime.models import LoadedModel

logger = logging.getLogger(__name__)

OUTPUT_NAME = "sentence_embedding"


class _Pending(Pending):
    __slots__ = ("inputs",)

    def __init__(
        self, request: EmbedRequest, sink: EventSink, inputs: list[tuple[int, ...]]
    ) -> None:
        super().__init__(request, sink, len(inputs))
        self.inputs = inputs


class EncoderEngine(DynamicBatcher[_Pending]):
    """Dynamic batching of embedding requests (see `DynamicBatcher` for when a batch closes).

    Inputs are sorted by length before they are cut into runs of `max_batch`
    so that padding stays small; a request larger than a batch is run in
    several chunks.
    """

    def __init__(
        self,
        session: Session,
        *,
        dimensions: int,
        max_input_tokens: int,
        name: str = "encoder",
        max_batch: int = 32,
        max_wait_ms: float = 5.0,
        pad_token_id: int = 0,
    ) -> None:
        super().__init__(name=name, max_batch=max_batch, max_wait_ms=max_wait_ms)
        self.dimensions = dimensions
        self._session = session
        self._max_input_tokens = max_input_tokens
        self._pad = pad_token_id
        inputs = getattr(session, "get_inputs", None)
        names = {i.name for i in inputs()} if inputs is not None else {"token_type_ids"}
        self._wants_token_types = "token_type_ids" in names

    @classmethod
    def from_model(cls, model: LoadedModel, *, max_batch: int, max_wait_ms: float) -> EncoderEngine:
        spec: Mapping[str, Any] = model.manifest["embedding"]
        pad = model.manifest.get("pad_token_id")
        return cls(
            model.session,
            dimensions=int(spec["dimensions"]),
            max_input_tokens=int(spec["max_input_tokens"]),
            name=model.ref.version_id,
            max_batch=max_batch,
            max_wait_ms=max_wait_ms,
            pad_token_id=int(pad) if pad is not None else 0,
        )

    def start(self) -> EncoderEngine:
        super().start()
        return self

    def submit(self, request: EmbedRequest, sink: EventSink) -> RequestHandle:
        # The gateway truncates already; clamping again keeps a bad payload
        # from asking the model for more positions than it has.
        inputs = [tuple(ids[: self._max_input_tokens]) for ids in request.inputs]
        pending = _Pending(request, sink, inputs)
        if not inputs or any(not ids for ids in inputs):
            return self._refuse(pending, "invalid_request", "every input needs at least one token")
        return self._enqueue(pending)

    def _run(self, batch: list[_Pending]) -> None:
        live = self._live(batch)
        if not live:
            return
        items = [(p, j, ids) for p in live for j, ids in enumerate(p.inputs)]
        items.sort(key=lambda item: len(item[2]))
        outputs = {id(p): np.zeros((len(p.inputs), self.dimensions), np.float32) for p in live}
        started = time.time()
        try:
            for start in range(0, len(items), self.max_batch):
                chunk = items[start : start + self.max_batch]
                vectors = self._embed([ids for _, _, ids in chunk])
                for (p, j, _), vector in zip(chunk, vectors, strict=True):
                    outputs[id(p)][j] = vector
        except Exception:
            logger.exception("encoder %s: batch of %d inputs failed", self.name, len(items))
            self._fail(live, "internal_error", "the model failed on the input")
            return
        answered = [p for p in live if p.handle.claim()]
        tokens = 0
        finished = []
        for pending in answered:
            prompt_tokens = sum(len(ids) for ids in pending.inputs)
            tokens += prompt_tokens
            result = self._result(pending, FinishReason.STOP, started, "", "")
            pending.sink.embeddings(
                pending.request.request_id, outputs[id(pending)], prompt_tokens, result=result
            )
            finished.append((pending, result))
        self.meter.add(tokens)
        self._flush_and_complete(finished)

    def _embed(self, inputs: list[tuple[int, ...]]) -> np.ndarray:
        width = max(len(ids) for ids in inputs)
        ids = np.full((len(inputs), width), self._pad, dtype=np.int64)
        mask = np.zeros((len(inputs), width), dtype=np.int64)
        for row, seq in enumerate(inputs):
            ids[row, : len(seq)] = seq
            mask[row, : len(seq)] = 1
        feeds = {"input_ids": ids, "attention_mask": mask}
        if self._wants_token_types:
            feeds["token_type_ids"] = np.zeros_like(ids)
        (vectors,) = self._session.run([OUTPUT_NAME], feeds)
        self.runs += 1
        return np.asarray(vectors, dtype=np.float32)

    def _result(
        self, pending: _Pending, reason: FinishReason, started: float, code: str, message: str
    ) -> RequestResult:
        return RequestResult(
            finish_reason=reason.value,
            prompt_tokens=sum(len(ids) for ids in pending.inputs),
            completion_tokens=0,
            admitted_at=started,
            finished_at=time.time(),
            error_code=code,
            error_message=message,
        )
