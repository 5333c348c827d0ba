# Stored responses of the Responses API (issue 15), deleted after their retention period.

import django.db.models.deletion
from django.db import migrations, models


class Migration(migrations.Migration):
    initial = True

    dependencies = [
        ("accounts", "0003_email_verification_invitations"),
    ]

    operations = [
        migrations.CreateModel(
            name="StoredResponse",
            fields=[
                (
                    "id",
                    models.CharField(
                        editable=False, max_length=64, primary_key=True, serialize=False
                    ),
                ),
                ("project_id", models.CharField(max_length=40)),
                ("api_key_id", models.CharField(max_length=40)),
                ("model", models.CharField(max_length=256)),
                ("input_items_json", models.TextField()),
                ("output_json", models.TextField()),
                ("response_json", models.TextField()),
                ("created_at", models.DateTimeField()),
                ("expires_at", models.DateTimeField()),
                (
                    "organization",
                    models.ForeignKey(
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="stored_responses",
                        to="accounts.organization",
                    ),
                ),
            ],
            options={
                "indexes": [models.Index(fields=["expires_at"], name="stored_response_expiry")],
            },
        ),
    ]
