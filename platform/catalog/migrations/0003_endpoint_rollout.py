# Endpoint rollouts (issue 5 part B): revision history, the version to roll back to, unique names per organization.

import django.db.models.deletion
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("accounts", "0002_rate_limits"),
        ("catalog", "0002_compile_jobs"),
    ]

    operations = [
        migrations.CreateModel(
            name="EndpointRevision",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
                ("number", models.PositiveIntegerField()),
                (
                    "action",
                    models.CharField(
                        choices=[
                            ("created", "Created"),
                            ("rollout", "Rollout"),
                            ("rollback", "Rollback"),
                        ],
                        max_length=16,
                    ),
                ),
                ("created_by", models.CharField(blank=True, max_length=254)),
                ("created_at", models.DateTimeField(auto_now_add=True)),
            ],
        ),
        migrations.AddField(
            model_name="endpoint",
            name="previous_model_version",
            field=models.ForeignKey(
                blank=True,
                null=True,
                on_delete=django.db.models.deletion.SET_NULL,
                related_name="+",
                to="catalog.modelversion",
            ),
        ),
        migrations.AddField(
            model_name="endpoint",
            name="updated_at",
            field=models.DateTimeField(auto_now=True),
        ),
        migrations.AddConstraint(
            model_name="endpoint",
            constraint=models.UniqueConstraint(
                condition=models.Q(("organization__isnull", False)),
                fields=("organization", "name"),
                name="uniq_endpoint_name_per_org",
            ),
        ),
        migrations.AddField(
            model_name="endpointrevision",
            name="endpoint",
            field=models.ForeignKey(
                on_delete=django.db.models.deletion.CASCADE,
                related_name="revisions",
                to="catalog.endpoint",
            ),
        ),
        migrations.AddField(
            model_name="endpointrevision",
            name="model_version",
            field=models.ForeignKey(
                on_delete=django.db.models.deletion.RESTRICT,
                related_name="+",
                to="catalog.modelversion",
            ),
        ),
        migrations.AddConstraint(
            model_name="endpointrevision",
            constraint=models.UniqueConstraint(
                fields=("endpoint", "number"), name="uniq_endpoint_revision"
            ),
        ),
    ]
