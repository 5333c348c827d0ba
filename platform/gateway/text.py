"""Tokenizers and chat templates of served models: tenant code and data, run under bounds.

A gateway process serves every tenant and the console, so nothing a tenant uploads
may hold its event loop. Chat templates render in child processes under a budget
(workers/template_process.py), at most MANTLE_TEMPLATE_ORG_SHARE at once per
organization; tokenizer.json files are checked against limits when loaded
(workers/tokenizer_limits.py) and kept in an LRU cache bounded by estimated bytes;
long texts are tokenized in a thread with the GIL released (`encode_batch`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from django.conf import settings
from tokenizers import Tokenizer

from catalog.specs import EndpointSpec
from gateway.errors import OpenAIError, invalid
from workers.chat_template import TemplateBudget, TemplateBudgetExceeded, chat_variables
from workers.contract import Runtime
from workers.template_process import RendererPool, TemplateRenderError
from workers.tokenizer_limits import (
    TokenizerLimits,
    TokenizerRejected,
    check_file_size,
    check_patterns,
    check_vocab,
    regex_patterns,
)

logger = logging.getLogger(__name__)
T = TypeVar("T")

# Below this many characters, encoding on the event loop is cheaper than a thread hop.
_INLINE_ENCODE_CHARS = 16_000
BYTES_PER_FILE_BYTE = 10
"""A loaded tokenizer's memory per byte of its tokenizer.json (SmolLM2's BPE: 3.5 MB of
JSON, 33 MB resident); the cache's estimate, deliberately on the high side."""


# --- tokenizers --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Cached:
    tokenizer: Tokenizer
    estimated_bytes: int


class TokenizerCache:
    """Loaded tokenizers, least recently used evicted first once the estimate passes
    `budget_bytes`. The one just loaded always stays, even if alone it is over."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self.total_bytes = 0
        self._entries: OrderedDict[tuple[str, int], _Cached] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, int]) -> Tokenizer | None:
        with self._lock:
            found = self._entries.get(key)
            if found is None:
                return None
            self._entries.move_to_end(key)
            return found.tokenizer

    def put(self, key: tuple[str, int], tokenizer: Tokenizer, estimated_bytes: int) -> None:
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.total_bytes -= old.estimated_bytes
            self._entries[key] = _Cached(tokenizer, estimated_bytes)
            self.total_bytes += estimated_bytes
            while self.total_bytes > self.budget_bytes and len(self._entries) > 1:
                _, evicted = self._entries.popitem(last=False)
                self.total_bytes -= evicted.estimated_bytes

    def keys(self) -> list[tuple[str, int]]:
        with self._lock:
            return list(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.total_bytes = 0


_load_lock = threading.Lock()
_cache: TokenizerCache | None = None


def tokenizer_cache() -> TokenizerCache:
    global _cache
    budget = settings.MANTLE_TOKENIZER_CACHE_BYTES
    if _cache is None or _cache.budget_bytes != budget:  # a changed setting starts afresh
        _cache = TokenizerCache(budget)
    return _cache


def tokenizer_limits() -> TokenizerLimits:
    """The compile nodes' limits (MANTLE_TOKENIZER_*), bytes and vocabulary from settings."""
    return dataclasses.replace(
        TokenizerLimits.from_env(),
        max_bytes=settings.MANTLE_TOKENIZER_MAX_BYTES,
        max_vocab=settings.MANTLE_TOKENIZER_MAX_VOCAB,
    )


def load_tokenizer(path: Path, limits: TokenizerLimits) -> tuple[Tokenizer, int]:
    """A tokenizer file within `limits` and its estimated resident bytes.

    The size is checked before the file is read: parsing holds the GIL, so the cap
    bounds how long a load can pause this process.
    """
    size = check_file_size(path, limits)
    tokenizer = Tokenizer.from_file(str(path))
    check_vocab(tokenizer.get_vocab_size(with_added_tokens=True), limits)
    patterns: list[str] = []
    for component in (tokenizer.pre_tokenizer, tokenizer.normalizer):
        if component is not None:
            patterns += regex_patterns(json.loads(component.__getstate__()))
    check_patterns(patterns, limits)
    return tokenizer, size * BYTES_PER_FILE_BYTE


def tokenizer_for(spec: EndpointSpec) -> Tokenizer:
    key = (spec.location, spec.max_input_tokens if spec.runtime == Runtime.ENCODER else 0)
    cache = tokenizer_cache()
    found = cache.get(key)
    if found is not None:
        return found
    with _load_lock:
        found = cache.get(key)
        if found is None:
            path = Path(spec.location) / (spec.tokenizer_file or "tokenizer.json")
            try:
                found, estimated = load_tokenizer(path, tokenizer_limits())
            except TokenizerRejected as exc:
                raise OpenAIError(
                    400,
                    f"model `{spec.public_id}` can not be served: its tokenizer is over the "
                    f"platform's limits: {exc}",
                    code="tokenizer_rejected",
                ) from exc
            if spec.runtime == Runtime.ENCODER:
                found.enable_truncation(max_length=spec.max_input_tokens)
            else:
                found.no_truncation()
            found.no_padding()
            cache.put(key, found, estimated)
    return found


def _panicked(exc: BaseException) -> bool:
    # pyo3 turns a Rust panic (Oniguruma's "retry-limit-in-match over" on a pattern that
    # backtracks too much) into PanicException, a BaseException that names no module.
    return type(exc).__name__ == "PanicException"


