"""Refuse untrusted model files: malformed protobufs, custom operators, escaping external data."""

from __future__ import annotations

import logging
import stat
import tarfile
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import onnx

# Imports: stdlib, plus onnx (protobuf and op schemas) lazily. No onnxruntime
# session, no Celery, no Django: the control plane runs these checks on an
# upload before it accepts it, and the compile node runs them again before it
# trusts a staged directory.

logger = logging.getLogger(__name__)

PROTOBUF_LIMIT = 2 * 1024**3 - 1
"""A serialized ModelProto can not exceed 2 GiB; bigger weights go to external data."""

DEFAULT_MAX_TENSOR_BYTES = 4 * 1024**3
DEFAULT_MAX_ARCHIVE_MEMBERS = 10_000
DEFAULT_MAX_COMPRESSION_RATIO = 200

# The operator domains a served graph may use: the ONNX standard, its classic ML
# set, and ONNX Runtime's contrib ops (which its own optimizer emits). Anything
# else is a custom operator that needs a shared library nobody here has.
ALLOWED_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft"})

# Bytes per element of the fixed-size TensorProto data types (onnx.TensorProto.DataType).
_ELEMENT_BYTES = {
    1: 4,  # FLOAT
    2: 1,  # UINT8
    3: 1,  # INT8
    4: 2,  # UINT16
    5: 2,  # INT16
    6: 4,  # INT32
    7: 8,  # INT64
    9: 1,  # BOOL
    10: 2,  # FLOAT16
    11: 8,  # DOUBLE
    12: 4,  # UINT32
    13: 8,  # UINT64
    14: 8,  # COMPLEX64
    15: 16,  # COMPLEX128
    16: 2,  # BFLOAT16
    17: 1,  # FLOAT8E4M3FN
    18: 1,  # FLOAT8E4M3FNUZ
    19: 1,  # FLOAT8E5M2
    20: 1,  # FLOAT8E5M2FNUZ
}
_STRING = 8
_EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL


class CompileError(Exception):
    """A compile input or step failed; `message` says what to fix, `code` classifies it."""

    def __init__(self, message: str, *, code: str = "invalid_model", param: str | None = None):
        super().__init__(message)
        self.message = message
        self.code = code
        self.param = param


@dataclass(frozen=True, slots=True)
class Limits:
    max_tensor_bytes: int = DEFAULT_MAX_TENSOR_BYTES
    max_total_bytes: int = 16 * 1024**3
    max_archive_members: int = DEFAULT_MAX_ARCHIVE_MEMBERS
    max_compression_ratio: int = DEFAULT_MAX_COMPRESSION_RATIO


@dataclass(slots=True)
class GraphReport:
    """What validation learnt about a graph: recorded in the compile job's first step."""

    model_file: str
    opsets: dict[str, int]
    operators: dict[str, int] = field(default_factory=dict)
    initializers: int = 0
    initializer_bytes: int = 0
    external_files: list[str] = field(default_factory=list)
    inputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)

    def as_metrics(self) -> dict[str, Any]:
        return {
            "model_file": self.model_file,
            "opsets": self.opsets,
            "operator_types": len(self.operators),
            "nodes": sum(self.operators.values()),
            "initializers": self.initializers,
            "initializer_bytes": self.initializer_bytes,
            "external_files": self.external_files,
            "inputs": self.inputs,
            "outputs": self.outputs,
        }


# --- Archives -------------------------------------------------------------------------------


