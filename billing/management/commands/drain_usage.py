"""`manage.py drain_usage`: the usage drain process (a Procfile entry)."""

from __future__ import annotations

import logging
import signal
import socket
import threading
import time
from argparse import ArgumentParser
from typing import Any

import redis
from django.conf import settings
from django.core.management.base import BaseCommand
from prometheus_client import start_http_server

from billing.metering.drain import Drain, tune_gc_for_draining

logger = logging.getLogger(__name__)


class Command(BaseCommand):
    help = (
        "Drain the Redis usage stream into raw usage events and hourly rollups, exactly "
        "once. Stops after the current batch on SIGTERM or SIGINT."
    )

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument(
            "--once", action="store_true", help="exit when the stream has nothing left"
        )
        parser.add_argument("--batch", type=int, default=5000, help="entries per transaction")
        parser.add_argument(
            "--consumer",
            default=socket.gethostname(),
            help="consumer name in the group; stable across restarts (default: host name)",
        )
        parser.add_argument(
            "--claim-idle",
            type=float,
            default=60.0,
            help="seconds after which another consumer's pending entries are taken over",
        )
        parser.add_argument(
            "--metrics-port", type=int, default=0, help="serve Prometheus metrics on this port"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        stop = threading.Event()

        def _stop(signum: int, frame: object) -> None:
            logger.info("signal %d: stopping after the current batch", signum)
            stop.set()

        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)
        if options["metrics_port"]:
            start_http_server(options["metrics_port"])
        client = redis.Redis.from_url(
            settings.REDIS_URL,
            decode_responses=True,
            socket_connect_timeout=5,
            socket_timeout=30,
            health_check_interval=30,
        )
        drain = Drain(
            consumer=options["consumer"],
            client=client,
            batch_size=options["batch"],
            claim_idle_ms=int(options["claim_idle"] * 1000),
        )
        tune_gc_for_draining()
        started = time.monotonic()
        logger.info("usage drain %s starting (batch %d)", options["consumer"], options["batch"])
        totals = drain.run(stop=stop, once=options["once"])
        logger.info(
            "usage drain %s stopped after %.1fs: %d batches, %d counted, %d duplicates, "
            "%d dead-lettered",
            options["consumer"],
            time.monotonic() - started,
            totals.batches,
            totals.inserted,
            totals.duplicates,
            totals.dead,
        )
