"""Per-process cache of loaded model versions: one ONNX Runtime session per version."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workers.contract import ModelRef, Runtime
from workers.runtime.contention import thread_ids
from workers.runtime.cpus import usable_cores
from workers.runtime.memory import release_free_memory
from workers.runtime.providers import choose_providers

if TYPE_CHECKING:
    import onnxruntime
    from tokenizers import Tokenizer

logger = logging.getLogger(__name__)

MANIFEST_FILE = "mantle.json"


class ModelLoadError(RuntimeError):
    """The artifact is missing, malformed or not the one the request asked for."""


@dataclass(frozen=True, slots=True)
class LoadedModel:
    ref: ModelRef
    directory: Path
    manifest: Mapping[str, Any]
    session: onnxruntime.InferenceSession
    tokenizer: Tokenizer | None  # None for tensor models: they take tensors, not text
    providers: tuple[str, ...]
    provider: str
    load_s: float
    # A second session of the same graph with one intra-op thread, for calls made while
    # other processes keep the node's cores busy (MANTLE_ORT_ADAPTIVE_THREADS; None: off).
    narrow_session: onnxruntime.InferenceSession | None = None
    # The intra-op pool threads of `session` (with narrow_session only): the contention
    # monitor counts the rest of the process as crowding (runtime/contention.py).
    session_threads: frozenset[int] = frozenset()

    def text_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise ModelLoadError(f"model version {self.ref.version_id} has no tokenizer")
        return self.tokenizer


_models: dict[str, LoadedModel] = {}
_version_locks: dict[str, threading.Lock] = {}
_registry_lock = threading.Lock()


def read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST_FILE
    try:
        with path.open(encoding="utf-8") as fh:
            manifest: dict[str, Any] = json.load(fh)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read manifest {path}: {exc}") from exc
    return manifest


def ort_threads(manifest: Mapping[str, Any] | None = None) -> int:
    """MANTLE_ORT_THREADS, else what the artifact measured best (`runtime_options`), else
    every core this process can use (its affinity and cgroup CPU quota: runtime/cpus.py)."""
    raw = os.environ.get("MANTLE_ORT_THREADS", "").strip()
    threads = int(raw) if raw else 0
    if threads > 0:  # 0: unset (ONNX Runtime's own 0 would be every core)
        return threads
    chosen = ((manifest or {}).get("runtime_options") or {}).get("intra_op_threads")
    if isinstance(chosen, int) and chosen > 0:
        return min(chosen, usable_cores())
    return usable_cores()


def adaptive_threads() -> bool:
    """MANTLE_ORT_ADAPTIVE_THREADS: on a node whose cores other processes share (the
    all-in-one box), hold a one-thread session beside the wide one and run each call on
    the one that suits the node's load (workers/runtime/contention.py). Off by default:
    a dedicated node gains nothing, and the second session costs the graph's packed
    weights again (~150 MB for the built-in 4-bit model)."""
    raw = os.environ.get("MANTLE_ORT_ADAPTIVE_THREADS", "").strip().lower()
    return raw in ("1", "true", "on", "yes")


def model_file(manifest: Mapping[str, Any]) -> str:
    """The graph to serve: the manifest's `model_file`, or the variant MANTLE_MODEL_VARIANT
    names (`fp32`: a quantized model's full-precision graph) when the artifact has it."""
    wanted = os.environ.get("MANTLE_MODEL_VARIANT", "").strip()
    variant = (manifest.get("variants") or {}).get(wanted) if wanted else None
    if variant:
        return str(variant["model_file"])
    return str(manifest.get("model_file", "model.onnx"))


def load_model(ref: ModelRef) -> LoadedModel:
    """The loaded model for `ref`, loading it on first use in this process.

    Sessions are created lazily so that nothing native is initialised before a
    prefork pool forks (ONNX Runtime thread pools do not survive a fork). A lock
    per version keeps two threads from loading the same 500 MB model twice,
    while different versions still load in parallel.
    """
    model = _models.get(ref.version_id)
    if model is not None:
        _check_same_artifact(model, ref)
        return model
    with _registry_lock:
        lock = _version_locks.setdefault(ref.version_id, threading.Lock())
    with lock:
        model = _models.get(ref.version_id)
        if model is None:
            model = _load(ref)
            _models[ref.version_id] = model
    _check_same_artifact(model, ref)
    return model


def loaded_models() -> list[LoadedModel]:
    return list(_models.values())


def unload_model(version_id: str) -> None:
    """Forgets a loaded version; its session is freed once no engine holds it any more."""
    _models.pop(version_id, None)


def _check_same_artifact(model: LoadedModel, ref: ModelRef) -> None:
    if model.ref.sha256 != ref.sha256:
        raise ModelLoadError(
            f"model version {ref.version_id} is loaded as {model.ref.sha256}, "
            f"the request names {ref.sha256}"
        )


def artifact_cache() -> Path:
    """Where this node keeps local copies of artifacts that live in a remote store."""
    return Path(
        os.environ.get("MANTLE_ARTIFACT_DIR", "") or Path.home() / ".cache/mantle/artifacts"
    ).expanduser()


def _local_directory(location: str) -> Path:
    """A local artifact directory, or a remote store's (`s3://...`) fetched once into the cache."""
    from workers.compile.remote import fetch, is_remote

    if is_remote(location):
        try:
            return fetch(location, artifact_cache())
        except Exception as exc:  # any fsspec or ArtifactError: the version cannot load here
            raise ModelLoadError(f"fetching {location} failed: {exc}") from exc
    return Path(location.removeprefix("file://")).expanduser()


def _load(ref: ModelRef) -> LoadedModel:
    # onnxruntime and tokenizers are heavy native imports: only a node that
    # actually serves a model pays for them, and not at module import time.
    import onnxruntime as ort
    from tokenizers import Tokenizer

    started = time.monotonic()
    directory = _local_directory(ref.location)
    # The directory is named by its content digest; comparing names is the cheap
    # check that the control plane and this node agree on the artifact, without
    # rehashing hundreds of megabytes on every start.
    if directory.name != ref.sha256:
        raise ModelLoadError(f"artifact directory {directory} is not named {ref.sha256}")
    manifest = read_manifest(directory)
    if manifest.get("sha256") != ref.sha256:
        raise ModelLoadError(f"manifest of {directory} records sha256 {manifest.get('sha256')}")
    if manifest.get("runtime") != ref.runtime:
        raise ModelLoadError(
            f"artifact runtime {manifest.get('runtime')!r} is not the requested {ref.runtime!r}"
        )
    model_path = directory / model_file(manifest)
    tokenizer_path = directory / str(manifest.get("tokenizer_file", "tokenizer.json"))
    needs_tokenizer = ref.runtime != Runtime.TENSOR
    for path in (model_path, tokenizer_path) if needs_tokenizer else (model_path,):
        if not path.is_file():
            raise ModelLoadError(f"artifact file missing: {path}")

    providers, chosen = choose_providers(ref.providers, ort.get_available_providers())
    options = ort.SessionOptions()
    options.intra_op_num_threads = ort_threads(manifest)
    # One engine thread drives each session; inter-op parallelism only adds threads.
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # MANTLE_ORT_ARENA=0: no CPU memory arena (ONNX Runtime frees each run's buffers rather
    # than keeping the largest batch's; docs/benchmarks.md measures what it saves and costs).
    if os.environ.get("MANTLE_ORT_ARENA", "").strip().lower() in ("0", "false", "off"):
        options.enable_cpu_mem_arena = False
    spin = os.environ.get("MANTLE_ORT_SPINNING", "").strip()
    if spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", spin)
    before = thread_ids()
    session = ort.InferenceSession(str(model_path), sess_options=options, providers=providers)
    # ONNX Runtime starts the session's intra-op pool (threads - 1: the caller is one) here.
    pool = thread_ids() - before
    narrow = None
    threads = options.intra_op_num_threads
    if adaptive_threads() and chosen == "CPUExecutionProvider" and threads > 1:
        from workers.engine.inplace import is_in_place  # numpy only

        if is_in_place(session):  # the engine's in-place graphs are the ones it can swap
            options.intra_op_num_threads = 1
            narrow = ort.InferenceSession(
                str(model_path), sess_options=options, providers=providers
            )
    tokenizer = Tokenizer.from_file(str(tokenizer_path)) if needs_tokenizer else None
    # The parsed model that ONNX Runtime built the session from is garbage now.
    release_free_memory()
    load_s = time.monotonic() - started
    logger.info(
        "loaded model version %s (%s, %s, %s) on %s with %d intra-op threads%s in %.1fs",
        ref.version_id,
        manifest.get("name"),
        ref.sha256[:12],
        model_path.name,
        chosen,
        threads,
        " (and a one-thread session for a contended node)" if narrow is not None else "",
        load_s,
    )
    return LoadedModel(
        ref=ref,
        directory=directory,
        manifest=manifest,
        session=session,
        tokenizer=tokenizer,
        providers=tuple(session.get_providers()),
        provider=chosen,
        load_s=load_s,
        narrow_session=narrow,
        # Only when exactly the pool appeared (another thread of this process started at
        # the same moment would be counted as the session's): else the whole process counts.
        session_threads=pool if narrow is not None and len(pool) == threads - 1 else frozenset(),
    )
