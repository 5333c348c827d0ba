"""The staff roles: Groups "billing admin" and "support" with their permissions."""

from django.db import migrations


def create_roles(apps, schema_editor):
    from billing.staff_roles import roles_sync

    roles_sync(apps=apps)


def remove_roles(apps, schema_editor):
    from billing.staff_roles import ROLE_PERMISSIONS

    apps.get_model("auth", "Group").objects.filter(name__in=list(ROLE_PERMISSIONS)).delete()


class Migration(migrations.Migration):
    dependencies = [
        ("auth", "0012_alter_user_first_name_max_length"),
        ("contenttypes", "0002_remove_content_type_name"),
        ("accounts", "0002_rate_limits"),
        ("catalog", "0001_initial"),
        ("billing", "0004_backoffice"),
    ]

    operations = [migrations.RunPython(create_roles, remove_roles)]
