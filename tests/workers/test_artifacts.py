"""The content-addressed artifact store: digests, atomic commits, verification."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from workers.compile import artifacts
from workers.compile.artifacts import ArtifactError


def _make(directory: Path, files: dict[str, bytes]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for rel, data in files.items():
        path = directory / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return directory


FILES = {
    "model.onnx": b"graph bytes" * 100,
    "tokenizer.json": b'{"model": {}}',
    "sub/extra.bin": b"\0\1",
}
MANIFEST = {
    "name": "tiny",
    "kind": "tensor",
    "runtime": "echo",
    "model_file": "model.onnx",
    "tokenizer_file": "tokenizer.json",
}


def _commit(store: Path, files: dict[str, bytes] = FILES) -> Path:
    with artifacts.staging_dir(store, "tiny") as tmp:
        _make(tmp, files)
        return artifacts.commit_artifact(store, tmp, MANIFEST)


def test_digest_matches_the_documented_formula(tmp_path: Path) -> None:
    d = _make(tmp_path / "a", FILES)
    lines = b"".join(
        rel.encode() + b"\0" + hashlib.sha256(FILES[rel]).hexdigest().encode() + b"\n"
        for rel in sorted(FILES)
    )
    assert artifacts.directory_digest(d) == hashlib.sha256(lines).hexdigest()


def test_digest_is_stable_and_ignores_the_manifest_and_write_order(tmp_path: Path) -> None:
    a = _make(tmp_path / "a", FILES)
    b = _make(tmp_path / "b", dict(reversed(list(FILES.items()))))
    (b / "mantle.json").write_text('{"anything": 1}')
    assert artifacts.directory_digest(a) == artifacts.directory_digest(b)
    assert artifacts.directory_digest(a) == artifacts.directory_digest(a)


@pytest.mark.parametrize(
    "change",
    [
        lambda d: (d / "model.onnx").write_bytes(b"graph bytes" * 99 + b"graph bytez"),
        lambda d: (d / "tokenizer.json").rename(d / "tokenizer2.json"),
        lambda d: (d / "new.txt").write_text("x"),
        lambda d: (d / "sub" / "extra.bin").unlink(),
    ],
    ids=["content", "rename", "added", "removed"],
)
def test_digest_changes_with_any_content_change(tmp_path: Path, change: object) -> None:
    d = _make(tmp_path / "a", FILES)
    before = artifacts.directory_digest(d)
    change(d)  # type: ignore[operator]
    assert artifacts.directory_digest(d) != before


def test_commit_publishes_under_the_digest_with_a_complete_manifest(tmp_path: Path) -> None:
    store = tmp_path / "store"
    final = _commit(store)
    digest = artifacts.directory_digest(_make(tmp_path / "ref", FILES))
    assert final == store / digest
    manifest = json.loads((final / "mantle.json").read_text())
    assert manifest["sha256"] == digest
    assert manifest["format"] == 1
    assert manifest["size_bytes"] == sum(len(v) for v in FILES.values())
    assert artifacts.find_artifact(store, digest) == final
    assert artifacts.verify_artifact(final)["name"] == "tiny"
    # Nothing but the artifact is left in the store.
    assert [p.name for p in store.iterdir()] == [digest]


def test_committing_the_same_content_twice_keeps_one_artifact(tmp_path: Path) -> None:
    store = tmp_path / "store"
    first = _commit(store)
    second = _commit(store)
    assert first == second
    assert [p.name for p in store.iterdir()] == [first.name]


def test_a_failed_build_leaves_no_directory_behind(tmp_path: Path) -> None:
    store = tmp_path / "store"

    class Boom(Exception):
        pass

    with pytest.raises(Boom), artifacts.staging_dir(store, "tiny") as tmp:
        _make(tmp, FILES)
        raise Boom
    assert list(store.iterdir()) == []


def test_a_reader_never_sees_a_half_written_artifact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = tmp_path / "store"
    digest = artifacts.directory_digest(_make(tmp_path / "ref", FILES))
    seen_during_commit: list[Path | None] = []

    real_fsync = artifacts._fsync_tree

    def spy(directory: Path) -> None:
        # Last moment before the rename: all files and the manifest are written.
        seen_during_commit.append(artifacts.find_artifact(store, digest))
        real_fsync(directory)
        raise OSError("disk full")

    monkeypatch.setattr(artifacts, "_fsync_tree", spy)
    with pytest.raises(OSError, match="disk full"):
        _commit(store)
    assert seen_during_commit == [None]
    assert artifacts.find_artifact(store, digest) is None
    assert list(store.iterdir()) == []


def test_find_artifact_rejects_malformed_ids(tmp_path: Path) -> None:
    store = tmp_path / "store"
    _commit(store)
    assert artifacts.find_artifact(store, "../etc") is None
    assert artifacts.find_artifact(store, "0" * 64) is None
    assert artifacts.find_artifact(store, "A" * 64) is None


def test_verify_detects_a_corrupted_file(tmp_path: Path) -> None:
    final = _commit(tmp_path / "store")
    data = bytearray((final / "model.onnx").read_bytes())
    data[10] ^= 0xFF  # same size: only a full rehash can notice
    (final / "model.onnx").write_bytes(bytes(data))
    artifacts.verify_artifact(final, fast=True)
    with pytest.raises(ArtifactError, match="digest"):
        artifacts.verify_artifact(final)


def test_fast_verify_detects_truncation_and_missing_files(tmp_path: Path) -> None:
    final = _commit(tmp_path / "store")
    with (final / "model.onnx").open("r+b") as f:
        f.truncate(5)
    with pytest.raises(ArtifactError, match="size"):
        artifacts.verify_artifact(final, fast=True)
    (final / "tokenizer.json").unlink()
    with pytest.raises(ArtifactError, match="tokenizer_file"):
        artifacts.verify_artifact(final, fast=True)


def test_verify_detects_a_manifest_that_names_another_digest(tmp_path: Path) -> None:
    final = _commit(tmp_path / "store")
    manifest = json.loads((final / "mantle.json").read_text())
    manifest["sha256"] = "f" * 64
    (final / "mantle.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="sha256"):
        artifacts.verify_artifact(final, fast=True)


def test_discard_removes_an_artifact_and_stale_staging_is_cleaned(tmp_path: Path) -> None:
    store = tmp_path / "store"
    final = _commit(store)
    artifacts.discard_artifact(store, final.name)
    assert artifacts.find_artifact(store, final.name) is None
    stale = store / f"{artifacts.STAGING_PREFIX}dead-1-abcd"
    stale.mkdir()
    assert artifacts.remove_stale_staging(store, older_than_s=-1) == [stale]
    assert list(store.iterdir()) == []


def test_recipe_index_lookup_and_check_mode(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from workers.compile import builtin

    store = tmp_path / "store"
    final = _commit(store)
    pins = builtin.read_pins()
    recipe = builtin.RECIPES[1]
    key = builtin.recipe_key(recipe, pins)
    assert f"--r{builtin.RECIPE_VERSION}--" in key
    assert builtin.lookup(store, key, full=False) == "not built yet"
    artifacts.write_json_atomic(builtin.index_path(store, key), {"sha256": final.name})
    found = builtin.lookup(store, key, full=True)
    assert isinstance(found, tuple)
    assert found[0] == final

    assert builtin.main(["--store", str(store), "--check", "--only", "minilm"]) == 0
    listed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [m["location"] for m in listed] == [str(final.resolve())]
    assert builtin.main(["--store", str(store), "--check"]) == 1  # the chat model is missing

    with (final / "model.onnx").open("ab") as f:
        f.write(b"x")
    assert "damaged" in str(builtin.lookup(store, key, full=False))
