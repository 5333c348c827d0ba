"""The Responses API's wire types (/v1/responses): the request, the Response object, its
items, the list and deletion replies, and the typed stream events, as OpenAI shapes them.

Like gateway/protocol.py: requests are pydantic models that refuse unknown members (a 400
naming the member); replies and events are TypedDicts declared in wire order, described
by pydantic for the OpenAPI document (gateway/openapi.py). The limits below are refused
at parse time and listed in docs/api.md ("The Responses API").
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, NotRequired

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
    with_config,
)
from typing_extensions import TypedDict

from gateway.protocol import (
    ID_MAX_LENGTH,
    MAX_ARGUMENTS_CHARS,
    MAX_TOOLS,
    MODEL_MAX_LENGTH,
    USER_MAX_LENGTH,
    ResponseFormatJSONObject,
    ResponseFormatText,
    ServiceTier,
    metadata_check,
)

INPUT_MAX_ITEMS = 1024
"""Items in one request's `input` (those of a previous response come on top)."""
CONTENT_MAX_PARTS = 64
"""Content parts of one input message."""
TEXT_MAX_CHARS = 1024 * 1024
"""Characters of one text: a content part, a string input, `instructions`, a function's
output (the body limit, MANTLE_MAX_BODY_BYTES, usually binds first)."""
STORED_MAX_BYTES = 16 * 1024 * 1024
"""The conversation a response carries (its input items, a previous response's included,
as JSON): past this a request is refused before anything is reserved, so a chain of
responses cannot grow a stored row without bound."""
LIST_MAX_LIMIT = 100
LIST_DEFAULT_LIMIT = 20


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


_FIELD = re.compile(r"^[a-z_][a-z0-9_]*$")
_LABELS = frozenset({"str", "int", "float", "bool", "dict", "list", "none"})


def _field_path(loc: tuple[int | str, ...]) -> tuple[int | str, ...]:
    """An error's location without the labels pydantic gives union members ("str",
    "list[...]", "constrained-str", class-like tags): the path of the member in the body."""
    return tuple(p for p in loc if isinstance(p, int) or (_FIELD.match(p) and p not in _LABELS))


def clean_error(exc: ValidationError) -> ValidationError:
    """The error that says most about what is wrong, at its member's path: the deepest one
    (a union reports every member's failure; the member the body meant goes deepest), a
    type mismatch only when nothing says more."""
    errors = exc.errors()
    best = min(
        errors,
        key=lambda e: (-len(_field_path(e["loc"])), str(e["type"]).endswith("_type")),
    )
    detail: dict[str, Any] = {
        "type": best["type"],
        "loc": _field_path(best["loc"]),
        "input": best["input"],
    }
    if "ctx" in best:
        detail["ctx"] = best["ctx"]
    try:
        return ValidationError.from_exception_data(exc.title, [detail])  # type: ignore[list-item]
    except (KeyError, TypeError, ValueError):  # a type pydantic cannot rebuild: as it was
        return exc


# --- the request ----------------------------------------------------------------------------

ItemStatus = Literal["in_progress", "completed", "incomplete"]
TextValue = Annotated[str, Field(max_length=TEXT_MAX_CHARS)]
ItemId = Annotated[str, Field(min_length=1, max_length=ID_MAX_LENGTH)]


class InputTextPart(_Request):
    """A part of a message's content: `input_text`, or `output_text` (an assistant turn,
    as a previous response's output gives it back: annotations and logprobs are ignored)."""

    type: Literal["input_text", "output_text"]
    text: TextValue
    annotations: list[Any] | None = Field(default=None, max_length=0)
    logprobs: list[Any] | None = None


class InputMessage(_Request):
    type: Literal["message"] = "message"
    id: ItemId | None = None
    role: Literal["user", "system", "developer", "assistant"]
    content: Annotated[list[InputTextPart], Field(max_length=CONTENT_MAX_PARTS)] | TextValue
    status: ItemStatus | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class InputFunctionCall(_Request):
    """A call the model made earlier (a previous response's `function_call` item)."""

    type: Literal["function_call"]
    id: ItemId | None = None
    call_id: ItemId
    name: str = Field(min_length=1, max_length=64)
    arguments: str = Field(max_length=MAX_ARGUMENTS_CHARS)
    status: ItemStatus | None = None


class InputFunctionCallOutput(_Request):
    """What the client's function returned for `call_id`."""

    type: Literal["function_call_output"]
    id: ItemId | None = None
    call_id: ItemId
    output: TextValue
    status: ItemStatus | None = None


_ITEM_TAGS = {
    "message": "Message",
    "function_call": "FunctionCall",
    "function_call_output": "FunctionCallOutput",
}


def _item_kind(value: Any) -> str | None:
    # A message may leave `type` out (OpenAI's "easy" input message). Tags are class-like
    # names, which `clean_error` drops from an error's location.
    if isinstance(value, dict):
        return _ITEM_TAGS.get(value.get("type", "message"))
    return _ITEM_TAGS.get(getattr(value, "type", ""))


