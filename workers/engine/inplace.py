"""Sessions of causal LM graphs that write their KV cache in place (GroupQueryAttention).

The built-in chat graph (workers/compile/gqa_graph.py) computes attention with ONNX
Runtime's `GroupQueryAttention`: rotary and attention in one node per layer, each row's
length given by `seqlens_k` (its total length - 1), its cache right-padded in a buffer
of any capacity. When a layer's `past` and `present` are the same memory the kernel
writes the new keys and values into it and copies nothing; this module binds them so
(ONNX Runtime's IO binding), one numpy buffer per layer and kind that the engine owns.

Inputs of such a graph: `input_ids` [batch, seq] int64, `seqlens_k` [batch] int32,
`total_sequence_length` [] int32 (the batch's longest total), `logits_index` [batch]
int64 (the flat index, in batch x seq, of the position whose logits each row wants:
right-padded rows end at different columns), and `past_key_values.{i}.{key,value}`
[batch, kv_heads, capacity, head_dim]. Outputs: `logits` [batch, 1, vocab] and the
presents, bound to the pasts. A call of more than one token per row over a past must be
of one row (the kernel's rule); fresh prompts of any lengths go together, right-padded.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

IN_PLACE_INPUTS = ("input_ids", "seqlens_k", "total_sequence_length", "logits_index")


def is_in_place(session: Any) -> bool:
    """Whether an ONNX Runtime session's graph has the in-place interface."""
    try:
        names = {i.name for i in session.get_inputs()}
    except AttributeError:
        return False
    return "seqlens_k" in names and "logits_index" in names


def feeds_for(ids: np.ndarray, totals: np.ndarray, ends: np.ndarray) -> dict[str, np.ndarray]:
    """The non-cache inputs of one call. `ids` [batch, seq] right-padded; `totals` [batch]
    each row's total length after the call (past + its new tokens); `ends` [batch] the
    column of each row's last new token."""
    batch, seq = ids.shape
    return {
        "input_ids": np.ascontiguousarray(ids, dtype=np.int64),
        "seqlens_k": (np.asarray(totals) - 1).astype(np.int32),
        "total_sequence_length": np.array(int(np.max(totals)), dtype=np.int32),
        "logits_index": np.arange(batch, dtype=np.int64) * seq + np.asarray(ends, np.int64),
    }


class InPlaceSession:
    """An ONNX Runtime session run with each layer's past and present bound to one buffer."""

    def __init__(self, session: Any) -> None:
        self.session = session
        outputs = [o.name for o in session.get_outputs()]
        self.present_names = [n for n in outputs if n.startswith("present.")]
        self.past_names = [n.replace("present", "past_key_values") for n in self.present_names]

    def run_in_place(
        self,
        feeds: Mapping[str, np.ndarray],
        kv: Sequence[np.ndarray],
        run_options: Any = None,
    ) -> np.ndarray:
        """Run one call: `kv` (in past order, each [batch, kv_heads, capacity, head_dim],
        float32, C-contiguous) receives the new keys and values; the logits [batch, 1, V]."""
        io = self.session.io_binding()
        for name, value in feeds.items():
            io.bind_cpu_input(name, value)
        io.bind_output("logits", "cpu")
        for past, present, buf in zip(self.past_names, self.present_names, kv, strict=True):
            if buf.dtype != np.float32 or not buf.flags.c_contiguous:
                raise ValueError(f"{past}: the cache buffer must be C-contiguous float32")
            shape = list(buf.shape)
            io.bind_input(past, "cpu", 0, np.float32, shape, buf.ctypes.data)
            io.bind_output(present, "cpu", 0, np.float32, shape, buf.ctypes.data)
        if run_options is None:
            self.session.run_with_iobinding(io)
        else:
            self.session.run_with_iobinding(io, run_options)
        # Only the logits are copied out: the caches are already where the engine wants them.
        return io.get_outputs()[0].numpy()


# Calls of every adaptive session in this process, by session, since it started: the
# worker's `mantle_worker_model_calls_total` (a counter must not fall when an engine is
# unloaded, so it is not a sum over the live ones).
_calls_lock = threading.Lock()
_calls_total = {"wide": 0, "narrow": 0}


def session_calls_total() -> dict[str, int]:
    with _calls_lock:
        return dict(_calls_total)


class AdaptiveInPlaceSession:
    """Two sessions of one in-place graph, one with every intra-op thread (`wide`) and one
    with a single thread (`narrow`), each call run by the one that suits the node now: the
    narrow one while other processes leave fewer cores than the wide one's threads
    (`contended()`, workers/runtime/contention.py). Both compute the same bits (the
    kernels split a call's work across threads by output, not by reduction; tested on the
    built-in model), so which one ran a call changes its time, never its tokens."""

    def __init__(
        self,
        wide: Any,
        narrow: Any,
        contended: Callable[[], bool],
        *,
        monitor: Any = None,
    ) -> None:
        """`monitor`: what `contended` reads (a CpuContention), for the worker's metrics."""
        self.monitor = monitor
        self.wide = InPlaceSession(wide)
        self.narrow = InPlaceSession(narrow)
        self.session = wide  # what the graph's inputs and outputs are read from
        self.present_names = self.wide.present_names
        self.past_names = self.wide.past_names
        self.contended = contended  # () -> bool, asked before each call
        self.narrow_calls = 0
        self.wide_calls = 0

    def run_in_place(
        self,
        feeds: Mapping[str, np.ndarray],
        kv: Sequence[np.ndarray],
        run_options: Any = None,
    ) -> np.ndarray:
        contended = self.contended()
        name = "narrow" if contended else "wide"
        with _calls_lock:
            _calls_total[name] += 1
        if contended:
            self.narrow_calls += 1
            return self.narrow.run_in_place(feeds, kv, run_options)
        self.wide_calls += 1
        return self.wide.run_in_place(feeds, kv, run_options)
