"""Creates the demo operator (staff, billing admin role) for the back office (idempotent)."""

from __future__ import annotations

import secrets
from typing import Any

from django.conf import settings
from django.contrib.auth.models import Group
from django.core.management.base import BaseCommand

from accounts import two_factor
from accounts.models import User
from accounts.principal import SYSTEM
from billing.staff_roles import BILLING_ADMIN, roles_sync

STAFF_EMAIL = "ops@mantle.local"


class Command(BaseCommand):
    help = __doc__

    def handle(self, *args: Any, **options: Any) -> None:
        roles_sync()
        user = User.objects.filter(email=STAFF_EMAIL).first()
        self._say(f"back office:  {settings.PUBLIC_BASE_URL}/admin/  staff user: {STAFF_EMAIL}")
        if user is not None:
            return
        password = secrets.token_urlsafe(12)
        user = User.objects.create_user(STAFF_EMAIL, password, full_name="Demo Operator")
        user.is_staff = True
        user.save(update_fields=["is_staff"])
        user.groups.add(Group.objects.get(name=BILLING_ADMIN))
        # Enrolled like any staff member (production and development alike: the back office
        # has no switch that skips the second factor); the secret is printed so that a
        # developer can add it to an app, or compute codes with `oathtool --totp -b`.
        enrolment = two_factor.two_factor_enrol_unattended(principal=SYSTEM, user=user)
        self._say(f"              password: {password}  (billing admin role; shown once)")
        self._say(f"              TOTP secret: {enrolment.secret}  (shown once)")
        self._say(f"              {enrolment.uri}")
        self._say(
            "              lost it? python manage.py backoffice_two_factor_reset "
            f"{STAFF_EMAIL} (then enrol at the next sign-in)"
        )

    def _say(self, line: str) -> None:
        self.stdout.write(self.style.SUCCESS("[mantle] ") + line)
