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
