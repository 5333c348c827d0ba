"""Held (unpriced) usage in the back office: shown on the customer and invoice pages."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.core.management import call_command
from django.urls import reverse
from django.utils import timezone

from billing.invoicing import invoice_finalize, invoice_refresh_draft
from billing.models import HeldUsage, Invoice
from billing.periods import month_start
from tests.backoffice.support import Staff, client_for
from tests.billing.factories import CHAT, EMBED, price_book, staff_principal, usage
from tests.factories import OrganizationFactory

pytestmark = pytest.mark.django_db


def finalized_with_held_usage() -> Invoice:
    price_book(CHAT)
    org = OrganizationFactory(name="Held Co")
    last_month = month_start(month_start(timezone.now()) - timedelta(days=1))
    usage(org, last_month + timedelta(hours=3), input_tokens=1_000_000)
    usage(org, last_month + timedelta(hours=4), model=EMBED, input_tokens=4321)
    draft = invoice_refresh_draft(org=org, month=last_month)
    assert draft is not None
    return invoice_finalize(principal=staff_principal(), invoice=draft)


def test_the_customer_and_invoice_pages_show_the_held_usage(staff: Staff) -> None:
    invoice = finalized_with_held_usage()
    client = client_for(staff.support)

    customer = client.get(reverse("admin:backoffice-customer", args=[invoice.organization_id]))
    page = client.get(reverse("admin:backoffice-invoice", args=[invoice.id]))

    for response in (customer, page):
        assert response.status_code == 200
        body = response.content.decode()
        assert "Held usage (unpriced" in body
        assert body.count('data-testid="held-usage"') == 1
        assert EMBED in body and "4321" in body
    assert invoice.number in customer.content.decode()


def test_an_operator_releases_held_usage_from_the_command_line(staff: Staff) -> None:
    invoice = finalized_with_held_usage()
    [held] = invoice.held_usage.all()

    call_command(
        "billing",
        "held-release",
        "--actor",
        staff.billing_admin.email,
        "--held",
        str(held.id),
        "--unit-price",
        "2",
        "--reason",
        "priced after the fact",
    )

    held.refresh_from_db()
    assert (held.status, str(held.unit_price)) == (HeldUsage.Status.RELEASED, "2.000000000")
