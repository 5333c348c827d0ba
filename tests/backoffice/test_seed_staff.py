"""The demo operator that bin/run creates: staff, billing admin, created once."""

from __future__ import annotations

import re
from io import StringIO

import pytest
from django.core.management import call_command
from django.test import Client

from accounts.models import User
from billing.backoffice.roles import BILLING_ADMIN

pytestmark = pytest.mark.django_db


def test_seed_staff_creates_one_billing_admin_who_can_log_in() -> None:
    out = StringIO()
    call_command("seed_staff", stdout=out)
    call_command("seed_staff", stdout=StringIO())

    staff = User.objects.get(email="ops@mantle.local")
    assert staff.is_staff and not staff.is_superuser
    assert list(staff.groups.values_list("name", flat=True)) == [BILLING_ADMIN]
    assert User.objects.filter(email="ops@mantle.local").count() == 1
    password = re.search(r"password: (\S+)", out.getvalue())
    assert password is not None
    client = Client()
    assert client.login(username="ops@mantle.local", password=password.group(1))
    assert client.get("/admin/").status_code == 200
