"""Choice of the ONNX Runtime execution provider for a pool's ordered preferences."""

from __future__ import annotations

import logging
from collections.abc import Sequence

logger = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"


def choose_providers(requested: Sequence[str], available: Sequence[str]) -> tuple[list[str], str]:
    """The providers to build a session with, and the one that was chosen.

    The first requested provider that this onnxruntime build offers wins; CPU is
    always kept last because accelerator providers hand the nodes they cannot
    run to the next provider in the list, and a node whose driver is missing
    must still serve (slowly) rather than refuse every request.
    """
    chosen = next((p for p in requested if p in available or p == CPU), CPU)
    skipped = [p for p in requested if p not in available and p != CPU]
    providers = [chosen] if chosen == CPU else [chosen, CPU]
    # Only a provider preferred over the chosen one makes this a fallback.
    preferred = list(requested[: list(requested).index(chosen)]) if chosen in requested else skipped
    if chosen == CPU and preferred:
        logger.warning(
            "execution provider: falling back to %s; requested %s, not available here: %s",
            CPU,
            list(requested),
            skipped,
        )
    else:
        logger.info(
            "execution provider: %s (requested %s, not available here: %s)",
            chosen,
            list(requested),
            skipped,
        )
    return providers, chosen
