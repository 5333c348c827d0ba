"""The Batch API's wire types (/v1/batches): the create request, the Batch object, its list,
and the lines of a batch's input, output and error files, as OpenAI shapes them.

Like gateway/protocol.py: requests are pydantic models that refuse unknown members; replies
are TypedDicts in wire order. The limits are listed in docs/api.md ("The Batch API").
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from typing_extensions import TypedDict

from gateway.protocol import metadata_check

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses")
"""What a batch may run; every line's `url` is the batch's endpoint."""
CUSTOM_ID_MAX_LENGTH = 512
LIST_MAX_LIMIT = 100
LIST_DEFAULT_LIMIT = 20
ERRORS_LISTED = 100
"""Line errors a failed validation lists (the count says how many there were)."""

Endpoint = Literal["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses"]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ExpiresAfter(_Request):
    anchor: Literal["created_at"]
    seconds: int = Field(ge=3600, le=30 * 24 * 3600)


class BatchCreateRequest(_Request):
    input_file_id: str = Field(min_length=1, max_length=64)
    endpoint: Endpoint
    completion_window: Literal["24h"]
    metadata: dict[str, str] | None = None
    # When the output and error files expire (OpenAI's `output_expires_after`).
    output_expires_after: ExpiresAfter | None = None

    _metadata = field_validator("metadata")(metadata_check)


class BatchLineRequest(BaseModel):
    """One line of a batch's input file: `{"custom_id", "method", "url", "body"}`."""

    model_config = ConfigDict(extra="forbid")

    custom_id: str = Field(min_length=1, max_length=CUSTOM_ID_MAX_LENGTH)
    method: Literal["POST"]
    url: str = Field(max_length=64)
    body: dict[str, Any]


class BatchError(TypedDict):
    code: str
    message: str
    param: str | None
    line: int | None


class BatchErrors(TypedDict):
    object: Literal["list"]
    data: list[BatchError]


class BatchRequestCounts(TypedDict):
    total: int
    completed: int
    failed: int


class Batch(TypedDict):
    id: str
    object: Literal["batch"]
    endpoint: str
    errors: BatchErrors | None
    input_file_id: str
    completion_window: str
    status: str
    output_file_id: str | None
    error_file_id: str | None
    created_at: int
    in_progress_at: int | None
    expires_at: int | None
    finalizing_at: int | None
    completed_at: int | None
    failed_at: int | None
    expired_at: int | None
    cancelling_at: int | None
    cancelled_at: int | None
    request_counts: BatchRequestCounts
    metadata: dict[str, str] | None


class BatchList(TypedDict):
    object: Literal["list"]
    data: list[Batch]
    first_id: str | None
    last_id: str | None
    has_more: bool


class LineResponse(TypedDict):
    status_code: int
    request_id: str
    body: Any


class LineError(TypedDict):
    code: str
    message: str


class OutputLine(TypedDict):
    """A line of a batch's output file (a 2xx answer) or error file (anything else, or a
    line that never ran: `response` null and `error` saying why)."""

    id: str
    custom_id: str
    response: LineResponse | None
    error: LineError | None
