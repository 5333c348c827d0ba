"""Helpers shared by the export modules: offline mode, metrics, the child-process CLI."""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

from workers.compile.artifacts import MANIFEST_NAME

log = logging.getLogger("mantle.compile")

ExportFn = Callable[[Path], dict[str, Any]]


def force_offline() -> None:
    """Make every Hugging Face library fail fast instead of trying to reach a hub.

    Model hubs are unreachable here; without these flags a missing file turns
    into minutes of connection retries instead of a clear error.
    """
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(var, "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    # Progress bars redraw hundreds of times into build logs; the timings we log suffice.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (ru_maxrss is KiB on Linux)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def versions(*packages: str) -> dict[str, str]:
    """Installed versions of the packages that shaped an artifact (recorded in its manifest)."""
    found: dict[str, str] = {}
    for name in packages:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "absent"
    return found


def setup_logging() -> None:
    """Progress goes to stderr: stdout is reserved for the machine-readable result."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[compile %(asctime)s] %(message)s", "%H:%M:%S"))
    # Our logger only: at INFO the root logger would also print onnxscript's
    # optimizer, which logs one line per folded initializer (thousands).
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    log.propagate = False


def run_export_cli(export: ExportFn, argv: list[str] | None = None) -> int:
    """`python -m workers.compile.export_x --out DIR`: build one artifact's files in DIR.

    The export runs in its own process (builtin.py starts it), so that its
    peak memory is measured alone and the ~3 GB it holds is returned to the
    system before the next export starts. The partial manifest (no sha256 yet)
    is left in DIR/mantle.json for the parent to seal.
    """
    parser = argparse.ArgumentParser(description=export.__doc__)
    parser.add_argument("--out", type=Path, required=True, help="empty directory to fill")
    args = parser.parse_args(argv)
    setup_logging()
    force_offline()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    manifest = export(out)
    manifest["build"] = {
        **manifest.get("build", {}),
        "seconds": round(time.monotonic() - started, 1),
        "peak_rss_mb": peak_rss_mb(),
    }
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    log.info(
        "export done in %.1f s, peak RSS %.0f MiB",
        manifest["build"]["seconds"],
        manifest["build"]["peak_rss_mb"],
    )
    return 0


def strip_export_metadata(model: Any) -> int:
    """Drop the exporter's debug metadata from an `onnx_ir.Model`; return how many entries.

    torch.onnx records on every node the Python stack trace of the line that
    made it, with absolute paths into the prepare venv. That makes the bytes
    (and so the content digest) depend on where the venv lives, and adds
    megabytes no runtime reads. Without it the same recipe gives the same
    sha256 on every machine.
    """
    removed = 0

    def clear(obj: Any) -> None:
        nonlocal removed
        removed += len(obj.metadata_props)
        obj.metadata_props.clear()

    clear(model)
    graphs = [model.graph, *model.graph.subgraphs(), *model.functions.values()]
    for graph in graphs:
        clear(graph)
        for value in (*graph.inputs, *graph.outputs):
            clear(value)
        for node in graph:
            clear(node)
            for value in node.outputs:
                clear(value)
    for value in model.graph.initializers.values():
        clear(value)
    return removed


def cache_names(num_layers: int, prefix: str) -> list[str]:
    """A causal LM graph's KV tensors, `{prefix}.{layer}.key|value` in layer order: the
    pasts (`past_key_values`) and presents (`present`) of both graph interfaces."""
    return [f"{prefix}.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]
