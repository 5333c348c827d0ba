# Batch prices: the `batch_` units in the price book, and the batch part of each rollup sum.

from __future__ import annotations

from django.db import migrations, models

TOKEN_KINDS = [
    ("input", "Input"),
    ("output", "Output"),
    ("request", "Request"),
    ("compute_ms", "Compute Ms"),
    ("cached_input", "Cached Input"),
    ("batch_input", "Batch Input"),
    ("batch_output", "Batch Output"),
    ("batch_request", "Batch Request"),
    ("batch_compute_ms", "Batch Compute Ms"),
    ("batch_cached_input", "Batch Cached Input"),
]
# The longest kind, `batch_cached_input`, needs 18 characters. Widening a varchar is a
# catalog change on PostgreSQL (no table rewrite, no index rebuild).
TOKEN_KIND_LENGTH = 24


# ADD COLUMN with a constant default is a catalog change on PostgreSQL (no table rewrite),
# and the default stays: a drain of the previous release still upserts rollups without
# naming the columns (its batch lines are then counted as online usage: never free).
def batch_part(name: str) -> migrations.AddField:
    return migrations.AddField(
        model_name="usagerollup",
        name=name,
        field=models.BigIntegerField(db_default=0, default=0),
    )


class Migration(migrations.Migration):
    dependencies = [
        ("billing", "0008_usage_service_class"),
    ]

    operations = [
        batch_part("batch_requests"),
        batch_part("batch_input_tokens"),
        batch_part("batch_output_tokens"),
        batch_part("batch_compute_ms"),
        batch_part("batch_cached_input_tokens"),
        migrations.AlterField(
            model_name="heldusage",
            name="token_kind",
            field=models.CharField(choices=TOKEN_KINDS, max_length=TOKEN_KIND_LENGTH),
        ),
        migrations.AlterField(
            model_name="invoiceline",
            name="token_kind",
            field=models.CharField(blank=True, choices=TOKEN_KINDS, max_length=TOKEN_KIND_LENGTH),
        ),
        migrations.AlterField(
            model_name="price",
            name="token_kind",
            field=models.CharField(choices=TOKEN_KINDS, max_length=TOKEN_KIND_LENGTH),
        ),
        migrations.AlterField(
            model_name="priceoverride",
            name="token_kind",
            field=models.CharField(blank=True, choices=TOKEN_KINDS, max_length=TOKEN_KIND_LENGTH),
        ),
    ]
