"""Continuous batching for causal language models over one ONNX Runtime session.

Each step, a row's next token comes from its logits in this order: logit_bias added, the
frequency and presence penalties, the grammar's mask (disallowed tokens at -inf), then the
greedy or sampled choice (temperature, top_p). Log probabilities are a log_softmax of the
logits as they stand just before the choice (bias, penalties and mask in; temperature and
top_p not), as OpenAI reports them; a prompt's scores (prompt_logprobs) are the model's own.
"""

from __future__ import annotations

import logging
import math
import mmap
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from workers.contract import (
    MAX_CHOICES,
    MAX_TOP_LOGPROBS,
    FinishReason,
    GenerateRequest,
    ServiceClass,
    cancel_key,
    logprob_entry,
)
from workers.engine.base import EventSink, RateMeter, RequestHandle, RequestResult
from workers.engine.constrain import Constrainer, apply_mask
from workers.engine.inplace import (
    AdaptiveInPlaceSession,
    InPlaceSession,
    feeds_for,
    is_in_place,
)
from workers.engine.prefix_cache import PrefixCache, shared_cache
from workers.engine.priority import (
    CUT_MIN_STEPS,
    FLEX_MAX_WAIT_S,
    ONLINE_LINGER_S,
    RANKS,
    OnlineActivity,
    batch_row_limit,
    fair_share,
    is_batch,
    online_burst,
    rank_of,
)
from workers.engine.sampling import bias_logits, logprobs_of, penalize, sample_token
from workers.engine.text import IncrementalDetokenizer, StopFilter
from workers.grammar import Compiled, GrammarError
from workers.runtime.contention import CpuContention, SessionThreads
from workers.runtime.memory import release_free_memory

if TYPE_CHECKING:
    import llguidance
    import redis

    from workers.runtime.models import LoadedModel

logger = logging.getLogger(__name__)

CANCEL_CHECK_INTERVAL_S = 0.05
# The smallest prompt chunk computed beside running streams: below it, a call's fixed cost
# (the traced graph copies the whole past into its presents) dominates and a long prompt
# crawls.
PREFILL_MIN_CHUNK = 16
# Prefill's time beside running streams, at most this share of decode's, so the time
# between their tokens is at most ~(1 + share)x what it is without the prompt. Measured
# with a 4k-token prompt beside 4 streams on the in-place graph (docs/benchmarks.md):
# 1.0 gave 2.0x (the prompt took 27 s), 0.7 gave 1.8-2.0x (35-38 s), 0.5 gave 1.6x (46 s).
# (On the traced graph the streams' own steps ran 1.6-2x slower between the prompt's
# calls, whose presents copied the whole past, and no share brought the ratio under 3x.)
PREFILL_SHARE = 0.5
# A priority prompt's call beside running streams computes at least this many tokens: the
# short prompts priority traffic sends go in one call (~25-60 ms here), and a long one still
# leaves the streams a decode step between its calls.
PRIORITY_CHUNK = 256
PREFILL_WINDOW_S = 2.0  # about how much decode time the share is measured over

IDLE_RELEASE_S = 2.0
"""How long the engine waits idle after work before handing free memory back."""
SERVED_DECAY_S = 10.0
"""How long an organization's recent tokens count against it (e-folding time) when
organizations holding equal rows compete for a free one."""
# Prefix-cache blocks gathered from a computed prompt at once (then copied out one by one).
GATHER_BLOCKS = 32


def prompt_piece(remaining: int, chunk: int) -> int:
    """Tokens of a prompt with `remaining` left to compute in a call of `chunk`: never a
    piece that leaves one token for a call of its own (ONNX Runtime computes one-token calls
    on another kernel path, whose logits differ: the answer would depend on the load that
    sized the chunks; the prefix cache leaves two tokens for the same reason)."""
    piece = min(remaining, chunk)
    if remaining - piece == 1 and piece > 1:
        piece -= 1
    return piece


KV_HEADROOM = 128
"""In-place caches: columns a buffer gets beyond what it holds, so that it grows (one copy
of the batch's cache) once per this many decode steps instead of every step."""

Standing = tuple[int, int]
"""Where a request stands for prefill order and cutting calls short: its class's rank, then
(with fair sharing) the rows its organization holds. Lower goes first: a prompt of an
organization holding fewer rows than every organization running beside it is computed at
once, whole (max-min fairness on rows)."""


class Session(Protocol):
    """The part of `onnxruntime.InferenceSession` the engine uses (tests pass a fake).

    `run_options` is passed only by an engine given a `run_options` factory, to calls that
    an online arrival may cut short (`RunOptions.terminate`)."""

    def run(
        self, output_names: Sequence[str], input_feed: Mapping[str, Any], *run_options: Any
    ) -> Sequence[Any]: ...


class InPlaceRunner(Protocol):
    """A session whose graph writes the KV cache in place (workers/engine/inplace.py)."""

    def run_in_place(
        self, feeds: Mapping[str, np.ndarray], kv: Sequence[np.ndarray], run_options: Any = None
    ) -> np.ndarray: ...


class _CutShort(Exception):
    """A session call of only batch work, cut short for an online request."""


def ort_run_options() -> Any:
    """ONNX Runtime's RunOptions for a call that may be cut short (quietly: a call cut
    short is not an error)."""
    import onnxruntime

    options = onnxruntime.RunOptions()
    options.log_severity_level = 4  # fatal only
    return options


@dataclass(frozen=True, slots=True)
class CausalLMSpec:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    eos_token_ids: frozenset[int]
    pad_token_id: int
    context_length: int

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any]) -> CausalLMSpec:
        lm = manifest["causal_lm"]
        eos = frozenset(int(i) for i in manifest.get("eos_token_ids") or ())
        pad = manifest.get("pad_token_id")
        return cls(
            num_layers=int(lm["num_layers"]),
            num_kv_heads=int(lm["num_kv_heads"]),
            head_dim=int(lm["head_dim"]),
            vocab_size=int(lm["vocab_size"]),
            eos_token_ids=eos,
            # Pad ids sit under mask 0, so any valid id works; the EOS id is the usual choice.
            pad_token_id=int(pad if pad is not None else min(eos, default=0)),
            context_length=int(manifest.get("context_length") or 2048),
        )


@dataclass(frozen=True, slots=True)
class _Publication:
    sinks: list[EventSink]
    completed: list[tuple[RequestHandle, RequestResult]]


class _Request:
    """One request inside the engine: what its choices share (prompt, sink, handle)."""

    __slots__ = (
        "admitted_at",
        "admitted_step",
        "batch",
        "cached_tokens",
        "choices",
        "first_token_at",
        "handle",
        "n",
        "open",
        "org",
        "prefill_ids",
        "prompt_entries",
        "prompt_len",
        "rank",
        "reason",
        "request",
        "seq",
        "sink",
    )

    def __init__(self, request: GenerateRequest, sink: EventSink) -> None:
        self.request = request
        self.sink = sink
        self.handle = RequestHandle(request.request_id)
        self.prompt_len = len(request.prompt_token_ids)
        self.n = max(1, request.sampling.n)
        self.batch = is_batch(request.service_class)  # a batch line: online requests go first
        self.rank = rank_of(request.service_class)
        self.org = request.identity.organization_id
        self.seq = 0  # arrival order in the engine (set by submit)
        # Scoring the prompt (teacher forcing): only its first token is prefilled, the
        # others are fed as forced decode steps, each one's logprob read on the way.
        scored = request.sampling.prompt_logprobs >= 0
        self.prefill_ids = request.prompt_token_ids[:1] if scored else request.prompt_token_ids
        self.prompt_entries: list[Any] | None = [None] if scored else None
        self.choices: list[_Seq] = []
        self.open = self.n  # choices not finished yet
        self.reason = FinishReason.STOP  # choice 0's, once it finished (n > 1)
        self.admitted_at = 0.0
        self.first_token_at = 0.0
        self.admitted_step = -1
        self.cached_tokens = 0  # prompt tokens whose KV came from the prefix cache


class _Prefill:
    """A request whose prompt is being computed, a chunk per call: its KV so far (rows
    [1, kv_heads, done, head_dim] in past order, no padding; None before the first call)."""

    __slots__ = ("arrival", "done", "past", "req", "served")

    def __init__(
        self, req: _Request, past: list[np.ndarray] | None, done: int, arrival: int, step: int
    ) -> None:
        self.req = req
        self.past = past
        self.done = done  # prompt tokens whose KV is in past
        self.arrival = arrival
        # The engine step of its last chunk (of its admission before any): prompts take
        # turns in this order, so fresh arrivals never hold a prompt half computed.
        self.served = step

    @property
    def remaining(self) -> int:
        return len(self.req.prefill_ids) - self.done


