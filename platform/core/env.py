"""Reading settings and secrets from the environment."""

from __future__ import annotations

from pathlib import Path

import environ

env = environ.Env()


def secret(name: str, default: str | None = None) -> str | None:
    """A secret from `NAME`, or from the file named by `NAME_FILE` (Docker/K8s secrets)."""
    file_name = env.str(f"{name}_FILE", default="")
    if file_name:
        return Path(file_name).read_text(encoding="utf-8").strip()
    value: str | None = env.str(name, default=default)
    return value
