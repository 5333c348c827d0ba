"""Re-encrypts every provider credential under the first of MANTLE_PROVIDER_SECRET_KEYS.

Key rotation (docs/providers.md): list the new key first (the old one after it), run this,
then drop the old key. Prints counts, never a credential."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError

from catalog.providers import provider_secrets_rotate
from core.secretbox import SecretUnreadable


class Command(BaseCommand):
    help = __doc__

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            count = provider_secrets_rotate()
        except SecretUnreadable as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write(f"{count} provider credentials re-encrypted under the first key")
