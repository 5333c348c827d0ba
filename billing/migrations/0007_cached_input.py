# The cached_input unit: prompt tokens the prefix cache served, on raw events and rollups.

from __future__ import annotations

from typing import Any

from django.db import migrations, models

TOKEN_KINDS = [
    ("input", "Input"),
    ("output", "Output"),
    ("request", "Request"),
    ("compute_ms", "Compute Ms"),
    ("cached_input", "Cached Input"),
]


# The raw table is written by hand (0001_metering): partitioned on PostgreSQL, where a
# column added to the parent reaches every partition; a plain table with a hand-made unique
# index on SQLite, which Django's AddField would rebuild without it. ADD COLUMN with a
# constant default is a catalog change on PostgreSQL (no table rewrite), and the default
# stays: a drain of the previous release still inserts without naming the column.
def add_event_column(apps: Any, schema_editor: Any) -> None:
    schema_editor.execute(
        "ALTER TABLE billing_usageevent ADD COLUMN cached_input_tokens bigint NOT NULL DEFAULT 0"
    )


def drop_event_column(apps: Any, schema_editor: Any) -> None:
    schema_editor.execute("ALTER TABLE billing_usageevent DROP COLUMN cached_input_tokens")


class Migration(migrations.Migration):
    dependencies = [
        ("billing", "0006_tensor_units_and_held_usage"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.AddField(
                    model_name="usageevent",
                    name="cached_input_tokens",
                    field=models.BigIntegerField(db_default=0, default=0),
                ),
            ],
            database_operations=[
                migrations.RunPython(add_event_column, drop_event_column),
            ],
        ),
        migrations.AddField(
            model_name="usagerollup",
            name="cached_input_tokens",
            field=models.BigIntegerField(db_default=0, default=0),
        ),
        migrations.AlterField(
            model_name="heldusage",
            name="token_kind",
            field=models.CharField(choices=TOKEN_KINDS, max_length=16),
        ),
        migrations.AlterField(
            model_name="invoiceline",
            name="token_kind",
            field=models.CharField(blank=True, choices=TOKEN_KINDS, max_length=16),
        ),
        migrations.AlterField(
            model_name="price",
            name="token_kind",
            field=models.CharField(choices=TOKEN_KINDS, max_length=16),
        ),
        migrations.AlterField(
            model_name="priceoverride",
            name="token_kind",
            field=models.CharField(blank=True, choices=TOKEN_KINDS, max_length=16),
        ),
    ]
