"""The /v1 wire types: request bodies, responses, stream chunks and errors, as OpenAI shapes them.

Request bodies are pydantic models, validated the way OpenAI does (unknown fields refused).
Responses, chunks and errors are TypedDicts: mypy checks every one the gateway builds, and
pydantic describes them (gateway/openapi.py generates the /v1 OpenAPI document from this
module). At run time they are plain dicts, so building one costs what a dict literal costs;
a pydantic model per stream chunk (construct, then dump) cost three to five times as much.
Keys are declared in the order they go on the wire. typing_extensions' TypedDict (a
dependency of pydantic): pydantic needs it on Python 3.11.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, NotRequired

from pydantic import BaseModel, ConfigDict, Field, field_validator, with_config
from typing_extensions import TypedDict

# Identifier lengths, refused at parse time (400 naming the field) so an oversized value
# never reaches a cache key, a log line or the database: docs/api.md lists them.
MODEL_MAX_LENGTH = 256
USER_MAX_LENGTH = 256
METADATA_MAX_PAIRS = 16  # OpenAI's own limits for `metadata`
METADATA_KEY_MAX_LENGTH = 64
METADATA_VALUE_MAX_LENGTH = 512


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _metadata_check(value: dict[str, str] | None) -> dict[str, str] | None:
    if value is None:
        return value
    if len(value) > METADATA_MAX_PAIRS:
        raise ValueError(f"at most {METADATA_MAX_PAIRS} key-value pairs")
    for key, item in value.items():
        if len(key) > METADATA_KEY_MAX_LENGTH:
            raise ValueError(f"keys may be at most {METADATA_KEY_MAX_LENGTH} characters")
        if len(item) > METADATA_VALUE_MAX_LENGTH:
            raise ValueError(f"values may be at most {METADATA_VALUE_MAX_LENGTH} characters")
    return value


class StreamOptions(_Request):
    include_usage: bool = False


class ChatMessage(BaseModel):
    # Messages carry fields we only pass to the template (name, tool_call_id...).
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError("only text content parts are supported")
            parts.append(part["text"])
        return "".join(parts)


class SamplingRequest(_Request):
    """What chat completions and completions share: the model and how to sample."""

    model: str = Field(min_length=1, max_length=MODEL_MAX_LENGTH)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(default=None, ge=1, le=1)
    user: str | None = Field(default=None, max_length=USER_MAX_LENGTH)
    # OpenAI's penalties, applied by the worker's engine to the logits of tokens already
    # generated (workers/engine/sampling.py `penalize`); OpenAI's range.
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logprobs: bool | None = Field(default=None)
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = Field(default=None, max_length=32)

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        return value

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        return _metadata_check(value)

    @field_validator("logprobs")
    @classmethod
    def _logprobs(cls, value: bool | None) -> bool | None:
        if value:
            raise ValueError("logprobs are not supported")
        return value

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = Field(default=None)
    suffix: str | None = None

    @field_validator("echo")
    @classmethod
    def _echo(cls, value: bool | None) -> bool | None:
        if value:
            raise ValueError("echo is not supported")
        return value


class EmbeddingRequest(_Request):
    model: str = Field(min_length=1, max_length=MODEL_MAX_LENGTH)
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = Field(default=None, max_length=USER_MAX_LENGTH)


# --- responses, stream chunks, errors --------------------------------------------------------

# Every reply type is closed: the document says exactly which members a reply has.
_closed = with_config(ConfigDict(extra="forbid"))
Count = Annotated[int, Field(ge=0)]
FinishReason = str  # "stop" or "length", as the worker reports it


@_closed
class Usage(TypedDict):
    prompt_tokens: Count
    completion_tokens: Count
    total_tokens: Count


@_closed
class AssistantMessage(TypedDict):
    role: Literal["assistant"]
    content: str
    refusal: None


@_closed
class ChatChoice(TypedDict):
    index: int
    message: AssistantMessage
    logprobs: None
    finish_reason: FinishReason


@_closed
class ChatCompletion(TypedDict):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    system_fingerprint: str
    choices: Annotated[list[ChatChoice], Field(min_length=1)]
    usage: Usage


@_closed
class ChatDelta(TypedDict, total=False):
    """The first chunk's delta opens the message (role, empty content); the others carry
    text; the finishing chunk's is empty."""

    role: Literal["assistant"]
    content: str
    refusal: None


@_closed
class ChatChunkChoice(TypedDict):
    index: int
    delta: ChatDelta
    logprobs: None
    finish_reason: FinishReason | None


@_closed
class ChatCompletionChunk(TypedDict):
    """One `data:` line of a chat stream. `usage` is there (null) in every chunk when the
    request asked for stream_options.include_usage; the last chunk then has no choices and
    the usage."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChunkChoice]
    usage: NotRequired[Usage | None]


@_closed
class CompletionChoice(TypedDict):
    text: str
    index: int
    logprobs: None
    finish_reason: FinishReason | None


@_closed
class Completion(TypedDict):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    system_fingerprint: str
    choices: Annotated[list[CompletionChoice], Field(min_length=1)]
    usage: Usage


@_closed
class CompletionChunk(TypedDict):
    """One `data:` line of a completion stream; the usage chunk (stream_options.include_usage)
    has no choices and no system_fingerprint."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    system_fingerprint: NotRequired[str]
    choices: list[CompletionChoice]
    usage: NotRequired[Usage | None]


@_closed
class Embedding(TypedDict):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str  # floats, or base64 of little-endian float32


@_closed
class EmbeddingUsage(TypedDict):
    prompt_tokens: Count
    total_tokens: Count


@_closed
class EmbeddingList(TypedDict):
    object: Literal["list"]
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


@_closed
class Model(TypedDict):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


@_closed
class ModelList(TypedDict):
    object: Literal["list"]
    data: list[Model]


@_closed
class ErrorObject(TypedDict):
    message: Annotated[str, Field(min_length=1)]
    type: Annotated[str, Field(min_length=1)]
    param: str | None
    code: str | None


@_closed
class ErrorResponse(TypedDict):
    """Every /v1 error, with its HTTP status; mid-stream, one `data:` line."""

    error: ErrorObject
