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


def test_recovery_codes_issued_before_are_kept_as_digests_and_still_work() -> None:
    from accounts import two_factor
    from accounts.models import User
    from accounts.principal import Principal

    otp = ("otp_static", "0003_add_timestamps")
    before = [("accounts", "0003_email_verification_invitations"), otp]
    after = [("accounts", "0004_mfa_required_recovery_digests"), otp]
    executor = MigrationExecutor(connection)
    latest = executor.loader.graph.leaf_nodes()
    try:
        executor.migrate(before)
        old_apps = executor.loader.project_state(before).apps
        user = old_apps.get_model("accounts", "User").objects.create(
            email="staff@example.com", password="!", is_staff=True
        )
        device = old_apps.get_model("otp_static", "StaticDevice").objects.create(
            user_id=user.pk, name="recovery codes", confirmed=True
        )
        token_model = old_apps.get_model("otp_static", "StaticToken")
        token_model.objects.create(device_id=device.pk, token="abcdefghij")
        executor = MigrationExecutor(connection)
        executor.migrate(after)
        new_apps = executor.loader.project_state(after).apps
        stored = new_apps.get_model("otp_static", "StaticToken").objects.get(device_id=device.pk)
        assert stored.token == two_factor.recovery_code_digest("abcdefghij")
    finally:
        MigrationExecutor(connection).migrate(latest)
    person = User.objects.get(pk=user.pk)
    result = two_factor.two_factor_verify(
        principal=Principal(user=person), user=person, code="abcde-fghij"
    )
    assert result.device is not None
