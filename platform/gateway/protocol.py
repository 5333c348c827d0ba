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

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator, with_config
from typing_extensions import TypedDict

from workers import contract

# Identifier lengths, refused at parse time (400 naming the field) so an oversized value
# never reaches a cache key, a log line or the database: docs/api.md lists them.
MODEL_MAX_LENGTH = 256
USER_MAX_LENGTH = 256
METADATA_MAX_PAIRS = 16  # OpenAI's own limits for `metadata`
METADATA_KEY_MAX_LENGTH = 64
METADATA_VALUE_MAX_LENGTH = 512
ID_MAX_LENGTH = 128  # tool call ids sent back to us
MAX_TOOLS = 128  # OpenAI's limit (gateway/agent.py checks the rest)
MAX_ARGUMENTS_CHARS = 64 * 1024
MAX_LOGIT_BIAS = 1024  # entries of logit_bias
MAX_CHOICES = contract.MAX_CHOICES
MAX_TOP_LOGPROBS = contract.MAX_TOP_LOGPROBS
MAX_COMPLETION_LOGPROBS = 5  # the legacy completions' integer logprobs, OpenAI's limit


ServiceTier = Literal["auto", "default", "flex", "priority", "scale"]
"""OpenAI's `service_tier` (docs/service_tiers.md): `auto` and `scale` are the organization's
provisioned units when it has room in them, else `default`."""


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


def metadata_check(value: dict[str, str] | None) -> dict[str, str] | None:
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


class FunctionCall(_Request):
    name: str = Field(max_length=64)
    arguments: str = Field(max_length=MAX_ARGUMENTS_CHARS)


class MessageToolCall(_Request):
    """A tool call an assistant message made earlier in the conversation."""

    id: str = Field(min_length=1, max_length=ID_MAX_LENGTH)
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    # Messages carry fields we only pass to the template (name...).
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    tool_calls: list[MessageToolCall] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_call_id: str | None = Field(default=None, max_length=ID_MAX_LENGTH)

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
    n: int | None = Field(default=None, ge=1, le=MAX_CHOICES)
    user: str | None = Field(default=None, max_length=USER_MAX_LENGTH)
    # OpenAI's penalties, applied by the worker's engine to the logits of tokens already
    # generated (workers/engine/sampling.py `penalize`); OpenAI's range.
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    # Token id (as a string, OpenAI's form) -> bias added to its logit, -100..100.
    logit_bias: dict[str, float] | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: ServiceTier | None = None

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
        return metadata_check(value)

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value is None:
            return value
        if len(value) > MAX_LOGIT_BIAS:
            raise ValueError(f"at most {MAX_LOGIT_BIAS} entries")
        for key, bias in value.items():
            if not key.isdigit() or len(key) > 9:
                raise ValueError(f"keys must be token ids; got {key[:40]!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"biases must be between -100 and 100; got {bias}")
        return value

    def bias(self) -> tuple[tuple[int, float], ...]:
        return tuple((int(k), float(v)) for k, v in (self.logit_bias or {}).items())

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class FunctionDefinition(_Request):
    name: str = Field(max_length=256)  # the name rules: gateway/agent.py, param-exact
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ChatTool(_Request):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Request):
    name: str = Field(max_length=256)


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: NamedFunction


class JSONSchemaFormat(_Request):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")
    description: str | None = None
    # "schema" shadows a BaseModel attribute; the wire name stays `schema`.
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ResponseFormatText(_Request):
    type: Literal["text"]


class ResponseFormatJSONObject(_Request):
    type: Literal["json_object"]


class ResponseFormatJSONSchema(_Request):
    type: Literal["json_schema"]
    json_schema: JSONSchemaFormat


