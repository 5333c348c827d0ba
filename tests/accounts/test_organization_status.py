"""Suspending an organization refuses its keys at every gateway at once; reactivating restores."""

from __future__ import annotations

from typing import Any

import pytest

from accounts import keys, services
from accounts.models import ApiKey, AuditLog, Organization
from accounts.principal import SYSTEM
from core.errors import InvalidInput
from core.redis import get_redis
from tests.conftest import OrgWorld
from tests.factories import make_api_key

pytestmark = pytest.mark.django_db

STATUS_ACTIONS = ("organization.suspended", "organization.reactivated")


def cached(key: ApiKey) -> keys.KeyIdentity:
    raw = get_redis().get(keys.cache_key(key.digest))
    assert raw is not None, "the key has no cache entry"
    return keys.KeyIdentity.from_json(str(raw))


def test_suspension_rewrites_every_key_cache_entry(
    world: OrgWorld, django_capture_on_commit_callbacks: Any
) -> None:
    second, _ = make_api_key(world.org)
    get_redis().flushdb()  # no entries at all: the suspension must write them, not just patch

    with django_capture_on_commit_callbacks(execute=True):
        org = services.organization_set_status(
            principal=SYSTEM, org=world.org, status="suspended", reason="unpaid invoices"
        )

    assert org.status == Organization.Status.SUSPENDED
    assert Organization.objects.get(pk=world.org.pk).status == "suspended"
    for key in (world.admin_key, second):
        identity = cached(key)
        assert identity.organization_active is False
        assert identity.usable() is False
    entry = AuditLog.objects.get(action="organization.suspended")
    assert entry.organization_id == world.org.id
    assert entry.metadata == {"from": "active", "to": "suspended", "reason": "unpaid invoices"}


def test_reactivation_makes_keys_usable_again(
    world: OrgWorld, django_capture_on_commit_callbacks: Any
) -> None:
    with django_capture_on_commit_callbacks(execute=True):
        services.organization_set_status(
            principal=SYSTEM, org=world.org, status="suspended", reason="unpaid"
        )
    with django_capture_on_commit_callbacks(execute=True):
        services.organization_set_status(
            principal=SYSTEM, org=world.org, status="active", reason="paid"
        )

    identity = cached(world.admin_key)
    assert identity.organization_active is True
    assert identity.usable() is True
    assert sorted(
        AuditLog.objects.filter(action__in=STATUS_ACTIONS).values_list("action", flat=True)
    ) == ["organization.reactivated", "organization.suspended"]


def test_other_organizations_keys_are_untouched(
    world: OrgWorld, other_world: OrgWorld, django_capture_on_commit_callbacks: Any
) -> None:
    with django_capture_on_commit_callbacks(execute=True):
        services.organization_set_status(
            principal=SYSTEM, org=world.org, status="suspended", reason="unpaid"
        )

    assert cached(world.admin_key).organization_active is False
    assert get_redis().get(keys.cache_key(other_world.admin_key.digest)) is None


def test_revoked_keys_stay_revoked(
    world: OrgWorld, django_capture_on_commit_callbacks: Any
) -> None:
    services.api_key_revoke(principal=SYSTEM, key=world.admin_key)
    with django_capture_on_commit_callbacks(execute=True):
        services.organization_set_status(
            principal=SYSTEM, org=world.org, status="suspended", reason="unpaid"
        )
    with django_capture_on_commit_callbacks(execute=True):
        services.organization_set_status(
            principal=SYSTEM, org=world.org, status="active", reason="paid"
        )

    identity = cached(world.admin_key)
    assert identity.revoked is True
    assert identity.usable() is False


def test_same_status_records_nothing(
    world: OrgWorld, django_capture_on_commit_callbacks: Any
) -> None:
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        services.organization_set_status(
            principal=SYSTEM, org=world.org, status="active", reason="no-op"
        )

    assert callbacks == []
    assert not AuditLog.objects.filter(action__in=STATUS_ACTIONS).exists()


@pytest.mark.parametrize(
    ("status", "reason", "param"),
    [("closed", "why", "status"), ("suspended", "   ", "reason")],
)
def test_bad_input_changes_nothing(world: OrgWorld, status: str, reason: str, param: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        services.organization_set_status(
            principal=SYSTEM, org=world.org, status=status, reason=reason
        )

    assert caught.value.param == param
    assert Organization.objects.get(pk=world.org.pk).status == "active"
    assert not AuditLog.objects.filter(action="organization.suspended").exists()
