"""Prepares the built-in models into the artifact cache and registers them as public endpoints."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from catalog import services


class Command(BaseCommand):
    help = __doc__

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--manifests",
            help="a JSON file with the manifest list (skips running bin/prepare-models)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if options["manifests"]:
            manifests = json.loads(Path(options["manifests"]).read_text(encoding="utf-8"))
        else:
            manifests = self._prepare()
        endpoints = services.builtin_models_register(manifests)
        for endpoint in endpoints:
            self.stdout.write(
                f"[mantle] model {endpoint.name:<24} endpoint {endpoint.id}  "
                f"pool {endpoint.pool.name}"
            )

    def _prepare(self) -> list[dict[str, Any]]:
        script = Path(settings.ROOT_DIR) / "bin" / "prepare-models"
        # Export is heavy and needs torch; bin/prepare-models does it in its own
        # cached environment and is a no-op when the artifacts already exist.
        done = subprocess.run(  # noqa: S603 - our own script, fixed arguments
            [str(script)], capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            raise CommandError(f"bin/prepare-models failed:\n{done.stderr[-4000:]}")
        lines = [line for line in done.stdout.splitlines() if line.strip()]
        if not lines:
            raise CommandError("bin/prepare-models printed no manifest list")
        manifests: list[dict[str, Any]] = json.loads(lines[-1])
        return manifests
