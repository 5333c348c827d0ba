"""The cores a worker can use under a cgroup CPU quota (workers/runtime/cpus.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from workers.runtime.cpus import cpu_quota, usable_cores

ROOT = Path(__file__).resolve().parents[2]


def fake_proc(tmp_path: Path, cgroup: str, mountinfo: str) -> Path:
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "cgroup").write_text(cgroup)
    (proc / "self" / "mountinfo").write_text(mountinfo)
    return proc


def write(directory: Path, **files: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name.replace("__", ".")).write_text(text + "\n")


def test_a_v2_quota_of_a_pod_caps_its_container_below_a_looser_limit(tmp_path: Path) -> None:
    """The kubelet's layout on a cgroup v2 host: the pod's limit on the pod's cgroup, the
    container's own below it; the tighter one is what the process gets."""
    fs = tmp_path / "sys" / "fs" / "cgroup"
    pod = fs / "kubepods.slice" / "kubepods-burstable.slice" / "pod-1"
    write(fs, cpu__max="max 100000")
    write(pod, cpu__max="150000 100000")
    write(pod / "cri-abc", cpu__max="400000 100000")
    proc = fake_proc(
        tmp_path,
        "0::/kubepods.slice/kubepods-burstable.slice/pod-1/cri-abc\n",
        f"30 23 0:26 / {fs} rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate\n",
    )
    assert cpu_quota(proc) == pytest.approx(1.5)
    assert usable_cores(proc) == 1  # 1.5 cores: one whole thread


def test_a_namespaced_container_reads_its_own_cgroup_at_the_mount_top(tmp_path: Path) -> None:
    fs = tmp_path / "cgroup"
    write(fs, cpu__max="200000 100000")
    proc = fake_proc(tmp_path, "0::/\n", f"40 30 0:26 / {fs} ro - cgroup2 cgroup2 rw\n")
    assert cpu_quota(proc) == pytest.approx(2.0)


def test_a_v1_container_whose_mount_root_is_its_own_cgroup(tmp_path: Path) -> None:
    """Docker without cgroup namespaces: /proc/self/cgroup names the host's path and the
    cpu hierarchy is mounted from that path."""
    mount = tmp_path / "cpu,cpuacct"
    write(mount, cpu__cfs_quota_us="50000", cpu__cfs_period_us="100000")
    proc = fake_proc(
        tmp_path,
        "5:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n0::/\n",
        f"41 30 0:30 /docker/abc {mount} ro - cgroup cgroup rw,cpu,cpuacct\n"
        f"42 30 0:31 /docker/abc {tmp_path / 'memory'} ro - cgroup cgroup rw,memory\n",
    )
    assert cpu_quota(proc) == pytest.approx(0.5)
    assert usable_cores(proc) == 1  # never below one


def test_no_quota_leaves_the_affinity(tmp_path: Path) -> None:
    fs = tmp_path / "cpu"
    write(fs, cpu__cfs_quota_us="-1", cpu__cfs_period_us="100000")
    write(fs / "svc", cpu__cfs_quota_us="-1", cpu__cfs_period_us="100000")
    proc = fake_proc(tmp_path, "1:cpu:/svc\n", f"32 31 0:29 / {fs} rw - cgroup cgroup rw,cpu\n")
    assert cpu_quota(proc) is None
    assert usable_cores(proc) == len(os.sched_getaffinity(0))
    # No cgroups at all (not Linux, or /proc not mounted): the affinity too.
    assert usable_cores(tmp_path / "nothing") == len(os.sched_getaffinity(0))


def test_garbage_in_the_files_is_no_quota(tmp_path: Path) -> None:
    fs = tmp_path / "cg"
    write(fs, cpu__max="lots 100000")
    proc = fake_proc(tmp_path, "0::/\nnot a line\n", f"bad line\n40 30 0:26 / {fs} - cgroup2 x\n")
    assert cpu_quota(proc) is None


def test_a_cpu_request_caps_the_cores_in_whole_cores(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kubernetes' request (MANTLE_CPU_REQUEST_MILLICORES, from the Downward API in
    millicores) sets no quota; it caps the threads the same way, rounded down."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs at least 2 cores to tell a cap from the affinity")
    nothing = tmp_path / "no-proc"
    monkeypatch.setenv("MANTLE_CPU_REQUEST_MILLICORES", "1500")
    assert usable_cores(nothing) == 1
    monkeypatch.setenv("MANTLE_CPU_REQUEST_MILLICORES", "500")
    assert usable_cores(nothing) == 1  # never below one
    monkeypatch.setenv("MANTLE_CPU_REQUEST_MILLICORES", "100000")
    assert usable_cores(nothing) == len(os.sched_getaffinity(0))  # the affinity still caps
    for unset in ("0", "", "lots", "-2000"):  # a pod without a request gets "0"
        monkeypatch.setenv("MANTLE_CPU_REQUEST_MILLICORES", unset)
        assert usable_cores(nothing) == len(os.sched_getaffinity(0)), unset