class _Seq:
    """One choice of a request (a row of the batch): its sampling and streaming state."""

    __slots__ = (
        "bias",
        "counts",
        "detok",
        "entries",
        "forced",
        "generated",
        "greedy",
        "index",
        "matcher",
        "penalized",
        "plain",
        "req",
        "rng",
        "stops",
        "top",
        "unreported_tokens",
    )

    def __init__(
        self,
        req: _Request,
        index: int,
        decode: Callable[[Sequence[int]], str],
        bias: tuple[np.ndarray, np.ndarray] | None,
        matcher: llguidance.LLMatcher | None,
    ) -> None:
        sampling = req.request.sampling
        self.req = req
        self.index = index
        self.greedy = sampling.temperature <= 0.0
        # One generator per choice: with a seed, the draws of this request do not depend
        # on which other requests share its batch, nor (for choice 0) on n.
        if index == 0:
            self.rng = np.random.default_rng(sampling.seed)
        elif sampling.seed is None:
            self.rng = np.random.default_rng()
        else:
            self.rng = np.random.default_rng([sampling.seed, index])
        self.generated: list[int] = []
        self.penalized = sampling.frequency_penalty != 0.0 or sampling.presence_penalty != 0.0
        self.counts: dict[int, int] = {}  # generated token -> times, kept when penalized
        self.bias = bias
        self.matcher = matcher
        self.top = sampling.logprobs  # -1: no logprobs
        self.entries: list[Any] = []  # logprob entries not sent yet
        # The prompt tokens still to feed as forced steps (prompt scoring), the next one
        # last; None when there are none.
        rest = req.request.prompt_token_ids[len(req.prefill_ids) :]
        self.forced: list[int] | None = list(reversed(rest)) if rest else None
        self.detok = IncrementalDetokenizer(decode)
        self.stops = StopFilter(sampling.stop)
        self.unreported_tokens = 0
        self.plain = False
        self.update_plain()

    def update_plain(self) -> None:
        """Whether this row is plain greedy: the batch's argmax is its token, nothing else."""
        self.plain = (
            self.greedy
            and not self.penalized
            and self.bias is None
            and self.matcher is None
            and self.top < 0
            and self.forced is None
        )