def safe_member_path(name: str) -> PurePosixPath:
    """The relative path an archive member may be extracted to, or a CompileError."""
    cleaned = name.replace("\\", "/")
    path = PurePosixPath(cleaned)
    if not cleaned or cleaned.startswith("/") or (len(cleaned) > 1 and cleaned[1] == ":"):
        raise CompileError(f"archive member {name!r} has an absolute path", code="unsafe_archive")
    parts = [p for p in path.parts if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise CompileError(
            f"archive member {name!r} leaves the archive's directory (..)", code="unsafe_archive"
        )
    if not parts:
        raise CompileError(f"archive member {name!r} has no file name", code="unsafe_archive")
    return PurePosixPath(*parts)


def extract_archive(archive: Path, dest: Path, limits: Limits | None = None) -> list[str]:
    """Unpack a .tar(.gz/.bz2/.xz) or .zip into the empty directory `dest`; return the files.

    Refused: absolute paths, `..`, links and devices, more members than the
    limit, or more unpacked bytes than the limit or the compression ratio
    allows (an archive bomb). Extraction writes regular files only, counting
    bytes as it goes, so a member that lies about its size is still stopped.
    """
    limits = limits or Limits()
    size = archive.stat().st_size
    budget = min(limits.max_total_bytes, max(size, 1) * limits.max_compression_ratio)
    if zipfile.is_zipfile(archive):
        members = list(_zip_members(archive, limits))
    elif tarfile.is_tarfile(archive):
        members = list(_tar_members(archive, limits))
    else:
        raise CompileError(
            "the upload is neither an ONNX file nor a .tar, .tar.gz or .zip archive",
            code="invalid_archive",
        )
    declared = sum(m[1] for m in members)
    if declared > budget:
        raise CompileError(
            f"the archive unpacks to {declared} bytes, more than the {budget} allowed "
            f"({limits.max_compression_ratio}x its size, at most {limits.max_total_bytes})",
            code="archive_too_large",
        )
    written = 0
    files: list[str] = []
    seen: set[str] = set()
    opener = _zip_open if zipfile.is_zipfile(archive) else _tar_open
    with opener(archive) as read_member:
        for name, _declared, rel in members:
            key = rel.as_posix()
            if key in seen:
                raise CompileError(f"archive member {key!r} appears twice", code="unsafe_archive")
            seen.add(key)
            target = dest.joinpath(*rel.parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            with read_member(name) as src, target.open("xb") as out:
                while chunk := src.read(1 << 20):
                    written += len(chunk)
                    if written > budget:
                        raise CompileError(
                            f"the archive unpacks to more than the {budget} bytes allowed",
                            code="archive_too_large",
                        )
                    out.write(chunk)
            files.append(key)
    return sorted(files)


def _zip_members(archive: Path, limits: Limits) -> Iterator[tuple[str, int, PurePosixPath]]:
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        if len(infos) > limits.max_archive_members:
            raise CompileError(
                f"the archive has {len(infos)} members, more than {limits.max_archive_members}",
                code="archive_too_large",
            )
        for info in infos:
            if info.is_dir():
                safe_member_path(info.filename)
                continue
            mode = (info.external_attr >> 16) & 0o170000
            if mode and not stat.S_ISREG(mode):
                raise CompileError(
                    f"archive member {info.filename!r} is a link or special file",
                    code="unsafe_archive",
                )
            yield info.filename, info.file_size, safe_member_path(info.filename)


def _tar_members(archive: Path, limits: Limits) -> Iterator[tuple[str, int, PurePosixPath]]:
    with tarfile.open(archive) as tf:
        count = 0
        for info in tf:
            count += 1
            if count > limits.max_archive_members:
                raise CompileError(
                    f"the archive has more than {limits.max_archive_members} members",
                    code="archive_too_large",
                )
            if info.isdir():
                safe_member_path(info.name)
                continue
            if not info.isreg():
                raise CompileError(
                    f"archive member {info.name!r} is a link or special file",
                    code="unsafe_archive",
                )
            yield info.name, info.size, safe_member_path(info.name)


class _MemberReader:
    def __init__(self, handle: Any, kind: str) -> None:
        self.handle = handle
        self.kind = kind

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.close()

    def __call__(self, name: str) -> Any:
        if self.kind == "zip":
            return self.handle.open(name)
        member = self.handle.extractfile(name)
        if member is None:
            raise CompileError(f"archive member {name!r} is not a file", code="unsafe_archive")
        return member


def _zip_open(archive: Path) -> _MemberReader:
    return _MemberReader(zipfile.ZipFile(archive), "zip")


def _tar_open(archive: Path) -> _MemberReader:
    return _MemberReader(tarfile.open(archive), "tar")


# --- ONNX graphs ------------------------------------------------------------------------------


# Weight formats that are Python pickles: loading one runs whatever code it names.
PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib"})


def check_checkpoint(directory: Path) -> list[str]:
    """A Hugging Face checkpoint directory whose weights load without unpickling anything.

    Only safetensors weights are accepted; a checkpoint that carries pickled weights
    (`pytorch_model.bin`, `*.pt`, ...) is refused whole rather than loaded "carefully",
    since a pickle is code. Returns the safetensors files.
    """
    if not (directory / "config.json").is_file():
        raise CompileError(
            f"{directory.name or directory} is not a Hugging Face checkpoint directory "
            "(no config.json)",
            code="invalid_checkpoint",
        )
    pickles = sorted(
        str(f.relative_to(directory))
        for f in directory.rglob("*")
        if f.is_file() and f.suffix.lower() in PICKLE_SUFFIXES
    )
    if pickles:
        raise CompileError(
            f"the checkpoint holds pickled weights ({', '.join(pickles[:5])}): only "
            "safetensors are loaded, since unpickling runs code; convert with "
            "`save_pretrained(..., safe_serialization=True)` and upload again",
            code="unsafe_checkpoint",
        )
    weights = sorted(str(f.relative_to(directory)) for f in directory.rglob("*.safetensors"))
    if not weights:
        raise CompileError("the checkpoint has no .safetensors weights", code="invalid_checkpoint")
    return weights


def load_graph(model_path: Path) -> onnx.ModelProto:
    """The ModelProto without its external data, or a CompileError a user can act on."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        size = model_path.stat().st_size
    except FileNotFoundError as exc:
        raise CompileError(f"{model_path.name}: no such file", code="missing_file") from exc
    if size == 0:
        raise CompileError(f"{model_path.name} is empty", code="invalid_model")
    if size > PROTOBUF_LIMIT:
        raise CompileError(
            f"{model_path.name} is {size} bytes: an ONNX protobuf can not exceed 2 GiB; "
            "save the weights as external data",
            code="invalid_model",
        )
    try:
        model = onnx.load_model(str(model_path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise CompileError(
            f"{model_path.name} is not a valid ONNX model (the protobuf does not parse: {exc})",
            code="invalid_model",
        ) from exc
    if model.ir_version <= 0 or not model.HasField("graph") or len(model.graph.node) == 0:
        raise CompileError(
            f"{model_path.name} is not a valid ONNX model (no IR version or an empty graph)",
            code="invalid_model",
        )
    return model


def validate_onnx(model_dir: Path, model_file: str, limits: Limits | None = None) -> GraphReport:
    """Check an ONNX model directory before anything runs it; return what it holds.

    Refuses: a model file outside `model_dir`, a protobuf that does not parse,
    operators outside the standard domains or unknown to ONNX and ONNX
    Runtime, external-data locations that are absolute, contain `..`, are
    links or leave `model_dir`, tensors larger than their file or the limit.
    Does not run the graph (the pipeline's checker and smoke steps do).
    """
    limits = limits or Limits()
    root = model_dir.resolve()
    model_path = _inside(root, model_file, what="model file")
    if model_path.is_symlink() or not model_path.is_file():
        raise CompileError(f"model file {model_file!r} is not a regular file", code="missing_file")
    model = load_graph(model_path)
    opsets = {(o.domain or "ai.onnx"): int(o.version) for o in model.opset_import}
    report = GraphReport(model_file=model_file, opsets=opsets)
    _check_opsets(opsets)
    local_functions = {(f.domain, f.name) for f in model.functions}
    for node in _all_nodes(model):
        domain = node.domain or ""
        if (domain, node.op_type) in local_functions:
            continue
        _check_operator(domain, node.op_type, opsets)
        key = f"{domain + '.' if domain else ''}{node.op_type}"
        report.operators[key] = report.operators.get(key, 0) + 1
    external: set[str] = set()
    for tensor in _all_tensors(model):
        nbytes = _tensor_bytes(tensor, limits)
        report.initializers += 1
        report.initializer_bytes += nbytes
        if tensor.data_location == _EXTERNAL:
            external.add(_check_external(root, tensor, nbytes))
        else:
            _check_inline(tensor, nbytes)
    if report.initializer_bytes > limits.max_total_bytes:
        raise CompileError(
            f"the model's tensors hold {report.initializer_bytes} bytes, more than the "
            f"{limits.max_total_bytes} allowed",
            code="tensor_too_large",
        )
    report.external_files = sorted(external)
    report.inputs = _value_infos(model.graph.input, {i.name for i in model.graph.initializer})
    report.outputs = _value_infos(model.graph.output, set())
    return report


def _inside(root: Path, rel: str, *, what: str) -> Path:
    if not rel or Path(rel).is_absolute() or rel.startswith(("/", "\\")):
        raise CompileError(f"{what} {rel!r} must be a relative path", code="unsafe_path")
    parts = PurePosixPath(rel.replace("\\", "/")).parts
    if ".." in parts:
        raise CompileError(f"{what} {rel!r} leaves the model's directory (..)", code="unsafe_path")
    candidate = root.joinpath(*parts)
    resolved = candidate.resolve()
    if resolved != root and root not in resolved.parents:
        raise CompileError(f"{what} {rel!r} leaves the model's directory", code="unsafe_path")
    # A link anywhere on the way could point outside later; links are never followed.
    probe = root
    for part in parts:
        probe = probe / part
        if probe.is_symlink():
            raise CompileError(f"{what} {rel!r} goes through a symbolic link", code="unsafe_path")
    return candidate


def _check_opsets(opsets: Mapping[str, int]) -> None:
    import onnx

    newest = onnx.defs.onnx_opset_version()
    std = opsets.get("ai.onnx")
    if std is None:
        raise CompileError("the model imports no standard ONNX opset", code="invalid_model")
    if std > newest:
        raise CompileError(
            f"the model needs ONNX opset {std}; this platform supports up to {newest}",
            code="unsupported_opset",
        )
    # Importing a domain is harmless (ONNX Runtime's optimizer imports all of
    # its own); every node that *uses* one is checked by _check_operator.


_ORT_OPS: set[tuple[str, str]] | None = None


def _ort_operators() -> set[tuple[str, str]]:
    """(domain, op type) of every operator this node's ONNX Runtime implements."""
    global _ORT_OPS
    if _ORT_OPS is None:
        try:
            from onnxruntime.capi import onnxruntime_pybind11_state as ort_c

            _ORT_OPS = {(s.domain, s.name) for s in ort_c.get_all_operator_schema()}
        except ImportError:  # a node without onnxruntime: the ONNX schemas alone decide
            _ORT_OPS = set()
    return _ORT_OPS


def _check_operator(domain: str, op_type: str, opsets: Mapping[str, int]) -> None:
    import onnx

    if domain not in ALLOWED_DOMAINS:
        raise CompileError(
            f"operator {op_type!r} of custom domain {domain!r} is not supported; only the "
            "standard ONNX operators (and ONNX Runtime's com.microsoft ones) can be served",
            code="unsupported_operator",
        )
    norm = "" if domain == "ai.onnx" else domain
    if norm in ("", "ai.onnx.ml"):
        version = opsets.get(norm or "ai.onnx", 1)
        try:
            onnx.defs.get_schema(op_type, version, norm)
            return
        except onnx.defs.SchemaError:
            pass
    if (norm, op_type) in _ort_operators():
        return
    raise CompileError(
        f"unknown operator {op_type!r} (domain {domain or 'ai.onnx'!r}): it is neither an ONNX "
        "operator at the model's opset nor one ONNX Runtime implements",
        code="unsupported_operator",
    )


def _all_graphs(model: onnx.ModelProto) -> Iterator[onnx.GraphProto]:
    stack = [model.graph]
    while stack:
        graph = stack.pop()
        yield graph
        for node in graph.node:
            for attr in node.attribute:
                if attr.HasField("g"):
                    stack.append(attr.g)
                stack.extend(attr.graphs)


def _all_nodes(model: onnx.ModelProto) -> Iterator[onnx.NodeProto]:
    for graph in _all_graphs(model):
        yield from graph.node
    for function in model.functions:
        yield from function.node


def _all_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    for graph in _all_graphs(model):
        yield from graph.initializer
        for sparse in graph.sparse_initializer:
            yield sparse.values
            yield sparse.indices
        for node in graph.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors


def _tensor_bytes(tensor: onnx.TensorProto, limits: Limits) -> int:
    if any(d < 0 for d in tensor.dims):
        raise CompileError(
            f"tensor {tensor.name!r} has a negative dimension {list(tensor.dims)}",
            code="invalid_model",
        )
    count = 1
    for d in tensor.dims:
        count *= int(d)
    if tensor.data_type == _STRING:
        nbytes = sum(len(s) for s in tensor.string_data)
    elif tensor.data_type in _ELEMENT_BYTES:
        nbytes = count * _ELEMENT_BYTES[tensor.data_type]
    else:
        # 4-bit types pack two per byte.
        nbytes = (count + 1) // 2
    if nbytes > limits.max_tensor_bytes:
        raise CompileError(
            f"tensor {tensor.name!r} {list(tensor.dims)} holds {nbytes} bytes, more than the "
            f"{limits.max_tensor_bytes} allowed for one tensor",
            code="tensor_too_large",
        )
    return nbytes


def _check_inline(tensor: onnx.TensorProto, nbytes: int) -> None:
    if tensor.raw_data and tensor.data_type in _ELEMENT_BYTES and len(tensor.raw_data) != nbytes:
        raise CompileError(
            f"tensor {tensor.name!r} {list(tensor.dims)} needs {nbytes} bytes but carries "
            f"{len(tensor.raw_data)}",
            code="invalid_model",
        )


def _check_external(root: Path, tensor: onnx.TensorProto, nbytes: int) -> str:
    info = {e.key: e.value for e in tensor.external_data}
    location = info.get("location", "")
    path = _inside(root, location, what=f"external data of tensor {tensor.name!r}:")
    if not path.is_file():
        raise CompileError(
            f"external data file {location!r} of tensor {tensor.name!r} is missing from the upload",
            code="missing_file",
        )
    try:
        offset = int(info.get("offset", "0"))
        length = int(info["length"]) if "length" in info else None
    except ValueError as exc:
        raise CompileError(
            f"tensor {tensor.name!r}: malformed external data offset/length", code="invalid_model"
        ) from exc
    size = path.stat().st_size
    if offset < 0 or (length is not None and length < 0):
        raise CompileError(
            f"tensor {tensor.name!r}: negative external data offset/length", code="invalid_model"
        )
    wanted = length if length is not None else nbytes
    if length is not None and tensor.data_type in _ELEMENT_BYTES and length != nbytes:
        raise CompileError(
            f"tensor {tensor.name!r} {list(tensor.dims)} needs {nbytes} bytes but its external "
            f"data claims {length}",
            code="invalid_model",
        )
    if offset + wanted > size:
        raise CompileError(
            f"tensor {tensor.name!r} reads bytes {offset}..{offset + wanted} of {location!r}, "
            f"which has only {size}",
            code="invalid_model",
        )
    return PurePosixPath(location.replace("\\", "/")).as_posix()


_DTYPES = {
    1: "float32",
    2: "uint8",
    3: "int8",
    5: "int16",
    6: "int32",
    7: "int64",
    9: "bool",
    10: "float16",
    11: "float64",
    8: "string",
}


def _value_infos(values: Any, skip: set[str]) -> dict[str, dict[str, Any]]:
    """name -> {dtype, shape}: fixed dims as ints, symbolic ones by name (or "?")."""
    out: dict[str, dict[str, Any]] = {}
    for value in values:
        if value.name in skip:
            continue
        ttype = value.type.tensor_type
        shape: list[int | str] = []
        for dim in ttype.shape.dim:
            if dim.HasField("dim_value"):
                shape.append(int(dim.dim_value))
            else:
                shape.append(dim.dim_param or "?")
        out[value.name] = {
            "dtype": _DTYPES.get(ttype.elem_type, str(ttype.elem_type)),
            "shape": shape,
        }
    return out
