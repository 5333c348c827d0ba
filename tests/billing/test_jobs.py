"""Billing jobs: queued by name after commit, run by the billing queue's registered tasks."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import pytest
from django.db import transaction

from accounts.models import Organization
from billing import jobs, tasks, wallet_keys
from billing.models import BillingAccount
from core.celery_app import app
from tests.factories import OrganizationFactory

pytestmark = pytest.mark.django_db


@pytest.mark.parametrize(
    "name",
    [jobs.WALLET_SYNC_ORGANIZATION, jobs.WALLET_SYNC_ALL, jobs.BUDGETS_EVALUATE_ORGANIZATION],
)
def test_every_job_names_a_registered_task_of_the_billing_queue(name: str) -> None:
    assert app.tasks[name].queue == jobs.QUEUE == "billing"


def test_a_job_runs_once_its_transaction_commits_and_not_after_a_rollback(
    monkeypatch: pytest.MonkeyPatch,
    django_capture_on_commit_callbacks: Callable[..., Any],
) -> None:
    org: Organization = OrganizationFactory()
    synced: list[str] = []
    monkeypatch.setattr(tasks, "wallet_sync", lambda o: synced.append(o.id))

    with (
        django_capture_on_commit_callbacks(execute=True) as rolled_back,
        contextlib.suppress(RuntimeError),
        transaction.atomic(),
    ):
        jobs.queue_wallet_sync(org.id)
        raise RuntimeError("rolled back")
    with django_capture_on_commit_callbacks(execute=True) as committed:
        jobs.queue_wallet_sync(org.id)
        assert synced == []  # not before the commit

    assert (len(rolled_back), len(committed)) == (0, 1)
    assert synced == [org.id]


def test_the_wallets_unlimited_mode_is_the_billing_accounts() -> None:
    # The admission script skips the money check for this `mode`; wallet_sync writes it.
    assert wallet_keys.UNLIMITED == BillingAccount.Mode.UNLIMITED