class CausalLMEngine:
    """Runs every in-flight generation of one model version as one batch.

    A single engine thread owns the session and the batch state. Between two
    decode steps it admits waiting sequences: their prompts are prefilled
    together (left-padded), and their KV cache is merged into the running
    batch by left-padding both sides to a common length and concatenating on
    the batch axis. Finished sequences are sliced out, and leading columns that
    are padding for every remaining row are trimmed. The KV cache is copied
    only when the composition of the batch changes; a plain decode step feeds
    the previous step's `present` tensors straight back as `past`.

    Padding is invisible to the model: padded positions are masked out of
    attention, and each row carries its own position ids, so a sequence's
    tokens do not depend on its neighbours (up to float rounding).

    That is the traced graph's layout. A graph that writes its cache in place
    (GroupQueryAttention; workers/engine/inplace.py) gets the other one: each
    row's cache right-padded in buffers the engine owns, with room to grow
    (KV_HEADROOM columns), a row's length being its next position. A decode
    step then copies no cache at all: the kernel writes one column per row
    into the buffers, which are copied only when they fill up and, as above,
    when the batch's composition changes. A prompt's later chunks are written
    into its own buffer, one prompt per call (the kernel's rule); fresh
    prompts still share a call, right-padded.

    A request with n choices is prefilled once, as one row; its cache row is
    repeated n times when it joins the batch, and each choice is a row of its
    own from then on. It takes n rows of `max_batch`, and is admitted only when
    n rows are free. With n == 1 a request's events are exactly those of a
    request that knows nothing of choices (no index, no choice_done).

    Batch lines (`service_class` "batch") run on what online requests leave
    (workers/engine/priority.py): waiting online requests are admitted first
    and their prompts computed first; an online request never waits for batch
    rows to end (it may go over `max_batch` by a burst allowance) and beside
    only batch rows its prompt is computed at once, whole, and its first token
    published before the batch's next step; while online traffic is present,
    batch rows are held to a share of the batch. With a `run_options` factory
    (ONNX Runtime's RunOptions; `from_model` gives one), a session call of only
    batch work is cut short when an online request arrives during it
    (`terminate`): the call changed nothing, so it is simply run again after the
    online prompt, and the online request does not wait for a whole batch step.
    """

    def __init__(
        self,
        session: Session | InPlaceRunner,
        spec: CausalLMSpec,
        decode: Callable[[Sequence[int]], str],
        *,
        name: str = "causal-lm",
        max_batch: int = 32,
        max_prefill_tokens: int = 4096,
        redis_client: redis.Redis | None = None,
        cancel_check_interval_s: float = CANCEL_CHECK_INTERVAL_S,
        grammar_compiler: Callable[[], Compiled] | None = None,
        prefix_cache: PrefixCache | None = None,
        online_linger_s: float = ONLINE_LINGER_S,
        run_options: Callable[[], Any] | None = None,
        fair_sharing: bool = True,
        flex_max_wait_s: float = FLEX_MAX_WAIT_S,
    ) -> None:
        self.name = name
        self.fair_sharing = fair_sharing
        self.flex_max_wait_s = flex_max_wait_s
        self.spec = spec
        self.max_batch = max(1, max_batch)
        if is_in_place(session):  # an ONNX Runtime session of an in-place graph
            session = InPlaceSession(session)
        self._session = session
        # A graph that writes its cache in place (GroupQueryAttention): rows right-padded in
        # buffers with room to grow, each row's length its next position; otherwise the
        # traced graph's layout, left-padded with an attention mask, presents copied out.
        self._in_place = callable(getattr(session, "run_in_place", None))
        self._decode = decode
        self._max_prefill_tokens = max_prefill_tokens
        self._redis = redis_client
        self._cancel_interval = cancel_check_interval_s
        # Grammars and token bytes (logprobs); `grammar_compiler` builds llguidance's view
        # of the tokenizer on first use (None: no grammars; token bytes from `decode`).
        self.constrainer = Constrainer(grammar_compiler, spec.vocab_size, decode)
        self._past_names = [
            f"past_key_values.{i}.{kind}"
            for i in range(spec.num_layers)
            for kind in ("key", "value")
        ]
        self._output_names = ["logits"] + [
            f"present.{i}.{kind}" for i in range(spec.num_layers) for kind in ("key", "value")
        ]
        self._cond = threading.Condition()
        # Waiting requests: online ones (every tier), admitted by standing and fair share
        # (`_admit`), and batch lines in arrival order, admitted on what online ones leave.
        self._waiting: deque[_Request] = deque()
        self._waiting_batch: deque[_Request] = deque()
        self._waiting_rows = 0  # rows the waiting requests will take (their n)
        self._submitted = 0
        # The organizations' rows as the last admission saw them: a submitting thread
        # places a new request with them (guarded by _cond).
        self._org_rows_seen: dict[str, int] = {}
        # Tokens each organization's online rows received lately (decayed with
        # SERVED_DECAY_S), the tie-break between organizations holding equal rows: the one
        # served least lately goes first (engine thread only).
        self._served: dict[str, tuple[float, float]] = {}
        # The call under way, as an arrival sees it: its best rank, and the fewest rows an
        # organization with rows of that rank holds (an arrival with fewer stands ahead).
        self._cut: tuple[int, int] = (len(RANKS), 0)
        self._calls_since_cut = CUT_MIN_STEPS
        self._online = OnlineActivity(online_linger_s)
        # The RunOptions of the session call under way when it is only batch work (an
        # online arrival sets its `terminate`); guarded by _cond.
        self._run_options = run_options
        self._cuttable: Any = None
        self.cut_short = 0  # session calls cut short for online requests (tests, logs)
        self._stopping = False
        # Batch state, owned by the engine thread. Row r of every array is _running[r].
        self._running: list[_Seq] = []
        self._admitting: list[_Request] = []  # in the prefill call under way
        # Prompts being computed (chunked beside running streams), and the rows they take.
        self._prefilling: list[_Prefill] = []
        self._prefilling_rows = 0
        self._arrivals = 0
        self._cache = prefix_cache if prefix_cache is not None and prefix_cache.enabled else None
        # Timings that size prefill chunks: the last decode step's seconds (smoothed), the
        # last prefill call's seconds per padded token, and the time each took while both
        # had work (prefill's share is kept at most decode's).
        self._decode_s = 0.0
        self._prefill_s_per_token = 0.0
        self._contended_prefill_s = 0.0
        self._contended_decode_s = 0.0
        self._past: list[np.ndarray] = []  # [B, kv_heads, P, head_dim] per layer and key/value
        self._mask = np.zeros((0, 0), dtype=np.int64)  # [B, P]: 1 where the cache holds a token
        self._next_ids = np.zeros(0, dtype=np.int64)  # [B]: token to feed at the next step
        self._next_pos = np.zeros(0, dtype=np.int64)  # [B]: its position id
        self.step = 0  # session runs so far (prefills and decodes)
        self._last_cancel_check = 0.0
        self._dirty_sinks: dict[int, EventSink] = {}
        self._to_complete: list[tuple[RequestHandle, RequestResult]] = []
        self._ended_requests = False  # a request ended as a whole during this step
        self._published: queue.SimpleQueue[_Publication | None] = queue.SimpleQueue()
        self.meter = RateMeter()
        self.memory_releases = 0  # times the idle engine handed free memory back
        self._thread = threading.Thread(target=self._loop, name=f"engine-{name}", daemon=True)
        self._publisher = threading.Thread(
            target=self._publish_loop, name=f"engine-{name}-publish", daemon=True
        )

    @classmethod
    def from_model(
        cls,
        model: LoadedModel,
        *,
        max_batch: int,
        max_prefill_tokens: int,
        redis_client: redis.Redis | None,
        prefix_cache: PrefixCache | None = None,
        fair_sharing: bool = True,
        flex_max_wait_s: float = FLEX_MAX_WAIT_S,
    ) -> CausalLMEngine:
        """`prefix_cache`: None for the process's shared one (MANTLE_KV_CACHE_MB)."""
        tokenizer = model.text_tokenizer()
        spec = CausalLMSpec.from_manifest(model.manifest)
        tokenizer_file = str(
            model.directory / str(model.manifest.get("tokenizer_file", "tokenizer.json"))
        )

        def decode(ids: Sequence[int]) -> str:
            return tokenizer.decode(list(ids), skip_special_tokens=True)

        def compiler() -> Compiled:
            return Compiled(tokenizer_file, sorted(spec.eos_token_ids))

        session: Any = model.session
        if model.narrow_session is not None:
            # The threads the wide session was made with, not worked out again.
            threads = model.session.get_session_options().intra_op_num_threads
            # Only the session's own threads as "mine" when they are known: the worker's
            # other threads crowd the session's as much as another process does.
            monitor = (
                CpuContention(threads, process=SessionThreads(model.session_threads))
                if model.session_threads
                else CpuContention(threads)
            )
            session = AdaptiveInPlaceSession(
                model.session, model.narrow_session, monitor.check, monitor=monitor
            )
        return cls(
            session,
            spec,
            decode,
            name=model.ref.version_id,
            max_batch=max_batch,
            max_prefill_tokens=max_prefill_tokens,
            redis_client=redis_client,
            grammar_compiler=compiler,
            prefix_cache=prefix_cache if prefix_cache is not None else shared_cache(),
            run_options=ort_run_options,
            fair_sharing=fair_sharing,
            flex_max_wait_s=flex_max_wait_s,
        )

    # --- the submitters' side (any thread) ------------------------------------

    def start(self) -> CausalLMEngine:
        self._publisher.start()
        self._thread.start()
        return self

    def submit(self, request: GenerateRequest, sink: EventSink) -> RequestHandle:
        req = _Request(request, sink)
        problem = self._check_request(request)
        matchers: list[llguidance.LLMatcher] | None = None
        if not problem and (
            request.sampling.logprobs >= 0 or request.sampling.prompt_logprobs >= 0
        ):
            self.constrainer.compiled()  # token bytes: built here, never on the engine thread
        if not problem and request.sampling.grammar:
            # Compiled here, on the submitting task's thread (llguidance releases the GIL):
            # a grammar never stalls the batch's steps.
            try:
                matchers = self.constrainer.matchers(request.sampling.grammar, req.n)
            except GrammarError as exc:
                problem = f"the grammar cannot be used: {exc}"
        if problem:
            if req.handle.claim():
                result = self._result(req, FinishReason.ERROR, "invalid_request", problem)
                sink.error(request.request_id, "invalid_request", problem, result=result)
                sink.flush()
                req.handle.complete(result)
            return req.handle
        bias = _bias_arrays(request.sampling.logit_bias)
        req.choices = [
            _Seq(req, i, self._decode, bias, matchers[i] if matchers else None)
            for i in range(req.n)
        ]
        with self._cond:
            if self._stopping:
                raise RuntimeError(f"engine {self.name} is stopped")
            self._submitted += 1
            req.seq = self._submitted
            (self._waiting_batch if req.batch else self._waiting).append(req)
            self._waiting_rows += req.n
            if self._cuttable is not None and self._ahead_of_call(req):
                self._cuttable.terminate = True
            self._cond.notify()
        return req.handle

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)
        if self._publisher.is_alive():
            self._published.put(None)
            self._publisher.join(timeout)

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def waiting(self) -> int:
        return len(self._waiting) + len(self._waiting_batch)

    def waiting_by_class(self) -> dict[str, int]:
        """Requests waiting to be admitted, by class of work (a snapshot)."""
        out: dict[str, int] = {}
        with self._cond:
            for req in (*self._waiting, *self._waiting_batch):
                key = req.request.service_class
                key = key if key in RANKS else ServiceClass.ONLINE.value
                out[key] = out.get(key, 0) + 1
        return out

    def rows_by_class(self) -> tuple[int, int]:
        """(online, batch) rows running or having their prompt computed (a snapshot)."""
        seqs = [s.req for s in list(self._running)] + [p.req for p in list(self._prefilling)]
        batch = sum(1 for req in seqs if req.batch)
        return len(seqs) - batch, batch

    @property
    def free_slots(self) -> int:
        return max(
            0, self.max_batch - len(self._running) - self._prefilling_rows - self._waiting_rows
        )

    def tokens_per_s(self) -> float:
        return self.meter.rate()

    def cpu_crowding(self) -> float | None:
        """Cores that other processes and the worker's threads outside the session took
        from the session's cores over the contention monitor's last window (None without
        adaptive threads, MANTLE_ORT_ADAPTIVE_THREADS)."""
        session = self._session
        if isinstance(session, AdaptiveInPlaceSession) and session.monitor is not None:
            return float(session.monitor.others)
        return None

    def _check_request(self, request: GenerateRequest) -> str:
        sampling = request.sampling
        if not request.prompt_token_ids:
            return "the prompt is empty"
        if len(request.prompt_token_ids) >= self.spec.context_length:
            return (
                f"the prompt has {len(request.prompt_token_ids)} tokens; "
                f"this model's context is {self.spec.context_length}"
            )
        if sampling.max_tokens < 1:
            return "max_tokens must be at least 1"
        if any(not 0 <= t < self.spec.vocab_size for t in request.prompt_token_ids):
            return "the prompt has token ids outside the vocabulary"
        if not 1 <= sampling.n <= MAX_CHOICES:
            return f"n must be between 1 and {MAX_CHOICES}"
        if sampling.n > self.max_batch:
            return f"n is {sampling.n}; this model's workers run at most {self.max_batch} at once"
        for name, k in (
            ("logprobs", sampling.logprobs),
            ("prompt_logprobs", sampling.prompt_logprobs),
        ):
            if not -1 <= k <= MAX_TOP_LOGPROBS:
                return f"{name} must be between 0 and {MAX_TOP_LOGPROBS}"
        if any(not 0 <= t < self.spec.vocab_size for t, _ in sampling.logit_bias):
            return "logit_bias has token ids outside the vocabulary"
        return ""

    # --- the engine thread ----------------------------------------------------

    def _loop(self) -> None:
        logger.info("engine %s started (max batch %d)", self.name, self.max_batch)
        worked = False  # whether the engine ran since it last handed free memory back
        while True:
            release = False
            with self._cond:
                while (
                    not self._stopping
                    and not self._waiting
                    and not self._waiting_batch
                    and not self._running
                    and not self._prefilling
                ):
                    if not worked:
                        self._cond.wait()
                    elif not self._cond.wait(IDLE_RELEASE_S):
                        release = True
                        break
                if self._stopping:
                    break
            if release:
                # Idle for a while after work: what the burst's rows held goes back to the
                # system, not kept for a burst that may not come (workers.runtime.memory).
                worked = False
                if release_free_memory():
                    self.memory_releases += 1
                continue
            worked = True
            try:
                self._iteration()
            except Exception:
                # Never let the thread die with requests in it: every client
                # gets an error event instead of a stream that hangs.
                logger.exception("engine %s: step failed; failing the whole batch", self.name)
                self._fail_running("internal_error", "the model failed while generating")
            self._publish()
        self._shutdown()

    def _iteration(self) -> None:
        now = time.time()
        if now - self._last_cancel_check >= self._cancel_interval:
            self._last_cancel_check = now
            self._sweep(now)
        self._admit()
        if self._prefilling and self._may_prefill() and not self._prefill_step():
            return  # cut short for an online request: admitted at the next iteration
        if self._prefilling and self._online_first():
            return  # an online prompt goes on alone: batch rows wait for it
        if self._running:
            started = time.monotonic()
            if not self._decode_step():
                return
            elapsed = time.monotonic() - started
            self._decode_s = (
                elapsed if self._decode_s <= 0 else 0.8 * self._decode_s + 0.2 * elapsed
            )
            if self._prefilling:
                self._contended_decode_s += elapsed
                if self._contended_decode_s > PREFILL_WINDOW_S:
                    # Recent time counts, not a long contention's whole history: when the
                    # share changes, prefill does not run (or wait) for minutes to catch up.
                    self._contended_prefill_s /= 2
                    self._contended_decode_s /= 2

    def _sweep(self, now: float) -> None:
        """Drop cancelled, expired and abandoned requests, running or waiting."""
        with self._cond:
            waiting = [*self._waiting, *self._waiting_batch]
        running = list({id(s.req): s.req for s in self._running}.values())
        reqs = running + [p.req for p in self._prefilling] + waiting
        if not reqs:
            return
        cancelled: set[int] = set()
        if self._redis is not None:
            try:
                flags = self._redis.mget([cancel_key(r.request.request_id) for r in reqs])
                cancelled = {i for i, flag in enumerate(flags) if flag}
            except Exception:
                logger.warning("engine %s: cancellation check failed", self.name, exc_info=True)
        flex = RANKS[ServiceClass.FLEX.value]
        for i, req in enumerate(reqs):
            if req.handle.claimed:  # the submitter gave up and already answered
                continue
            if i in cancelled:
                self._finish(req, FinishReason.CANCELLED)
            elif req.request.deadline and req.request.deadline < now:
                self._fail(req, "deadline_exceeded", "the request deadline passed")
            elif (
                req.rank == flex
                and req.admitted_step < 0  # waiting, or given a row but not yet computed
                and now - (req.request.enqueued_at or now) > self.flex_max_wait_s
            ):
                # Never served late, never dropped: a clean refusal the client may retry.
                self._fail(
                    req,
                    "resource_unavailable",
                    f"flex capacity is not available: the request waited "
                    f"{self.flex_max_wait_s:.0f} s without starting; retry later or use "
                    "the default tier",
                )
        # Every way a request ends claims its handle.
        if not any(r.handle.claimed for r in reqs):
            return
        with self._cond:
            self._waiting = deque(r for r in self._waiting if not r.handle.claimed)
            self._waiting_batch = deque(r for r in self._waiting_batch if not r.handle.claimed)
            self._waiting_rows = sum(r.n for r in (*self._waiting, *self._waiting_batch))
        gone = [p for p in self._prefilling if p.req.handle.claimed]
        if gone:
            self._drop_prefilling(gone)
        keep = [r for r, s in enumerate(self._running) if not s.req.handle.claimed]
        if len(keep) != len(self._running):
            self._compact(keep)

    def _admit(self) -> None:
        """Move waiting requests into prefill while the batch has rows for them; a prompt
        whose first blocks are in the prefix cache starts from them.

        Online requests first (every tier), by standing: their class's rank (provisioned
        and priority, then default, then flex), then, with fair sharing, the organization
        holding the fewest rows, then arrival. They count against `max_batch` among
        themselves; a request of priority rank, or of an organization within its fair
        share of rows (`max_batch` split among the organizations with online work here),
        may take the burst allowance beyond it (`online_burst` rows), so that a quiet
        organization never waits for another's long streams to end. Batch lines next,
        only while no online request waits, within `max_batch` and `batch_row_limit`
        (priority.py)."""
        counts = self._org_rows()
        online_rows, batch_rows = self.rows_by_class()
        total = online_rows + batch_rows
        admitted: list[_Request] = []
        with self._cond:
            share = self._share_of(counts)
            ceiling = self.max_batch + online_burst(self.max_batch)
            now = time.monotonic()
            # A request of a lower class than a prompt already waiting to be computed would
            # hold a row that no call reaches until those prompts are done: it waits here,
            # where it keeps no row and a flex request's waiting limit applies.
            computing = min((p.req.rank for p in self._prefilling if not p.req.batch), default=None)
            while self._waiting:
                req = min(self._waiting, key=lambda r: self._order(r, counts, now))
                if computing is not None and req.rank > computing:
                    break
                n = req.n
                favoured = req.rank == 0 or (
                    self.fair_sharing and counts.get(req.org, 0) + n <= share
                )
                if total + n > ceiling or (online_rows + n > self.max_batch and not favoured):
                    break
                self._waiting.remove(req)
                self._waiting_rows -= n
                online_rows += n
                total += n
                counts[req.org] = counts.get(req.org, 0) + n
                admitted.append(req)
                computing = req.rank if computing is None else min(computing, req.rank)
            if online_rows or self._waiting:
                self._online.touch()
            if not self._waiting:
                limit = batch_row_limit(self.max_batch, online_rows, self._online.recent())
                while self._waiting_batch:
                    n = self._waiting_batch[0].n
                    if total + n > self.max_batch or batch_rows + n > limit:
                        break
                    req = self._waiting_batch.popleft()
                    self._waiting_rows -= n
                    batch_rows += n
                    total += n
                    admitted.append(req)
            self._org_rows_seen = counts
        for req in admitted:
            past: list[np.ndarray] | None = None
            if self._cache is not None:
                blocks = self._cache.lookup(self._namespace(req), req.prefill_ids)
                if blocks:
                    req.cached_tokens = len(blocks) * self._cache.block_tokens
                    stacked = np.concatenate(blocks, axis=2)  # [2L, H, cached, D]
                    past = [np.ascontiguousarray(stacked[k][None]) for k in range(len(blocks[0]))]
            self._prefilling.append(
                _Prefill(req, past, req.cached_tokens, self._arrivals, self.step)
            )
            self._arrivals += 1
            self._prefilling_rows += req.n

    # --- fair sharing ---------------------------------------------------------------------

    def _org_rows(self) -> dict[str, int]:
        """Rows each organization's online requests hold (running, or their prompt being
        computed); batch lines are apart (their class already yields to every online one)."""
        counts: dict[str, int] = {}
        for seq in self._running:
            if not seq.req.batch:
                counts[seq.req.org] = counts.get(seq.req.org, 0) + 1
        for p in self._prefilling:
            if not p.req.batch:
                counts[p.req.org] = counts.get(p.req.org, 0) + p.req.n
        return counts

    def _share_of(self, counts: Mapping[str, int]) -> float:
        """Each organization's fair share of rows: `max_batch` split among those with online
        work here (rows or waiting requests). Called with _cond held."""
        orgs = set(counts) | {r.org for r in self._waiting}
        return fair_share(self.max_batch, len(orgs))

    def _order(
        self, req: _Request, counts: Mapping[str, int], now: float
    ) -> tuple[int, int, float, int]:
        if not self.fair_sharing:
            return (req.rank, 0, 0.0, req.seq)
        return (req.rank, counts.get(req.org, 0), self._served_lately(req.org, now), req.seq)

    def _served_lately(self, org: str, now: float) -> float:
        value, at = self._served.get(org, (0.0, now))
        return value * math.exp(-(now - at) / SERVED_DECAY_S)

    def _count_served(self, rows: Sequence[_Seq]) -> None:
        """One token for each online row's organization (after a decode step)."""
        if not self.fair_sharing:
            return
        now = time.monotonic()
        per_org: dict[str, int] = {}
        for seq in rows:
            if not seq.req.batch:
                per_org[seq.req.org] = per_org.get(seq.req.org, 0) + 1
        for org, tokens in per_org.items():
            self._served[org] = (self._served_lately(org, now) + tokens, now)
        if len(self._served) > 4 * self.max_batch:  # forget organizations long gone
            for org in [o for o in self._served if self._served_lately(o, now) < 1.0]:
                del self._served[org]

    def _standing(self, req: _Request, counts: Mapping[str, int]) -> Standing:
        if not self.fair_sharing or req.batch:
            return (req.rank, 0)
        return (req.rank, counts.get(req.org, 0))

    def _ahead_of_call(self, req: _Request) -> bool:
        """Whether `req` stands ahead of every row of the call under way (_cond held): a
        better rank, or, with fair sharing, the same rank and fewer rows (its own included)
        than any organization holding rows of that rank in the call."""
        rank, fewest = self._cut
        if req.rank < rank:
            return True
        return (
            self.fair_sharing
            and not req.batch
            and req.rank == rank
            and self._org_rows_seen.get(req.org, 0) + req.n < fewest
        )

    def _call_standing(self, reqs: Sequence[_Request]) -> tuple[int, int]:
        """`_cut` for a call over the rows of `reqs`: their best rank, and the fewest rows
        an organization with rows of that rank holds."""
        rank = min(r.rank for r in reqs)
        if not self.fair_sharing:
            return rank, 0
        counts = self._org_rows()
        level = [counts.get(r.org, 0) for r in reqs if r.rank == rank and not r.batch]
        return rank, min(level, default=0)

    def _standings(self) -> tuple[Standing | None, Callable[[_Request], Standing]]:
        """The best standing among running rows (None when none runs), and the standing of
        any request, both as the engine stands now."""
        counts = self._org_rows()

        def standing(req: _Request) -> Standing:
            return self._standing(req, counts)

        best = min((standing(s.req) for s in self._running), default=None)
        return best, standing

    def _namespace(self, req: _Request) -> str:
        # Per model version and organization: tenants never share blocks (module docs).
        return f"{self.name}\x00{req.request.identity.organization_id}"

    def _online_first(self) -> bool:
        """Whether a prompt waits to be computed beside only rows that stand behind it
        (batch rows behind an online prompt, default-tier rows behind a priority one, rows
        of organizations holding more rows than its own): then it need not spare their
        pace, and it is computed at once, whole."""
        if not self._prefilling:
            return False
        best_running, standing = self._standings()
        if best_running is None:
            return any(not p.req.batch for p in self._prefilling)
        return any(standing(p.req) < best_running for p in self._prefilling)

    def _prefill_budget(self) -> int:
        """Tokens (padded) the next prefill call may compute. With nothing decoding it is
        the whole bound, and so beside only batch rows for an online prompt; beside running
        streams a chunk sized to take about as long as one decode step (from the last
        calls' timings), at least PREFILL_MIN_CHUNK, or PRIORITY_CHUNK for a priority
        prompt: a short one is computed in one call, not in decode-step-sized pieces."""
        if not self._running or self._prefill_s_per_token <= 0.0 or self._online_first():
            return self._max_prefill_tokens
        fit = int(self._decode_s / self._prefill_s_per_token) if self._decode_s > 0 else 0
        least = PRIORITY_CHUNK if self._priority_prompt() else PREFILL_MIN_CHUNK
        return min(self._max_prefill_tokens, max(least, fit))

    def _may_prefill(self) -> bool:
        """Whether prefill gets this iteration. While streams decode, prefill's time is at
        most PREFILL_SHARE of decode's (so time between their tokens stays within
        (1 + PREFILL_SHARE)x while a long prompt is computed), scaled up by how many more
        rows wait for their prompt than decode: when most rows are prompts not yet computed
        (a surge), sparing the few decoding ones would starve the many (each row then gets
        about equal time). Alone, for an online prompt beside only batch rows, or for a
        priority prompt that is short or not yet started (`_priority_prompt`), it always
        runs."""
        if not self._running:
            self._contended_prefill_s = self._contended_decode_s = 0.0
            return True
        if self._online_first() or self._priority_prompt():
            return True
        share = PREFILL_SHARE * max(1.0, self._prefilling_rows / len(self._running))
        return self._contended_prefill_s <= share * self._contended_decode_s

    def _priority_prompt(self) -> bool:
        """Whether a prompt of priority rank waits to be computed and is short (what is left
        of it fits PRIORITY_CHUNK) or not yet started: its call goes at once, not when
        prefill's share of time comes round again (its first token waited for that share
        between decode-step-sized pieces, 0.2-0.3 s under a surge). A long one's later
        chunks keep to the share, so the streams beside it keep their pace."""
        return any(
            p.req.rank == 0 and (p.remaining <= PRIORITY_CHUNK or p.req.admitted_step < 0)
            for p in self._prefilling
        )

    def _prefill_step(self) -> bool:
        """One session call that computes the next chunk of one or more prompts; False
        when the call was cut short (nothing changed).

        Online prompts go before batch ones; within a class the rows served least recently
        go first (a fresh prompt counts as served when it was admitted; arrival order among
        equals): prompts take turns, so a long prompt being computed chunk by chunk never
        holds short ones behind it, and a stream of fresh arrivals never holds it. Rows join
        a call only if they are of the first one's class and have as much past as it (0 for
        fresh prompts, or the same cached prefix): a call's rows are padded to one past and
        one chunk width, and a batch prompt never makes an online one's call longer.
        """
        budget = self._prefill_budget()
        uncontended = self._online_first()
        _, standing = self._standings()
        order = sorted(self._prefilling, key=lambda p: (standing(p.req), p.served, p.arrival))
        head = order[0]
        rows = [head]
        chunk = min(head.remaining, budget)
        # An in-place graph computes several tokens over a past for one row at a time.
        alone = self._in_place and head.done > 0
        for cand in order[1:] if not alone else ():
            if cand.done != head.done or standing(cand.req) != standing(head.req):
                continue
            wider = max(chunk, min(cand.remaining, budget))
            if (len(rows) + 1) * wider > budget:
                continue
            rows.append(cand)
            chunk = wider
        chunks = [prompt_piece(p.remaining, chunk) for p in rows]
        self._admitting = [p.req for p in rows]
        started = time.monotonic()
        try:
            logits, presents, mask = self._prefill_call(rows, chunks)
        except _CutShort:
            self._admitting = []  # nothing changed: the chunk is computed again later
            return False
        except Exception:
            logger.exception("engine %s: prefill of %d sequences failed", self.name, len(rows))
            for p in rows:
                self._fail(p.req, "internal_error", "the model failed on the prompt")
            self._drop_prefilling(rows)
            self._admitting = []
            return True
        elapsed = time.monotonic() - started
        self._prefill_s_per_token = elapsed / max(1, len(rows) * max(chunks))
        if self._running and not uncontended:
            self._contended_prefill_s += elapsed
        now = time.time()
        finished: list[int] = []
        for i, (p, c) in enumerate(zip(rows, chunks, strict=True)):
            if p.req.admitted_step < 0:
                p.req.admitted_at = now
                p.req.admitted_step = self.step
            p.served = self.step
            p.done += c
            if p.remaining == 0:
                finished.append(i)
            elif len(rows) == 1:
                p.past = presents
            else:
                real = np.flatnonzero(mask[i])
                p.past = [np.ascontiguousarray(t[i : i + 1][:, :, real]) for t in presents]
        if not finished:
            self._admitting = []
            return True
        done_rows = [rows[i] for i in finished]
        self._cache_prompts(done_rows, presents, mask, finished)
        self._drop_prefilling(done_rows)
        if len(finished) == len(rows):
            self._begin_decoding([p.req for p in done_rows], logits, presents, mask)
        else:
            idx = np.asarray(finished)
            self._begin_decoding(
                [p.req for p in done_rows], logits[idx], [t[idx] for t in presents], mask[idx]
            )
        self._admitting = []
        return True

    def _drop_prefilling(self, rows: Sequence[_Prefill]) -> None:
        gone = {id(p) for p in rows}
        self._prefilling = [p for p in self._prefilling if id(p) not in gone]
        self._prefilling_rows = sum(p.req.n for p in self._prefilling)

    def _prefill_call(
        self, rows: list[_Prefill], chunks: list[int]
    ) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
        """Run the next `chunks[i]` prompt tokens of every row after its past (left-padded
        to one width): last-position logits, presents, and the attention mask."""
        if self._in_place:
            return self._prefill_in_place(rows, chunks)
        n = len(rows)
        width = max(chunks)
        past_len = max(p.done for p in rows)
        ids = np.full((n, width), self.spec.pad_token_id, dtype=np.int64)
        mask = np.zeros((n, past_len + width), dtype=np.int64)
        positions = np.zeros((n, width), dtype=np.int64)
        for row, (p, c) in enumerate(zip(rows, chunks, strict=True)):
            ids[row, width - c :] = p.req.prefill_ids[p.done : p.done + c]
            mask[row, past_len - p.done : past_len] = 1
            mask[row, past_len + width - c :] = 1
            positions[row, width - c :] = np.arange(p.done, p.done + c)
        feeds: dict[str, np.ndarray] = {
            "input_ids": ids,
            "attention_mask": mask,
            "position_ids": positions,
        }
        heads, dim = self.spec.num_kv_heads, self.spec.head_dim
        for k, name in enumerate(self._past_names):
            if past_len == 0:
                feeds[name] = np.zeros((n, heads, 0, dim), dtype=np.float32)
            elif n == 1:
                feeds[name] = rows[0].past[k]  # type: ignore[index]
            else:
                # Rows of a call have equal pasts (`_prefill_step`): one concatenation.
                feeds[name] = np.concatenate([p.past[k] for p in rows], axis=0)  # type: ignore[index]
        outputs = self._run(feeds, reqs=[p.req for p in rows])
        self.step += 1
        return outputs[0][:, -1, :], list(outputs[1:]), mask

    def _prefill_in_place(
        self, rows: list[_Prefill], chunks: list[int]
    ) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
        """`_prefill_call` for an in-place graph: fresh prompts right-padded together, or
        one row's next chunk written after its past in its own buffer (which is made, once,
        large enough for the whole prompt and the first decode steps). The buffers are the
        presents; the mask marks each row's columns [0, length)."""
        n = len(rows)
        heads, dim = self.spec.num_kv_heads, self.spec.head_dim
        width = max(chunks)
        totals = np.array([p.done + c for p, c in zip(rows, chunks, strict=True)], np.int64)
        ids = np.full((n, width), self.spec.pad_token_id, dtype=np.int64)
        for row, (p, c) in enumerate(zip(rows, chunks, strict=True)):
            ids[row, :c] = p.req.prefill_ids[p.done : p.done + c]
        if n == 1:
            p = rows[0]
            kv = p.past
            if kv is None or kv[0].shape[2] < totals[0]:
                # Room for the rest of the prompt: its later chunks are written in place.
                cap = max(int(totals[0]), len(p.req.prefill_ids)) + KV_HEADROOM
                grown = [np.zeros((1, heads, cap, dim), dtype=np.float32) for _ in self._past_names]
                if kv is not None and p.done:
                    for new, old in zip(grown, kv, strict=True):
                        new[:, :, : p.done] = old[:, :, : p.done]
                kv = grown
        else:
            if any(p.done for p in rows):  # `_prefill_step` never groups such rows
                raise RuntimeError(
                    "an in-place graph computes chunks over a past one row at a time"
                )
            cap = width + (
                KV_HEADROOM
                if all(c == p.remaining for p, c in zip(rows, chunks, strict=True))
                else 0
            )
            kv = [np.zeros((n, heads, cap, dim), dtype=np.float32) for _ in self._past_names]
        feeds = feeds_for(ids, totals, np.asarray(chunks, np.int64) - 1)
        logits = self._run(feeds, reqs=[p.req for p in rows], kv=kv)[0]
        self.step += 1
        mask = np.zeros((n, kv[0].shape[2]), dtype=np.int64)
        for row, total in enumerate(totals):
            mask[row, :total] = 1
        return logits[:, -1, :], kv, mask

    def _cache_prompts(
        self,
        rows: list[_Prefill],
        presents: list[np.ndarray],
        mask: np.ndarray,
        indices: list[int],
    ) -> None:
        """Put the full blocks of just-computed prompts into the prefix cache."""
        cache = self._cache
        if cache is None:
            return
        size = cache.block_tokens
        block_bytes = 2 * self.spec.num_layers * self.spec.num_kv_heads * size
        block_bytes *= self.spec.head_dim * presents[0].dtype.itemsize
        # A prompt longer than the whole cache stores only the blocks that fit: copying the
        # rest would only evict them again (and the prompt's own first blocks with them).
        fits = cache.max_bytes // block_bytes
        for p, i in zip(rows, indices, strict=True):
            req = p.req
            full = min(cache.cacheable_blocks(len(req.prefill_ids)), fits)
            first = req.cached_tokens // size
            if full <= first:
                continue
            real = np.flatnonzero(mask[i])
            blocks: list[np.ndarray] = []
            # One gather per layer's keys or values for a run of new blocks, then a copy per
            # block (each block its own array: the LRU frees blocks one by one); runs of
            # GATHER_BLOCKS keep the gathered copy small beside the blocks.
            for start in range(first, full, GATHER_BLOCKS):
                end = min(full, start + GATHER_BLOCKS)
                cols = real[start * size : end * size]
                span = np.stack([t[i][:, cols] for t in presents])  # [2L, H, n * size, D]
                blocks += [span[:, :, b * size : (b + 1) * size].copy() for b in range(end - start)]
            cache.insert(self._namespace(req), req.prefill_ids, blocks, start=first)

    def _begin_decoding(
        self,
        batch: list[_Request],
        logits: np.ndarray,
        presents: list[np.ndarray],
        mask: np.ndarray,
    ) -> None:
        """Choose the first tokens of prompts just computed and merge them into the batch."""
        now = time.time()
        rows = sum(req.n for req in batch)
        choices = [seq for req in batch for seq in req.choices]
        # The prompt's row, once per choice (n > 1): the same logits, the same cache.
        rows_of = (
            np.repeat(np.arange(len(batch)), [req.n for req in batch])
            if rows != len(batch)
            else None
        )
        if rows_of is not None:
            logits = logits[rows_of]
        for req in batch:
            req.first_token_at = now
            if req.prompt_entries is not None and req.choices[0].forced is None:
                self._send_prompt_logprobs(req)  # a one-token prompt: nothing to force
        tokens = self._choose(logits, choices)
        keep = [row for row, seq in enumerate(choices) if not self._accept(seq, int(tokens[row]))]
        if self._ended_requests:
            self._ended_requests = False
            keep = [row for row in keep if not choices[row].req.handle.claimed]
        self.meter.add(len(choices))
        if any(not req.batch for req in batch):
            # An online request's first token goes out now, not after the merge (a copy of
            # the whole batch's cache) and the batch's next decode step.
            self._publish()
        if not keep:
            return
        src = np.asarray(keep) if rows_of is None else rows_of[keep]
        identity = rows_of is None and len(keep) == len(batch)
        prefill_lens = np.array([len(choices[r].req.prefill_ids) for r in keep], dtype=np.int64)
        self._merge(
            [choices[r] for r in keep],
            presents if identity else [p[src] for p in presents],
            mask if identity else mask[src],
            tokens[keep],
            prefill_lens,
        )

    def _merge(
        self,
        seqs: list[_Seq],
        presents: list[np.ndarray],
        mask: np.ndarray,
        next_ids: np.ndarray,
        next_pos: np.ndarray,
    ) -> None:
        """Append prefilled sequences to the running batch (one copy of the cache)."""
        if self._running and self._in_place:
            self._merge_in_place(seqs, presents, next_ids, next_pos)
            return
        if not self._running:
            self._running = seqs
            self._past = presents
            self._mask = mask
            self._next_ids = next_ids
            self._next_pos = next_pos
            return
        old_b, old_len = self._mask.shape
        new_b, new_len = mask.shape
        width = max(old_len, new_len)
        merged: list[np.ndarray] = []
        for old, new in zip(self._past, presents, strict=True):
            out = np.zeros((old_b + new_b, old.shape[1], width, old.shape[3]), dtype=old.dtype)
            out[:old_b, :, width - old_len :] = old
            out[old_b:, :, width - new_len :] = new
            merged.append(out)
        merged_mask = np.zeros((old_b + new_b, width), dtype=np.int64)
        merged_mask[:old_b, width - old_len :] = self._mask
        merged_mask[old_b:, width - new_len :] = mask
        self._running = self._running + seqs
        self._past = merged
        self._mask = merged_mask
        self._next_ids = np.concatenate([self._next_ids, next_ids])
        self._next_pos = np.concatenate([self._next_pos, next_pos])

    def _merge_in_place(
        self,
        seqs: list[_Seq],
        presents: list[np.ndarray],
        next_ids: np.ndarray,
        next_pos: np.ndarray,
    ) -> None:
        """`_merge` for in-place buffers: the new rows' columns [0, next position) copied
        after the running rows, into the rows the buffers have to spare; only when they have
        too few rows or columns are they made anew (as many rows as the engine may run,
        which costs nothing until written: `kv_buffers`), the running rows copied once."""
        old_n, new_n = len(self._running), presents[0].shape[0]
        slots, cap = self._past[0].shape[0], self._past[0].shape[2]
        used_new = int(next_pos.max())
        if old_n + new_n > slots or used_new > cap:
            used_old = int(self._next_pos.max())
            rows = max(old_n + new_n, self.max_batch + online_burst(self.max_batch))
            bufs = self._kv_buffers(rows, max(cap, used_new + KV_HEADROOM))
            for buf, old in zip(bufs, self._past, strict=True):
                buf[:old_n, :, :used_old] = old[:old_n, :, :used_old]
            self._past = bufs
        for buf, new in zip(self._past, presents, strict=True):
            buf[old_n : old_n + new_n, :, :used_new] = new[:, :, :used_new]
        self._running = self._running + seqs
        self._next_ids = np.concatenate([self._next_ids, next_ids])
        self._next_pos = np.concatenate([self._next_pos, next_pos])

    def _kv_buffers(self, rows: int, cap: int) -> list[np.ndarray]:
        return kv_buffers(
            len(self._past_names), rows, self.spec.num_kv_heads, cap, self.spec.head_dim
        )

    def _compact_in_place(self, keep: list[int]) -> None:
        """`_compact` for in-place buffers: each row that leaves is replaced by one of the
        last rows (its columns copied), so the running rows stay the buffers' first ones and
        nothing else moves; when the longest row left uses less than half of the columns,
        the buffers are made anew to fit it."""
        k = len(keep)
        kept = set(keep)
        holes = [r for r in range(k) if r not in kept]
        movers = [r for r in keep if r >= k]
        order = list(range(k))
        for dst, src in zip(holes, movers, strict=True):
            length = int(self._next_pos[src])
            for buf in self._past:
                buf[dst, :, :length] = buf[src, :, :length]
            order[dst] = src
        rows = np.asarray(order)
        self._running = [self._running[r] for r in order]
        self._next_ids = self._next_ids[rows]
        self._next_pos = self._next_pos[rows]
        longest = int(self._next_pos.max())
        if self._past[0].shape[2] > 2 * (longest + KV_HEADROOM):
            bufs = self._kv_buffers(self._past[0].shape[0], longest + KV_HEADROOM)
            for buf, old in zip(bufs, self._past, strict=True):
                buf[:k, :, :longest] = old[:k, :, :longest]
            self._past = bufs

    def _run(
        self,
        feeds: Mapping[str, np.ndarray],
        *,
        reqs: Sequence[_Request],
        kv: Sequence[np.ndarray] | None = None,
    ) -> Sequence[Any]:
        """One session call for the rows of `reqs` (a prefill call's, beside the running
        rows): an arrival that stands ahead of all of them (`_ahead_of_call`) cuts it short
        (_CutShort; the call changed nothing and runs again after the arrival's prompt).
        Not while a request that stands ahead already waits (it is waiting for rows, not
        for this call), and a call holding online rows only after CUT_MIN_STEPS whole
        calls since the last cut."""
        options = None
        if self._run_options is not None and reqs:
            # Who may cut: an arrival ahead of the call's own rows, so a prompt's call beside
            # running rows of a better rank is cut by an arrival of that rank (it waited out
            # default prompts' calls of up to 0.8 s). How often: only a call with no online
            # row in it or beside it is cut at any time; others once per CUT_MIN_STEPS.
            cut = self._call_standing(reqs)
            batch_only = (
                min((r.rank for r in (*reqs, *(s.req for s in self._running))), default=cut[0])
                >= RANKS[ServiceClass.BATCH.value]
            )
            with self._cond:
                self._cut = cut
                ahead = any(self._ahead_of_call(r) for r in self._waiting)
                if not ahead and (batch_only or self._calls_since_cut >= CUT_MIN_STEPS):
                    options = self._cuttable = self._run_options()
        if options is None:
            outputs = self._call(feeds, kv, None)
            self._calls_since_cut += 1
            return outputs
        try:
            outputs = self._call(feeds, kv, options)
            self._calls_since_cut += 1
            return outputs
        except Exception:
            if not options.terminate:
                raise
            self.cut_short += 1
            self._calls_since_cut = 0
            raise _CutShort from None
        finally:
            with self._cond:
                self._cuttable = None

    def _call(
        self, feeds: Mapping[str, np.ndarray], kv: Sequence[np.ndarray] | None, options: Any
    ) -> Sequence[Any]:
        """One session call: the outputs (an in-place graph's: its logits only; `kv` holds
        the cache, written in place; a call cut short wrote only past each row's length)."""
        if kv is not None:
            runner: InPlaceRunner = self._session  # type: ignore[assignment]
            return [runner.run_in_place(feeds, kv, options)]
        session: Session = self._session  # type: ignore[assignment]
        if options is None:
            return session.run(self._output_names, feeds)
        return session.run(self._output_names, feeds, options)

    def _decode_step_in_place(self) -> bool:
        """`_decode_step`'s session call for an in-place graph: each row's length is its
        next position; the buffers grow (one copy) when the longest row reaches their end."""
        lens = self._next_pos
        n = len(lens)
        top = int(lens.max()) + 1
        if top > self._past[0].shape[2]:
            bufs = self._kv_buffers(self._past[0].shape[0], top + KV_HEADROOM)
            for buf, old in zip(bufs, self._past, strict=True):
                buf[:n, :, : top - 1] = old[:n, :, : top - 1]
            self._past = bufs
        # The running rows are the buffers' first n: a view of them is contiguous.
        kv = self._past if self._past[0].shape[0] == n else [b[:n] for b in self._past]
        feeds = feeds_for(self._next_ids[:, None], lens + 1, np.zeros(n, np.int64))
        try:
            outputs = self._run(feeds, reqs=[s.req for s in self._running], kv=kv)
        except _CutShort:
            return False
        self.step += 1
        self._next_pos = self._next_pos + 1
        self._after_decode(outputs[0])
        return True

    def _decode_step(self) -> bool:
        """One token for every running row; False when the step was cut short (nothing
        changed, and the step runs again at the next iteration)."""
        if self._in_place:
            return self._decode_step_in_place()
        batch = len(self._running)
        mask = np.concatenate([self._mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
        feeds: dict[str, np.ndarray] = {
            "input_ids": self._next_ids[:, None],
            "attention_mask": mask,
            "position_ids": self._next_pos[:, None],
        }
        for name, past in zip(self._past_names, self._past, strict=True):
            feeds[name] = past
        try:
            outputs = self._run(feeds, reqs=[s.req for s in self._running])
        except _CutShort:
            return False
        self.step += 1
        self._past = list(outputs[1:])
        self._mask = mask
        self._next_pos = self._next_pos + 1
        self._after_decode(outputs[0])
        return True

    def _after_decode(self, logits: np.ndarray) -> None:
        """Choose every row's token from a decode step's logits; slice finished rows out."""
        running = self._running
        batch = len(running)
        tokens = self._choose(logits[:, -1, :], running)
        self._next_ids = tokens
        keep = [r for r, seq in enumerate(running) if not self._accept(seq, int(tokens[r]))]
        if self._ended_requests:
            # A request ended as a whole (an error, a grammar failure): all its choices go.
            self._ended_requests = False
            keep = [r for r in keep if not running[r].req.handle.claimed]
        self.meter.add(batch)
        self._count_served(running)
        if len(keep) != batch:
            self._compact(keep)

    def _compact(self, keep: list[int]) -> None:
        """Slice finished rows out and trim columns that are padding for every row left."""
        if not keep:
            self._running = []
            self._past = []
            self._mask = np.zeros((0, 0), dtype=np.int64)
            self._next_ids = np.zeros(0, dtype=np.int64)
            self._next_pos = np.zeros(0, dtype=np.int64)
            return
        if self._in_place:
            self._compact_in_place(keep)
            return
        rows = np.asarray(keep)
        mask = self._mask[keep]
        used = np.flatnonzero(mask.any(axis=0))
        start = int(used[0]) if used.size else mask.shape[1]
        # Fancy indexing on the batch axis plus a slice on the sequence axis is
        # one contiguous copy per tensor, which is what the session wants.
        self._past = [p[rows, :, start:] for p in self._past]
        self._mask = np.ascontiguousarray(mask[:, start:])
        self._running = [self._running[r] for r in keep]
        self._next_ids = self._next_ids[rows]
        self._next_pos = self._next_pos[rows]

    def _choose(self, logits: np.ndarray, seqs: Sequence[_Seq]) -> np.ndarray:
        """The next token of every row: the argmax for plain greedy rows; for the others
        logit_bias, penalties and the grammar mask first, then greedy or sampled choice
        (and the token's logprob entry when asked for). Forced rows take their prompt token.
        """
        tokens: np.ndarray = np.argmax(logits, axis=-1).astype(np.int64)
        special = [row for row, seq in enumerate(seqs) if not seq.plain]
        if not special:
            return tokens
        allowed = self._grammar_masks([(row, seqs[row]) for row in special])
        for row in special:
            seq = seqs[row]
            scores = logits[row]
            if seq.forced is not None:
                token = seq.forced[-1]
                if seq.index == 0 and seq.req.prompt_entries is not None:
                    k = seq.req.request.sampling.prompt_logprobs
                    seq.req.prompt_entries.append(self._entry(scores, token, k))
                tokens[row] = token
                continue
            params = seq.req.request.sampling
            if seq.bias is not None:
                scores = bias_logits(scores, *seq.bias)
            if seq.penalized:
                scores = penalize(
                    scores,
                    seq.counts,
                    frequency=params.frequency_penalty,
                    presence=params.presence_penalty,
                )
            mask = allowed.get(row)
            if mask is not None:
                scores = apply_mask(scores, mask)
            if seq.greedy:
                token = int(np.argmax(scores))
            else:
                token = sample_token(
                    scores, temperature=params.temperature, top_p=params.top_p, rng=seq.rng
                )
            tokens[row] = token
            if seq.top >= 0 and token not in self.spec.eos_token_ids:
                seq.entries.append(self._entry(scores, token, seq.top))
        return tokens

    def _grammar_masks(self, rows: list[tuple[int, _Seq]]) -> dict[int, np.ndarray]:
        """The allowed tokens of every constrained row, computed in one call; a request
        whose matcher failed (or allows nothing at all) is failed instead."""
        constrained: list[tuple[int, _Seq, llguidance.LLMatcher]] = []
        for row, seq in rows:
            if seq.matcher is None or seq.forced is not None or seq.req.handle.claimed:
                continue
            if seq.matcher.is_error():
                self._fail_grammar(seq)
            else:
                constrained.append((row, seq, seq.matcher))
        if not constrained:
            return {}
        masks = self.constrainer.allowed([m for _, _, m in constrained])
        allowed: dict[int, np.ndarray] = {}
        for i, (row, seq, _) in enumerate(constrained):
            if masks[i].any():
                allowed[row] = masks[i]
            else:
                self._fail_grammar(seq, "it allows no token")
        return allowed

    def _entry(self, scores: np.ndarray, token: int, k: int) -> list[Any]:
        logprob, top = logprobs_of(scores, token, k)
        text, raw = self.constrainer.token(token)
        alternatives = [(*self.constrainer.token(t), lp) for t, lp in top]
        return logprob_entry(text, raw, logprob, alternatives)

    def _accept(self, seq: _Seq, token: int) -> bool:
        """Take one token of a choice; emit its text; return whether the choice is over."""
        req = seq.req
        if req.handle.claimed:  # the request ended meanwhile (a sibling's failure, a give-up)
            return True
        if seq.forced is not None:
            # A prompt token fed by teacher forcing: scored, not generated.
            seq.forced.pop()
            if not seq.forced:
                seq.forced = None
                seq.update_plain()
                if seq.index == 0:
                    self._send_prompt_logprobs(req)
            return False
        seq.generated.append(token)
        if seq.penalized:
            seq.counts[token] = seq.counts.get(token, 0) + 1
        seq.unreported_tokens += 1
        if token in self.spec.eos_token_ids:
            self._end_choice(seq, FinishReason.STOP)
            return True
        if seq.matcher is not None and not seq.matcher.consume_token(token):
            self._fail_grammar(seq)
            return True
        text = seq.detok.push(token)
        if text:
            self._emit(seq, seq.stops.push(text))
            if seq.stops.matched:
                self._end_choice(seq, FinishReason.STOP)
                return True
        elif seq.entries:
            # Log probabilities are never held back with text (a partial character).
            self._emit(seq, "")
        if len(seq.generated) >= req.request.sampling.max_tokens:
            self._end_choice(seq, FinishReason.LENGTH)
            return True
        if req.prompt_len + len(seq.generated) >= self.spec.context_length:
            self._end_choice(seq, FinishReason.LENGTH)
            return True
        return False

    def _emit(self, seq: _Seq, text: str) -> None:
        req = seq.req
        if req.n == 1 and seq.top < 0:
            if not text:
                return
            req.sink.delta(req.request.request_id, text, seq.unreported_tokens)
        else:
            if not text and not seq.entries:
                return
            req.sink.delta(
                req.request.request_id,
                text,
                seq.unreported_tokens,
                index=seq.index if req.n > 1 else None,
                logprobs=seq.entries if seq.top >= 0 else None,
            )
            seq.entries = []
        seq.unreported_tokens = 0
        self._dirty_sinks[id(req.sink)] = req.sink

    def _release_tail(self, seq: _Seq, reason: FinishReason) -> FinishReason:
        """Emit what a finishing choice still holds back: a trailing partial character,
        text that looked like the start of a stop string but never became one, and its
        last logprob entries."""
        tail = seq.stops.push(seq.detok.finish())
        if seq.stops.matched:
            reason = FinishReason.STOP
        self._emit(seq, tail + seq.stops.finish())
        return reason

    def _end_choice(self, seq: _Seq, reason: FinishReason) -> None:
        req = seq.req
        if req.n == 1:
            self._finish(req, reason)
            return
        if req.handle.claimed:
            return
        reason = self._release_tail(seq, reason)
        rid = req.request.request_id
        req.sink.choice_done(rid, seq.index, reason.value, len(seq.generated))
        self._dirty_sinks[id(req.sink)] = req.sink
        if seq.index == 0:
            req.reason = reason
        req.open -= 1
        if req.open == 0:
            self._finish(req, req.reason)

    def _finish(self, req: _Request, reason: FinishReason) -> None:
        """The request's last event: done (every choice's tokens; choice 0's reason)."""
        if not req.handle.claim():
            return
        self._ended_requests = True
        if reason is not FinishReason.CANCELLED and req.n == 1:
            reason = self._release_tail(req.choices[0], reason)
        rid = req.request.request_id
        result = self._result(req, reason)
        req.sink.done(
            rid,
            reason.value,
            req.prompt_len,
            _completion_tokens(req),
            cached_tokens=req.cached_tokens,
            result=result,
        )
        self._dirty_sinks[id(req.sink)] = req.sink
        self._to_complete.append((req.handle, result))

    def _fail(self, req: _Request, code: str, message: str) -> None:
        if not req.handle.claim():
            return
        self._ended_requests = True
        result = self._result(req, FinishReason.ERROR, code, message)
        req.sink.error(req.request.request_id, code, message, result=result)
        self._dirty_sinks[id(req.sink)] = req.sink
        self._to_complete.append((req.handle, result))

    def _fail_grammar(self, seq: _Seq, problem: str = "") -> None:
        if not problem and seq.matcher is not None:
            # The first line says what failed; the rest is the parser's state dump.
            problem = seq.matcher.get_error().strip().split("\n", 1)[0]
        logger.error(
            "engine %s: request %s: grammar matcher failed: %s",
            self.name,
            seq.req.request.request_id,
            problem,
        )
        self._fail(seq.req, "internal_error", f"the grammar matcher failed: {problem}")

    def _send_prompt_logprobs(self, req: _Request) -> None:
        if req.prompt_entries is None or req.handle.claimed:
            return
        req.sink.prompt_logprobs(req.request.request_id, req.prompt_entries)
        self._dirty_sinks[id(req.sink)] = req.sink

    def _result(
        self, req: _Request, reason: FinishReason, code: str = "", message: str = ""
    ) -> RequestResult:
        return RequestResult(
            finish_reason=reason.value,
            prompt_tokens=req.prompt_len,
            completion_tokens=_completion_tokens(req),
            admitted_at=req.admitted_at,
            finished_at=time.time(),
            first_token_at=req.first_token_at,
            admitted_step=req.admitted_step,
            finished_step=self.step,
            cached_tokens=req.cached_tokens,
            error_code=code,
            error_message=message,
        )

    def _fail_running(self, code: str, message: str) -> None:
        for req in self._admitting:
            self._fail(req, code, message)
        for p in self._prefilling:
            self._fail(p.req, code, message)
        for seq in self._running:
            self._fail(seq.req, code, message)
        self._admitting = []
        self._drop_prefilling(self._prefilling)
        self._ended_requests = False
        self._compact([])

    def _publish(self) -> None:
        """Hand this step's events to the publisher thread and go on computing.

        Writing to Redis takes a round trip per step; done on the engine thread
        it would add to every step, while the publisher overlaps it with the
        next session run (which releases the GIL). One publisher per engine
        keeps the steps in order.
        """
        if not self._dirty_sinks and not self._to_complete:
            return
        sinks, self._dirty_sinks = self._dirty_sinks, {}
        completed, self._to_complete = self._to_complete, []
        self._published.put(_Publication(list(sinks.values()), completed))

    def _publish_loop(self) -> None:
        while (publication := self._published.get()) is not None:
            for sink in publication.sinks:
                try:
                    sink.flush()
                except Exception:
                    logger.exception("engine %s: writing events failed", self.name)
            # Only after the flush: a task never reports a request as finished
            # (and acknowledges its message) before its final events are in Redis.
            for handle, result in publication.completed:
                handle.complete(result)

    def _shutdown(self) -> None:
        with self._cond:
            waiting = [*self._waiting, *self._waiting_batch]
            self._waiting.clear()
            self._waiting_batch.clear()
        for req in waiting:
            self._fail(req, "worker_shutdown", "the worker is shutting down")
        self._fail_running("worker_shutdown", "the worker is shutting down")
        self._publish()
        logger.info("engine %s stopped", self.name)


def kv_buffers(count: int, rows: int, heads: int, cap: int, dim: int) -> list[np.ndarray]:
    """`count` zeroed cache buffers [rows, heads, cap, dim], views of one private anonymous
    mapping.

    Its pages are the kernel's zero pages until written, 4 KB at a time, so buffers for
    every row the engine may run cost only what the rows write. numpy's own zeros did not:
    separate arrays of a few MB came from heap memory used before, zeroed there and then,
    and one large array is marked for transparent huge pages, so that a row written into
    each buffer zeroes 2 MB of each (0.3-0.9 s for 40 rows' buffers, a stall of every stream
    and of a priority prompt's first token under a surge)."""
    size = count * rows * heads * cap * dim
    if size == 0:
        return [np.zeros((rows, heads, cap, dim), dtype=np.float32) for _ in range(count)]
    # Private (copy-on-write after a fork, zero pages until written), unmapped with the last
    # view of it; 4 KB pages whatever the system's transparent huge page setting.
    memory = mmap.mmap(-1, size * 4, flags=mmap.MAP_PRIVATE)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        memory.madvise(mmap.MADV_NOHUGEPAGE)
    block = np.frombuffer(memory, dtype=np.float32).reshape(count, rows, heads, cap, dim)
    return list(block)


def _completion_tokens(req: _Request) -> int:
    return sum(len(seq.generated) for seq in req.choices)


def _bias_arrays(pairs: Sequence[tuple[int, float]]) -> tuple[np.ndarray, np.ndarray] | None:
    """logit_bias as (distinct ids, summed biases), or None when it changes nothing."""
    summed: dict[int, float] = {}
    for token, bias in pairs:
        summed[int(token)] = summed.get(int(token), 0.0) + float(bias)
    summed = {t: b for t, b in summed.items() if b != 0.0}
    if not summed:
        return None
    return (
        np.fromiter(summed.keys(), dtype=np.int64, count=len(summed)),
        np.fromiter(summed.values(), dtype=np.float32, count=len(summed)),
    )
