"""Tokenizers and chat templates of served models, loaded once per artifact per process."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from catalog.specs import EndpointSpec
from gateway.errors import OpenAIError, invalid
from workers.contract import Runtime

# Below this many characters, encoding on the event loop is cheaper than a thread hop.
_INLINE_ENCODE_CHARS = 16_000

_lock = threading.Lock()
_tokenizers: dict[tuple[str, int], Tokenizer] = {}


def tokenizer_for(spec: EndpointSpec) -> Tokenizer:
    key = (spec.location, spec.max_input_tokens if spec.runtime == Runtime.ENCODER else 0)
    found = _tokenizers.get(key)
    if found is not None:
        return found
    with _lock:
        found = _tokenizers.get(key)
        if found is None:
            path = Path(spec.location) / (spec.tokenizer_file or "tokenizer.json")
            found = Tokenizer.from_file(str(path))
            if spec.runtime == Runtime.ENCODER:
                found.enable_truncation(max_length=spec.max_input_tokens)
            else:
                found.no_truncation()
            found.no_padding()
            _tokenizers[key] = found
    return found


@lru_cache(maxsize=64)
def _template(source: str) -> Any:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env.globals["raise_exception"] = raise_exception
    return env.from_string(source)


def render_chat(spec: EndpointSpec, messages: Sequence[dict[str, str]]) -> str:
    if not spec.chat_template:
        raise invalid(f"model `{spec.public_id}` has no chat template; use /v1/completions")
    try:
        return str(
            _template(spec.chat_template).render(
                messages=list(messages), add_generation_prompt=True, bos_token="", eos_token=""
            )
        )
    except TemplateError as exc:
        raise invalid(f"messages: {exc}", param="messages") from exc


async def encode(spec: EndpointSpec, text: str) -> list[int]:
    tokenizer = tokenizer_for(spec)
    special = spec.runtime == Runtime.ENCODER  # [CLS] ... [SEP] for encoders
    if len(text) < _INLINE_ENCODE_CHARS:
        return list(tokenizer.encode(text, add_special_tokens=special).ids)
    encoding = await asyncio.to_thread(tokenizer.encode, text, add_special_tokens=special)
    return list(encoding.ids)


def check_token_ids(spec: EndpointSpec, ids: Sequence[int], param: str) -> list[int]:
    vocab = tokenizer_for(spec).get_vocab_size(with_added_tokens=True)
    for token in ids:
        if not 0 <= token < vocab:
            raise invalid(f"token id {token} is outside the vocabulary (0..{vocab - 1})", param)
    return list(ids)


def context_exceeded(spec: EndpointSpec, prompt: int, completion: int) -> OpenAIError:
    return OpenAIError(
        400,
        f"This model's maximum context length is {spec.context_length} tokens. However, you "
        f"requested {prompt + completion} tokens ({prompt} in the messages, {completion} in the "
        "completion). Please reduce the length of the messages or completion.",
        param="messages",
        code="context_length_exceeded",
    )
