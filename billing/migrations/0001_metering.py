"""Metering: raw usage events (partitioned by month on PostgreSQL), hourly rollups, spend outbox."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import django.utils.timezone
from django.db import migrations, models

# The raw table is written by hand: Django cannot declare a partitioned table, and on
# PostgreSQL a unique constraint must contain the partition key, so the idempotency key
# is (request_id, occurred_at). SQLite (bin/run without DATABASE_URL) gets a plain table
# that is also unique on request_id alone. Django reads both through billing.UsageEvent.
COLUMNS = """
    request_id varchar(128) {collate} NOT NULL,
    occurred_at {ts} NOT NULL,
    organization_id varchar(64) NOT NULL,
    project_id varchar(64) NOT NULL,
    api_key_id varchar(64) NOT NULL,
    endpoint_id varchar(64) NOT NULL,
    model_version_id varchar(64) NOT NULL,
    model_name varchar(200) NOT NULL,
    input_tokens bigint NOT NULL,
    output_tokens bigint NOT NULL,
    status varchar(16) NOT NULL,
    started_at {ts} NOT NULL,
    queue_ms bigint NOT NULL,
    compute_ms bigint NOT NULL,
    worker varchar(128) NOT NULL,
    recorded_at {ts} NOT NULL,
    PRIMARY KEY (request_id, occurred_at)
"""


ROLLUP_IDS = (
    ("organization_id", 64),
    ("project_id", 64),
    ("api_key_id", 64),
    ("endpoint_id", 64),
    ("model_name", 200),
)


def _month_start(year: int, month: int) -> datetime:
    return datetime(year + (month - 1) // 12, (month - 1) % 12 + 1, 1, tzinfo=UTC)


def create_usage_event_table(apps: Any, schema_editor: Any) -> None:
    vendor = schema_editor.connection.vendor
    if vendor == "postgresql":
        schema_editor.execute(
            "CREATE TABLE billing_usageevent ("
            # Byte order for the request id: the idempotency index compares with memcmp
            # instead of the locale's strcoll, which matters at tens of thousands a second.
            + COLUMNS.format(ts="timestamptz", collate='COLLATE "C"')
            + ") PARTITION BY RANGE (occurred_at)"
        )
        # The drain and a daily task keep partitions ahead of time
        # (billing.partitions.usage_partitions_ensure); these two let the table work at once.
        now = datetime.now(UTC)
        for offset in (0, 1):
            start = _month_start(now.year, now.month + offset)
            end = _month_start(start.year, start.month + 1)
            schema_editor.execute(
                f"CREATE TABLE billing_usageevent_p{start:%Y%m} PARTITION OF billing_usageevent "
                f"FOR VALUES FROM ('{start.isoformat()}') TO ('{end.isoformat()}')"
            )
    elif vendor == "sqlite":
        schema_editor.execute(
            "CREATE TABLE billing_usageevent (" + COLUMNS.format(ts="datetime", collate="") + ")"
        )
        schema_editor.execute(
            "CREATE UNIQUE INDEX billing_usageevent_request_id_uniq "
            "ON billing_usageevent (request_id)"
        )
    else:
        raise RuntimeError(f"billing.UsageEvent has no table definition for {vendor}")


def tune_rollup_table(apps: Any, schema_editor: Any) -> None:
    """PostgreSQL: byte-order ids (the upsert's unique index compares with memcmp, not the
    locale's strcoll) and room on each page for in-place (HOT) updates of the sums."""
    if schema_editor.connection.vendor != "postgresql":
        return
    for column, length in ROLLUP_IDS:
        schema_editor.execute(
            f"ALTER TABLE billing_usagerollup ALTER COLUMN {column} "
            f'TYPE varchar({length}) COLLATE "C"'
        )
    schema_editor.execute("ALTER TABLE billing_usagerollup SET (fillfactor = 70)")


def drop_usage_event_table(apps: Any, schema_editor: Any) -> None:
    # On PostgreSQL, dropping the partitioned table drops its partitions.
    schema_editor.execute("DROP TABLE billing_usageevent")


class Migration(migrations.Migration):
    initial = True

    dependencies: list[tuple[str, str]] = []

    operations = [
        migrations.CreateModel(
            name="SpendOutbox",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
                ("batch", models.UUIDField(unique=True)),
                ("deltas", models.JSONField()),
                ("request_ids", models.JSONField(blank=True, null=True)),
                ("created_at", models.DateTimeField(default=django.utils.timezone.now)),
            ],
        ),
        migrations.CreateModel(
            name="UsageRollup",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
                ("organization_id", models.CharField(max_length=64)),
                ("project_id", models.CharField(max_length=64)),
                ("api_key_id", models.CharField(max_length=64)),
                ("endpoint_id", models.CharField(max_length=64)),
                ("model_name", models.CharField(max_length=200)),
                ("hour", models.DateTimeField()),
                ("requests", models.BigIntegerField(default=0)),
                ("input_tokens", models.BigIntegerField(default=0)),
                ("output_tokens", models.BigIntegerField(default=0)),
                ("updated_at", models.DateTimeField(default=django.utils.timezone.now)),
            ],
            options={
                "constraints": [
                    models.UniqueConstraint(
                        fields=(
                            "organization_id",
                            "project_id",
                            "api_key_id",
                            "endpoint_id",
                            "model_name",
                            "hour",
                        ),
                        name="uniq_usage_rollup",
                    )
                ],
                "indexes": [
                    models.Index(fields=["organization_id", "hour"], name="usage_rollup_org_hour"),
                ],
            },
        ),
        migrations.RunPython(tune_rollup_table, migrations.RunPython.noop),
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.CreateModel(
                    name="UsageEvent",
                    fields=[
                        (
                            "pk",
                            models.CompositePrimaryKey(
                                "request_id",
                                "occurred_at",
                                blank=True,
                                editable=False,
                                primary_key=True,
                                serialize=False,
                            ),
                        ),
                        ("request_id", models.CharField(max_length=128)),
                        ("occurred_at", models.DateTimeField()),
                        ("organization_id", models.CharField(max_length=64)),
                        ("project_id", models.CharField(max_length=64)),
                        ("api_key_id", models.CharField(max_length=64)),
                        ("endpoint_id", models.CharField(max_length=64)),
                        ("model_version_id", models.CharField(max_length=64)),
                        ("model_name", models.CharField(max_length=200)),
                        ("input_tokens", models.BigIntegerField()),
                        ("output_tokens", models.BigIntegerField()),
                        ("status", models.CharField(max_length=16)),
                        ("started_at", models.DateTimeField()),
                        ("queue_ms", models.BigIntegerField()),
                        ("compute_ms", models.BigIntegerField()),
                        ("worker", models.CharField(blank=True, max_length=128)),
                        (
                            "recorded_at",
                            models.DateTimeField(default=django.utils.timezone.now),
                        ),
                    ],
                ),
            ],
            database_operations=[
                migrations.RunPython(create_usage_event_table, drop_usage_event_table),
            ],
        ),
    ]
