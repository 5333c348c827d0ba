"""A throwaway platform for benchmarks: SQLite in a temp dir, own Redis DBs, real processes
(started by the suite's launcher, tests/support/stack.py)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from tests.support.stack import PYTHONPATH, Stack, artifact_dir, builtin_manifests


def _env(var_dir: Path) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": PYTHONPATH,
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
        self.stack = Stack(env=self.env, log_dir=self.var, log_level="WARNING")
        self.url = ""
        self.secret = ""

    def manage(self, *args: str) -> str:
        return self.stack.manage(*args)

    def bootstrap(self) -> None:
        import redis

        for url in (self.env["REDIS_URL"], self.env["CELERY_BROKER_URL"]):
            redis.Redis.from_url(url).flushdb()
        manifests = self.var / "manifests.json"
        manifests.write_text(json.dumps(builtin_manifests(artifact_dir())))
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

    def start(
        self, port: int, *, gateway_procs: int = 1, worker_procs: int = 1, worker_threads: int = 64
    ) -> None:
        """One uvicorn server (with `gateway_procs` processes) and `worker_procs` workers."""
        gateway = self.stack.start_gateway("gateway", port=port, processes=gateway_procs)
        workers = [
            self.stack.start_worker(
                "cpu", name=f"worker-{i}", concurrency=worker_threads, node=f"bench-{i}"
            )
            for i in range(worker_procs)
        ]
        self.url = gateway.url
        self.stack.wait_serving(gateway)
        for worker in workers:
            self.stack.wait_registered(worker, "cpu")

    def stop(self) -> None:
        self.stack.stop_all()
