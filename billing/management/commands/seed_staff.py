"""Creates the demo operator (staff, billing admin role) for the back office (idempotent)."""

from __future__ import annotations

import secrets
from typing import Any

from django.conf import settings
from django.contrib.auth.models import Group
from django.core.management.base import BaseCommand

from accounts.models import User
from billing.backoffice.roles import BILLING_ADMIN, roles_sync

STAFF_EMAIL = "ops@mantle.local"


class Command(BaseCommand):
    help = __doc__

    def handle(self, *args: Any, **options: Any) -> None:
        roles_sync()
        user = User.objects.filter(email=STAFF_EMAIL).first()
        if user is None:
            password = secrets.token_urlsafe(12)
            user = User.objects.create_user(STAFF_EMAIL, password, full_name="Demo Operator")
            user.is_staff = True
            user.save(update_fields=["is_staff"])
            user.groups.add(Group.objects.get(name=BILLING_ADMIN))
            self._say(f"back office:  {settings.PUBLIC_BASE_URL}/admin/  staff user: {STAFF_EMAIL}")
            self._say(f"              password: {password}  (billing admin role; shown once)")
        else:
            self._say(f"back office:  {settings.PUBLIC_BASE_URL}/admin/  staff user: {STAFF_EMAIL}")

    def _say(self, line: str) -> None:
        self.stdout.write(self.style.SUCCESS("[mantle] ") + line)