def _tokenizer_failed(spec: EndpointSpec, exc: BaseException, param: str | None) -> OpenAIError:
    return OpenAIError(
        400,
        f"model `{spec.public_id}`'s tokenizer could not tokenize this input "
        f"({str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__})",
        param=param,
        code="tokenizer_failed",
    )


async def encode(spec: EndpointSpec, text: str, param: str | None = None) -> list[int]:
    tokenizer = tokenizer_for(spec)
    special = spec.runtime == Runtime.ENCODER  # [CLS] ... [SEP] for encoders
    try:
        if len(text) < _INLINE_ENCODE_CHARS:
            return list(tokenizer.encode(text, add_special_tokens=special).ids)
        # encode_batch releases the GIL (encode does not): a slow tokenizer then pauses
        # this thread, not the event loop.
        batch = await asyncio.to_thread(tokenizer.encode_batch, [text], add_special_tokens=special)
    except BaseException as exc:
        if _panicked(exc):
            raise _tokenizer_failed(spec, exc, param) from None
        raise
    return list(batch[0].ids)


def check_token_ids(spec: EndpointSpec, ids: Sequence[int], param: str) -> list[int]:
    vocab = tokenizer_for(spec).get_vocab_size(with_added_tokens=True)
    for token in ids:
        if not 0 <= token < vocab:
            raise invalid(f"token id {token} is outside the vocabulary (0..{vocab - 1})", param)
    return list(ids)


def check_bias(spec: EndpointSpec, bias: Sequence[tuple[int, float]], param: str) -> None:
    """logit_bias names tokens of this model's vocabulary."""
    if bias:
        check_token_ids(spec, [token for token, _ in bias], param)


# --- chat templates ----------------------------------------------------------------------


class OrganizationShares:
    """At most `share` template renders in flight per organization in this process.

    A slot is freed when its render ends, not when the request that started it is
    cancelled, so a client that hangs up cannot push its organization past its share.
    """

    def __init__(self) -> None:
        self._by_loop: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, dict[str, tuple[asyncio.Semaphore, list[int]]]
        ] = weakref.WeakKeyDictionary()

    async def run(self, organization_id: str, share: int, submit: Callable[[], Future[T]]) -> T:
        loop = asyncio.get_running_loop()
        gates = self._by_loop.setdefault(loop, {})
        semaphore, users = gates.setdefault(organization_id, (asyncio.Semaphore(share), [0]))
        users[0] += 1

        def forget() -> None:
            users[0] -= 1
            if not users[0] and gates.get(organization_id, (None,))[0] is semaphore:
                del gates[organization_id]

        def leave() -> None:
            semaphore.release()
            forget()

        try:
            await semaphore.acquire()
        except BaseException:  # cancelled while queued behind its own organization
            forget()
            raise
        try:
            future = submit()
        except BaseException:
            leave()
            raise

        def finished(_: Future[T]) -> None:
            # A closed loop (a test's) took its gates with it.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(leave)

        future.add_done_callback(finished)
        return await asyncio.wrap_future(future)


_shares = OrganizationShares()
_pool: RendererPool | None = None
_executor: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def renderer_pool() -> tuple[RendererPool, ThreadPoolExecutor]:
    global _pool, _executor
    with _pool_lock:
        if _pool is None or _executor is None:
            size = settings.MANTLE_TEMPLATE_RENDERERS
            _pool = RendererPool(size=size, memory_bytes=settings.MANTLE_TEMPLATE_MEMORY_BYTES)
            _executor = ThreadPoolExecutor(size, thread_name_prefix="chat-template")
        return _pool, _executor


def template_budget() -> TemplateBudget:
    return TemplateBudget(
        seconds=settings.MANTLE_TEMPLATE_BUDGET_S,
        max_output_chars=settings.MANTLE_TEMPLATE_MAX_OUTPUT_CHARS,
        max_iterations=settings.MANTLE_TEMPLATE_MAX_ITERATIONS,
    )


async def render_chat(
    spec: EndpointSpec,
    messages: Sequence[Mapping[str, Any]],
    organization_id: str,
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> str:
    """The prompt; a 400 naming the problem when the template fails or overruns its budget.
    `tools` (OpenAI's function tools) go to templates that render tools themselves."""
    if not spec.chat_template:
        raise invalid(f"model `{spec.public_id}` has no chat template; use /v1/completions")
    pool, executor = renderer_pool()
    variables = chat_variables(messages, tools=list(tools)) if tools else chat_variables(messages)
    budget = template_budget()
    try:
        return await _shares.run(
            organization_id,
            settings.MANTLE_TEMPLATE_ORG_SHARE,
            lambda: executor.submit(pool.render, spec.chat_template, variables, budget),
        )
    except TemplateBudgetExceeded as exc:
        raise OpenAIError(
            400,
            f"model `{spec.public_id}`'s chat template {exc.message}; the template was "
            "stopped (its owner can fix it and compile a new version)",
            param="messages",
            code="chat_template_budget_exceeded",
        ) from None
    except TemplateRenderError as exc:
        raise invalid(f"messages: {exc}", param="messages") from exc


def context_exceeded(spec: EndpointSpec, prompt: int, completion: int) -> OpenAIError:
    return OpenAIError(
        400,
        f"This model's maximum context length is {spec.context_length} tokens. However, you "
        f"requested {prompt + completion} tokens ({prompt} in the messages, {completion} in the "
        "completion). Please reduce the length of the messages or completion.",
        param="messages",
        code="context_length_exceeded",
    )
