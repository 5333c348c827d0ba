"""Removes a staff member's two-factor devices (lost phone): they enrol again at next sign-in."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from accounts import two_factor
from accounts.models import User
from accounts.principal import SYSTEM


class Command(BaseCommand):
    help = __doc__

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("email", help="the staff member's email")

    def handle(self, *args: Any, **options: Any) -> None:
        user = User.objects.filter(email=str(options["email"]).strip().lower()).first()
        if user is None or not user.is_staff:
            raise CommandError(f"no staff user {options['email']!r}")
        removed = two_factor.two_factor_reset(principal=SYSTEM, user=user)
        self.stdout.write(
            f"{user.email}: {removed} two-factor device(s) removed; their open back-office "
            "sessions must pass the second factor again, and their next sign-in enrols anew"
        )
