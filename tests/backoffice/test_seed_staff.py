"""The demo operator that bin/run creates: staff, billing admin, created once, enrolled."""

from __future__ import annotations

import re
from base64 import b32decode
from io import StringIO

import pytest
from django.core.management import call_command
from django.test import Client
from django.urls import reverse
from django_otp.oath import TOTP

from accounts.models import User
from billing.staff_roles import BILLING_ADMIN

pytestmark = pytest.mark.django_db


def test_seed_staff_creates_one_billing_admin_who_can_log_in() -> None:
    out = StringIO()
    call_command("seed_staff", stdout=out)
    again = StringIO()
    call_command("seed_staff", stdout=again)

    staff = User.objects.get(email="ops@mantle.local")
    assert staff.is_staff and not staff.is_superuser
    assert list(staff.groups.values_list("name", flat=True)) == [BILLING_ADMIN]
    assert User.objects.filter(email="ops@mantle.local").count() == 1
    password = re.search(r"password: (\S+)", out.getvalue())
    assert password is not None
    secret = re.search(r"TOTP secret: ([A-Z2-7]+)", out.getvalue())
    assert secret is not None
    assert "secret" not in again.getvalue()  # shown once
    client = Client()
    assert client.login(username="ops@mantle.local", password=password.group(1))
    # The password alone does not open the back office: the printed secret's code does.
    assert client.get("/admin/").status_code == 302
    code = f"{TOTP(b32decode(secret.group(1))).token():06d}"
    verified = client.post(reverse("admin:backoffice-two-factor-verify"), {"code": code})
    assert verified.status_code == 302
    assert client.get("/admin/").status_code == 200
