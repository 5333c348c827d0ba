"""Organizations may require MFA of owners and admins; recovery codes are kept as digests.

Recovery codes (django-otp static tokens) used to be stored as typed; from here on only
a keyed digest of each is stored (accounts/two_factor.py, `recovery_code_digest`), and
the codes already issued are replaced by their digests, so they keep working.
"""

from __future__ import annotations

from typing import Any

from django.db import migrations, models
from django.utils.crypto import salted_hmac

# The same salt and length as accounts.two_factor (kept here so the migration never
# changes meaning when that module does).
_SALT = "mantle.accounts.recovery-code"


def _digest(code: str) -> str:
    return salted_hmac(_SALT, code, algorithm="sha256").hexdigest()[:16]


def digest_issued_codes(apps: Any, schema_editor: Any) -> None:
    token_model = apps.get_model("otp_static", "StaticToken")
    for token in token_model.objects.all().iterator():
        if len(token.token) == 10:  # a code as typed (10 base32 characters)
            token.token = _digest(token.token)
            token.save(update_fields=["token"])


class Migration(migrations.Migration):
    dependencies = [
        ("accounts", "0003_email_verification_invitations"),
        ("otp_static", "0003_add_timestamps"),
    ]

    operations = [
        migrations.AddField(
            model_name="organization",
            name="mfa_required",
            field=models.BooleanField(default=False),
        ),
        migrations.RunPython(digest_issued_codes, migrations.RunPython.noop, elidable=True),
    ]
