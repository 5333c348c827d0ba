"""A throwaway platform for benchmarks: SQLite in a temp dir, own Redis DBs, real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def _env(var_dir: Path) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": f"{ROOT}:{ROOT / 'platform'}",
        "DJANGO_SETTINGS_MODULE": "config.settings.base",
        "DJANGO_SECRET_KEY": "bench-only-secret",
        "MANTLE_API_KEY_PEPPER": "bench-only-pepper",
        "MANTLE_IDENTITY_KEY": "bench-only-identity-key",
        "MANTLE_VAR_DIR": str(var_dir),
        "REDIS_URL": os.environ.get("MANTLE_BENCH_REDIS_URL", "redis://127.0.0.1:6379/3"),
        "CELERY_BROKER_URL": os.environ.get("MANTLE_BENCH_BROKER_URL", "redis://127.0.0.1:6379/1"),
        "MANTLE_LOG_LEVEL": "WARNING",
        "DATABASE_URL": "",
    }


class BenchStack:
    """bootstrap(): migrate, register built-ins, mint a key; then start/stop processes."""

    def __init__(self) -> None:
        self.var = Path(tempfile.mkdtemp(prefix="mantle-bench-"))
        self.env = _env(self.var)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.url = ""
        self.secret = ""

    def manage(self, *args: str) -> str:
        done = subprocess.run(
            [PY, str(ROOT / "manage.py"), *args],
            env=self.env,
            capture_output=True,
            text=True,
            check=True,
            cwd=ROOT,
        )
        return done.stdout

    def bootstrap(self) -> None:
        import redis

        for url in (self.env["REDIS_URL"], self.env["CELERY_BROKER_URL"]):
            redis.Redis.from_url(url).flushdb()
        check = subprocess.run(
            [
                PY,
                "-m",
                "workers.compile.builtin",
                "--store",
                os.environ.get("MANTLE_ARTIFACT_DIR", str(Path.home() / ".cache/mantle/artifacts")),
                "--check",
            ],
            env=self.env,
            capture_output=True,
            text=True,
            check=True,
            cwd=ROOT,
        )
        manifests = self.var / "manifests.json"
        manifests.write_text(check.stdout.strip().splitlines()[-1])
        self.manage("migrate", "--noinput", "-v", "0")
        self.manage("prepare_models", "--manifests", str(manifests))
        self.manage("seed_prices")  # as bin/run: admission refuses a model without a price
        out = self.manage("seed_demo")
        self.secret = next(
            w for line in out.splitlines() for w in line.split() if w.startswith("sk-")
        )
        # Benchmarks measure throughput, not the (per-minute) limits.
        self.manage(
            "shell",
            "-c",
            (
                "from catalog.models import Endpoint; from catalog.services import "
                "endpoints_publish_all; Endpoint.objects.update(rpm_limit=10**9, tpm_limit=10**12);"
                "from accounts.models import ApiKey, Project; from accounts import services;"
                "ApiKey.objects.update(rpm_limit=10**9, tpm_limit=10**12);"
                "Project.objects.update(rpm_limit=10**9, tpm_limit=10**12);"
                "endpoints_publish_all();"
                "[__import__('accounts.keys').keys.cache_put(services._identity(k, k.organization))"
                " for k in ApiKey.objects.select_related('organization', 'project')]"
            ),
        )

    def _spawn(self, argv: list[str], log: str, extra: dict[str, str] | None = None) -> None:
        handle = (self.var / log).open("wb")
        self.procs.append(
            subprocess.Popen(
                argv,
                env={**self.env, **(extra or {})},
                cwd=ROOT,
                stdout=handle,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )

    def start(
        self, port: int, *, gateway_procs: int = 1, worker_procs: int = 1, worker_threads: int = 64
    ) -> None:
        """One uvicorn server (with `gateway_procs` processes) and `worker_procs` workers."""
        self._spawn(
            [
                PY,
                "-m",
                "uvicorn",
                "config.asgi:application",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                str(gateway_procs),
                "--lifespan",
                "off",
                "--no-access-log",
                "--log-level",
                "warning",
            ],
            "gateway.log",
        )
        for i in range(worker_procs):
            self._spawn(
                [
                    PY,
                    "-m",
                    "celery",
                    "-A",
                    "workers.celery_app",
                    "worker",
                    "-P",
                    "threads",
                    "-c",
                    str(worker_threads),
                    "-Q",
                    "inference.cpu",
                    "-n",
                    f"bench{i}@%h",
                    "--loglevel",
                    "WARNING",
                    "--without-gossip",
                    "--without-mingle",
                ],
                f"worker-{i}.log",
                {
                    "MANTLE_POOL": "cpu",
                    "MANTLE_CONCURRENCY": str(worker_threads),
                    "MANTLE_NODE": f"bench-{i}",
                },
            )
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"{self.url}/healthz", timeout=1):  # noqa: S310
                    break
            except OSError:
                time.sleep(0.2)
        import redis

        client = redis.Redis.from_url(self.env["REDIS_URL"])
        while time.time() < deadline and client.zcard("mantle:pool-live:cpu") < worker_procs:
            time.sleep(0.2)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        self.procs.clear()


def manifests() -> list[dict[str, object]]:
    check = subprocess.run(
        [
            PY,
            "-m",
            "workers.compile.builtin",
            "--store",
            os.environ.get("MANTLE_ARTIFACT_DIR", str(Path.home() / ".cache/mantle/artifacts")),
            "--check",
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    result: list[dict[str, object]] = json.loads(check.stdout.strip().splitlines()[-1])
    return result
