"""`manage.py run_batches`: the batch runner process (a Procfile entry)."""

from __future__ import annotations

import asyncio
import logging
import signal
from argparse import ArgumentParser
from typing import Any

from django.core.management.base import BaseCommand

from gateway.batch_runner import run_forever, runner_name

logger = logging.getLogger(__name__)


class Command(BaseCommand):
    help = (
        "Run batches of the Batch API: validate their input files, run their lines in the "
        "batch class of work, write their output and error files. Several may run at once; "
        "a batch whose runner died is resumed by another after its lease expires. Stops on "
        "SIGTERM or SIGINT, letting go of its batches."
    )

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument(
            "--name", default="", help="this runner's name in leases (default: host:pid)"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        asyncio.run(self._main(options["name"] or runner_name()))

    async def _main(self, name: str) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await run_forever(stop, runner=name)
        logger.info("batch runner %s stopped", name)
