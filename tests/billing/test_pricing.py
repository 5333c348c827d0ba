"""The price book: lookups at a time, organization overrides, and refused price changes."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.utils import timezone

from accounts.models import AuditLog, Organization
from accounts.principal import Principal
from billing.models import Price, PriceOverride
from billing.periods import hour_start
from billing.pricing import (
    CommitTier,
    commit_discount,
    price_lookup,
    price_override_create,
    price_override_end,
    price_set,
)
from core.errors import Conflict, InvalidInput, NotFound, PermissionDenied
from tests.billing.factories import (
    CHAT,
    OverrideFactory,
    PriceFactory,
    at,
    price_book,
    staff_principal,
)
from tests.factories import OrganizationFactory, UserFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def org() -> Organization:
    price_book(CHAT, input_price="1", output_price="2")
    return OrganizationFactory()


@pytest.fixture
def staff() -> Principal:
    return staff_principal()


def test_lookup_follows_the_effective_dates(org: Organization) -> None:
    PriceFactory(
        model_name=CHAT, token_kind="input", unit_price=Decimal("3"), effective_from=at(10, 15)
    )

    assert price_lookup(org, CHAT, "input", at(10, 14, 23)).unit_price == Decimal("1")
    assert price_lookup(org, CHAT, "input", at(10, 15)).unit_price == Decimal("3")
    assert price_lookup(org, CHAT, "output", at(10, 15)).unit_price == Decimal("2")
    with pytest.raises(NotFound):
        price_lookup(org, CHAT, "input", at(12, 31, year=2025))  # before any price


def test_negotiated_rate_replaces_the_list_price_for_its_organization_only(
    org: Organization,
) -> None:
    OverrideFactory(
        organization=org,
        kind="rate",
        model_name=CHAT,
        token_kind="output",
        unit_price=Decimal("1.25"),
    )
    other = OrganizationFactory()

    mine = price_lookup(org, CHAT, "output", at(10))
    theirs = price_lookup(other, CHAT, "output", at(10))

    assert (mine.unit_price, mine.list_price, mine.source) == (
        Decimal("1.25"),
        Decimal("2"),
        "rate",
    )
    assert (theirs.unit_price, theirs.source) == (Decimal("2"), "list")


@pytest.mark.parametrize(
    ("discounts", "expected"),
    [
        ([("", "", "10")], "1.8"),
        ([("", "", "10"), (CHAT, "", "20")], "1.6"),  # the model's beats everything's
        ([(CHAT, "", "20"), (CHAT, "output", "50")], "1"),  # model and kind beat the model's
        ([("", "output", "30"), (CHAT, "", "20")], "1.6"),  # a model is more specific than a kind
        ([("", "input", "30")], "2"),  # another kind's discount does not apply
    ],
)
def test_the_most_specific_discount_applies(
    org: Organization, discounts: list[tuple[str, str, str]], expected: str
) -> None:
    for model, kind, percent in discounts:
        OverrideFactory(
            organization=org, model_name=model, token_kind=kind, discount_percent=Decimal(percent)
        )

    assert price_lookup(org, CHAT, "output", at(10)).unit_price == Decimal(expected)


def test_rate_beats_discount_and_ended_overrides_stop(org: Organization) -> None:
    OverrideFactory(organization=org, kind="discount", discount_percent=Decimal("50"))
    OverrideFactory(
        organization=org,
        kind="rate",
        model_name=CHAT,
        token_kind="input",
        unit_price=Decimal("0.9"),
        effective_until=at(10, 15),
    )

    assert price_lookup(org, CHAT, "input", at(10, 14)).unit_price == Decimal("0.9")
    assert price_lookup(org, CHAT, "input", at(10, 15)).unit_price == Decimal("0.5")


@pytest.mark.parametrize(
    ("subtotal", "expected"),
    [("50", "0"), ("100", "0"), ("600", "50"), ("1000", "90"), ("1500", "190")],
)
def test_commit_tiers_are_marginal(subtotal: str, expected: str) -> None:
    tiers = [CommitTier(Decimal("100"), Decimal("10")), CommitTier(Decimal("1000"), Decimal("20"))]

    assert commit_discount(Decimal(subtotal), tiers) == Decimal(expected)


def test_price_set_adds_a_row_and_audits(org: Organization, staff: Principal) -> None:
    start = hour_start(timezone.now()) + timedelta(hours=2)

    price = price_set(
        principal=staff,
        model_name=CHAT,
        token_kind="input",
        unit_price="0.125",
        effective_from=start,
        reason="Q4 price list",
    )

    assert Price.objects.filter(model_name=CHAT, token_kind="input").count() == 2  # history kept
    assert price_lookup(org, CHAT, "input", start).unit_price == Decimal("0.125")
    assert price_lookup(org, CHAT, "input", start - timedelta(hours=1)).unit_price == Decimal("1")
    audit = AuditLog.objects.get(action="billing.price_set", target_id=str(price.id))
    assert audit.metadata["unit_price"] == "0.125"
    assert audit.organization is None


BAD_PRICES: list[tuple[dict[str, Any], str]] = [
    ({"model_name": "no-such-model"}, "model_name"),
    ({"model_name": ""}, "model_name"),
    ({"token_kind": "cached"}, "token_kind"),
    ({"unit_price": "-0.01"}, "unit_price"),
    ({"unit_price": "0.0000000001"}, "unit_price"),
    ({"unit_price": "1e7"}, "unit_price"),
    ({"effective_from": "past"}, "effective_from"),
    ({"effective_from": "half-past"}, "effective_from"),
    ({"effective_from": "naive"}, "effective_from"),
    ({"currency": "EUR"}, "currency"),
    ({"reason": ""}, "reason"),
]


@pytest.mark.parametrize(("change", "param"), BAD_PRICES)
def test_bad_price_is_refused_and_nothing_is_written(
    org: Organization, staff: Principal, change: dict[str, Any], param: str
) -> None:
    start = hour_start(timezone.now()) + timedelta(hours=1)
    kwargs: dict[str, Any] = {
        "model_name": CHAT,
        "token_kind": "input",
        "unit_price": "0.5",
        "effective_from": start,
        "reason": "new list",
    }
    kwargs.update(change)
    kwargs["effective_from"] = {
        "past": start - timedelta(hours=2),
        "half-past": start + timedelta(minutes=30),
        "naive": start.replace(tzinfo=None),
    }.get(kwargs["effective_from"], kwargs["effective_from"])
    before = (Price.objects.count(), AuditLog.objects.count())

    with pytest.raises(InvalidInput) as raised:
        price_set(principal=staff, **kwargs)

    assert raised.value.param == param
    assert param in raised.value.message
    assert (Price.objects.count(), AuditLog.objects.count()) == before


def test_two_prices_from_the_same_hour_conflict(org: Organization, staff: Principal) -> None:
    start = hour_start(timezone.now()) + timedelta(hours=1)
    price_set(
        principal=staff,
        model_name=CHAT,
        token_kind="input",
        unit_price="2",
        effective_from=start,
        reason="a",
    )

    with pytest.raises(Conflict):
        price_set(
            principal=staff,
            model_name=CHAT,
            token_kind="input",
            unit_price="3",
            effective_from=start,
            reason="b",
        )

    assert Price.objects.filter(effective_from=start).count() == 1


def test_customers_cannot_set_prices(org: Organization) -> None:
    start = hour_start(timezone.now()) + timedelta(hours=1)
    with pytest.raises(PermissionDenied):
        price_set(
            principal=Principal(user=UserFactory()),
            model_name=CHAT,
            token_kind="input",
            unit_price="0",
            effective_from=start,
            reason="free",
        )
    assert not Price.objects.filter(effective_from=start).exists()


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"kind": "rate", "model_name": CHAT, "token_kind": "input"}, "unit_price"),
        (
            {"kind": "rate", "model_name": "nope", "token_kind": "input", "unit_price": "1"},
            "model_name",
        ),
        (
            {
                "kind": "rate",
                "model_name": CHAT,
                "token_kind": "input",
                "unit_price": "1",
                "discount_percent": "5",
            },
            "discount_percent",
        ),
        ({"kind": "discount", "discount_percent": "0"}, "discount_percent"),
        ({"kind": "discount", "discount_percent": "100.5"}, "discount_percent"),
        ({"kind": "commit_tier", "discount_percent": "5"}, "threshold"),
        ({"kind": "commit_tier", "discount_percent": "5", "threshold": "-1"}, "threshold"),
        (
            {"kind": "commit_tier", "discount_percent": "5", "threshold": "10", "model_name": CHAT},
            "model_name",
        ),
        ({"kind": "bogus"}, "kind"),
    ],
)
def test_bad_override_is_refused_and_nothing_is_written(
    org: Organization, staff: Principal, kwargs: dict[str, Any], param: str
) -> None:
    before = (PriceOverride.objects.count(), AuditLog.objects.count())

    with pytest.raises(InvalidInput) as raised:
        price_override_create(
            principal=staff,
            org=org,
            effective_from=hour_start(timezone.now()),
            reason="contract",
            **kwargs,
        )

    assert raised.value.param == param
    assert (PriceOverride.objects.count(), AuditLog.objects.count()) == before


def test_override_is_created_and_ended_in_the_future_only(
    org: Organization, staff: Principal
) -> None:
    now_hour = hour_start(timezone.now())
    override = price_override_create(
        principal=staff,
        org=org,
        kind="discount",
        discount_percent="12.5",
        effective_from=now_hour,
        reason="MSA 2026",
    )

    with pytest.raises(InvalidInput):
        price_override_end(
            principal=staff, override=override, at=now_hour - timedelta(hours=1), reason="x"
        )
    ended = price_override_end(
        principal=staff, override=override, at=now_hour + timedelta(hours=3), reason="contract ends"
    )

    assert ended.effective_until == now_hour + timedelta(hours=3)
    assert price_lookup(org, CHAT, "output", now_hour).unit_price == Decimal("1.75")
    assert price_lookup(org, CHAT, "output", now_hour + timedelta(hours=3)).unit_price == Decimal(
        "2"
    )
    actions = list(
        AuditLog.objects.filter(organization=org).values_list("action", flat=True).order_by("id")
    )
    assert actions[-2:] == ["billing.price_override_created", "billing.price_override_ended"]
