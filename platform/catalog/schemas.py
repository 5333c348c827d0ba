"""Request and response shapes of the catalog API: endpoints, pools and the fleet."""

from __future__ import annotations

from datetime import datetime

from ninja import Schema
from pydantic import Field

from accounts.schemas import In


class EndpointIn(In):
    name: str = Field(min_length=1, max_length=120)
    model_version_id: str = Field(min_length=1, max_length=40)
    pool: str = Field(min_length=1, max_length=64, description="an accelerator pool's name")
    rpm_limit: int | None = Field(default=None, ge=1, description="requests per minute")
    tpm_limit: int | None = Field(default=None, ge=1, description="tokens per minute")


class EndpointPatch(In):
    name: str | None = Field(default=None, min_length=1, max_length=120)
    pool: str | None = Field(default=None, min_length=1, max_length=64)
    rpm_limit: int | None = Field(default=None, ge=1)
    tpm_limit: int | None = Field(default=None, ge=1)


class RolloutIn(In):
    model_version_id: str = Field(min_length=1, max_length=40)


class EndpointOut(Schema):
    id: str
    name: str
    status: str
    kind: str
    model: str
    model_version_id: str
    model_version: int
    previous_model_version_id: str | None = Field(
        description="what `POST .../rollback` returns to; null until the version was switched"
    )
    pool: str
    region: str
    rpm_limit: int
    tpm_limit: int
    created_at: datetime
    updated_at: datetime


class EndpointRevisionOut(Schema):
    number: int
    action: str
    model_version_id: str
    model_version: int
    created_by: str
    created_at: datetime


class PoolOut(Schema):
    name: str
    region: str
    providers: list[str] = Field(description="ONNX Runtime execution providers, preferred first")
    description: str


class LoadedVersionOut(Schema):
    model_version_id: str
    model: str
    version: int


class FleetWorkerOut(Schema):
    node: str
    providers: list[str] = Field(description="execution providers the node actually runs on")
    models_loaded: list[LoadedVersionOut]
    other_models_loaded: int = Field(description="loaded versions of other organizations")
    free_slots: int
    total_slots: int
    tokens_per_s: float
    last_heartbeat: datetime
    heartbeat_age_s: float


class FleetPoolOut(Schema):
    name: str
    region: str
    providers: list[str]
    providers_in_use: list[str]
    live_workers: int
    free_slots: int
    total_slots: int
    tokens_per_s: float
    workers: list[FleetWorkerOut]
