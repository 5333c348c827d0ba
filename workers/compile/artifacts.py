"""The content-addressed model artifact store described in docs/artifacts.md."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

# Stdlib only: worker nodes import this module at run time to find and verify
# the artifacts they load, and they have no torch or onnx tooling.

MANIFEST_NAME = "mantle.json"
MANIFEST_FORMAT = 1
STAGING_PREFIX = ".staging-"
_CHUNK = 1 << 20


class ArtifactError(Exception):
    """An artifact is missing, malformed or does not match its digest."""


def file_sha256(path: Path) -> str:
    """Hex sha256 of one file, read in chunks so 500 MB graphs never sit in memory."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def content_files(directory: Path) -> list[str]:
    """Relative POSIX paths of the files the digest covers, sorted (all but the manifest)."""
    found: list[str] = []
    for dirpath, _dirnames, filenames in os.walk(directory):
        for name in filenames:
            rel = (Path(dirpath) / name).relative_to(directory).as_posix()
            if rel != MANIFEST_NAME:
                found.append(rel)
    # Sort on the encoded path so the order never depends on locale or platform.
    found.sort(key=lambda p: p.encode("utf-8"))
    return found


def content_size(directory: Path) -> int:
    """Total bytes of the files the digest covers: the manifest's `size_bytes`."""
    return sum((directory / rel).stat().st_size for rel in content_files(directory))


def directory_digest(directory: Path) -> str:
    """sha256 over `<path>\\0<sha256 of file>\\n` lines sorted by path (docs/artifacts.md)."""
    h = hashlib.sha256()
    for rel in content_files(directory):
        h.update(rel.encode("utf-8") + b"\0" + file_sha256(directory / rel).encode("ascii") + b"\n")
    return h.hexdigest()


def read_manifest(artifact_dir: Path) -> dict[str, Any]:
    """The parsed `mantle.json` of an artifact directory."""
    path = artifact_dir / MANIFEST_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ArtifactError(f"{artifact_dir}: no {MANIFEST_NAME}") from exc
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{path}: unreadable manifest: {exc}") from exc
    if not isinstance(data, dict):
        raise ArtifactError(f"{path}: manifest is not a JSON object")
    return data


def find_artifact(store: Path, sha256: str) -> Path | None:
    """The directory of artifact `sha256` in `store`, or None when it is not there."""
    if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
        # Never let a malformed id become a path outside the store.
        return None
    candidate = store / sha256
    if (candidate / MANIFEST_NAME).is_file():
        return candidate
    return None


def verify_artifact(artifact_dir: Path, *, fast: bool = False) -> dict[str, Any]:
    """Check an artifact against its name and manifest; return the manifest.

    `fast` trusts file contents and compares only the total size, which is enough
    to catch a truncated or missing file in milliseconds; the full check rehashes
    every byte (seconds per 500 MB) and catches any corruption.
    """
    manifest = read_manifest(artifact_dir)
    name = artifact_dir.name
    if manifest.get("sha256") != name:
        raise ArtifactError(
            f"{artifact_dir}: manifest sha256 {manifest.get('sha256')!r} != directory name"
        )
    for key in ("model_file", "tokenizer_file"):
        rel = manifest.get(key)
        if rel and not (artifact_dir / rel).is_file():
            raise ArtifactError(f"{artifact_dir}: {key} {rel!r} is missing")
    size = content_size(artifact_dir)
    if manifest.get("size_bytes") != size:
        raise ArtifactError(
            f"{artifact_dir}: size {size} != manifest size_bytes {manifest.get('size_bytes')}"
        )
    if not fast:
        digest = directory_digest(artifact_dir)
        if digest != name:
            raise ArtifactError(f"{artifact_dir}: content digest {digest} != directory name")
    return manifest


def _fsync_tree(directory: Path) -> None:
    # Flush file data before the rename publishes the directory: after a crash a
    # reader must not find a complete-looking artifact with zero-filled files.
    for dirpath, _dirnames, filenames in os.walk(directory):
        for name in filenames:
            fd = os.open(Path(dirpath) / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def staging_dir(store: Path, label: str = "artifact") -> Iterator[Path]:
    """A fresh directory inside `store` to build an artifact in; removed on the way out.

    It lives in the store itself so that publishing is a rename on one
    filesystem (atomic), never a copy. `commit_artifact` moves the content out;
    whatever is left (a failed build) is deleted, so no half artifact remains.
    """
    store.mkdir(parents=True, exist_ok=True)
    path = store / f"{STAGING_PREFIX}{label}-{os.getpid()}-{secrets.token_hex(4)}"
    path.mkdir()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def commit_artifact(store: Path, staging: Path, manifest: Mapping[str, Any]) -> Path:
    """Seal a staging directory: digest it, write the manifest, rename it into place.

    Returns `<store>/<sha256>`. When that artifact already exists (the same
    build ran before, or concurrently) the existing one is kept and the staging
    directory is left for `staging_dir` to delete.
    """
    (staging / MANIFEST_NAME).unlink(missing_ok=True)
    digest = directory_digest(staging)
    full = dict(manifest)
    full.setdefault("format", MANIFEST_FORMAT)
    full["sha256"] = digest
    full["size_bytes"] = content_size(staging)
    (staging / MANIFEST_NAME).write_text(
        json.dumps(full, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    final = store / digest
    if find_artifact(store, digest) is not None:
        return final
    _fsync_tree(staging)
    try:
        staging.rename(final)
    except OSError:
        # Lost a race with another builder of the same content: theirs is as good.
        if find_artifact(store, digest) is None:
            raise
        return final
    _fsync_dir(store)
    return final


def discard_artifact(store: Path, sha256: str) -> None:
    """Remove an artifact (a damaged one, before its rebuild), atomically for readers.

    Renamed to a staging name first so that no reader ever finds the digest's
    directory half deleted; processes holding its files open keep them.
    """
    path = find_artifact(store, sha256)
    if path is None:
        return
    doomed = store / f"{STAGING_PREFIX}discard-{sha256[:12]}-{os.getpid()}-{secrets.token_hex(4)}"
    path.rename(doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def remove_stale_staging(store: Path, older_than_s: float = 24 * 3600) -> list[Path]:
    """Delete staging directories left by builds that died (killed, power loss)."""
    removed: list[Path] = []
    if not store.is_dir():
        return removed
    cutoff = time.time() - older_than_s
    for entry in store.iterdir():
        if entry.name.startswith(STAGING_PREFIX) and entry.stat().st_mtime < cutoff:
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def write_json_atomic(path: Path, data: Any) -> None:
    """Write a small JSON file so readers see the old or the new content, never a mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with tmp.open("w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, ensure_ascii=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