def test_an_explicit_thread_count_wins_and_zero_means_unset(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from workers.runtime.models import ort_threads

    monkeypatch.delenv("MANTLE_CPU_REQUEST_MILLICORES", raising=False)
    monkeypatch.setenv("MANTLE_ORT_THREADS", "3")
    assert ort_threads() == 3
    monkeypatch.setenv("MANTLE_ORT_THREADS", "0")  # ONNX Runtime's 0 is every core
    assert ort_threads() == usable_cores()
    # An artifact's measured count applies below the cap, not above it.
    monkeypatch.delenv("MANTLE_ORT_THREADS")
    monkeypatch.setenv("MANTLE_CPU_REQUEST_MILLICORES", "1000")
    assert ort_threads({"runtime_options": {"intra_op_threads": 4}}) == 1


def test_a_mount_path_that_is_not_utf8_is_skipped_not_fatal(tmp_path: Path) -> None:
    fs = tmp_path / "cg"
    write(fs, cpu__max="100000 100000")
    proc = fake_proc(tmp_path, "0::/\n", "")
    (proc / "self" / "mountinfo").write_bytes(
        b"39 30 0:40 / /mnt/caf\xe9 rw - ext4 /dev/x rw\n"
        + f"40 30 0:26 / {fs} rw - cgroup2 cgroup2 rw\n".encode()
    )
    assert cpu_quota(proc) == pytest.approx(1.0)


# --- the kernel's own cgroups ------------------------------------------------------


@pytest.fixture
def one_core_cgroup() -> Iterator[Path]:
    """A real cgroup v1 cpu group limited to one core a second (root on a cgroup v1 host,
    like the CI machine; elsewhere the test says why it cannot run)."""
    base = Path("/sys/fs/cgroup/cpu")
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs at least 2 cores to tell a one-core quota from the affinity")
    if not (base / "cpu.cfs_quota_us").exists() or not os.access(base, os.W_OK):
        pytest.skip("needs a writable cgroup v1 cpu hierarchy at /sys/fs/cgroup/cpu (root)")
    group = base / f"mantle-test-{uuid.uuid4().hex[:8]}"
    group.mkdir()
    try:
        (group / "cpu.cfs_period_us").write_text("100000")
        (group / "cpu.cfs_quota_us").write_text("100000")
        yield group
    finally:
        # The child has exited; its group is empty and can go.
        group.rmdir()


def test_a_worker_in_a_one_core_cgroup_sizes_its_sessions_to_one_thread(
    one_core_cgroup: Path,
) -> None:
    """A real process moved into a real cgroup with a quota of one core: the worker's
    model sessions take one intra-op thread, not the machine's count."""
    script = (
        "import json, os\n"
        "from workers.runtime.cpus import cpu_quota, usable_cores\n"
        "from workers.runtime.models import ort_threads\n"
        "print(json.dumps({'quota': cpu_quota(), 'cores': usable_cores(),\n"
        "    'ort': ort_threads(), 'cpu_count': os.cpu_count()}))\n"
    )
    unset = ("MANTLE_ORT_THREADS", "MANTLE_CPU_REQUEST_MILLICORES")
    env = {k: v for k, v in os.environ.items() if k not in unset}
    env["PYTHONPATH"] = str(ROOT)

    def seen_by(argv: list[str]) -> dict[str, Any]:
        out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, check=True)
        return dict(json.loads(out.stdout.strip().splitlines()[-1]))

    procs = one_core_cgroup / "cgroup.procs"
    seen = seen_by(["sh", "-c", f'echo $$ > {procs} && exec "$0" -c "$1"', sys.executable, script])
    assert seen["cpu_count"] >= 2
    assert seen["quota"] == pytest.approx(1.0)
    assert seen["cores"] == 1
    assert seen["ort"] == 1

    # The same script outside the group: the machine's cores.
    outside = seen_by([sys.executable, "-c", script])
    assert outside["cores"] == len(os.sched_getaffinity(0))
    assert outside["ort"] == outside["cores"]
