"""A month of usage for 100 organizations (over a trillion tokens) through the drain, invoiced.

Every event goes the production way (Redis stream -> drain -> raw partition + hourly
rollups); then each organization's invoice for the month is generated (draft, then
finalized) and its totals are compared, exactly, with an independent computation from
the raw events: per (organization, model, token kind, hour) sums straight from the raw
table, priced by this script's own reading of the price book (a list-price change in
the middle of the month, a contract discount for some organizations) and rounded per
line as docs/billing.md states (half-even to cents, once per line).

Uses its own database (created, migrated and dropped here) and its own Redis database.
Run alone on the machine:  .venv/bin/python bench/invoices.py [--events 2000000]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import threading
import time
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench"), str(ROOT / "platform")]

from drain import drop_database, emit, recreate_database  # noqa: E402

MODELS = ("smollm2-135m-instruct", "all-minilm-l6-v2", "mantle-large-sim")
# USD per million tokens: (input, output) before and after the mid-month change.
PRICES_BEFORE = {
    "smollm2-135m-instruct": ("0.150000000", "0.600000000"),
    "all-minilm-l6-v2": ("0.020000000", "0"),
    "mantle-large-sim": ("2.500000000", "10.000000000"),
}
PRICES_AFTER = {
    "smollm2-135m-instruct": ("0.120000000", "0.480000000"),
    "all-minilm-l6-v2": ("0.015000000", "0"),
    "mantle-large-sim": ("2.000000000", "8.000000000"),
}
DISCOUNT_PERCENT = Decimal("12.50")  # for every fifth organization
NANO = Decimal("0.000000001")
CENT = Decimal("0.01")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=2_000_000)
    parser.add_argument("--orgs", type=int, default=100)
    parser.add_argument("--chunk", type=int, default=250_000, help="events per emit+drain round")
    parser.add_argument("--batch", type=int, default=5000)
    parser.add_argument("--database", default="mantle_bench_invoices")
    parser.add_argument("--pg", default="postgres://postgres@127.0.0.1:5432")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/2")
    parser.add_argument("--keep", action="store_true", help="keep the database afterwards")
    return parser.parse_args()


def last_month(now: datetime) -> tuple[datetime, datetime]:
    end = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    start = (end - timedelta(days=1)).replace(day=1)
    return start, end


def make_events(start: datetime, end: datetime, first: int, count: int, total: int, orgs: int):
    """Events `first`..`first+count` of `total`, spread evenly over [start, end)."""
    from workers.contract import UsageEvent

    rng = random.Random(first)
    span = (end - start).total_seconds()
    step = span / total
    t0 = start.timestamp()
    out = []
    for i in range(first, first + count):
        org = rng.randrange(orgs)
        model = rng.randrange(len(MODELS))
        finished = t0 + i * step + step / 2
        out.append(
            UsageEvent(
                request_id=f"req_bench{i:016d}",
                organization_id=f"org_bench{org:04d}",
                project_id=f"proj_bench{org:04d}",
                api_key_id=f"key_bench{org:04d}{rng.randrange(4)}",
                endpoint_id=f"ep-bench{model}",
                model_version_id=f"mv_bench{model}",
                model_name=MODELS[model],
                # Long-context and batch traffic: ~0.55M tokens a request on average.
                input_tokens=rng.randrange(1, 1_060_000),
                output_tokens=rng.randrange(0, 40_000),
                status="stop",
                started_at=finished - 5.0,
                finished_at=finished,
                queue_ms=3,
                compute_ms=4000,
                worker="bench-0",
            )
        )
    return out


def set_up_price_book(start: datetime, change: datetime, orgs: int) -> None:
    """History written directly: the services refuse prices in the past, on purpose."""
    from accounts.models import Organization
    from billing.models import BillingAccount, Price, PriceOverride
    from catalog.models import Model

    for name in MODELS:
        Model.objects.get_or_create(
            name=name, defaults={"kind": Model.Kind.CHAT, "context_length": 1_048_576}
        )
    rows = []
    for when, book in ((start - timedelta(days=31), PRICES_BEFORE), (change, PRICES_AFTER)):
        for name, (pin, pout) in book.items():
            for kind, price in (("input", pin), ("output", pout)):
                rows.append(
                    Price(
                        model_name=name,
                        token_kind=kind,
                        unit_price=Decimal(price),
                        effective_from=when,
                        reason="bench price book",
                    )
                )
    Price.objects.bulk_create(rows)
    for i in range(orgs):
        org = Organization.objects.create(id=f"org_bench{i:04d}", name=f"Bench customer {i}")
        BillingAccount.objects.create(organization=org, mode="postpaid")
        if i % 5 == 0:
            PriceOverride.objects.create(
                organization=org,
                kind=PriceOverride.Kind.DISCOUNT,
                discount_percent=DISCOUNT_PERCENT,
                effective_from=start - timedelta(days=60),
                reason="bench contract discount",
            )


def independent_totals(start: datetime, end: datetime, change: datetime) -> dict[str, Any]:
    """Per organization: line amounts from the raw events alone, priced and rounded here."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            """
            SELECT organization_id, model_name, occurred_at >= %s AS after_change,
                   sum(input_tokens)::numeric, sum(output_tokens)::numeric, count(*)
            FROM billing_usageevent
            WHERE occurred_at >= %s AND occurred_at < %s
            GROUP BY 1, 2, 3
            """,
            [change, start, end],
        )
        rows = cursor.fetchall()
    # A line is (model, token kind, unit price): quantities at one price are summed first,
    # then rounded once.
    quantities: dict[tuple[str, str, str, Decimal], int] = defaultdict(int)
    tokens = events = 0
    for org_id, model, after, tin, tout, n in rows:
        discount = int(org_id[-4:]) % 5 == 0
        book = PRICES_AFTER if after else PRICES_BEFORE
        events += n
        for kind, qty, list_price in (
            ("in", int(tin), book[model][0]),
            ("out", int(tout), book[model][1]),
        ):
            tokens += qty
            if not qty:
                continue
            unit = Decimal(list_price)
            if discount:
                unit = (unit * (100 - DISCOUNT_PERCENT) / 100).quantize(NANO, ROUND_HALF_EVEN)
            quantities[(org_id, model, kind, unit)] += qty
    per_org: dict[str, Decimal] = defaultdict(Decimal)
    lines: dict[str, int] = defaultdict(int)
    for (org_id, _model, _kind, unit), qty in quantities.items():
        per_org[org_id] += (qty * unit / 1_000_000).quantize(CENT, ROUND_HALF_EVEN)
        lines[org_id] += 1
    return {"per_org": dict(per_org), "lines": dict(lines), "tokens": tokens, "events": events}


def main() -> None:
    args = parse_args()
    os.environ.update(
        {
            "DJANGO_SETTINGS_MODULE": "config.settings.base",
            "DJANGO_SECRET_KEY": "bench-only-secret",
            "MANTLE_API_KEY_PEPPER": "bench-only-pepper",
            "MANTLE_IDENTITY_KEY": "bench-only-identity-key",
            "DATABASE_URL": f"{args.pg}/{args.database}",
            "REDIS_URL": args.redis,
            "CELERY_BROKER_URL": args.redis,
            "MANTLE_LOG_LEVEL": "WARNING",
        }
    )
    recreate_database(args)
    try:
        subprocess.run(
            [sys.executable, "manage.py", "migrate", "-v", "0"],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'platform'}"},
            check=True,
        )
        import django

        django.setup()
        import redis

        from accounts.models import Organization
        from accounts.principal import SYSTEM
        from billing.invoicing import invoice_finalize, invoice_refresh_draft
        from billing.metering.drain import Drain, tune_gc_for_draining
        from billing.models import Invoice, UsageRollup

        client = redis.Redis.from_url(args.redis, decode_responses=True)
        client.flushdb()
        now = datetime.now(UTC)
        start, end = last_month(now)
        change = start + timedelta(days=14)  # the 15th, 00:00 UTC
        set_up_price_book(start, change, args.orgs)

        tune_gc_for_draining()
        load_started = time.perf_counter()
        for first in range(0, args.events, args.chunk):
            count = min(args.chunk, args.events - first)
            emit(
                client,
                "mantle:usage",
                make_events(start, end, first, count, args.events, args.orgs),
            )
            drain = Drain(consumer="bench", client=client, batch_size=args.batch, hooks=())
            drain.run(stop=threading.Event(), once=True)
        load_s = time.perf_counter() - load_started

        invoicing_started = time.perf_counter()
        invoices = []
        for org in Organization.objects.order_by("id"):
            draft = invoice_refresh_draft(org=org, month=start)
            assert draft is not None, f"{org.id} has usage but no draft"
            invoices.append(invoice_finalize(principal=SYSTEM, invoice=draft, now=now))
        invoicing_s = time.perf_counter() - invoicing_started

        check_started = time.perf_counter()
        expected = independent_totals(start, end, change)
        check_s = time.perf_counter() - check_started
        mismatches = [
            inv.organization_id
            for inv in invoices
            if inv.subtotal != expected["per_org"].get(inv.organization_id)
            or inv.lines.count() != expected["lines"].get(inv.organization_id)
        ]
        if mismatches:
            inv = next(i for i in invoices if i.organization_id == mismatches[0])
            print(
                "invoice",
                inv.subtotal,
                inv.lines.count(),
                "expected",
                expected["per_org"].get(inv.organization_id),
                expected["lines"].get(inv.organization_id),
                file=sys.stderr,
            )
            for line in inv.lines.order_by("position"):
                print(
                    " ",
                    line.kind,
                    line.model_name,
                    line.token_kind,
                    line.quantity,
                    line.unit_price,
                    line.amount,
                    file=sys.stderr,
                )
        billed = sum((inv.subtotal for inv in invoices), Decimal(0))
        rollup_rows = UsageRollup.objects.filter(hour__gte=start, hour__lt=end).count()
        client.flushdb()
        print(
            json.dumps(
                {
                    "month": start.strftime("%Y-%m"),
                    "organizations": args.orgs,
                    "events": expected["events"],
                    "tokens": expected["tokens"],
                    "rollup_rows": rollup_rows,
                    "load_through_drain_s": round(load_s, 1),
                    "invoices": len(invoices),
                    "invoices_finalized": sum(
                        inv.status in (Invoice.Status.FINALIZED, Invoice.Status.PAID)
                        for inv in invoices
                    ),
                    "invoicing_s": round(invoicing_s, 2),
                    "independent_check_s": round(check_s, 2),
                    "billed_total": str(billed),
                    "independent_total": str(sum(expected["per_org"].values(), Decimal(0))),
                    "exact": not mismatches,
                    "mismatched_organizations": mismatches[:10],
                    "cpus": os.cpu_count(),
                },
                indent=2,
            )
        )
        if mismatches:
            sys.exit(1)
    finally:
        from django.db import connections

        connections.close_all()
        if not args.keep:
            drop_database(args)


if __name__ == "__main__":
    main()
