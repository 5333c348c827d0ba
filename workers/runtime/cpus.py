"""The cores this process can use: its CPU affinity, and its cgroup's CPU quota.

`os.cpu_count()` is the machine's count. In a container under a CPU limit (Kubernetes'
`resources.limits.cpu`, `docker run --cpus`) the kernel lets the container's processes
run on every core but only for `quota / period` core-seconds a second, and stops all of
them until the next period once the quota is spent. An ONNX Runtime session with one
intra-op thread per machine core spends a 2-core quota in a fraction of each period and
then waits the rest of it, every call: the session's threads are sized here instead, to
the whole cores the quota allows (at least one). A CPU request without a limit sets no
quota; the manifests pass it in as MANTLE_CPU_REQUEST_MILLICORES, another cap.

The quota is the smallest over the process's cgroup and its ancestors (a pod's limit and
its container's both apply), cgroup v2 (`cpu.max`: "max 100000" or "200000 100000") or
v1 (`cpu.cfs_quota_us`, -1 for none, over `cpu.cfs_period_us`). The paths come from
/proc/self/cgroup and /proc/self/mountinfo, so a container that sees only its own
cgroup (a cgroup namespace, or a bind mount of it) and a host that sees the whole tree
both read the right files.
"""

from __future__ import annotations

import math
import os
from pathlib import Path


def _mounts(proc: Path) -> list[tuple[str, Path, str, set[str]]]:
    """(root, mount point, filesystem type, super options) of each cgroup mount."""
    found = []
    try:
        # A mount point's bytes need not be UTF-8: such a path only never matches.
        text = (proc / "self" / "mountinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    for line in text.splitlines():
        # id parent major:minor root mountpoint options [optional...] - fstype source super
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 3 or tail[0] not in ("cgroup", "cgroup2"):
            continue
        found.append((fields[3], Path(fields[4]), tail[0], set(tail[2].split(","))))
    return found


def _memberships(proc: Path) -> dict[str, str]:
    """Controller ('cpu', or '' for the v2 unified tree) -> this process's cgroup path."""
    try:
        text = (proc / "self" / "cgroup").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return {}
    paths = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        for name in controllers.split(",") if controllers else [""]:
            paths[name] = path
    return paths


def _directories(root: str, mountpoint: Path, path: str) -> list[Path]:
    """The cgroup's directory under `mountpoint` and its ancestors up to the mount's top."""
    relative = path
    if root != "/" and (path == root or path.startswith(root.rstrip("/") + "/")):
        relative = path[len(root.rstrip("/")) :]
    elif root != "/":
        relative = "/"  # another namespace's view: the mount's top is this cgroup
    here = mountpoint / relative.lstrip("/")
    dirs = [here]
    while here != mountpoint and mountpoint in here.parents:
        here = here.parent
        dirs.append(here)
    return dirs


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii", errors="replace").strip()
    except OSError:
        return None


def _v2_quota(directory: Path) -> float | None:
    raw = _read(directory / "cpu.max")
    if not raw:
        return None
    parts = raw.split()
    if parts[0] == "max" or len(parts) != 2:
        return None
    try:
        quota, period = int(parts[0]), int(parts[1])
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def _v1_quota(directory: Path) -> float | None:
    quota_raw, period_raw = (
        _read(directory / "cpu.cfs_quota_us"),
        _read(directory / "cpu.cfs_period_us"),
    )
    try:
        quota, period = int(quota_raw or "-1"), int(period_raw or "0")
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def cpu_quota(proc: Path = Path("/proc")) -> float | None:
    """Cores a second the cgroup quota allows this process (None: no quota, or no cgroups)."""
    memberships = _memberships(proc)
    quotas: list[float] = []
    for root, mountpoint, fstype, options in _mounts(proc):
        if fstype == "cgroup2":
            path, read = memberships.get(""), _v2_quota
        elif "cpu" in options:
            path, read = memberships.get("cpu"), _v1_quota
        else:
            continue
        if path is None:
            continue
        for directory in _directories(root, mountpoint, path):
            quota = read(directory)
            if quota is not None:
                quotas.append(quota)
    return min(quotas) if quotas else None


def cpu_request() -> float | None:
    """MANTLE_CPU_REQUEST_MILLICORES: the cores the orchestrator reserved for this container
    (Kubernetes' `resources.requests.cpu` through the Downward API, which sets no quota).
    None when unset, not a number or not above 0."""
    raw = os.environ.get("MANTLE_CPU_REQUEST_MILLICORES", "").strip()
    try:
        milli = int(raw)
    except ValueError:
        return None
    return milli / 1000 if milli > 0 else None


def usable_cores(proc: Path = Path("/proc")) -> int:
    """Whole cores this process can keep busy: its affinity, capped by its cgroup's quota
    and by the cores requested for it (MANTLE_CPU_REQUEST_MILLICORES), each rounded down:
    a thread for a fraction of a core would spend the quota and stall, or crowd a
    neighbour's share."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    for cap in (cpu_quota(proc), cpu_request()):
        if cap is not None:
            cores = min(cores, max(1, math.floor(cap + 1e-9)))
    return max(1, cores)
