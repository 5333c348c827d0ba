"""Handing freed memory back to the system (workers.runtime.memory), in a process of its own."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

# A heap with 256 MiB freed below a block still in use: glibc keeps it (only a free top of
# the heap goes back by itself) until it is asked to hand it back.
_FRAGMENTED = textwrap.dedent(
    """
    import ctypes, json, sys
    from workers.runtime.memory import release_free_memory

    def anon_kib():
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1])

    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: 1 MiB blocks come from the heap
    blocks = [libc.malloc(1 << 20) for _ in range(256)]
    for block in blocks:
        ctypes.memset(block, 1, 1 << 20)
    pin = libc.malloc(4096)  # above them: the heap's top is in use
    ctypes.memset(pin, 1, 4096)
    for block in blocks:
        libc.free(block)
    before = anon_kib()
    released = release_free_memory() if sys.argv[1] == "release" else False
    print(json.dumps({"before": before, "after": anon_kib(), "released": released}))
    """
)


def _run(mode: str) -> dict[str, int]:
    done = subprocess.run(
        [sys.executable, "-c", _FRAGMENTED, mode], capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout)  # type: ignore[no-any-return]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_freed_memory_stays_resident_until_released_and_then_goes_back() -> None:
    kept = _run("keep")
    assert kept["after"] - kept["before"] > -64 * 1024  # the allocator kept the 256 MiB
    released = _run("release")
    assert released["released"]
    assert released["before"] - released["after"] > 200 * 1024
