"""Usage page: tokens and cost by day, model, key and project from the hourly rollups; CSV."""

from __future__ import annotations

import csv
import io
from datetime import timedelta
from decimal import Decimal

import pytest
from django.utils import timezone

from accounts import services
from accounts.models import ApiKey, Project
from accounts.permissions import Role
from accounts.principal import SYSTEM
from console.selectors import usage_report
from tests.billing.factories import CHAT, EMBED, PriceFactory, at, price_book, usage
from tests.conftest import OrgWorld
from tests.console.support import org_url
from tests.core.test_csv_export import FORMULA_NAMES
from tests.factories import default_project, make_api_key

pytestmark = pytest.mark.django_db

RANGE = {"start": "2026-03-01", "end": "2026-03-03"}


@pytest.fixture
def usage_world(world: OrgWorld, other_world: OrgWorld) -> OrgWorld:
    """Chat at $1/$2 and embeddings at $0.5 per million; two keys in two projects."""
    price_book(CHAT, "1", "2")
    price_book(EMBED, "0.5", "0.5")
    mobile = services.project_create(principal=SYSTEM, org=world.org, name="Mobile")
    web, _ = make_api_key(world.org)
    app, _ = make_api_key(world.org, project=mobile)
    web.name, app.name = "web", "app"
    web.save(update_fields=["name"])
    app.save(update_fields=["name"])
    usage(world.org, at(3, 1, 9), input_tokens=1_000, output_tokens=500, api_key_id=web.id)
    usage(world.org, at(3, 1, 10), input_tokens=2_000, output_tokens=0, api_key_id=web.id)
    usage(
        world.org, at(3, 3, 23), input_tokens=4_000, model=EMBED, api_key_id=app.id,
        project_id=mobile.id, requests=4,
    )  # fmt: skip
    # Outside the range, and another organization's: neither may show.
    usage(world.org, at(3, 4, 0), input_tokens=99_999, api_key_id=web.id)
    usage(other_world.org, at(3, 2, 12), input_tokens=77_777, output_tokens=1)
    world.keys = {"web": web, "app": app}  # type: ignore[attr-defined]
    world.mobile = mobile  # type: ignore[attr-defined]
    return world


def test_by_day_includes_empty_days_and_exact_costs(usage_world: OrgWorld) -> None:
    from datetime import date

    report = usage_report(
        usage_world.org, start=date(2026, 3, 1), end=date(2026, 3, 3), dimension="day"
    )
    rows = [(r.label, r.requests, r.input_tokens, r.output_tokens, r.cost) for r in report.rows]
    assert rows == [
        ("2026-03-01", 2, 3_000, 500, Decimal("0.004")),  # 3000 at $1/M + 500 at $2/M
        ("2026-03-02", 0, 0, 0, Decimal(0)),
        ("2026-03-03", 4, 4_000, 0, Decimal("0.002")),
    ]
    assert (report.total.requests, report.total.total_tokens, report.total.cost) == (
        6,
        7_500,
        Decimal("0.006"),
    )


@pytest.mark.parametrize(
    ("group", "expected"),
    [
        # Most tokens first.
        ("model", [(EMBED, 4_000, Decimal("0.002")), (CHAT, 3_500, Decimal("0.004"))]),
        ("key", [("app", 4_000, Decimal("0.002")), ("web", 3_500, Decimal("0.004"))]),
        (
            "project",
            [("Mobile", 4_000, Decimal("0.002")), ("Default project", 3_500, Decimal("0.004"))],
        ),
    ],
)
def test_by_model_key_and_project(
    usage_world: OrgWorld, group: str, expected: list[tuple[str, int, Decimal]]
) -> None:
    response = usage_world.client_for(Role.VIEWER).get(
        org_url("console-usage", usage_world.org.id), {**RANGE, "group": group}
    )
    assert response.status_code == 200
    report = response.context["report"]
    got = [(r.label.split(" (")[0], r.total_tokens, r.cost) for r in report.rows]
    assert got == expected
    assert "77777" not in response.content.decode() and "99999" not in response.content.decode()


