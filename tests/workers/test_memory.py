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

    start = anon_kib()
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
    print(json.dumps(
        {"start": start, "before": before, "after": anon_kib(), "released": released}
    ))
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
    assert kept["after"] - kept["start"] > 200 * 1024  # freed, and still resident
    released = _run("release")
    assert released["released"]
    assert released["before"] - released["start"] > 200 * 1024
    assert released["before"] - released["after"] > 200 * 1024  # handed back


# A long-running worker has freed large arrays, which raises glibc's mmap threshold (up to
# 32 MB): the caches made next for 16 rows (60 buffers of ~3 MB, as the built-in chat model
# has) must still cost nothing until written, and then only what is written.
_BUFFERS = textwrap.dedent(
    """
    import json
    import numpy as np
    from workers.engine.causal_lm import kv_buffers

    def anon_kib():  # private and shared anonymous pages both
        fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
        return sum(int(fields[k].split()[0]) for k in ("RssAnon", "RssShmem"))

    freed = np.ones(30 << 18, dtype=np.float32)  # 30 MB, mmapped, then freed
    del freed
    before = anon_kib()
    buffers = kv_buffers(60, 16, 3, 256, 64)
    made = anon_kib()
    for buffer in buffers:  # a row merged in: its first 10 columns in every buffer
        buffer[3, :, :10] = 1.0
    written = anon_kib()
    assert all(b.shape == (16, 3, 256, 64) and b.flags.c_contiguous for b in buffers)
    assert all(b.flags.writeable for b in buffers)
    assert float(sum(b.sum() for b in buffers)) == 60 * 3 * 10 * 64
    # One allocation for all of them (adjacent views), past glibc's largest mmap threshold.
    starts = [b.__array_interface__["data"][0] for b in buffers]
    adjacent = all(b - a == buffers[0].nbytes for a, b in zip(starts, starts[1:]))
    print(json.dumps({
        "grew_kib": made - before,
        "written_kib": written - made,
        "total_mib": 60 * 16 * 3 * 256 * 64 * 4 >> 20,
        "one_allocation": adjacent,
    }))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_cache_buffers_for_every_row_cost_nothing_until_written() -> None:
    done = subprocess.run(
        [sys.executable, "-c", _BUFFERS], capture_output=True, text=True, check=True
    )
    figures = json.loads(done.stdout)
    assert figures["total_mib"] == 180
    assert figures["one_allocation"], figures
    assert figures["grew_kib"] < 16 * 1024, figures
    # 180-360 pages of 4 KB written; transparent huge pages would make them 2 MB each.
    assert 512 < figures["written_kib"] < 16 * 1024, figures
