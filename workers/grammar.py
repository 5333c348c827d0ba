"""Grammars for constrained decoding: JSON schemas and forced tool calls, via llguidance.

The gateway builds a request's grammar here and checks it (a bad or too costly schema is a
400 before anything is reserved); the worker's engine compiles the same text against the
model's tokenizer and masks every step's logits with it (workers/engine/constrain.py). Both
sides use the same limits, so a grammar the gateway accepted compiles on the worker.

Why llguidance (docs/decisions.md): no Python dependencies (xgrammar needs torch), masks in
tens of microseconds on a 50k vocabulary, and compilation that is cheap and bounded by fuel
limits rather than a wall clock; bench/grammar_engines.py measures it against outlines-core.

Tool calls use one documented text format (docs/api.md, "Tool calling"), the one Hermes and
Qwen templates use:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

several calls one after another, separated by a newline.
"""

from __future__ import annotations

import functools
import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import llguidance

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"

MAX_SCHEMA_BYTES = 64 * 1024
"""A schema's size as compact JSON; a larger one is refused before it is compiled."""
MAX_REQUEST_SCHEMA_BYTES = 256 * 1024
"""All the schemas of one request together (its tools'): compiling costs ~0.2 ms per KiB,
so one request costs the gateway at most ~50 ms of a core, off its event loop."""
MAX_ERROR_CHARS = 300
"""llguidance's messages may quote the grammar; a client gets this much of one, on one line."""

# Compilation is bounded by work, not time: the same schema is refused the same way on
# every machine. These are a fifth of llguidance's defaults, which allow grammars far
# larger than any tool or response schema; a 10-field schema uses a few thousand units.
LIMITS = {
    "initial_lexer_fuel": 200_000,  # ~4 ms of regex analysis (llguidance: ~50k/ms)
    "step_lexer_fuel": 100_000,  # per mask (~7 ms at worst)
    "step_max_items": 20_000,
    "max_lexer_states": 50_000,
    "max_grammar_size": 100_000,
}


class GrammarError(ValueError):
    """A schema or grammar that cannot be used, in words for the client."""


def _limits() -> llguidance.LLParserLimits:
    return llguidance.LLParserLimits(
        initial_lexer_fuel=LIMITS["initial_lexer_fuel"],
        step_lexer_fuel=LIMITS["step_lexer_fuel"],
        step_max_items=LIMITS["step_max_items"],
        max_lexer_states=LIMITS["max_lexer_states"],
        max_grammar_size=LIMITS["max_grammar_size"],
    )


# JSON as one line with single spaces (`{"a": 1, "b": [2, 3]}`): free whitespace would let a
# small model wander through newlines and indentation instead of writing values. It also
# replaces any `x-guidance` the client sent: compiler options are the platform's.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _schema_text(schema: Mapping[str, Any]) -> str:
    if not isinstance(schema, Mapping):
        raise GrammarError("the schema must be a JSON object")
    schema = {**schema, "x-guidance": JSON_OPTIONS}
    try:
        text = json.dumps(schema, separators=(",", ":"), sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise GrammarError(f"the schema is not valid JSON: {exc}") from exc
    if len(text.encode()) > MAX_SCHEMA_BYTES:
        raise GrammarError(
            f"the schema is {len(text.encode())} bytes as JSON; at most {MAX_SCHEMA_BYTES}"
        )
    return text


def json_grammar(schema: Mapping[str, Any] | None) -> str:
    """Output that is one JSON value valid against `schema`; None: any JSON object (OpenAI's
    json_object mode)."""
    text = _schema_text(schema if schema is not None else {"type": "object"})
    grammar: str = llguidance.LLMatcher.grammar_from_json_schema(text)
    return check(grammar)


def tool_call_grammar(tools: Sequence[tuple[str, Mapping[str, Any]]], *, parallel: bool) -> str:
    """Output that is one tool call (or, with `parallel`, one or more) to one of `tools`
    ((name, JSON schema of its arguments) each), arguments valid against the schema."""
    if not tools:
        raise GrammarError("no tools to call")
    rules = []
    calls = []
    for i, (name, schema) in enumerate(tools):
        # Names are ^[a-zA-Z0-9_-]{1,64}$ (checked by the gateway); json.dumps quotes them.
        head = json.dumps(f'{TOOL_CALL_OPEN}\n{{"name": {json.dumps(name)}, "arguments": ')
        rules.append(f"call{i}: {head} args{i} " + json.dumps(f"}}\n{TOOL_CALL_CLOSE}"))
        rules.append(f"args{i}: %json {_schema_text(schema)}")
        calls.append(f"call{i}")
    start = "start: call" + (' ("\\n" call)*' if parallel else "")
    lark = "\n".join([start, "call: " + " | ".join(calls), *rules]) + "\n"
    return check(llguidance.LLMatcher.grammar_from_lark(lark))


@functools.lru_cache(maxsize=1024)
def _check(grammar: str) -> str:
    return str(llguidance.LLMatcher.validate_grammar(grammar, None, limits=_limits()))


def check(grammar: str) -> str:
    """`grammar` if llguidance compiles it within the limits, else a GrammarError saying why."""
    problem = _check(grammar)
    if problem:
        problem = " ".join(problem.split())
        if len(problem) > MAX_ERROR_CHARS:
            problem = problem[: MAX_ERROR_CHARS - 3] + "..."
        if any(w in problem for w in ("too big", "too large", "limit", "fuel")):
            raise GrammarError(f"the schema is too complex to compile: {problem}")
        raise GrammarError(problem.replace("Unimplemented keys", "unsupported keywords"))
    return grammar


# --- the worker's side ------------------------------------------------------------------------


class Compiled:
    """Grammars compiled against one tokenizer, the most recent kept (per schema: a
    request repeating a schema reuses the compiled matcher, copied per sequence)."""

    def __init__(self, tokenizer_file: str, eos_token_ids: Sequence[int], size: int = 256):
        self.tokenizer = llguidance.LLTokenizer(tokenizer_file, eos_token=list(eos_token_ids))
        self.vocab_size = int(self.tokenizer.vocab_size)
        self._size = size
        self._matchers: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self._lock = threading.Lock()

    def matcher(self, grammar: str) -> llguidance.LLMatcher:
        """A fresh matcher at the grammar's start; GrammarError if it does not compile."""
        key = hashlib.sha256(grammar.encode()).hexdigest()
        with self._lock:
            found = self._matchers.get(key)
            if found is not None:
                self._matchers.move_to_end(key)
                return found.deep_copy()
        built = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0, limits=_limits())
        if built.is_error():
            raise GrammarError(built.get_error())
        with self._lock:
            self._matchers[key] = built
            while len(self._matchers) > self._size:
                self._matchers.popitem(last=False)
        return built.deep_copy()

    def token_bytes(self, token_id: int) -> bytes:
        return bytes(self.tokenizer.decode_bytes([token_id]))