def test_project_filter(usage_world: OrgWorld) -> None:
    response = usage_world.client_for(Role.BILLING).get(
        org_url("console-usage", usage_world.org.id),
        {**RANGE, "group": "model", "project": usage_world.mobile.id},  # type: ignore[attr-defined]
    )
    report = response.context["report"]
    assert [(r.label, r.input_tokens) for r in report.rows] == [(EMBED, 4_000)]


def test_another_organizations_project_filter_is_404(
    usage_world: OrgWorld, other_world: OrgWorld
) -> None:
    response = usage_world.client_for(Role.OWNER).get(
        org_url("console-usage", usage_world.org.id),
        {**RANGE, "project": default_project(other_world.org).id},
    )
    assert response.status_code == 404


def test_csv_export(usage_world: OrgWorld) -> None:
    response = usage_world.client_for(Role.VIEWER).get(
        org_url("console-usage-csv", usage_world.org.id), {**RANGE, "group": "day"}
    )
    assert response.status_code == 200
    assert response["Content-Type"] == "text/csv"
    assert response["Content-Disposition"] == (
        f'attachment; filename="usage-{usage_world.org.id}-2026-03-01-2026-03-03-by-day.csv"'
    )
    rows = list(csv.reader(io.StringIO(response.content.decode())))
    # batch_*, priority_* and flex_* columns: no batch lines, priority or flex requests here
    no_batch = ["0", "0", "0", "0", "0.000000000", *["0", "0", "0.000000000"] * 2]
    assert rows == [
        ["day", "id", "requests", "input_tokens", "output_tokens", "total_tokens", "cost_usd",
         "unpriced_tokens", "cached_input_tokens", "batch_requests", "batch_input_tokens",
         "batch_output_tokens", "batch_cached_input_tokens", "batch_cost_usd",
         "priority_requests", "priority_tokens", "priority_cost_usd", "flex_requests",
         "flex_tokens", "flex_cost_usd"],
        ["2026-03-01", "2026-03-01", "2", "3000", "500", "3500", "0.004000000", "0", "0",
         *no_batch],
        ["2026-03-02", "2026-03-02", "0", "0", "0", "0", "0.000000000", "0", "0", *no_batch],
        ["2026-03-03", "2026-03-03", "4", "4000", "0", "4000", "0.002000000", "0", "0",
         *no_batch],
        ["Total", "total", "6", "7000", "500", "7500", "0.006000000", "0", "0", *no_batch],
    ]  # fmt: skip


def test_cached_input_tokens_on_the_page_and_in_the_csv(world: OrgWorld) -> None:
    # 3,000 input tokens on 03-01, 2,000 of them from the prefix cache, at $0.25/M cached.
    price_book(CHAT, "1", "2")
    PriceFactory(model_name=CHAT, token_kind="cached_input", unit_price=Decimal("0.25"))
    usage(world.org, at(3, 1, 9), input_tokens=1_000, cached_input_tokens=500, output_tokens=500)
    usage(world.org, at(3, 1, 10), input_tokens=2_000, cached_input_tokens=1_500)
    client = world.client_for(Role.VIEWER)

    page = client.get(org_url("console-usage", world.org.id), {**RANGE, "group": "day"})
    export = client.get(org_url("console-usage-csv", world.org.id), {**RANGE, "group": "day"})

    report = page.context["report"]
    first = report.rows[0]
    assert (first.input_tokens, first.cached_input_tokens, first.output_tokens) == (
        3_000,
        2_000,
        500,
    )
    # 1,000 uncached at $1/M + 2,000 cached at $0.25/M + 500 at $2/M (not 0.004 at $1/M)
    assert first.cost == report.total.cost == Decimal("0.0025")
    assert '<td class="num">2000</td>' in page.content.decode()
    rows = list(csv.DictReader(io.StringIO(export.content.decode())))
    assert [
        (r["day"], r["input_tokens"], r["cached_input_tokens"], r["cost_usd"]) for r in rows
    ] == [
        ("2026-03-01", "3000", "2000", "0.002500000"),
        ("2026-03-02", "0", "0", "0.000000000"),
        ("2026-03-03", "0", "0", "0.000000000"),
        ("Total", "3000", "2000", "0.002500000"),
    ]


