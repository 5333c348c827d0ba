"""Migration 0003: everyone who existed before sign-up links counts as verified."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from django.db import connection
from django.db.migrations.executor import MigrationExecutor

pytestmark = pytest.mark.django_db(transaction=True)

BEFORE = [("accounts", "0002_rate_limits")]
AFTER = [("accounts", "0003_email_verification_invitations")]


def test_existing_users_are_verified_from_the_day_they_joined() -> None:
    executor = MigrationExecutor(connection)
    latest = executor.loader.graph.leaf_nodes()
    try:
        executor.migrate(BEFORE)
        old_apps = executor.loader.project_state(BEFORE).apps
        joined = datetime(2025, 3, 4, 5, 6, tzinfo=UTC)
        old_user = old_apps.get_model("accounts", "User").objects.create(
            email="early@example.com", password="!", date_joined=joined
        )
        executor = MigrationExecutor(connection)
        executor.migrate(AFTER)
        new_apps = executor.loader.project_state(AFTER).apps
        migrated = new_apps.get_model("accounts", "User").objects.get(pk=old_user.pk)
        assert migrated.email_verified_at == joined
    finally:
        # Back to the schema every other test runs on (later migrations included).
        MigrationExecutor(connection).migrate(latest)
