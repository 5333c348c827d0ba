# Tensor billing units (request, compute_ms), rollups of compute time, and held usage.

import django.db.models.deletion
import django.utils.timezone
from django.conf import settings
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("billing", "0005_staff_roles"),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.AddField(
            model_name="usagerollup",
            name="compute_ms",
            field=models.BigIntegerField(db_default=0, default=0),
        ),
        migrations.AlterField(
            model_name="invoiceline",
            name="kind",
            field=models.CharField(
                choices=[
                    ("usage", "Usage"),
                    ("adjustment", "Adjustment"),
                    ("discount", "Discount"),
                    ("released", "Released"),
                ],
                max_length=16,
            ),
        ),
        migrations.AlterField(
            model_name="invoiceline",
            name="token_kind",
            field=models.CharField(
                blank=True,
                choices=[
                    ("input", "Input"),
                    ("output", "Output"),
                    ("request", "Request"),
                    ("compute_ms", "Compute Ms"),
                ],
                max_length=16,
            ),
        ),
        migrations.AlterField(
            model_name="price",
            name="token_kind",
            field=models.CharField(
                choices=[
                    ("input", "Input"),
                    ("output", "Output"),
                    ("request", "Request"),
                    ("compute_ms", "Compute Ms"),
                ],
                max_length=16,
            ),
        ),
        migrations.AlterField(
            model_name="priceoverride",
            name="token_kind",
            field=models.CharField(
                blank=True,
                choices=[
                    ("input", "Input"),
                    ("output", "Output"),
                    ("request", "Request"),
                    ("compute_ms", "Compute Ms"),
                ],
                max_length=16,
            ),
        ),
        migrations.CreateModel(
            name="HeldUsage",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
                ("usage_month", models.DateField()),
                ("model_name", models.CharField(max_length=120)),
                (
                    "token_kind",
                    models.CharField(
                        choices=[
                            ("input", "Input"),
                            ("output", "Output"),
                            ("request", "Request"),
                            ("compute_ms", "Compute Ms"),
                        ],
                        max_length=16,
                    ),
                ),
                ("quantity", models.BigIntegerField()),
                (
                    "status",
                    models.CharField(
                        choices=[
                            ("held", "Held"),
                            ("released", "Released"),
                            ("billed", "Billed"),
                            ("written_off", "Written Off"),
                        ],
                        default="held",
                        max_length=16,
                    ),
                ),
                (
                    "unit_price",
                    models.DecimalField(blank=True, decimal_places=9, max_digits=20, null=True),
                ),
                ("reason", models.CharField(blank=True, max_length=500)),
                ("resolved_at", models.DateTimeField(blank=True, null=True)),
                ("created_at", models.DateTimeField(default=django.utils.timezone.now)),
                (
                    "billed_invoice",
                    models.ForeignKey(
                        blank=True,
                        null=True,
                        on_delete=django.db.models.deletion.SET_NULL,
                        related_name="released_usage",
                        to="billing.invoice",
                    ),
                ),
                (
                    "invoice",
                    models.ForeignKey(
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="held_usage",
                        to="billing.invoice",
                    ),
                ),
                (
                    "organization",
                    models.ForeignKey(
                        on_delete=django.db.models.deletion.PROTECT,
                        related_name="held_usage",
                        to="accounts.organization",
                    ),
                ),
                (
                    "resolved_by",
                    models.ForeignKey(
                        blank=True,
                        null=True,
                        on_delete=django.db.models.deletion.SET_NULL,
                        related_name="+",
                        to=settings.AUTH_USER_MODEL,
                    ),
                ),
            ],
            options={
                "verbose_name_plural": "held usage",
                "indexes": [
                    models.Index(
                        fields=["organization", "status"], name="billing_hel_organiz_2da7cb_idx"
                    )
                ],
                "constraints": [
                    models.CheckConstraint(
                        condition=models.Q(("quantity__gt", 0)), name="held_usage_positive"
                    )
                ],
            },
        ),
    ]