@pytest.mark.parametrize("group", ["key", "project", "model"])
def test_csv_export_defuses_names_a_spreadsheet_would_run(world: OrgWorld, group: str) -> None:
    """Key, project and model names are the customer's; in the CSV each is text that a
    spreadsheet shows, never a formula it runs (core/csv_export.py)."""
    prefixes = {}
    for n, name in enumerate(FORMULA_NAMES):
        project = services.project_create(principal=SYSTEM, org=world.org, name=f"p{n}")
        key, _ = make_api_key(world.org, project=project)
        # Named past the services (which strip whitespace): the export relies on no input rule.
        Project.objects.filter(pk=project.pk).update(name=name)
        ApiKey.objects.filter(pk=key.pk).update(name=name)
        prefixes[name] = key.prefix
        usage(
            world.org, at(3, 1, 9), input_tokens=1_000 + n, api_key_id=key.id,
            project_id=project.id, model=name,
        )  # fmt: skip

    response = world.client_for(Role.VIEWER).get(
        org_url("console-usage-csv", world.org.id), {**RANGE, "group": group}
    )

    assert response.status_code == 200
    rows = list(csv.reader(io.StringIO(response.content.decode(), newline="")))
    labels = sorted(row[0] for row in rows[1:-1])
    suffix = {"key": lambda name: f" ({prefixes[name]}…)"}.get(group, lambda name: "")
    assert labels == sorted(f"'{name}{suffix(name)}" for name in FORMULA_NAMES)
    assert rows[-1][0] == "Total"
    assert len(rows) == 1 + len(FORMULA_NAMES) + 1  # no name broke its row in two


def test_unpriced_usage_is_counted_not_charged_and_said(world: OrgWorld) -> None:
    usage(world.org, at(3, 1, 9), input_tokens=10, model="no-price-model")
    response = world.client_for(Role.OWNER).get(
        org_url("console-usage", world.org.id), {**RANGE, "group": "model"}
    )
    report = response.context["report"]
    assert [(r.label, r.input_tokens, r.cost, r.unpriced_tokens) for r in report.rows] == [
        ("no-price-model", 10, Decimal(0), 10)
    ]
    assert "no-price-model has no price yet" in response.content.decode()


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"start": "2026-03-05", "end": "2026-03-01"}, "the start date must not be after"),
        ({"start": "2024-01-01", "end": "2026-03-01"}, "a range may span at most 366 days"),
        ({"start": "yesterday"}, "start: Enter a valid date."),
        ({"group": "hour"}, "group: Select a valid choice."),
    ],
)
def test_bad_range_is_400_naming_the_problem(
    world: OrgWorld, params: dict[str, str], message: str
) -> None:
    response = world.client_for(Role.OWNER).get(org_url("console-usage", world.org.id), params)
    assert response.status_code == 400
    assert message in response.content.decode()
    csv_response = world.client_for(Role.OWNER).get(
        org_url("console-usage-csv", world.org.id), params
    )
    assert csv_response.status_code == 400


def test_htmx_gets_only_the_report(usage_world: OrgWorld) -> None:
    response = usage_world.client_for(Role.OWNER).get(
        org_url("console-usage", usage_world.org.id), RANGE, HTTP_HX_REQUEST="true"
    )
    body = response.content.decode()
    assert "<html" not in body
    assert 'id="usage-table"' in body
    assert 'id="usage-chart"' in body


def test_the_date_inputs_show_the_range_reported_also_by_default(world: OrgWorld) -> None:
    client = world.client_for(Role.OWNER)
    today = timezone.now().date()
    body = client.get(org_url("console-usage", world.org.id)).content.decode()
    week_ago = (today - timedelta(days=6)).isoformat()
    assert f'name="start" value="{week_ago}"' in body
    assert f'name="end" value="{today.isoformat()}"' in body
    # The CSV link asks for the same range.
    assert f"start={week_ago}&amp;end={today.isoformat()}" in body
    body = client.get(org_url("console-usage", world.org.id), RANGE).content.decode()
    assert 'name="start" value="2026-03-01"' in body and 'name="end" value="2026-03-03"' in body