InputItem = Annotated[
    Annotated[InputMessage, Tag("Message")]
    | Annotated[InputFunctionCall, Tag("FunctionCall")]
    | Annotated[InputFunctionCallOutput, Tag("FunctionCallOutput")],
    Discriminator(
        _item_kind,
        custom_error_type="invalid_kind",
        custom_error_message=(
            "items are messages (type 'message' or none), 'function_call' or 'function_call_output'"
        ),
    ),
]


class FunctionTool(_Request):
    """A function tool, in the Responses API's flat shape."""

    type: Literal["function"]
    name: str = Field(max_length=256)  # the name rules: gateway/agent.py, param-exact
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolChoiceFunction(_Request):
    type: Literal["function"]
    name: str = Field(max_length=256)


# `{"type": "text"}` and `{"type": "json_object"}` are chat's response formats, the same shapes.
FormatText = ResponseFormatText
FormatJSONObject = ResponseFormatJSONObject


class FormatJSONSchema(_Request):
    type: Literal["json_schema"]
    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")
    # "schema" shadows a BaseModel attribute; the wire name stays `schema`.
    schema_: dict[str, Any] = Field(alias="schema")
    description: str | None = None
    strict: bool | None = None

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


_FORMAT_TAGS = {"text": "Text", "json_object": "JSONObject", "json_schema": "JSONSchema"}


def _format_kind(value: Any) -> str | None:
    if isinstance(value, dict):
        kind = value.get("type")
        return _FORMAT_TAGS.get(kind) if isinstance(kind, str) else None
    return _FORMAT_TAGS.get(getattr(value, "type", ""))


TextFormat = Annotated[
    Annotated[FormatText, Tag("Text")]
    | Annotated[FormatJSONObject, Tag("JSONObject")]
    | Annotated[FormatJSONSchema, Tag("JSONSchema")],
    Discriminator(
        _format_kind,
        custom_error_type="invalid_kind",
        custom_error_message="format types are 'text', 'json_object' and 'json_schema'",
    ),
]


class TextConfig(_Request):
    format: TextFormat | None = None


