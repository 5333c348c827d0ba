"""The dashboard: tokens and revenue per day and per model, top customers, drain lag."""

from __future__ import annotations

import json
from datetime import timedelta
from decimal import Decimal

import pytest
from django.urls import reverse
from django.utils import timezone

from billing.backoffice.selectors import dashboard
from billing.metering.lag import drain_lag_history, drain_lag_record
from billing.metering.stream import GROUP, ensure_group
from billing.periods import hour_start
from core.redis import get_redis
from tests.backoffice.support import Staff, client_for
from tests.billing.factories import CHAT, EMBED, OverrideFactory, PriceFactory, price_book, usage
from tests.factories import OrganizationFactory
from workers.contract import USAGE_STREAM

pytestmark = pytest.mark.django_db


@pytest.fixture
def traffic(db: None) -> dict[str, object]:
    price_book(CHAT, "1", "2")
    price_book(EMBED, "0.5", "0")
    now = timezone.now()
    today = hour_start(now)
    yesterday = today - timedelta(days=1)
    big = OrganizationFactory(name="Big Spender")
    small = OrganizationFactory(name="Small Fry")
    # Small Fry pays half price for chat: its revenue is its own prices, not the list.
    OverrideFactory(organization=small, kind="discount", discount_percent=50, model_name=CHAT)
    usage(big, yesterday, input_tokens=2_000_000, output_tokens=1_000_000)  # 2 + 2 = 4.00
    usage(big, today, model=EMBED, input_tokens=4_000_000)  # 2.00
    usage(small, today, input_tokens=1_000_000, output_tokens=1_000_000)  # (1 + 2) / 2 = 1.50
    usage(small, today - timedelta(days=45), input_tokens=9_000_000)  # outside the 30 days
    return {"big": big, "small": small, "today": today.date(), "yesterday": yesterday.date()}


def test_the_numbers_behind_the_charts(traffic: dict[str, object]) -> None:
    d = dashboard()

    by_day = {p.day: (p.input_tokens, p.output_tokens, p.revenue) for p in d.days}
    assert by_day[traffic["yesterday"]] == (2_000_000, 1_000_000, Decimal("4"))  # type: ignore[index]
    assert by_day[traffic["today"]] == (5_000_000, 1_000_000, Decimal("3.5"))  # type: ignore[index]
    assert sum(p.input_tokens for p in d.days) == 7_000_000
    assert [(m.model_name, m.input_tokens, m.output_tokens, m.revenue) for m in d.models] == [
        (CHAT, 3_000_000, 2_000_000, Decimal("5.5")),
        (EMBED, 4_000_000, 0, Decimal("2")),
    ]
    assert [(c.name, c.revenue, c.tokens) for c in d.top_customers] == [
        ("Big Spender", Decimal("6"), 7_000_000),
        ("Small Fry", Decimal("1.5"), 2_000_000),
    ]
    assert len(d.days) in (31, 32)  # 30 days back, both ends included


def test_cached_input_tokens_in_the_numbers_and_the_token_chart(staff: Staff) -> None:
    price_book(CHAT, "1", "2")
    PriceFactory(model_name=CHAT, token_kind="cached_input", unit_price=Decimal("0.5"))
    today = hour_start(timezone.now())
    usage(OrganizationFactory(), today, input_tokens=3_000_000, cached_input_tokens=2_000_000)

    d = dashboard()
    charts = client_for(staff.support).get(reverse("admin:index")).context["charts"]

    [day] = [p for p in d.days if p.day == today.date()]
    # 1M uncached at 1 + 2M cached at 0.5
    assert (day.input_tokens, day.cached_input_tokens, day.revenue) == (
        3_000_000,
        2_000_000,
        Decimal("2"),
    )
    assert [(m.model_name, m.cached_input_tokens, m.revenue) for m in d.models] == [
        (CHAT, 2_000_000, Decimal("2"))
    ]
    # The token bars stack uncached input, cached input and output: every token once.
    i = charts["days"].index(today.date().isoformat())
    assert (charts["input"][i], charts["cached_input"][i], charts["output"][i]) == (
        1_000_000,
        2_000_000,
        0,
    )


def test_the_dashboard_page_draws_the_charts(staff: Staff, traffic: dict[str, object]) -> None:
    response = client_for(staff.support).get(reverse("admin:index"))

    body = response.content.decode()
    assert response.status_code == 200
    for canvas in ("chart-tokens", "chart-revenue", "chart-models", "chart-customers", "chart-lag"):
        assert f'id="{canvas}"' in body
    assert '<script src="/static/vendor/chart.umd.min.js"></script>' in body
    charts = response.context["charts"]
    assert (
        json.loads(
            body.split('<script id="bo-charts" type="application/json">')[1].split("</script>")[0]
        )
        == charts
    )
    assert charts["models"] == [CHAT, EMBED]
    assert charts["model_revenue"] == [5.5, 2.0]
    assert charts["customers"] == ["Big Spender", "Small Fry"]
    assert "Big Spender" in body


def test_drain_lag_now_and_its_history(staff: Staff) -> None:
    client = get_redis()
    ensure_group(client)
    seconds, _ = client.time()  # type: ignore[misc]
    client.xadd(USAGE_STREAM, {"request_id": "r1"}, id=f"{(int(seconds) - 120) * 1000}-0")

    first = drain_lag_record(at=1_000.0)
    second = drain_lag_record(at=1_060.0)

    assert 120 <= first <= 180
    assert 120 <= second <= 180
    assert [ts for ts, _ in drain_lag_history()] == [1_000.0, 1_060.0]
    body = client_for(staff.support).get(reverse("admin:index")).content.decode()
    assert 'data-testid="drain-lag"' in body
    pending = client.xpending(USAGE_STREAM, GROUP)
    assert pending["pending"] == 0  # reading the lag never consumes anything


def test_the_history_keeps_a_day_of_samples(db: None) -> None:
    for i in range(24 * 60 + 5):
        drain_lag_record(at=float(i))
    history = drain_lag_history()
    assert len(history) == 24 * 60
    assert history[0][0] == 5.0 and history[-1][0] == float(24 * 60 + 4)


def test_no_usage_gives_empty_charts(db: None) -> None:
    d = dashboard()
    assert d.models == [] and d.top_customers == []
    assert all(p.revenue == 0 for p in d.days)
