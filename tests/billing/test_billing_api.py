"""The billing management API: reads, budget writes, the role matrix, other-org 404s."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import pytest
from django.test import Client
from django.utils import timezone

from accounts.models import AuditLog
from accounts.permissions import Role
from billing.invoicing import invoice_finalize, invoice_refresh_draft
from billing.models import Budget, BudgetAlert, Invoice
from billing.periods import hour_start
from tests.billing.factories import CHAT, GrantFactory, at, price_book, staff_principal, usage
from tests.conftest import OrgWorld
from tests.factories import default_project

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _prices() -> None:
    price_book(CHAT, input_price="1", output_price="2")


def call(client: Client, method: str, path: str, body: Any = None) -> Any:
    kwargs: dict[str, Any] = {}
    if body is not None:
        kwargs = {"data": json.dumps(body), "content_type": "application/json"}
    return getattr(client, method)(f"/api/v1{path}", **kwargs)


def billing_path(world: OrgWorld, suffix: str) -> str:
    return f"/organizations/{world.org.id}/billing{suffix}"


def finalized_invoice(world: OrgWorld) -> Invoice:
    usage(world.org, at(9, 3), input_tokens=3_000_000, output_tokens=250_000)
    draft = invoice_refresh_draft(org=world.org, month=at(9))
    assert draft is not None
    return invoice_finalize(principal=staff_principal(), invoice=draft)


# --- reads ------------------------------------------------------------------------------------


def test_balance_shows_the_ledger_and_this_months_spend(world: OrgWorld) -> None:
    GrantFactory(organization=world.org, amount=Decimal("12.50"))
    usage(world.org, hour_start(timezone.now()), input_tokens=1_500_000)

    body = call(world.client_for(Role.BILLING), "get", billing_path(world, "/balance")).json()

    assert body == {
        "currency": "USD",
        "mode": "postpaid",
        "balance": "12.50",
        "available": "12.50",
        "month": f"{timezone.now():%Y-%m}",
        "month_spend": "1.50",
    }


def test_credit_ledger_lists_entries_newest_first(world: OrgWorld) -> None:
    older = GrantFactory(organization=world.org, amount=Decimal("1.00"), created_at=at(1))
    newer = GrantFactory(
        organization=world.org, amount=Decimal("2.00"), kind="promotional", created_at=at(2)
    )

    body = call(world.client_for(Role.OWNER), "get", billing_path(world, "/credits")).json()

    assert [(e["id"], e["kind"], e["amount"]) for e in body] == [
        (newer.id, "promotional", "2.00"),
        (older.id, "prepaid_purchase", "1.00"),
    ]


def test_invoices_list_and_detail_with_lines(world: OrgWorld) -> None:
    invoice = finalized_invoice(world)
    client = world.client_for(Role.BILLING)

    listed = call(client, "get", billing_path(world, "/invoices")).json()
    detail = call(client, "get", billing_path(world, f"/invoices/{invoice.id}")).json()

    assert [(i["id"], i["number"], i["status"], i["total"]) for i in listed] == [
        (invoice.id, invoice.number, "finalized", "3.50")
    ]
    assert "lines" not in listed[0]
    assert detail["subtotal"] == "3.50"
    assert detail["lines"] == [
        {
            "kind": "usage",
            "label": "chat-small input tokens",
            "usage_month": "2026-09-01",
            "model_name": CHAT,
            "token_kind": "input",
            "quantity": 3_000_000,
            "unit_price": "1.000000000",
            "amount": "3.00",
        },
        {
            "kind": "usage",
            "label": "chat-small output tokens",
            "usage_month": "2026-09-01",
            "model_name": CHAT,
            "token_kind": "output",
            "quantity": 250_000,
            "unit_price": "2.000000000",
            "amount": "0.50",
        },
    ]


def test_put_budgets_then_get_them_with_this_months_spend(world: OrgWorld) -> None:
    project = default_project(world.org)
    usage(world.org, hour_start(timezone.now()), input_tokens=2_000_000, project_id=project.id)
    client = world.client_for(Role.BILLING)

    put = call(
        client,
        "put",
        billing_path(world, "/budgets"),
        {
            "budgets": [
                {"monthly_amount": "100.00", "alert_thresholds": [90, 50], "hard_limit": True},
                {"project_id": project.id, "monthly_amount": "2.5"},
            ]
        },
    )
    got = call(client, "get", billing_path(world, "/budgets")).json()

    assert put.status_code == 200, put.content
    assert [
        (
            b["project_id"],
            b["monthly_amount"],
            b["alert_thresholds"],
            b["hard_limit"],
            b["month_spend"],
        )
        for b in got
    ] == [
        (None, "100.00", [50, 90], True, "2.00"),
        (project.id, "2.50", [50, 80, 100], False, "2.00"),
    ]
    assert AuditLog.objects.filter(
        action="billing.budgets_set", actor_user=world.users[Role.BILLING]
    ).exists()


def test_alerts_are_listed_for_the_console(world: OrgWorld) -> None:
    budget = Budget.objects.create(
        organization=world.org, monthly_amount=Decimal("10"), alert_thresholds=[50]
    )
    BudgetAlert.objects.create(
        organization=world.org,
        budget=budget,
        month=at(11).date(),
        threshold=50,
        budget_amount=Decimal("10"),
        spend=Decimal("5.01"),
    )

    body = call(world.client_for(Role.BILLING), "get", billing_path(world, "/alerts")).json()

    assert [(a["month"], a["threshold"], a["spend"], a["project_id"]) for a in body] == [
        ("2026-11", 50, "5.01", None)
    ]


# --- permissions ------------------------------------------------------------------------------

READS = ["/balance", "/credits", "/invoices", "/budgets", "/alerts"]


@pytest.mark.parametrize("suffix", READS)
@pytest.mark.parametrize(
    ("role", "status"),
    [
        (Role.OWNER, 200),
        (Role.ADMIN, 200),
        (Role.BILLING, 200),
        (Role.DEVELOPER, 403),
        (Role.VIEWER, 403),
    ],
)
def test_reads_need_billing_view(world: OrgWorld, suffix: str, role: Role, status: int) -> None:
    response = call(world.client_for(role), "get", billing_path(world, suffix))
    assert response.status_code == status, response.content


@pytest.mark.parametrize(
    ("role", "status"),
    [
        (Role.OWNER, 200),
        (Role.BILLING, 200),
        (Role.ADMIN, 403),  # admins run the organization but do not move money
        (Role.DEVELOPER, 403),
        (Role.VIEWER, 403),
    ],
)
def test_budget_writes_need_billing_manage(world: OrgWorld, role: Role, status: int) -> None:
    response = call(
        world.client_for(role),
        "put",
        billing_path(world, "/budgets"),
        {"budgets": [{"monthly_amount": "10"}]},
    )
    assert response.status_code == status
    assert Budget.objects.filter(organization=world.org).exists() == (status == 200)


def test_admin_key_reads_billing_but_cannot_set_budgets(world: OrgWorld) -> None:
    client = world.key_client()
    assert call(client, "get", billing_path(world, "/balance")).status_code == 200
    put = call(
        client, "put", billing_path(world, "/budgets"), {"budgets": [{"monthly_amount": "1"}]}
    )
    assert put.status_code == 403
    assert not Budget.objects.exists()


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"budgets": [{"monthly_amount": "-1"}]}, "budgets.0.monthly_amount"),
        ({"budgets": [{"monthly_amount": "1.001"}]}, "budgets.0.monthly_amount"),
        ({"budgets": [{"monthly_amount": "ten"}]}, "budgets.0.monthly_amount"),
        (
            {"budgets": [{"monthly_amount": "1", "alert_thresholds": [5000]}]},
            "budgets.0.alert_thresholds",
        ),
        ({"budgets": [{"monthly_amount": "1", "hard": True}]}, "budgets.0.hard"),
        ({"budgets": [{"monthly_amount": "1"}, {"monthly_amount": "1"}]}, "budgets.1.project_id"),
        ({}, "budgets"),
    ],
)
def test_bad_budgets_are_400_naming_the_field_and_nothing_is_written(
    world: OrgWorld, body: dict[str, Any], param: str
) -> None:
    before = (Budget.objects.count(), AuditLog.objects.count())

    response = call(world.client_for(Role.OWNER), "put", billing_path(world, "/budgets"), body)

    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert error["param"] == param
    assert param.split(".")[-1] in error["message"]
    assert (Budget.objects.count(), AuditLog.objects.count()) == before


# --- another organization's ids are 404 ---------------------------------------------------------

CROSS_ORG = [
    ("get", "/organizations/{org}/billing/balance", None),
    ("get", "/organizations/{org}/billing/credits", None),
    ("get", "/organizations/{org}/billing/invoices", None),
    ("get", "/organizations/{mine}/billing/invoices/{invoice}", None),
    ("get", "/organizations/{org}/billing/invoices/{invoice}", None),
    ("get", "/organizations/{org}/billing/budgets", None),
    ("put", "/organizations/{org}/billing/budgets", {"budgets": []}),
    (
        "put",
        "/organizations/{mine}/billing/budgets",
        {"budgets": [{"project_id": "{project}", "monthly_amount": "1"}]},
    ),
    ("get", "/organizations/{org}/billing/alerts", None),
]


@pytest.mark.parametrize(("method", "template", "body"), CROSS_ORG)
@pytest.mark.parametrize("as_key", [False, True], ids=["session", "admin-key"])
def test_other_organizations_ids_are_404(
    world: OrgWorld, other_world: OrgWorld, method: str, template: str, body: Any, as_key: bool
) -> None:
    theirs = finalized_invoice(other_world)
    Budget.objects.create(organization=other_world.org, monthly_amount=Decimal("5"))
    ids = {
        "mine": world.org.id,
        "org": other_world.org.id,
        "invoice": theirs.id,
        "project": default_project(other_world.org).id,
    }
    path = template.format(**ids)
    if body is not None:
        body = json.loads(json.dumps(body).replace("{project}", ids["project"]))
    client = world.key_client() if as_key else world.client_for(Role.OWNER)
    if as_key and method == "put" and "{mine}" in template:
        client = world.client_for(Role.OWNER)  # a key may not write budgets at all (403)
    before = (list(Budget.objects.values()), AuditLog.objects.count())

    response = call(client, method, path, body)

    assert response.status_code == 404, response.content
    assert (list(Budget.objects.values()), AuditLog.objects.count()) == before
