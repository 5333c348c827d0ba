"""Budgets: this month's spend, alerts recorded once per threshold, refused bad budgets."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from django.utils import timezone

from accounts.models import AuditLog, Organization
from accounts.principal import Principal
from billing.budgets import BudgetSpec, budget_alerts, budgets_evaluate, budgets_set
from billing.models import Budget, BudgetAlert
from billing.periods import hour_start
from core.errors import InvalidInput, NotFound
from tests.billing.factories import CHAT, at, price_book, usage
from tests.factories import OrganizationFactory, UserFactory, default_project

pytestmark = pytest.mark.django_db


@pytest.fixture
def org() -> Organization:
    price_book(CHAT, input_price="1", output_price="2")
    return OrganizationFactory()


@pytest.fixture
def owner(org: Organization) -> Principal:
    return Principal(user=org.memberships.get().user)


def spend_now(org: Organization, dollars: int, **kwargs: Any) -> None:
    usage(org, hour_start(timezone.now()), input_tokens=dollars * 1_000_000, **kwargs)


def test_alerts_are_recorded_once_per_threshold(org: Organization, owner: Principal) -> None:
    budgets_set(
        principal=owner,
        org=org,
        specs=[BudgetSpec(monthly_amount="10.00", alert_thresholds=[50, 80, 100])],
    )
    usage(org, at(9, 3), input_tokens=50_000_000)  # last months' spend does not count
    spend_now(org, 6)

    first = budgets_evaluate(org=org)
    again = budgets_evaluate(org=org)
    spend_now(org, 3, api_key_id="key_more")
    third = budgets_evaluate(org=org)

    assert [(a.threshold, a.spend) for a in first] == [(50, Decimal("6.00"))]
    assert again == []
    assert [(a.threshold, a.spend) for a in third] == [(80, Decimal("9.00"))]
    assert [a.threshold for a in budget_alerts(org)] == [80, 50]


def test_a_project_budget_counts_only_its_project(org: Organization, owner: Principal) -> None:
    project = default_project(org)
    other = org.projects.create(name="batch jobs")
    budgets_set(
        principal=owner,
        org=org,
        specs=[BudgetSpec(project_id=project.id, monthly_amount="2", alert_thresholds=[100])],
    )
    spend_now(org, 5, project_id=other.id)
    assert budgets_evaluate(org=org) == []

    spend_now(org, 2, project_id=project.id)
    alerts = budgets_evaluate(org=org)

    assert [(a.project_id, a.threshold, a.spend) for a in alerts] == [
        (project.id, 100, Decimal("2.00"))
    ]


def test_updating_budgets_keeps_them_and_their_alerts(org: Organization, owner: Principal) -> None:
    [budget] = budgets_set(principal=owner, org=org, specs=[BudgetSpec(monthly_amount="10")])
    spend_now(org, 6)
    budgets_evaluate(org=org)

    [updated] = budgets_set(
        principal=owner, org=org, specs=[BudgetSpec(monthly_amount="12", hard_limit=True)]
    )

    assert updated.id == budget.id
    assert (updated.monthly_amount, updated.hard_limit) == (Decimal("12.00"), True)
    assert budgets_evaluate(org=org) == []  # 50% was already announced this month
    assert BudgetAlert.objects.filter(budget=budget).count() == 1
    audit = AuditLog.objects.filter(action="billing.budgets_set").latest("id")
    assert audit.metadata["after"][0]["monthly_amount"] == "12.00"


def test_an_empty_list_removes_every_budget(org: Organization, owner: Principal) -> None:
    budgets_set(principal=owner, org=org, specs=[BudgetSpec(monthly_amount="10")])

    assert budgets_set(principal=owner, org=org, specs=[]) == []

    assert not Budget.objects.filter(organization=org).exists()


BAD: list[tuple[list[dict[str, Any]], str, type[Exception]]] = [
    ([{"monthly_amount": "0"}], "budgets.0.monthly_amount", InvalidInput),
    ([{"monthly_amount": "-1"}], "budgets.0.monthly_amount", InvalidInput),
    ([{"monthly_amount": "1.234"}], "budgets.0.monthly_amount", InvalidInput),
    (
        [{"monthly_amount": "1", "alert_thresholds": [0]}],
        "budgets.0.alert_thresholds",
        InvalidInput,
    ),
    (
        [{"monthly_amount": "1", "alert_thresholds": [50, 50]}],
        "budgets.0.alert_thresholds",
        InvalidInput,
    ),
    ([{"monthly_amount": "1"}, {"monthly_amount": "2"}], "budgets.1.project_id", InvalidInput),
    ([{"monthly_amount": "1", "project_id": "proj_nowhere"}], "budgets.0.project_id", NotFound),
]


@pytest.mark.parametrize(("specs", "param", "error"), BAD)
def test_bad_budgets_are_refused_and_nothing_changes(
    org: Organization,
    owner: Principal,
    specs: list[dict[str, Any]],
    param: str,
    error: type[Exception],
) -> None:
    budgets_set(principal=owner, org=org, specs=[BudgetSpec(monthly_amount="99")])
    before = (list(Budget.objects.values()), AuditLog.objects.count())

    with pytest.raises(error) as raised:
        budgets_set(principal=owner, org=org, specs=[BudgetSpec(**s) for s in specs])

    assert raised.value.param == param  # type: ignore[attr-defined]
    assert (list(Budget.objects.values()), AuditLog.objects.count()) == before


def test_another_organizations_project_is_not_found(org: Organization, owner: Principal) -> None:
    other = OrganizationFactory(owner=UserFactory())

    with pytest.raises(NotFound):
        budgets_set(
            principal=owner,
            org=org,
            specs=[BudgetSpec(project_id=default_project(other).id, monthly_amount="5")],
        )

    assert not Budget.objects.exists()
