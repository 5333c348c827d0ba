"""The platform as real processes, for tests and benchmarks alike: ASGI gateway servers and
Celery worker nodes started with the flags production uses, and always stopped by their pids.

`Stack(env=...)` runs against whatever the environment names (the benchmarks' throwaway
platforms), `Stack.for_tests()` against the test database and Redis databases of this pytest
run. Only the test-side helpers read Django's settings, and lazily: the benchmarks import
this module without configuring Django.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from workers.contract import pool_live_key, worker_info_key

ROOT = Path(__file__).resolve().parents[2]
LOG_DIR = ROOT / "var" / "test-logs"
PYTHONPATH = f"{ROOT}:{ROOT / 'platform'}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def artifact_dir() -> Path:
    """The artifact store the environment names, else the platform's default (as settings)."""
    default = Path.home() / ".cache" / "mantle" / "artifacts"
    return Path(os.environ.get("MANTLE_ARTIFACT_DIR", str(default)))


def database_url() -> str:
    """The test database pytest-django set up, as a URL for the processes a test starts."""
    from django.db import connection

    db = connection.settings_dict
    auth = db["USER"] or "postgres"
    if db.get("PASSWORD"):
        auth += f":{db['PASSWORD']}"
    return f"postgres://{auth}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"


def builtin_manifests(store: str | Path | None = None) -> list[dict[str, Any]]:
    """The prepared built-in artifacts in `store` (default: the test settings' artifact
    directory, for a test, which must then carry the `models` marker that tells bin/test to
    prepare them)."""
    if store is None:
        from django.conf import settings

        from tests.support import needs

        needs.require("models")
        store = settings.MANTLE_ARTIFACT_DIR
    done = subprocess.run(
        [sys.executable, "-m", "workers.compile.builtin", "--store", str(store), "--check"],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": PYTHONPATH},
    )
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    if done.returncode != 0 or not lines:
        raise RuntimeError(
            "the built-in models are not prepared; run bin/prepare-models (bin/test does when "
            "a selected test carries the `models` marker): " + done.stderr[-2000:]
        )
    manifests: list[dict[str, Any]] = json.loads(lines[-1])
    return manifests


@dataclass
class Process:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    started_at: float  # time.time() just before it was started
    env: dict[str, str] = field(default_factory=dict)  # the environment it was started with
    node: str = ""  # a worker's MANTLE_NODE
    url: str = ""  # a gateway's base URL

    def tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.popen.poll() is None


# Default worker names are numbered across the whole session, not per Stack: two stacks'
# "worker-cpu-1" would be one node id in the same Redis, so one stopping (and unlisting)
# would unlist the other, and a new one would wait out the other's heartbeat as its own
# restart (workers/heartbeat.py). A test that means to restart a node names it.
_DEFAULT_WORKERS = itertools.count(1)


def stack_node(name: str) -> str:
    """The node id of a worker this test session starts (the session's pid in it)."""
    return f"{name}-{os.getpid()}"


def is_stack_node(node: str) -> bool:
    return node.endswith(f"-{os.getpid()}")


