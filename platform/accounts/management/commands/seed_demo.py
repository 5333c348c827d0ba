"""Creates the demo organization, user and API key (idempotent; the key is printed once)."""

from __future__ import annotations

import secrets
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandParser
from django.db import transaction
from django.utils import timezone

from accounts import services
from accounts.models import ApiKey, Organization, User
from accounts.principal import SYSTEM, Principal

DEMO_EMAIL = "demo@mantle.local"
DEMO_ORG = "Demo Organization"
DEMO_KEY_NAME = "demo key"


class Command(BaseCommand):
    help = __doc__

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--new-key", action="store_true", help="mint another demo API key")
        parser.add_argument("--password", default="", help="demo user's password (default: random)")

    def handle(self, *args: Any, **options: Any) -> None:
        base = settings.PUBLIC_BASE_URL
        with transaction.atomic():
            user = User.objects.filter(email=DEMO_EMAIL).first()
            password = options["password"]
            if user is None:
                password = password or secrets.token_urlsafe(12)
                # Made by the operator, not a sign-up: the address counts as confirmed.
                user = User.objects.create_user(
                    DEMO_EMAIL, password, full_name="Demo User", email_verified_at=timezone.now()
                )
                self._say(f"demo user:    {DEMO_EMAIL}  password: {password}")
            elif password:
                user.set_password(password)
                user.save(update_fields=["password"])
            org = Organization.objects.filter(name=DEMO_ORG, memberships__user=user).first()
            if org is None:
                org = services.organization_create(principal=SYSTEM, name=DEMO_ORG, owner=user)
            project = org.projects.get(is_default=True)
            existing = ApiKey.objects.filter(
                organization=org, name=DEMO_KEY_NAME, revoked_at__isnull=True
            ).first()
            if existing is None or options["new_key"]:
                # Created by the demo owner: an admin-scoped key acts with its creator's role.
                _, secret = services.api_key_create(
                    principal=Principal(user=user),
                    project=project,
                    name=DEMO_KEY_NAME,
                    scopes=["inference", "read-usage", "admin"],
                )
                self._say(f"demo API key: {secret}   (shown once: keep it)")
            else:
                self._say(
                    f"demo API key: {existing.prefix}... exists (its secret was shown when it "
                    "was created; `python manage.py seed_demo --new-key` mints another)"
                )
        self._say(f"organization: {org.name} ({org.id})")
        self._say(f"console:      {base}/console/   API docs: {base}/api/v1/docs")
        self._say(f"OpenAI SDK:   base_url={base}/v1")

    def _say(self, line: str) -> None:
        self.stdout.write(self.style.SUCCESS("[mantle] ") + line)
