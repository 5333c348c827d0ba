# Compile jobs (issue 5 part A); also the `onnx-tensor` runtime choice of model versions.

import django.db.models.deletion
from django.db import migrations, models

import catalog.models


class Migration(migrations.Migration):
    dependencies = [
        ("accounts", "0001_initial"),
        ("catalog", "0001_initial"),
    ]

    operations = [
        migrations.AlterField(
            model_name="modelversion",
            name="runtime",
            field=models.CharField(
                choices=[
                    ("onnx-causal-lm", "onnx-causal-lm"),
                    ("onnx-encoder", "onnx-encoder"),
                    ("echo", "echo"),
                    ("onnx-tensor", "onnx-tensor"),
                ],
                max_length=32,
            ),
        ),
        migrations.CreateModel(
            name="CompileJob",
            fields=[
                (
                    "id",
                    models.CharField(
                        default=catalog.models.new_compile_job_id,
                        editable=False,
                        max_length=40,
                        primary_key=True,
                        serialize=False,
                    ),
                ),
                ("created_by", models.CharField(blank=True, max_length=254)),
                ("model_name", models.CharField(max_length=120)),
                (
                    "kind",
                    models.CharField(
                        choices=[
                            ("chat", "Chat"),
                            ("completion", "Completion"),
                            ("embedding", "Embedding"),
                            ("tensor", "Tensor"),
                        ],
                        max_length=16,
                    ),
                ),
                (
                    "source",
                    models.CharField(
                        choices=[("onnx", "Onnx"), ("hf-checkpoint", "Hf Checkpoint")],
                        max_length=16,
                    ),
                ),
                ("source_detail", models.JSONField(default=dict)),
                ("options", models.JSONField(default=dict)),
                (
                    "status",
                    models.CharField(
                        choices=[
                            ("queued", "Queued"),
                            ("running", "Running"),
                            ("succeeded", "Succeeded"),
                            ("failed", "Failed"),
                        ],
                        default="queued",
                        max_length=16,
                    ),
                ),
                ("steps", models.JSONField(default=list)),
                ("progress_seq", models.PositiveBigIntegerField(default=0)),
                ("error", models.TextField(blank=True)),
                ("error_code", models.CharField(blank=True, max_length=64)),
                ("created_at", models.DateTimeField(auto_now_add=True)),
                ("started_at", models.DateTimeField(blank=True, null=True)),
                ("finished_at", models.DateTimeField(blank=True, null=True)),
                (
                    "model_version",
                    models.ForeignKey(
                        blank=True,
                        null=True,
                        on_delete=django.db.models.deletion.SET_NULL,
                        related_name="compile_jobs",
                        to="catalog.modelversion",
                    ),
                ),
                (
                    "organization",
                    models.ForeignKey(
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="compile_jobs",
                        to="accounts.organization",
                    ),
                ),
            ],
            options={
                "indexes": [
                    models.Index(
                        fields=["organization", "-created_at"], name="compile_job_org_created"
                    )
                ],
            },
        ),
    ]