class ResponseCreateRequest(_Request):
    model: str = Field(min_length=1, max_length=MODEL_MAX_LENGTH)
    input: Annotated[list[InputItem], Field(min_length=1, max_length=INPUT_MAX_ITEMS)] | TextValue
    instructions: TextValue | None = None
    tools: list[FunctionTool] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: ToolChoiceFunction | Literal["none", "auto", "required"] | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    store: bool | None = None
    previous_response_id: str | None = Field(default=None, min_length=1, max_length=ID_MAX_LENGTH)
    metadata: dict[str, str] | None = None
    stream: bool | None = False
    service_tier: ServiceTier | None = None
    # Accepted and ignored: what SDKs and frameworks send by default.
    user: str | None = Field(default=None, max_length=USER_MAX_LENGTH)
    truncation: Literal["disabled"] | None = None
    include: list[str] | None = Field(default=None, max_length=0)

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        return metadata_check(value)

    @model_validator(mode="wrap")
    @classmethod
    def _one_error(cls, data: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        try:
            return handler(data)
        except ValidationError as exc:
            raise clean_error(exc) from None


# --- replies --------------------------------------------------------------------------------

_closed = with_config(ConfigDict(extra="forbid"))
Count = Annotated[int, Field(ge=0)]


@_closed
class OutputText(TypedDict):
    type: Literal["output_text"]
    text: str
    annotations: Annotated[list[Any], Field(max_length=0)]


@_closed
class OutputMessage(TypedDict):
    type: Literal["message"]
    id: str
    status: ItemStatus
    role: Literal["assistant"]
    content: list[OutputText]


@_closed
class FunctionCallItem(TypedDict):
    type: Literal["function_call"]
    id: str
    call_id: str
    name: str
    arguments: str  # JSON text
    status: ItemStatus


OutputItem = OutputMessage | FunctionCallItem


@_closed
class InputTextReply(TypedDict):
    type: Literal["input_text"]
    text: str


@_closed
class InputMessageItem(TypedDict):
    """A user, system or developer message among a response's input items."""

    type: Literal["message"]
    id: str
    status: ItemStatus
    role: Literal["user", "system", "developer"]
    content: list[InputTextReply]


@_closed
class FunctionCallOutputItem(TypedDict):
    type: Literal["function_call_output"]
    id: str
    call_id: str
    output: str
    status: ItemStatus


# What `input_items` lists: assistant turns are output messages, as OpenAI lists them.
ResponseItem = InputMessageItem | OutputMessage | FunctionCallItem | FunctionCallOutputItem


@_closed
class InputTokensDetails(TypedDict):
    cached_tokens: Count
    cache_write_tokens: Count


@_closed
class OutputTokensDetails(TypedDict):
    reasoning_tokens: Count


@_closed
class ResponseUsage(TypedDict):
    input_tokens: Count
    input_tokens_details: InputTokensDetails
    output_tokens: Count
    output_tokens_details: OutputTokensDetails
    total_tokens: Count


@_closed
class ResponseError(TypedDict):
    code: str
    message: str


@_closed
class IncompleteDetails(TypedDict):
    reason: Literal["max_output_tokens"]


@_closed
class FunctionToolReply(TypedDict):
    type: Literal["function"]
    name: str
    description: str | None
    parameters: dict[str, Any] | None
    strict: bool


@_closed
class ToolChoiceFunctionReply(TypedDict):
    type: Literal["function"]
    name: str


@_closed
class TextFormatReply(TypedDict):
    """`{type: text}`, `{type: json_object}`, or `{type: json_schema, name, schema,
    description, strict}` as the request gave it."""

    type: Literal["text", "json_object", "json_schema"]
    name: NotRequired[str]
    schema: NotRequired[dict[str, Any]]
    description: NotRequired[str | None]
    strict: NotRequired[bool | None]


@_closed
class TextConfigReply(TypedDict):
    format: TextFormatReply


@_closed
class Response(TypedDict):
    """The Response object (`output_text` is not on the wire: the SDKs compute it)."""

    id: str
    object: Literal["response"]
    created_at: int
    status: Literal["in_progress", "completed", "incomplete", "failed"]
    error: ResponseError | None
    incomplete_details: IncompleteDetails | None
    instructions: str | None
    max_output_tokens: int | None
    model: str
    output: list[OutputItem]
    parallel_tool_calls: bool
    previous_response_id: str | None
    store: bool
    temperature: float
    text: TextConfigReply
    tool_choice: Literal["none", "auto", "required"] | ToolChoiceFunctionReply
    tools: list[FunctionToolReply]
    top_p: float
    truncation: Literal["disabled"]
    usage: ResponseUsage | None
    user: str | None
    metadata: dict[str, str]
    service_tier: str


@_closed
class ResponseItemList(TypedDict):
    object: Literal["list"]
    data: list[ResponseItem]
    first_id: str | None
    last_id: str | None
    has_more: bool


@_closed
class ResponseDeleted(TypedDict):
    id: str
    object: Literal["response.deleted"]
    deleted: Literal[True]


# --- stream events, in the order a stream sends them -----------------------------------------


@_closed
class ResponseCreatedEvent(TypedDict):
    type: Literal["response.created"]
    sequence_number: Count
    response: Response


@_closed
class ResponseInProgressEvent(TypedDict):
    type: Literal["response.in_progress"]
    sequence_number: Count
    response: Response


@_closed
class OutputItemAddedEvent(TypedDict):
    type: Literal["response.output_item.added"]
    sequence_number: Count
    output_index: Count
    item: OutputItem


@_closed
class ContentPartAddedEvent(TypedDict):
    type: Literal["response.content_part.added"]
    sequence_number: Count
    item_id: str
    output_index: Count
    content_index: Count
    part: OutputText


@_closed
class OutputTextDeltaEvent(TypedDict):
    type: Literal["response.output_text.delta"]
    sequence_number: Count
    item_id: str
    output_index: Count
    content_index: Count
    delta: str
    logprobs: Annotated[list[Any], Field(max_length=0)]


@_closed
class OutputTextDoneEvent(TypedDict):
    type: Literal["response.output_text.done"]
    sequence_number: Count
    item_id: str
    output_index: Count
    content_index: Count
    text: str
    logprobs: Annotated[list[Any], Field(max_length=0)]


@_closed
class ContentPartDoneEvent(TypedDict):
    type: Literal["response.content_part.done"]
    sequence_number: Count
    item_id: str
    output_index: Count
    content_index: Count
    part: OutputText


@_closed
class FunctionCallArgumentsDeltaEvent(TypedDict):
    type: Literal["response.function_call_arguments.delta"]
    sequence_number: Count
    item_id: str
    output_index: Count
    delta: str


@_closed
class FunctionCallArgumentsDoneEvent(TypedDict):
    type: Literal["response.function_call_arguments.done"]
    sequence_number: Count
    item_id: str
    output_index: Count
    arguments: str


@_closed
class OutputItemDoneEvent(TypedDict):
    type: Literal["response.output_item.done"]
    sequence_number: Count
    output_index: Count
    item: OutputItem


@_closed
class ResponseCompletedEvent(TypedDict):
    type: Literal["response.completed"]
    sequence_number: Count
    response: Response


@_closed
class ResponseIncompleteEvent(TypedDict):
    type: Literal["response.incomplete"]
    sequence_number: Count
    response: Response


@_closed
class ErrorEvent(TypedDict):
    """An error after the stream started (then `response.failed`)."""

    type: Literal["error"]
    sequence_number: Count
    code: str | None
    message: str
    param: str | None


@_closed
class ResponseFailedEvent(TypedDict):
    type: Literal["response.failed"]
    sequence_number: Count
    response: Response


StreamEvent = (
    ResponseCreatedEvent
    | ResponseInProgressEvent
    | OutputItemAddedEvent
    | ContentPartAddedEvent
    | OutputTextDeltaEvent
    | OutputTextDoneEvent
    | ContentPartDoneEvent
    | FunctionCallArgumentsDeltaEvent
    | FunctionCallArgumentsDoneEvent
    | OutputItemDoneEvent
    | ResponseCompletedEvent
    | ResponseIncompleteEvent
    | ErrorEvent
    | ResponseFailedEvent
)
