"""Artifacts in a shared fsspec store: fetched once per node, checked in full, then loaded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.factories import tensor_artifact
from workers.compile.artifacts import ArtifactError
from workers.compile.remote import fetch, publish
from workers.contract import ModelRef, Runtime


def _published(tmp_path: Path, store_url: str) -> tuple[dict[str, Any], str]:
    manifest = tensor_artifact(tmp_path / "built")
    return manifest, publish(Path(manifest["location"]), store_url)


def test_a_model_version_in_a_remote_store_loads_and_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from workers.runtime import models

    manifest, url = _published(tmp_path, "memory://mantle-remote-load/artifacts")
    cache = tmp_path / "node-cache"
    monkeypatch.setenv("MANTLE_ARTIFACT_DIR", str(cache))
    ref = ModelRef(
        version_id="mv_remote_1",
        runtime=Runtime.TENSOR.value,
        sha256=manifest["sha256"],
        location=url,
    )
    try:
        loaded = models.load_model(ref)
        score = loaded.session.run(["score"], {"features": np.ones((2, 4), np.float32)})[0]
    finally:
        models.unload_model(ref.version_id)

    assert loaded.directory == cache / manifest["sha256"]
    assert score.tolist() == [8.0, 8.0]  # (1 + offset 1) x 4 features
    assert sorted(p.name for p in cache.iterdir()) == [manifest["sha256"]]


def test_fetch_is_once_and_a_tampered_store_is_refused(tmp_path: Path) -> None:
    import fsspec

    manifest, url = _published(tmp_path, "memory://mantle-remote-tamper/artifacts")
    cache = tmp_path / "cache"
    first = fetch(url, cache)
    assert fetch(url, cache) == first  # the local copy is reused

    fs, root = fsspec.core.url_to_fs(url)
    model_file = f"{root}/{manifest['model_file']}"
    fs.pipe_file(model_file, fs.cat_file(model_file) + b"\0")
    other = tmp_path / "other-node"
    with pytest.raises(ArtifactError, match="do not hash to"):
        fetch(url, other)
    assert list(other.iterdir()) == []  # nothing half-written is left behind


def test_urls_that_do_not_name_an_artifact_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="ends in its sha256"):
        fetch("memory://mantle-remote-bad/artifacts/../../etc", tmp_path)
    with pytest.raises(ArtifactError, match=r"no mantle\.json"):
        fetch("memory://mantle-remote-bad/artifacts/" + "a" * 64, tmp_path)
