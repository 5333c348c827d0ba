"""Suspending in the admin reaches a real gateway process: the organization's keys stop."""

from __future__ import annotations

import time

import openai
import pytest
from django.urls import reverse

from accounts.models import Organization
from billing import staff_roles as roles
from tests.backoffice.support import client_for, staff_user
from tests.gateway.conftest import ECHO, Served, live, served  # noqa: F401

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True), pytest.mark.models]

# The change is written to the key cache at commit; the gateway reads it on every request.
WITHIN_S = 5.0


def call(target: Served) -> str:
    done = target.client().completions.create(model=ECHO, prompt="ping", max_tokens=2)
    return done.object


def refused_within(target: Served, seconds: float) -> openai.PermissionDeniedError | None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            call(target)
        except openai.PermissionDeniedError as exc:
            return exc
        time.sleep(0.1)
    return None


def test_suspending_in_the_admin_stops_the_keys_at_the_gateway(served: Served) -> None:  # noqa: F811
    admin = client_for(staff_user(roles.BILLING_ADMIN))
    status_url = reverse("admin:backoffice-customer-status", args=[served.org.id])
    assert call(served) == "text_completion"

    response = admin.post(
        status_url, {"status": "suspended", "reason": "fraud review", "form_token": "e2e-suspend-1"}
    )

    assert response.status_code == 302
    assert Organization.objects.get(pk=served.org.pk).status == "suspended"
    refused = refused_within(served, WITHIN_S)
    assert refused is not None, f"the gateway still accepted the key after {WITHIN_S}s"
    assert refused.status_code == 403
    assert refused.code == "organization_suspended"

    admin.post(status_url, {"status": "active", "reason": "cleared", "form_token": "e2e-suspend-2"})

    deadline = time.monotonic() + WITHIN_S
    while True:
        try:
            assert call(served) == "text_completion"
            break
        except openai.PermissionDeniedError:
            assert time.monotonic() < deadline, "the key stayed refused after reactivation"
            time.sleep(0.1)
