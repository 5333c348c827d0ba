"""Untrusted model files: what the validator accepts and what it refuses, with which words."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

from tests.workers.compile_support import (
    WEIGHTS,
    external_upload,
    ranker_bytes,
    ranker_model,
    tar_bytes,
    tar_with_symlink,
    tree,
    with_external_weights,
    zip_bytes,
)
from workers.compile.validate import CompileError, Limits, extract_archive, validate_onnx


def write(directory: Path, files: dict[str, bytes]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_bytes(data)
    return directory


def test_a_valid_graph_is_reported(tmp_path: Path) -> None:
    write(tmp_path, {"model.onnx": ranker_bytes()})

    report = validate_onnx(tmp_path, "model.onnx")

    assert report.opsets == {"ai.onnx": 17}
    assert report.operators == {"MatMul": 1, "Add": 1}
    assert report.initializers == 2
    assert report.initializer_bytes == WEIGHTS.nbytes + 4
    assert report.external_files == []
    assert report.inputs == {"features": {"dtype": "float32", "shape": ["batch", 8]}}
    assert report.outputs == {"score": {"dtype": "float32", "shape": ["batch", 1]}}


def test_external_data_inside_the_directory_is_accepted(tmp_path: Path) -> None:
    write(tmp_path, external_upload())

    report = validate_onnx(tmp_path, "model.onnx")

    assert report.external_files == ["weights.bin"]
    assert report.initializer_bytes == WEIGHTS.nbytes + 4


@pytest.mark.parametrize(
    ("location", "words"),
    [
        ("../secret.bin", "leaves the model's directory (..)"),
        ("sub/../../secret.bin", "leaves the model's directory (..)"),
        ("/etc/passwd", "must be a relative path"),
    ],
)
def test_external_data_that_leaves_the_directory_is_refused(
    tmp_path: Path, location: str, words: str
) -> None:
    model_dir = tmp_path / "upload"
    write(tmp_path, {"secret.bin": WEIGHTS.tobytes()})
    model = with_external_weights(ranker_model(), location)
    write(model_dir, {"model.onnx": model.SerializeToString()})

    with pytest.raises(CompileError) as err:
        validate_onnx(model_dir, "model.onnx")

    assert err.value.code == "unsafe_path"
    assert words in err.value.message
    assert "'W'" in err.value.message


def test_external_data_through_a_symlink_is_refused(tmp_path: Path) -> None:
    model_dir = write(tmp_path / "upload", {})
    write(tmp_path, {"secret.bin": WEIGHTS.tobytes()})
    (model_dir / "weights.bin").symlink_to(tmp_path / "secret.bin")
    model = with_external_weights(ranker_model(), "weights.bin")
    write(model_dir, {"model.onnx": model.SerializeToString()})

    with pytest.raises(CompileError) as err:
        validate_onnx(model_dir, "model.onnx")

    assert err.value.code == "unsafe_path"
    assert "leaves the model's directory" in err.value.message


def test_a_tensor_larger_than_its_file_is_refused(tmp_path: Path) -> None:
    model = with_external_weights(ranker_model(), "weights.bin")
    write(tmp_path, {"model.onnx": model.SerializeToString(), "weights.bin": b"\0" * 8})

    with pytest.raises(CompileError) as err:
        validate_onnx(tmp_path, "model.onnx")

    assert err.value.code == "invalid_model"
    assert err.value.message == ("tensor 'W' reads bytes 0..32 of 'weights.bin', which has only 8")


def test_external_length_that_lies_about_the_tensor_is_refused(tmp_path: Path) -> None:
    model = with_external_weights(ranker_model(), "weights.bin", length=4)
    write(tmp_path, {"model.onnx": model.SerializeToString(), "weights.bin": WEIGHTS.tobytes()})

    with pytest.raises(CompileError) as err:
        validate_onnx(tmp_path, "model.onnx")

    assert err.value.message == ("tensor 'W' [8, 1] needs 32 bytes but its external data claims 4")


def test_a_missing_external_file_is_refused(tmp_path: Path) -> None:
    model = with_external_weights(ranker_model(), "weights.bin")
    write(tmp_path, {"model.onnx": model.SerializeToString()})

    with pytest.raises(CompileError) as err:
        validate_onnx(tmp_path, "model.onnx")

    assert err.value.code == "missing_file"
    assert "'weights.bin'" in err.value.message


def test_a_tensor_over_the_limit_is_refused(tmp_path: Path) -> None:
    write(tmp_path, {"model.onnx": ranker_bytes()})

    with pytest.raises(CompileError) as err:
        validate_onnx(tmp_path, "model.onnx", Limits(max_tensor_bytes=16))

    assert err.value.code == "tensor_too_large"
    assert err.value.message == (
        "tensor 'W' [8, 1] holds 32 bytes, more than the 16 allowed for one tensor"
    )


@pytest.mark.parametrize(
    "data",
    [b"\x08\x09\x12\xff\xff\xff\xff\x0f garbage", b"\x08\x09", b"not a model at all"],
)
def test_a_malformed_protobuf_is_refused(tmp_path: Path, data: bytes) -> None:
    write(tmp_path, {"model.onnx": data})

    with pytest.raises(CompileError) as err:
        validate_onnx(tmp_path, "model.onnx")

    assert err.value.code == "invalid_model"
    assert err.value.message.startswith("model.onnx is not a valid ONNX model")


def test_a_custom_domain_operator_is_refused(tmp_path: Path) -> None:
    write(tmp_path, {"model.onnx": ranker_bytes(op_domain="com.acme", op_type="FastMatMul")})

    with pytest.raises(CompileError) as err:
        validate_onnx(tmp_path, "model.onnx")

    assert err.value.code == "unsupported_operator"
    assert err.value.message.startswith(
        "operator 'FastMatMul' of custom domain 'com.acme' is not supported"
    )


def test_an_unknown_standard_operator_is_refused(tmp_path: Path) -> None:
    write(tmp_path, {"model.onnx": ranker_bytes(op_type="MatMulFast")})

    with pytest.raises(CompileError) as err:
        validate_onnx(tmp_path, "model.onnx")

    assert err.value.code == "unsupported_operator"
    assert err.value.message.startswith("unknown operator 'MatMulFast' (domain 'ai.onnx')")


def test_an_onnx_runtime_contrib_operator_is_known(tmp_path: Path) -> None:
    model = ranker_model()
    model.graph.node[1].CopyFrom(
        onnx.helper.make_node("FastGelu", ["mm"], ["score"], domain="com.microsoft")
    )
    model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    write(tmp_path, {"model.onnx": model.SerializeToString()})

    report = validate_onnx(tmp_path, "model.onnx")

    assert report.operators == {"MatMul": 1, "com.microsoft.FastGelu": 1}


def test_a_model_file_outside_the_directory_is_refused(tmp_path: Path) -> None:
    write(tmp_path, {"model.onnx": ranker_bytes()})

    with pytest.raises(CompileError) as err:
        validate_onnx(tmp_path / "sub", "../model.onnx")

    assert err.value.code == "unsafe_path"


# --- Archives -------------------------------------------------------------------------------


def test_an_archive_unpacks_its_regular_files(tmp_path: Path) -> None:
    archive = tmp_path / "a.tgz"
    archive.write_bytes(tar_bytes({"m/model.onnx": b"x", "m/tok/tokenizer.json": b"{}"}))
    dest = tmp_path / "out"
    dest.mkdir()

    files = extract_archive(archive, dest)

    assert files == ["m/model.onnx", "m/tok/tokenizer.json"]
    assert (dest / "m" / "tok" / "tokenizer.json").read_bytes() == b"{}"


@pytest.mark.parametrize(
    ("archive", "words"),
    [
        (tar_bytes({"../evil.onnx": b"x"}), "leaves the archive's directory"),
        (tar_bytes({"/abs/evil.onnx": b"x"}), "has an absolute path"),
        (zip_bytes({"../../evil.onnx": b"x"}), "leaves the archive's directory"),
        (tar_with_symlink("weights.bin", "/etc/passwd"), "is a link or special file"),
    ],
)
def test_unsafe_archive_members_are_refused(tmp_path: Path, archive: bytes, words: str) -> None:
    path = tmp_path / "upload.bin"
    path.write_bytes(archive)
    dest = tmp_path / "out"
    dest.mkdir()

    with pytest.raises(CompileError) as err:
        extract_archive(path, dest)

    assert err.value.code == "unsafe_archive"
    assert words in err.value.message
    assert tree(dest) == []
    assert not (tmp_path / "evil.onnx").exists()


def test_an_archive_bomb_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bomb.zip"
    path.write_bytes(zip_bytes({"zeros.bin": b"\0" * 5_000_000}))
    dest = tmp_path / "out"
    dest.mkdir()

    with pytest.raises(CompileError) as err:
        extract_archive(path, dest, Limits(max_compression_ratio=100))

    assert err.value.code == "archive_too_large"
    assert "unpacks to 5000000 bytes" in err.value.message
    assert tree(dest) == []


def test_a_file_that_is_no_archive_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "upload.bin"
    path.write_bytes(b"hello")

    with pytest.raises(CompileError) as err:
        extract_archive(path, tmp_path)

    assert err.value.code == "invalid_archive"
