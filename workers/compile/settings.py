"""Compile node configuration, read from the environment only (no Django settings here)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from workers.compile.validate import DEFAULT_MAX_TENSOR_BYTES
from workers.runtime.cpus import usable_cores


def _int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    return int(raw) if raw else default


@dataclass(frozen=True, slots=True)
class CompileSettings:
    broker_url: str
    artifact_dir: Path
    prepare_python: Path | None  # None: the prepare venv bin/prepare-models builds
    time_limit_s: int
    ort_threads: int
    max_tensor_bytes: int

    @classmethod
    def from_env(cls) -> CompileSettings:
        prepare = os.environ.get("MANTLE_PREPARE_PYTHON", "").strip()
        store = os.environ.get("MANTLE_ARTIFACT_DIR", "").strip()
        return cls(
            broker_url=os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/0"),
            artifact_dir=Path(
                store or Path.home() / ".cache" / "mantle" / "artifacts"
            ).expanduser(),
            prepare_python=Path(prepare) if prepare else None,
            time_limit_s=_int("MANTLE_COMPILE_TIME_LIMIT_S", 3600),
            ort_threads=_int("MANTLE_ORT_THREADS", min(usable_cores(), 4)),
            max_tensor_bytes=_int("MANTLE_MAX_TENSOR_BYTES", DEFAULT_MAX_TENSOR_BYTES),
        )
