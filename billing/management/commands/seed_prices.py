"""Gives the built-in models their starter list prices, where they have none (idempotent)."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand

from accounts.principal import SYSTEM
from billing.starter_prices import starter_prices_ensure


class Command(BaseCommand):
    help = __doc__

    def handle(self, *args: Any, **options: Any) -> None:
        created = starter_prices_ensure(principal=SYSTEM)
        names = sorted({p.model_name for p in created})
        if names:
            self.stdout.write(f"[mantle] starter prices set for {', '.join(names)}")