ResponseFormat = Annotated[
    ResponseFormatText | ResponseFormatJSONObject | ResponseFormatJSONSchema,
    Field(discriminator="type"),
]


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: list[ChatTool] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs: requires logprobs to be true")
        return self


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = Field(default=None)
    suffix: str | None = None
    logprobs: int | None = Field(default=None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    best_of: int | None = Field(default=None, ge=1, le=MAX_CHOICES)


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
FinishReason = str  # "stop", "length" or "tool_calls"


@_closed
class PromptTokensDetails(TypedDict):
    cached_tokens: Count  # prompt tokens served from the prefix cache (billed `cached_input`)


@_closed
class Usage(TypedDict):
    prompt_tokens: Count
    completion_tokens: Count
    total_tokens: Count
    prompt_tokens_details: PromptTokensDetails


@_closed
class TopLogprob(TypedDict):
    token: str
    logprob: float
    bytes: list[int] | None


@_closed
class TokenLogprob(TypedDict):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


@_closed
class ChoiceLogprobs(TypedDict):
    content: list[TokenLogprob] | None
    refusal: list[TokenLogprob] | None


@_closed
class FunctionCallReply(TypedDict):
    name: str
    arguments: str  # JSON text


@_closed
class ToolCallReply(TypedDict):
    id: str
    type: Literal["function"]
    function: FunctionCallReply


@_closed
class AssistantMessage(TypedDict):
    role: Literal["assistant"]
    content: str | None
    refusal: None
    tool_calls: NotRequired[list[ToolCallReply]]


@_closed
class ChatChoice(TypedDict):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None
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
    service_tier: str


@_closed
class FunctionCallDelta(TypedDict, total=False):
    name: str
    arguments: str


@_closed
class ToolCallDelta(TypedDict):
    """The first delta of a call has its id, type and name (arguments ""); the next ones
    carry pieces of the arguments."""

    index: int
    id: NotRequired[str]
    type: NotRequired[Literal["function"]]
    function: FunctionCallDelta


@_closed
class ChatDelta(TypedDict, total=False):
    """The first chunk's delta opens the message (role, empty content); the others carry
    text or tool calls; the finishing chunk's is empty."""

    role: Literal["assistant"]
    content: str
    refusal: None
    tool_calls: list[ToolCallDelta]


@_closed
class ChatChunkChoice(TypedDict):
    index: int
    delta: ChatDelta
    logprobs: ChoiceLogprobs | None
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
    service_tier: str


@_closed
class CompletionLogprobs(TypedDict):
    """The legacy completions' log probabilities: one entry per token in every list (the
    first prompt token's logprob and alternatives null when the prompt is echoed)."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


@_closed
class CompletionChoice(TypedDict):
    text: str
    index: int
    logprobs: CompletionLogprobs | None
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
    service_tier: str


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
    service_tier: str


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


# --- files (the Files API) ------------------------------------------------------------------

FILE_EXPIRES_AFTER_MIN_S = 3600  # OpenAI's bounds for `expires_after[seconds]`
FILE_EXPIRES_AFTER_MAX_S = 30 * 24 * 3600
FILE_LIST_MAX_LIMIT = 10_000  # OpenAI's, and its default
FilePurpose = Literal["batch", "user_data", "batch_output"]


class FileExpiresAfter(_Request):
    anchor: Literal["created_at"]
    seconds: int = Field(ge=FILE_EXPIRES_AFTER_MIN_S, le=FILE_EXPIRES_AFTER_MAX_S)


class FileUploadFields(_Request):
    """The form fields of POST /v1/files beside `file`. The body is multipart/form-data;
    OpenAI's SDKs send `expires_after` as `expires_after[anchor]` and
    `expires_after[seconds]`. `batch_output` files are the platform's to write."""

    purpose: Literal["batch", "user_data"]
    expires_after: FileExpiresAfter | None = None


class FileCreateRequest(FileUploadFields):
    """POST /v1/files's body as the OpenAPI document describes it: the fields and the file
    (with a filename: it is shown back, never used as a path)."""

    file: bytes


@_closed
class FileObject(TypedDict):
    id: str
    object: Literal["file"]
    bytes: int
    created_at: int
    expires_at: int | None
    filename: str
    purpose: FilePurpose
    status: Literal["processed"]
    status_details: None


@_closed
class FileList(TypedDict):
    object: Literal["list"]
    data: list[FileObject]
    first_id: str | None
    last_id: str | None
    has_more: bool


@_closed
class FileDeleted(TypedDict):
    id: str
    object: Literal["file"]
    deleted: Literal[True]


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
