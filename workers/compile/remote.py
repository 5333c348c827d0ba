"""Publishing sealed artifacts to a shared fsspec store (s3://, gs://, ...) for many nodes."""

from __future__ import annotations

import logging
from pathlib import Path

from workers.compile.artifacts import MANIFEST_NAME, content_files

# fsspec is imported lazily: only nodes that publish to a remote store need it
# (and its protocol package, such as s3fs, which the operator installs).

logger = logging.getLogger(__name__)


def is_remote(store: str) -> bool:
    """A URL with a protocol other than the local filesystem's."""
    return "://" in store and not store.startswith("file://")


def publish(local: Path, url: str) -> str:
    """Copy the sealed artifact `local` (named by its sha256) to `<url>/<sha256>/`; its URL.

    Content files first, the manifest last: readers treat a directory without
    `mantle.json` as absent, so a half-copied artifact is never taken. An
    artifact already there is kept (same name, same content).
    """
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    target = f"{root.rstrip('/')}/{local.name}"
    location = f"{url.rstrip('/')}/{local.name}"
    if fs.exists(f"{target}/{MANIFEST_NAME}"):
        return location
    for rel in content_files(local):
        parent = f"{target}/{rel}".rsplit("/", 1)[0]
        fs.makedirs(parent, exist_ok=True)
        fs.put_file(str(local / rel), f"{target}/{rel}")
    fs.put_file(str(local / MANIFEST_NAME), f"{target}/{MANIFEST_NAME}")
    logger.info("published artifact %s to %s", local.name, location)
    return location


def fetch(url: str, cache: Path) -> Path:
    """The artifact at `url` (`<store>/<sha256>`) as a local directory in `cache`.

    Downloaded once per node into a temporary sibling, checked in full (the digest of
    every file must equal the name it is stored under), then renamed into place, so a
    node never loads a half-copied or altered artifact, and later loads are local.
    """
    import shutil
    import tempfile

    import fsspec

    from workers.compile.artifacts import ArtifactError, directory_digest, read_manifest

    name = url.rstrip("/").rsplit("/", 1)[-1]
    if len(name) != 64 or any(c not in "0123456789abcdef" for c in name):
        raise ArtifactError(f"{url}: an artifact URL ends in its sha256")
    local = cache / name
    if (local / MANIFEST_NAME).is_file():
        return local
    fs, root = fsspec.core.url_to_fs(url)
    root = root.rstrip("/")
    if not fs.exists(f"{root}/{MANIFEST_NAME}"):
        raise ArtifactError(f"{url}: no {MANIFEST_NAME} (absent, or still being published)")
    cache.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".fetch-{name[:12]}-", dir=cache))
    try:
        for remote in fs.find(root):
            rel = remote[len(root) :].lstrip("/")
            parts = Path(rel).parts
            if not rel or Path(rel).is_absolute() or ".." in parts:
                raise ArtifactError(f"{url}: unsafe file name {rel!r} in the store")
            (staging / rel).parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(remote, str(staging / rel))
        manifest = read_manifest(staging)
        if manifest.get("sha256") != name or directory_digest(staging) != name:
            raise ArtifactError(f"{url}: its files do not hash to {name}: refusing to load it")
        try:
            staging.rename(local)
        except OSError:
            if not (local / MANIFEST_NAME).is_file():
                raise
            shutil.rmtree(staging, ignore_errors=True)  # another thread or process was first
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("fetched artifact %s from %s", name, url)
    return local
