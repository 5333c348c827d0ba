"""Handing memory the process freed back to the operating system.

glibc's allocator keeps what a process frees for its next allocations: the protobuf copy
of a model that ONNX Runtime parsed and dropped after building its session (~20 MB for
the built-in 4-bit chat model, ~110 MB for its fp32 variant), the heap memory of a burst
after it ended (tens of MB for a batch of 8; the in-place cache buffers are a mapping of
their own, `causal_lm.kv_buffers`, unmapped when the batch empties). Without this they stay resident
until the process needs them again, and a worker's memory only ever grows to its largest
burst. `release_free_memory` asks the allocator to return every free page
(`malloc_trim(0)`, glibc only; it took under a millisecond on a 300 MB worker here). It
is called after a model is loaded and when an engine has been idle for a while
(docs/benchmarks.md, issue 16's memory figures).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
from collections.abc import Callable

logger = logging.getLogger(__name__)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None where the C library has none (musl, macOS)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        logger.info("malloc_trim is not available: freed memory stays with the allocator")
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def release_free_memory() -> bool:
    """Return the allocator's free pages to the operating system; whether it could ask."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
