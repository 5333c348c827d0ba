"""Real processes for end-to-end tests: ASGI gateway servers and Celery worker nodes."""

from __future__ import annotations

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
from django.conf import settings
from django.db import connection

from workers.contract import pool_live_key, worker_info_key

ROOT = Path(__file__).resolve().parents[1]
LOG_DIR = ROOT / "var" / "test-logs"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_database_url() -> str:
    db = connection.settings_dict
    auth = db["USER"] or "postgres"
    if db.get("PASSWORD"):
        auth += f":{db['PASSWORD']}"
    return f"postgres://{auth}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"


def builtin_manifests() -> list[dict[str, Any]]:
    """The prepared built-in artifacts (bin/test prepares them before the suite)."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "workers.compile.builtin",
            "--store",
            str(settings.MANTLE_ARTIFACT_DIR),
            "--check",
        ],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'platform'}"},
    )
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    if done.returncode != 0 or not lines:
        raise RuntimeError(
            "the built-in models are not prepared; run bin/prepare-models (bin/test does): "
            + done.stderr[-2000:]
        )
    manifests: list[dict[str, Any]] = json.loads(lines[-1])
    return manifests


@dataclass
class Process:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    node: str = ""

    def tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.popen.poll() is None


def stack_node(name: str) -> str:
    """The node id of a worker this test session starts (the session's pid in it)."""
    return f"{name}-{os.getpid()}"


def is_stack_node(node: str) -> bool:
    return node.endswith(f"-{os.getpid()}")


@dataclass
class Stack:
    """Starts and always stops the processes it started, by their pids."""

    env: dict[str, str]
    processes: list[Process] = field(default_factory=list)

    @classmethod
    def for_tests(cls) -> Stack:
        env = {
            **os.environ,
            "PYTHONPATH": f"{ROOT}:{ROOT / 'platform'}",
            "DJANGO_SETTINGS_MODULE": "config.settings.test",
            "DATABASE_URL": test_database_url(),
            "REDIS_URL": settings.REDIS_URL,
            "CELERY_BROKER_URL": settings.CELERY_BROKER_URL,
            "MANTLE_ARTIFACT_DIR": str(settings.MANTLE_ARTIFACT_DIR),
            "MANTLE_LOG_LEVEL": "INFO",
        }
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        return cls(env=env)

    def _spawn(self, name: str, argv: list[str], extra: Mapping[str, str]) -> Process:
        log = LOG_DIR / f"{name}.log"
        handle = log.open("wb")
        popen = subprocess.Popen(
            argv,
            cwd=ROOT,
            env={**self.env, **extra},
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        handle.close()
        proc = Process(name=name, popen=popen, log=log)
        self.processes.append(proc)
        return proc

    def gateway(self, name: str = "gateway", **extra: str) -> tuple[Process, str]:
        port = free_port()
        proc = self._spawn(
            name,
            [
                sys.executable,
                "-m",
                "uvicorn",
                "config.asgi:application",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--lifespan",
                "off",
                "--no-access-log",
            ],
            extra,
        )
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 60
        while time.time() < deadline:
            if not proc.alive():
                raise RuntimeError(f"{name} exited:\n{proc.tail()}")
            try:
                with urllib.request.urlopen(f"{url}/healthz", timeout=1):  # noqa: S310
                    return proc, url
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"{name} did not start:\n{proc.tail()}")

    def worker(
        self, pool: str = "cpu", name: str | None = None, concurrency: int = 32, **extra: str
    ) -> Process:
        name = name or f"worker-{pool}-{len(self.processes)}"
        node = stack_node(name)
        spawned_at = time.time()
        proc = self._spawn(
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
                "INFO",
                "--without-gossip",
                "--without-mingle",
            ],
            {
                "MANTLE_POOL": pool,
                "MANTLE_NODE": node,
                "MANTLE_CONCURRENCY": str(concurrency),
                **extra,
            },
        )
        proc.node = node
        client = redis.Redis.from_url(settings.REDIS_URL, decode_responses=True)
        deadline = time.time() + 60
        while time.time() < deadline:
            if not proc.alive():
                raise RuntimeError(f"{name} exited:\n{proc.tail()}")
            # A beat of this process, not a same-named predecessor's stale listing.
            beat = client.zscore(pool_live_key(pool), node)
            if client.exists(worker_info_key(node)) and beat and beat >= spawned_at:
                return proc
            time.sleep(0.2)
        raise RuntimeError(f"{name} did not register a heartbeat:\n{proc.tail()}")

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
