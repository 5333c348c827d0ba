"""The usage and cost API: GET /api/v1/organizations/{org}/usage and /costs.

Who may read (the read-usage scope, enforced; billing view for people; another
organization's key gets 404), the buckets and groups, paging by cursor, the bounds on
every parameter, and costs equal to the invoice of a closed month (usage through the
real drain, the invoice finalized by the invoicing service).
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any
from urllib.parse import urlencode

import pytest
from django.test import Client
from django.utils import timezone

from accounts import services
from accounts.models import Membership
from accounts.permissions import Role
from accounts.principal import SYSTEM
from billing import usage_buckets
from billing.invoicing import invoice_finalize, invoice_refresh_draft
from billing.metering.drain import usage_drain
from billing.models import InvoiceLine, ProvisionedCommitment
from billing.money import exact_amount, round_cents
from billing.periods import month_start, next_month, previous_month
from billing.usage_buckets import UNIT_HOURS
from catalog.services import endpoint_create
from core.redis import get_redis
from tests.billing.factories import (
    CHAT,
    EMBED,
    PriceFactory,
    at,
    price_book,
    staff_principal,
    usage,
)
from tests.billing.metering_support import UsageEventFactory, emit
from tests.conftest import OrgWorld
from tests.factories import (
    UNSERVED_ENCODER,
    default_project,
    make_api_key,
    make_model_version,
    make_pool,
)

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _prices() -> None:
    price_book(CHAT, input_price="1", output_price="2")
    price_book(EMBED, input_price="0.5", output_price="0.5")


def ts(when: datetime) -> int:
    return int(when.timestamp())


def get(client: Client, world: OrgWorld, what: str, **params: Any) -> Any:
    query = urlencode(params, doseq=True)
    return client.get(f"/api/v1/organizations/{world.org.id}/{what}?{query}")


def key_client(secret: str) -> Client:
    return Client(headers={"authorization": f"Bearer {secret}"})


def read_usage_client(world: OrgWorld, role: Role = Role.OWNER) -> Client:
    _, secret = make_api_key(world.org, scopes=["read-usage"], by=world.users[role])
    return key_client(secret)


def ok(response: Any) -> Any:
    assert response.status_code == 200, response.content
    return response.json()


def error(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.content
    err: dict[str, Any] = response.json()["error"]
    return err


def commitment(
    world: OrgWorld, *, units: int, starts_at: datetime, ends_at: datetime, price: str
) -> ProvisionedCommitment:
    """Provisioned units sold in the past (written directly: the service refuses past
    hours, as tests/billing/test_provisioned.py does)."""
    version = make_model_version(world.org, UNSERVED_ENCODER, model_name=f"enc-{world.org.id}")
    endpoint = endpoint_create(
        principal=SYSTEM,
        org=world.org,
        name="enc",
        model_version_id=version.id,
        pool=make_pool("prov-pool").name,
    )
    row: ProvisionedCommitment = ProvisionedCommitment.objects.create(
        organization=world.org,
        endpoint=endpoint,
        model_name=CHAT,
        units=units,
        tokens_per_minute_per_unit=600,
        unit_hour_price=Decimal(price),
        reason="test",
        starts_at=starts_at,
        ends_at=ends_at,
    )
    return row


# --- who may read ---------------------------------------------------------------------------


def test_an_inference_only_key_is_refused_naming_the_read_usage_scope(world: OrgWorld) -> None:
    _, secret = make_api_key(world.org, scopes=["inference"], by=world.users[Role.OWNER])
    start = ts(at(10, 1))

    for what in ("usage", "costs"):
        err = error(get(key_client(secret), world, what, start_time=start), 403)

        assert "read-usage" in err["message"]
        assert err["code"] == "permission_denied"


def test_a_read_usage_key_reads_usage_and_costs(world: OrgWorld) -> None:
    usage(world.org, at(10, 2, 5), input_tokens=1_000_000, output_tokens=500_000)
    client = read_usage_client(world, Role.DEVELOPER)
    params = {"start_time": ts(at(10, 1)), "end_time": ts(at(10, 4)), "bucket_width": "1d"}

    used = ok(get(client, world, "usage", **params))
    cost = ok(get(client, world, "costs", **params))

    assert used["object"] == "page" and used["has_more"] is False
    assert [len(b["results"]) for b in used["data"]] == [0, 1, 0]
    day = used["data"][1]
    assert (day["object"], day["start_time"], day["end_time"]) == (
        "bucket",
        ts(at(10, 2)),
        ts(at(10, 3)),
    )
    assert day["results"][0] | {"object": None} == {
        "object": None,
        "requests": 1,
        "input_tokens": 1_000_000,
        "output_tokens": 500_000,
        "cached_input_tokens": 0,
        "compute_ms": 0,
        "model": None,
        "project_id": None,
        "api_key_id": None,
        "endpoint_id": None,
        "service_class": None,
    }
    assert cost["data"][1]["results"][0]["amount"] == {"value": "2.00", "currency": "usd"}


def test_an_admin_key_reads_as_the_admin_scope_always_could(world: OrgWorld) -> None:
    body = ok(get(world.key_client(), world, "costs", start_time=ts(at(10, 1)), limit=1))

    assert len(body["data"]) == 1


def test_a_read_usage_key_whose_maker_lost_the_role_carries_nothing(world: OrgWorld) -> None:
    client = read_usage_client(world, Role.DEVELOPER)
    # Demoted behind the service's back: the read itself checks the maker's role now.
    Membership.objects.filter(organization=world.org, user=world.users[Role.DEVELOPER]).update(
        role=Role.VIEWER
    )

    err = error(get(client, world, "usage", start_time=ts(at(10, 1))), 403)

    assert "read-usage" in err["message"]


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
def test_people_need_billing_view(world: OrgWorld, role: Role, status: int) -> None:
    for what in ("usage", "costs"):
        response = get(world.client_for(role), world, what, start_time=ts(at(10, 1)))

        assert response.status_code == status, (what, response.content)


def test_another_organizations_key_or_member_gets_404(
    world: OrgWorld, other_world: OrgWorld
) -> None:
    foreign_key = read_usage_client(other_world)
    foreign_member = other_world.client_for(Role.OWNER)
    foreign_admin_key = other_world.key_client()

    for client in (foreign_key, foreign_member, foreign_admin_key):
        for what in ("usage", "costs"):
            err = error(get(client, world, what, start_time=ts(at(10, 1))), 404)
            assert err["param"] == "organization_id"


def test_no_credentials_or_a_wrong_key_is_401(world: OrgWorld) -> None:
    assert get(Client(), world, "usage", start_time=ts(at(10, 1))).status_code == 401
    wrong = key_client("sk-mantle-" + "x" * 40)
    assert get(wrong, world, "usage", start_time=ts(at(10, 1))).status_code == 401


def test_a_revoked_read_usage_key_is_401(world: OrgWorld) -> None:
    key, secret = make_api_key(world.org, scopes=["read-usage"], by=world.users[Role.OWNER])
    key.revoked_at = timezone.now()
    key.save(update_fields=["revoked_at"])

    assert get(key_client(secret), world, "usage", start_time=ts(at(10, 1))).status_code == 401


# --- buckets and groups ---------------------------------------------------------------------


def test_hour_day_and_month_buckets_sum_the_same_usage(world: OrgWorld) -> None:
    usage(world.org, at(10, 30, 22), input_tokens=10, output_tokens=1)
    usage(world.org, at(10, 31, 23), input_tokens=20, output_tokens=2)
    usage(world.org, at(11, 1, 0), input_tokens=40, output_tokens=4)
    client = read_usage_client(world)

    def totals(width: str, start: datetime, end: datetime, limit: int) -> list[tuple[int, int]]:
        body = ok(
            get(
                client,
                world,
                "usage",
                start_time=ts(start),
                end_time=ts(end),
                bucket_width=width,
                limit=limit,
            )
        )
        return [
            (b["start_time"], sum(r["input_tokens"] for r in b["results"])) for b in body["data"]
        ]

    hours = totals("1h", at(10, 31, 22), at(11, 1, 1), 168)
    days = totals("1d", at(10, 30), at(11, 2), 31)
    months = totals("1mo", at(10, 1), at(12, 1), 13)

    assert hours == [(ts(at(10, 31, 22)), 0), (ts(at(10, 31, 23)), 20), (ts(at(11, 1, 0)), 40)]
    assert days == [(ts(at(10, 30)), 10), (ts(at(10, 31)), 20), (ts(at(11, 1)), 40)]
    assert months == [(ts(at(10, 1)), 30), (ts(at(11, 1)), 40)]


def test_times_are_rounded_out_to_whole_buckets_and_iso_8601_is_accepted(
    world: OrgWorld,
) -> None:
    body = ok(
        get(
            read_usage_client(world),
            world,
            "usage",
            start_time="2026-10-02T05:30:00Z",
            end_time="2026-10-03T00:00:01+00:00",
            bucket_width="1d",
        )
    )

    assert [(b["start_time"], b["end_time"]) for b in body["data"]] == [
        (ts(at(10, 2)), ts(at(10, 3))),
        (ts(at(10, 3)), ts(at(10, 4))),
    ]
    assert body["data"][0]["start_time_iso"].startswith("2026-10-02T00:00:00")


def test_group_by_model_and_project(world: OrgWorld) -> None:
    other = services.project_create(principal=SYSTEM, org=world.org, name="research")
    usage(world.org, at(10, 2, 1), input_tokens=100, model=CHAT)
    usage(world.org, at(10, 2, 2), input_tokens=200, model=CHAT, project_id=other.id)
    usage(world.org, at(10, 2, 3), input_tokens=400, model=EMBED, project_id=other.id)
    client = read_usage_client(world)

    body = ok(
        get(
            client,
            world,
            "usage",
            start_time=ts(at(10, 2)),
            end_time=ts(at(10, 3)),
            group_by="model,project_id",
        )
    )

    found = {(r["model"], r["project_id"]): r["input_tokens"] for r in body["data"][0]["results"]}
    default = default_project(world.org).id
    assert found == {(CHAT, default): 100, (CHAT, other.id): 200, (EMBED, other.id): 400}

    repeated = ok(
        get(
            client,
            world,
            "usage",
            start_time=ts(at(10, 2)),
            end_time=ts(at(10, 3)),
            group_by=["model", "project_id"],
        )
    )
    assert repeated == body


def test_group_by_key_and_endpoint(world: OrgWorld) -> None:
    usage(world.org, at(10, 2, 1), input_tokens=1, api_key_id="key_a", endpoint_id="ep-1")
    usage(world.org, at(10, 2, 1), input_tokens=2, api_key_id="key_b", endpoint_id="ep-1")
    usage(world.org, at(10, 2, 2), input_tokens=4, api_key_id="key_b", endpoint_id="ep-2")
    client = read_usage_client(world)
    window = {"start_time": ts(at(10, 2)), "end_time": ts(at(10, 3))}

    by_key = ok(get(client, world, "usage", group_by="api_key_id", **window))
    by_endpoint = ok(get(client, world, "usage", group_by="endpoint_id", **window))
    by_both = ok(get(client, world, "costs", group_by="api_key_id,endpoint_id", **window))

    assert {r["api_key_id"]: r["input_tokens"] for r in by_key["data"][0]["results"]} == {
        "key_a": 1,
        "key_b": 6,
    }
    assert {r["endpoint_id"]: r["requests"] for r in by_endpoint["data"][0]["results"]} == {
        "ep-1": 2,
        "ep-2": 1,
    }
    assert {
        (r["api_key_id"], r["endpoint_id"]): r["amount"]["value"]
        for r in by_both["data"][0]["results"]
    } == {
        ("key_a", "ep-1"): "0.000001",
        ("key_b", "ep-1"): "0.000002",
        ("key_b", "ep-2"): "0.000004",
    }


def test_usage_by_service_class_splits_the_rollups_parts(world: OrgWorld) -> None:
    usage(
        world.org,
        at(10, 2, 1),
        requests=10,
        input_tokens=1000,
        output_tokens=100,
        cached_input_tokens=300,
        batch_requests=4,
        batch_input_tokens=400,
        batch_output_tokens=40,
        batch_cached_input_tokens=100,
        priority_requests=1,
        priority_input_tokens=50,
        priority_output_tokens=5,
    )

    body = ok(
        get(
            read_usage_client(world),
            world,
            "usage",
            start_time=ts(at(10, 2)),
            end_time=ts(at(10, 3)),
            group_by="service_class",
        )
    )

    found = {
        r["service_class"]: (
            r["requests"],
            r["input_tokens"],
            r["output_tokens"],
            r["cached_input_tokens"],
        )
        for r in body["data"][0]["results"]
    }
    assert found == {
        "online": (5, 550, 55, 200),
        "batch": (4, 400, 40, 100),
        "priority": (1, 50, 5, 0),
    }


def test_costs_by_token_kind_and_service_class_are_the_invoice_line_kinds(
    world: OrgWorld,
) -> None:
    usage(
        world.org,
        at(10, 2, 1),
        input_tokens=3_000_000,
        output_tokens=1_000_000,
        batch_input_tokens=1_000_000,
        priority_output_tokens=500_000,
    )
    client = read_usage_client(world)
    window = {"start_time": ts(at(10, 2)), "end_time": ts(at(10, 3))}

    by_kind = ok(get(client, world, "costs", group_by="token_kind", **window))
    by_class = ok(get(client, world, "costs", group_by="service_class", **window))
    by_kind_alias = ok(get(client, world, "costs", group_by="line_item,model", **window))

    # input: 2M online at 1, batch_input: 1M at the online price (no batch price), output:
    # 0.5M online at 2, priority_output: 0.5M at 2 x 2 (the default priority multiplier).
    assert {r["line_item"]: r["amount"]["value"] for r in by_kind["data"][0]["results"]} == {
        "input": "2.00",
        "batch_input": "1.00",
        "output": "1.00",
        "priority_output": "2.00",
    }
    assert {r["service_class"]: r["amount"]["value"] for r in by_class["data"][0]["results"]} == {
        "online": "3.00",
        "batch": "1.00",
        "priority": "2.00",
    }
    assert {(r["model"], r["line_item"]) for r in by_kind_alias["data"][0]["results"]} == {
        (CHAT, "input"),
        (CHAT, "batch_input"),
        (CHAT, "output"),
        (CHAT, "priority_output"),
    }


def test_costs_rate_each_hour_at_its_own_price_and_leave_unpriced_usage_out(
    world: OrgWorld,
) -> None:
    PriceFactory(model_name=CHAT, token_kind="input", unit_price="3", effective_from=at(10, 2, 2))
    usage(world.org, at(10, 2, 1), input_tokens=1_000_000)  # at 1
    usage(world.org, at(10, 2, 2), input_tokens=1_000_000)  # at 3
    usage(world.org, at(10, 2, 3), input_tokens=1_000_000, model="unpriced-model")

    body = ok(
        get(
            read_usage_client(world),
            world,
            "costs",
            start_time=ts(at(10, 2)),
            end_time=ts(at(10, 3)),
            group_by="model",
        )
    )

    assert [(r["model"], r["amount"]["value"]) for r in body["data"][0]["results"]] == [
        (CHAT, "4.00")
    ]


def test_provisioned_unit_hours_are_costs_of_their_endpoint_bucket_by_bucket(
    world: OrgWorld,
) -> None:
    row = commitment(world, units=3, starts_at=at(10, 1, 20), ends_at=at(10, 3, 2), price="2.5")
    usage(world.org, at(10, 1, 21), input_tokens=1_000_000, provisioned_input_tokens=1_000_000)
    client = read_usage_client(world)

    days = ok(
        get(
            client,
            world,
            "costs",
            start_time=ts(at(10, 1)),
            end_time=ts(at(10, 4)),
            group_by="token_kind,endpoint_id,service_class",
        )
    )
    month = ok(get(client, world, "costs", start_time=ts(at(10, 1)), bucket_width="1mo", limit=1))

    # 4 hours on the 1st, 24 on the 2nd, 2 on the 3rd: 30 hours of 3 units at 2.5.
    assert [
        sorted(
            (r["line_item"], r["endpoint_id"], r["service_class"], r["amount"]["value"])
            for r in b["results"]
        )
        for b in days["data"]
    ] == [
        [
            ("provisioned_input", "ep-test", "provisioned", "0.00"),
            (UNIT_HOURS, row.endpoint_id, "provisioned", "30.00"),
        ],
        [(UNIT_HOURS, row.endpoint_id, "provisioned", "180.00")],
        [(UNIT_HOURS, row.endpoint_id, "provisioned", "15.00")],
    ]
    assert [r["amount"]["value"] for r in month["data"][0]["results"]] == ["225.00"]


def test_filters_keep_the_named_models_projects_keys_and_endpoints(world: OrgWorld) -> None:
    other = services.project_create(principal=SYSTEM, org=world.org, name="research")
    usage(world.org, at(10, 2, 1), input_tokens=1_000_000, api_key_id="key_a", endpoint_id="e1")
    usage(world.org, at(10, 2, 1), input_tokens=2_000_000, api_key_id="key_b", endpoint_id="e2")
    usage(world.org, at(10, 2, 2), input_tokens=4_000_000, model=EMBED, project_id=other.id)
    row = commitment(world, units=1, starts_at=at(10, 2, 5), ends_at=at(10, 2, 7), price="10")
    client = read_usage_client(world)
    window = {"start_time": ts(at(10, 2)), "end_time": ts(at(10, 3))}

    def tokens(**filters: Any) -> int:
        body = ok(get(client, world, "usage", **window, **filters))
        return sum(r["input_tokens"] for r in body["data"][0]["results"])

    def cost(**filters: Any) -> str:
        body = ok(get(client, world, "costs", **window, **filters))
        return ",".join(r["amount"]["value"] for r in body["data"][0]["results"])

    assert tokens() == 7_000_000
    assert tokens(models=EMBED) == 4_000_000
    assert tokens(project_ids=other.id) == 4_000_000
    assert tokens(api_key_ids="key_a,key_b") == 3_000_000
    assert tokens(api_key_ids=["key_b"], endpoint_ids=["e1"]) == 0
    assert tokens(endpoint_ids="e2") == 2_000_000
    # Unit-hours belong to their endpoint and model, never to a project or key.
    assert cost() == "25.00"  # 3 at 1 + 2 x 0.5 + 2 unit-hours at 10
    assert cost(models=CHAT) == "23.00"
    assert cost(endpoint_ids=row.endpoint_id) == "20.00"
    assert cost(api_key_ids="key_a") == "1.00"
    # A cursor is bound to its filters.
    paged = {"start_time": ts(at(10, 1)), "end_time": ts(at(10, 5)), "limit": 1}
    cursor = ok(get(client, world, "usage", **paged, models=CHAT))["next_page"]
    assert ok(get(client, world, "usage", **paged, models=CHAT, page=cursor))["data"]
    err = error(get(client, world, "usage", **paged, models=EMBED, page=cursor), 400)
    assert err["param"] == "page"
    too_many = error(
        get(client, world, "usage", **window, models=[str(n) for n in range(101)]), 400
    )
    assert too_many["param"] == "models"
    nul = error(get(client, world, "costs", **window, api_key_ids="key\x00a"), 400)
    assert nul["param"] == "api_key_ids"


def test_token_kind_groups_costs_only(world: OrgWorld) -> None:
    err = error(
        get(
            read_usage_client(world),
            world,
            "usage",
            start_time=ts(at(10, 1)),
            group_by="token_kind",
        ),
        400,
    )

    assert err["param"] == "group_by" and "costs" in err["message"]


# --- paging -------------------------------------------------------------------------------


def test_the_cursor_walks_every_bucket_once(world: OrgWorld) -> None:
    for day in range(1, 11):
        usage(world.org, at(10, day, 12), input_tokens=day)
    client = read_usage_client(world)
    params: dict[str, Any] = {
        "start_time": ts(at(10, 1)),
        "end_time": ts(at(10, 11)),
        "bucket_width": "1d",
        "limit": 3,
    }

    seen: list[tuple[int, int]] = []
    pages = 0
    cursor = None
    while True:
        body = ok(get(client, world, "usage", **params, **({"page": cursor} if cursor else {})))
        pages += 1
        seen += [(b["start_time"], b["results"][0]["input_tokens"]) for b in body["data"]]
        assert body["has_more"] is (body["next_page"] is not None)
        cursor = body["next_page"]
        if cursor is None:
            break
        assert pages < 10

    assert pages == 4
    assert seen == [(ts(at(10, day)), day) for day in range(1, 11)]
    whole = ok(get(client, world, "usage", **{**params, "limit": 31}))
    assert [(b["start_time"], b["results"][0]["input_tokens"]) for b in whole["data"]] == seen


def test_a_cursor_belongs_to_its_query(world: OrgWorld) -> None:
    client = read_usage_client(world)
    params: dict[str, Any] = {
        "start_time": ts(at(10, 1)),
        "end_time": ts(at(10, 11)),
        "limit": 2,
    }
    cursor = ok(get(client, world, "costs", **params))["next_page"]

    # The limit may change between pages; the query may not.
    later = ok(get(client, world, "costs", **{**params, "limit": 5}, page=cursor))
    assert later["data"][0]["start_time"] == ts(at(10, 3))
    other = error(get(client, world, "costs", **params, page=cursor, group_by="model"), 400)
    garbage = error(get(client, world, "costs", **params, page="not-a-cursor"), 400)
    as_usage = error(get(client, world, "usage", **params, page=cursor), 400)

    assert other["param"] == garbage["param"] == as_usage["param"] == "page"


# --- parameters ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({}, "start_time"),
        ({"start_time": "yesterday"}, "start_time"),
        ({"start_time": "-5"}, "start_time"),
        ({"start_time": str(ts(at(10, 1))), "end_time": "2026-13-01"}, "end_time"),
        ({"start_time": ts(at(10, 2)), "end_time": ts(at(10, 1))}, "end_time"),
        ({"start_time": ts(at(10, 1)), "bucket_width": "1m"}, "bucket_width"),
        ({"start_time": ts(at(10, 1)), "bucket_width": "week"}, "bucket_width"),
        ({"start_time": ts(at(10, 1)), "group_by": "user_id"}, "group_by"),
        ({"start_time": ts(at(10, 1)), "limit": "0"}, "limit"),
        ({"start_time": ts(at(10, 1)), "limit": "32"}, "limit"),
        ({"start_time": ts(at(10, 1)), "limit": "ten"}, "limit"),
        (
            {"start_time": ts(at(10, 1)), "end_time": ts(at(10, 2)), "bucket_width": "1h"}
            | {"limit": "169"},
            "limit",
        ),
        ({"start_time": [ts(at(10, 1)), ts(at(10, 2))]}, "start_time"),
        (
            {"start_time": ts(at(10, 1)), "end_time": ts(at(11, 2)), "bucket_width": "1h"},
            "end_time",
        ),
        (
            {"start_time": ts(at(1, 1)), "end_time": ts(at(1, 3, year=2027)), "bucket_width": "1d"},
            "end_time",
        ),
        (
            {
                "start_time": ts(at(1, 1)),
                "end_time": ts(at(1, 3, year=2027)),
                "bucket_width": "1mo",
            },
            "end_time",
        ),
    ],
)
def test_bad_parameters_are_400_naming_the_parameter(
    world: OrgWorld, params: dict[str, Any], param: str
) -> None:
    client = read_usage_client(world)

    for what in ("usage", "costs"):
        err = error(get(client, world, what, **params), 400)

        assert err["param"] == param, err
        assert param in err["message"]


def test_the_longest_spans_and_pages_are_served(world: OrgWorld) -> None:
    client = read_usage_client(world)

    hours = ok(
        get(
            client,
            world,
            "usage",
            start_time=ts(at(10, 1)),
            end_time=ts(at(11, 1)),
            bucket_width="1h",
            limit=168,
        )
    )
    months = ok(
        get(
            client,
            world,
            "costs",
            start_time=ts(at(1, 1)),
            end_time=ts(at(1, 1, year=2027)),
            bucket_width="1mo",
            limit=13,
        )
    )
    default_days = ok(get(client, world, "usage", start_time=ts(at(1, 1)), end_time=ts(at(3, 1))))

    assert len(hours["data"]) == 168 and hours["has_more"] is True
    assert len(months["data"]) == 12 and months["has_more"] is False
    assert len(default_days["data"]) == 7 and default_days["has_more"] is True


def test_end_time_defaults_to_now(world: OrgWorld) -> None:
    usage(world.org, timezone.now().replace(minute=0, second=0, microsecond=0), input_tokens=7)
    start = timezone.now() - timedelta(hours=2)

    body = ok(
        get(read_usage_client(world), world, "usage", start_time=ts(start), bucket_width="1h")
    )

    assert body["data"][-1]["start_time"] <= time.time() < body["data"][-1]["end_time"]
    assert body["data"][-1]["results"][0]["input_tokens"] == 7


# --- costs equal the invoice of a closed month --------------------------------------------


def test_a_closed_months_costs_equal_its_finalized_invoice(world: OrgWorld) -> None:
    PriceFactory(model_name=CHAT, token_kind="input", unit_price="0.15", effective_from=at(2, 1))
    PriceFactory(model_name=CHAT, token_kind="output", unit_price="0.6", effective_from=at(2, 1))
    PriceFactory(model_name=CHAT, token_kind="cached_input", unit_price="0.075")
    PriceFactory(model_name=CHAT, token_kind="batch_output", unit_price="0.3")
    month = previous_month(month_start(timezone.now()))
    project = default_project(world.org).id
    keys = [make_api_key(world.org, by=world.users[Role.OWNER])[0].id for _ in range(2)]
    # Usage through the real drain: events on the usage stream, across the month's hours,
    # keys, service classes and both models; odd counts so each line has sub-cent parts.
    events = [
        UsageEventFactory(
            organization_id=world.org.id,
            project_id=project,
            api_key_id=keys[i % 2],
            endpoint_id=f"ep-{i % 3}",
            model_name=CHAT if i % 4 else EMBED,
            input_tokens=123_457 * (i + 1),
            output_tokens=9_871 * (i + 2),
            cached_input_tokens=1_001 * i,
            service_class=("online", "batch", "priority", "flex")[i % 4],
            finished_at=(month + timedelta(days=i, hours=i, minutes=7)).timestamp(),
        )
        for i in range(24)
    ]
    emit(get_redis(), events)
    # And provisioned units through two days of the month, at a price of nine places.
    commitment(
        world,
        units=2,
        starts_at=month + timedelta(days=2, hours=5),
        ends_at=month + timedelta(days=4),
        price="1.234567891",
    )
    assert usage_drain(consumer="test", client=get_redis(), once=True, hooks=()).inserted == 24
    draft = invoice_refresh_draft(org=world.org, month=month)
    assert draft is not None
    invoice = invoice_finalize(principal=staff_principal(), invoice=draft)
    lines = list(invoice.lines.all())
    # Usage lines and the unit-hours': no credit, no committed-spend tier, no adjustment.
    assert {line.kind for line in lines} == {InvoiceLine.Kind.USAGE, InvoiceLine.Kind.PROVISIONED}
    assert len(lines) > 6

    def line_item(line: InvoiceLine) -> tuple[str, str]:
        return line.model_name, line.token_kind or UNIT_HOURS

    body = ok(
        get(
            read_usage_client(world),
            world,
            "costs",
            start_time=ts(month),
            end_time=ts(month + timedelta(days=1)),  # rounded up to the month's end
            bucket_width="1mo",
            group_by="model,token_kind",
        )
    )

    assert len(body["data"]) == 1 and body["has_more"] is False
    assert body["data"][0]["end_time"] == ts(next_month(month)) == ts(invoice.period_end)
    results = {
        (r["model"], r["line_item"]): Decimal(r["amount"]["value"])
        for r in body["data"][0]["results"]
    }
    assert any(value != round_cents(value) for value in results.values())  # sub-cent parts
    # One line per (model, kind): each result is its line exactly, before the line's
    # rounding to cents; rounded, it is the line's amount.
    assert results == {
        line_item(line): exact_amount(line.quantity, line.unit_price)
        if line.kind == InvoiceLine.Kind.USAGE
        else line.quantity * line.unit_price
        for line in lines
        if line.unit_price is not None
    }
    assert {key: round_cents(value) for key, value in results.items()} == {
        line_item(line): line.amount for line in lines
    }
    assert sum(round_cents(v) for v in results.values()) == invoice.subtotal == invoice.total
    # Ungrouped, the month is one amount: the lines' exact sum, to the nano and beyond.
    total = ok(
        get(
            read_usage_client(world),
            world,
            "costs",
            start_time=ts(month),
            bucket_width="1mo",
            limit=1,
        )
    )["data"][0]["results"]
    assert [Decimal(r["amount"]["value"]) for r in total] == [sum(results.values())]
    # And the day buckets of the month add up to the same exact amount.
    days = ok(
        get(
            read_usage_client(world),
            world,
            "costs",
            start_time=ts(month),
            end_time=ts(invoice.period_end),
            bucket_width="1d",
            limit=31,
        )
    )
    assert sum(Decimal(r["amount"]["value"]) for b in days["data"] for r in b["results"]) == sum(
        results.values()
    )


def test_reads_have_a_budget_per_organization(
    world: OrgWorld, other_world: OrgWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A loop of reads, each rating a page of rollups in a process that serves the gateway
    too, is refused past the organization's budget (usage and costs counted together)."""
    monkeypatch.setattr(usage_buckets, "READS_PER_WINDOW", 3)
    client = read_usage_client(world)
    for what in ("usage", "costs", "usage"):
        ok(get(client, world, what, start_time=ts(at(10, 1))))

    for what in ("usage", "costs"):
        err = error(get(client, world, what, start_time=ts(at(10, 1))), 429)
        assert err["code"] == "rate_limit_exceeded"
        assert "at most 3 usage and cost reads per organization" in err["message"]
    # A signed-in member of the organization shares its budget; another organization
    # has its own.
    error(get(world.client_for(Role.BILLING), world, "costs", start_time=ts(at(10, 1))), 429)
    _, theirs = make_api_key(
        other_world.org, scopes=["read-usage"], by=other_world.users[Role.OWNER]
    )
    ok(get(key_client(theirs), other_world, "costs", start_time=ts(at(10, 1))))
    # The window's end gives the budget back.
    get_redis().delete(f"mantle:usage-api:{world.org.id}")
    ok(get(client, world, "costs", start_time=ts(at(10, 1))))
