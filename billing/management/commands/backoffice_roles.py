"""`manage.py backoffice_roles`: (re)creates the staff roles' Groups with their permissions."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand

from billing.staff_roles import roles_sync


class Command(BaseCommand):
    help = __doc__

    def handle(self, *args: Any, **options: Any) -> None:
        for name, count in roles_sync().items():
            self.stdout.write(f"{name}: {count} permissions")
