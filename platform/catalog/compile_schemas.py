"""Request and response shapes of the compile-job part of the management API."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from ninja import Schema
from pydantic import ConfigDict, Field


class In(Schema):
    """Inputs refuse unknown fields, so a typo is an error rather than silently ignored."""

    model_config = ConfigDict(extra="forbid")


Kind = Literal["chat", "completion", "embedding", "tensor"]
Quantize = Literal["none", "int8", "int4"]
Optimization = Literal["none", "basic", "extended"]


class CheckpointCompileIn(In):
    """Compile a Hugging Face checkpoint directory that is already on the node."""

    model_name: str = Field(min_length=1, max_length=120)
    kind: Kind
    source: Literal["hf-checkpoint"] = "hf-checkpoint"
    path: str = Field(min_length=1, max_length=1000)
    quantize: Quantize = "none"
    optimization: Optimization = "basic"
    tolerance: float | None = Field(default=None, ge=0)


class UploadParams(In):
    """Query parameters of an upload; the request body is the file itself."""

    model_name: str = Field(min_length=1, max_length=120)
    kind: Kind
    source: Literal["onnx", "hf-checkpoint"] = "onnx"
    model_file: str = Field(default="model.onnx", min_length=1, max_length=200)
    filename: str = Field(default="", max_length=200)
    quantize: Quantize = "none"
    optimization: Optimization = "basic"
    tolerance: float | None = Field(default=None, ge=0)


class CompileStepOut(Schema):
    name: str
    status: str
    started_at: float | None = None
    finished_at: float | None = None
    duration_s: float | None = None
    log: str = ""
    metrics: dict[str, Any] = Field(default_factory=dict)


class CompileJobOut(Schema):
    id: str
    status: str
    model_name: str
    kind: str
    source: str
    source_detail: dict[str, Any]
    options: dict[str, Any]
    steps: list[CompileStepOut]
    error: str | None
    error_code: str | None
    model_version_id: str | None
    model_version: int | None
    sha256: str | None
    created_by: str
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
