"""Small ONNX models and archives built in the tests, for the compile pipeline."""

from __future__ import annotations

import io
import tarfile
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FEATURES = 8
WEIGHTS = np.random.default_rng(7).standard_normal((FEATURES, 1)).astype(np.float32)
BIAS = np.array([0.25], dtype=np.float32)


def ranker_model(
    *, weights: np.ndarray = WEIGHTS, op_domain: str = "", op_type: str = "MatMul"
) -> onnx.ModelProto:
    """score = features @ W + b: a tiny linear ranking model with a dynamic batch."""
    w = numpy_helper.from_array(weights, "W")
    b = numpy_helper.from_array(BIAS, "B")
    nodes = [
        helper.make_node(op_type, ["features", "W"], ["mm"], domain=op_domain),
        helper.make_node("Add", ["mm", "B"], ["score"]),
    ]
    graph = helper.make_graph(
        nodes,
        "ranker",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", FEATURES])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["batch", 1])],
        [w, b],
    )
    opsets = [helper.make_opsetid("", 17)]
    if op_domain:
        opsets.append(helper.make_opsetid(op_domain, 1))
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 9
    return model


def ranker_bytes(**kwargs: object) -> bytes:
    return ranker_model(**kwargs).SerializeToString()  # type: ignore[arg-type]


def with_external_weights(
    model: onnx.ModelProto, location: str, *, length: int | None = None
) -> onnx.ModelProto:
    """Point the W initializer at external data `location` (the bytes are written apart)."""
    for init in model.graph.initializer:
        if init.name == "W":
            nbytes = len(init.raw_data) or WEIGHTS.nbytes
            init.ClearField("raw_data")
            init.data_location = TensorProto.EXTERNAL
            del init.external_data[:]
            for key, value in (
                ("location", location),
                ("offset", "0"),
                ("length", str(nbytes if length is None else length)),
            ):
                entry = init.external_data.add()
                entry.key, entry.value = key, value
    return model


def tar_bytes(files: Mapping[str, bytes], *, gz: bool = True) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def tar_with_symlink(name: str, target: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        info = tarfile.TarInfo(name)
        info.type = tarfile.SYMTYPE
        info.linkname = target
        tf.addfile(info)
    return buf.getvalue()


def zip_bytes(files: Mapping[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


def external_upload() -> dict[str, bytes]:
    """The ranker with its weights in `weights.bin` beside the graph."""
    model = with_external_weights(ranker_model(), "weights.bin")
    return {"model.onnx": model.SerializeToString(), "weights.bin": WEIGHTS.tobytes()}


def tree(directory: Path) -> list[str]:
    """Every path under `directory` (files and directories), relative, sorted."""
    if not directory.exists():
        return []
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*"))
