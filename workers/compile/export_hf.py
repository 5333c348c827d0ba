"""Export a Hugging Face checkpoint directory (`python -m workers.compile.export_hf`)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from workers.compile.artifacts import MANIFEST_NAME
from workers.compile.common import force_offline, peak_rss_mb, setup_logging

# Runs in the prepare venv (torch, transformers, onnxscript), started by the
# compile pipeline as a child process: its ~GBs of peak memory go back to the
# system when it exits, and the compile worker itself needs no torch.

log = logging.getLogger("mantle.compile")

ENCODER_KINDS = ("embedding",)
CAUSAL_KINDS = ("chat", "completion")
EXIT_REFUSED = 3
"""Exit status for a checkpoint this exporter does not support (the last stderr line says why)."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--source", type=Path, required=True, help="checkpoint directory")
    parser.add_argument("--out", type=Path, required=True, help="empty directory to fill")
    parser.add_argument("--kind", required=True, choices=(*ENCODER_KINDS, *CAUSAL_KINDS))
    parser.add_argument("--name", required=True, help="the model's name (manifest `name`)")
    parser.add_argument("--reference", type=Path, help=".npz for sample inputs and outputs")
    args = parser.parse_args(argv)
    setup_logging()
    force_offline()
    src: Path = args.source
    if not (src / "config.json").is_file():
        log.error("refused: %s has no config.json: not a Hugging Face checkpoint", src)
        return EXIT_REFUSED
    args.out.mkdir(parents=True, exist_ok=True)
    source = {"checkpoint": str(src)}
    started = time.monotonic()
    try:
        if args.kind in ENCODER_KINDS:
            from workers.compile.export_encoder import export_checkpoint as export_encoder

            manifest = export_encoder(
                src, args.out, name=args.name, licence="", source=source, reference=args.reference
            )
        else:
            from workers.compile.export_causal_lm import export_checkpoint as export_causal

            manifest = export_causal(
                src,
                args.out,
                name=args.name,
                kind=args.kind,
                licence="",
                source=source,
                reference=args.reference,
            )
    except (RuntimeError, ValueError, OSError, KeyError) as exc:
        # Expected refusals (wrong architecture, no chat template, parity): one clear line.
        log.error("refused: %s", exc)
        return EXIT_REFUSED
    manifest["build"] = {
        **manifest.get("build", {}),
        "seconds": round(time.monotonic() - started, 1),
        "peak_rss_mb": peak_rss_mb(),
    }
    (args.out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    log.info("export done in %.1f s", manifest["build"]["seconds"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