@dataclass
class Stack:
    """Starts and always stops the processes it started, by their pids.

    `gateway()` and `worker()` start one process and wait until it serves; `start_gateway()`
    and `start_worker()` only start it, so several can come up side by side before
    `wait_serving()` and `wait_registered()`.
    """

    env: dict[str, str]
    log_dir: Path = LOG_DIR
    # The servers' own log level: None keeps uvicorn's default and runs workers at INFO (tests
    # read the workers' logs); benchmarks pass "WARNING" so that logging costs them nothing.
    log_level: str | None = None
    processes: list[Process] = field(default_factory=list)

    @classmethod
    def for_tests(cls) -> Stack:
        from django.conf import settings

        env = {
            **os.environ,
            "PYTHONPATH": PYTHONPATH,
            "DJANGO_SETTINGS_MODULE": "config.settings.test",
            "DATABASE_URL": database_url(),
            "REDIS_URL": settings.REDIS_URL,
            "CELERY_BROKER_URL": settings.CELERY_BROKER_URL,
            "MANTLE_ARTIFACT_DIR": str(settings.MANTLE_ARTIFACT_DIR),
            "MANTLE_LOG_LEVEL": "INFO",
        }
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        return cls(env=env)

    def spawn(self, name: str, argv: list[str], extra: Mapping[str, str] | None = None) -> Process:
        """Any process, in a session of its own (so that stopping it stops its children),
        logging to <log_dir>/<name>.log."""
        log = self.log_dir / f"{name}.log"
        handle = log.open("wb")
        env = {**self.env, **(extra or {})}
        started_at = time.time()
        popen = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        handle.close()
        proc = Process(name=name, popen=popen, log=log, started_at=started_at, env=env)
        self.processes.append(proc)
        return proc

    def manage(self, *argv: str) -> str:
        """A management command in this stack's environment; its stdout."""
        done = subprocess.run(
            [sys.executable, str(ROOT / "manage.py"), *argv],
            env=self.env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
        return done.stdout

    def start_gateway(
        self,
        name: str = "gateway",
        *,
        port: int | None = None,
        processes: int | None = None,
        env: Mapping[str, str] | None = None,
    ) -> Process:
        """The ASGI server (gateway, console, APIs) on `port` (default: a free one), with
        `processes` uvicorn worker processes when given, and `env` over the stack's."""
        port = port or free_port()
        argv = [
            sys.executable,
            "-m",
            "uvicorn",
            "config.asgi:application",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ]
        if processes is not None:
            argv += ["--workers", str(processes)]
        argv += ["--lifespan", "off", "--no-access-log"]
        if self.log_level is not None:
            argv += ["--log-level", self.log_level.lower()]
        proc = self.spawn(name, argv, env)
        proc.url = f"http://127.0.0.1:{port}"
        return proc

    def wait_serving(self, proc: Process, timeout: float = 60) -> None:
        """Until the gateway answers /healthz."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if not proc.alive():
                raise RuntimeError(f"{proc.name} exited:\n{proc.tail()}")
            try:
                with urllib.request.urlopen(f"{proc.url}/healthz", timeout=1):  # noqa: S310
                    return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"{proc.name} did not start:\n{proc.tail()}")

    def batch_runner(self, name: str = "batch-runner", **extra: str) -> Process:
        """`manage.py run_batches`, named `name` in the batches' leases."""
        argv = [sys.executable, str(ROOT / "manage.py"), "run_batches", "--name", name]
        return self.spawn(name, argv, extra)

    def gateway(self, name: str = "gateway", **extra: str) -> tuple[Process, str]:
        proc = self.start_gateway(name, env=extra)
        self.wait_serving(proc)
        return proc, proc.url

    def start_worker(
        self,
        pool: str = "cpu",
        name: str | None = None,
        concurrency: int = 32,
        *,
        node: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> Process:
        """An inference worker node on `inference.<pool>` with `concurrency` threads and `env`
        over the stack's; its node id (MANTLE_NODE, and Celery's node name) is `node`, by
        default one of this session's."""
        name = name or f"worker-{pool}-{next(_DEFAULT_WORKERS)}"
        node = node or stack_node(name)
        proc = self.spawn(
            name,
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "workers.celery_app",
                "worker",
                "-P",
                "threads",
                "-c",
                str(concurrency),
                "-Q",
                f"inference.{pool}",
                "-n",
                f"{node}@%h",
                "--loglevel",
                self.log_level or "INFO",
                "--without-gossip",
                "--without-mingle",
            ],
            {
                "MANTLE_POOL": pool,
                "MANTLE_NODE": node,
                "MANTLE_CONCURRENCY": str(concurrency),
                **(env or {}),
            },
        )
        proc.node = node
        return proc

    def wait_registered(self, proc: Process, pool: str, timeout: float = 60) -> None:
        """Until the worker has sent a heartbeat to its Redis since it started: a beat of
        this process, not a same-named predecessor's stale listing."""
        client = redis.Redis.from_url(proc.env["REDIS_URL"], decode_responses=True)
        deadline = time.time() + timeout
        try:
            while time.time() < deadline:
                if not proc.alive():
                    raise RuntimeError(f"{proc.name} exited:\n{proc.tail()}")
                beat = client.zscore(pool_live_key(pool), proc.node)
                if client.exists(worker_info_key(proc.node)) and beat and beat >= proc.started_at:
                    return
                time.sleep(0.2)
        finally:
            client.close()
        raise RuntimeError(f"{proc.name} did not register a heartbeat:\n{proc.tail()}")

    def worker(
        self, pool: str = "cpu", name: str | None = None, concurrency: int = 32, **extra: str
    ) -> Process:
        proc = self.start_worker(pool, name, concurrency, env=extra)
        self.wait_registered(proc, pool)
        return proc

    def kill(self, proc: Process, sig: int = signal.SIGKILL) -> None:
        if proc.alive():
            os.killpg(proc.popen.pid, sig)
            proc.popen.wait(timeout=30)

    def stop(self, proc: Process) -> None:
        if proc.alive():
            os.killpg(proc.popen.pid, signal.SIGTERM)
            try:
                proc.popen.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.popen.pid, signal.SIGKILL)
                proc.popen.wait(timeout=10)

    def stop_all(self) -> None:
        for proc in reversed(self.processes):
            self.stop(proc)
        self.processes.clear()
