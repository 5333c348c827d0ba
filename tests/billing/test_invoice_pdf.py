"""Invoices as PDF: the document read back, tax lines and the parties' snapshot, who may
download it (console, management API, back office), and markup that must fetch nothing."""

from __future__ import annotations

import http.server
import io
import json
import socket
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from io import StringIO
from pathlib import Path
from typing import Any

import pypdf
import pytest
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command
from django.test import Client
from django.urls import reverse
from django.utils import timezone
from PIL import Image
from xhtml2pdf import pisa
from xhtml2pdf.config.resources import ResourceAccessPolicy

from accounts.models import AuditLog, Organization
from accounts.permissions import Role
from accounts.principal import Principal
from billing import tax
from billing.invoice_pdf import html_to_pdf, invoice_html, invoice_pdf, invoice_pdf_filename
from billing.invoicing import invoice_finalize, invoice_refresh_draft, invoice_void
from billing.models import BillingDetails, Invoice, TaxRate
from billing.payments.stripe_sync import stripe_invoice_push
from core.errors import InvalidInput, PermissionDenied
from tests.backoffice.support import client_for as staff_client
from tests.backoffice.support import make_staff
from tests.billing.factories import CHAT, GrantFactory, at, price_book, staff_principal, usage
from tests.billing.stripe_support import use_fake_stripe
from tests.conftest import OrgWorld
from tests.console.support import org_url

pytestmark = pytest.mark.django_db

SELLER = {
    "MANTLE_SELLER_LEGAL_NAME": "Mantle Cloud Ltd",
    "MANTLE_SELLER_ADDRESS": "1 Harbour Road\\nDublin D02 X285",
    "MANTLE_SELLER_COUNTRY": "IE",
    "MANTLE_SELLER_TAX_ID": "IE6388047V",
}
BUYER_VAT = "DE136695976"  # a German VAT number with valid check digits


@pytest.fixture(autouse=True)
def _seller_and_prices(settings: Any) -> None:
    for name, value in SELLER.items():
        setattr(settings, name, value)
    price_book(CHAT, input_price="1", output_price="2")


def rate(country: str, percent: str, *, label: str = "VAT", reverse_charge: bool = False) -> None:
    TaxRate.objects.create(
        country=country,
        label=label,
        rate=Decimal(percent),
        reverse_charge=reverse_charge,
        effective_from=datetime(2020, 1, 1, tzinfo=UTC),
        reason="test rate",
    )


def details(world: OrgWorld, **fields: str) -> BillingDetails:
    values = {
        "legal_name": "Acme GmbH",
        "address": "Hauptstrasse 5\n10115 Berlin",
        "country": "DE",
        "tax_id": "",
        **fields,
    }
    return tax.billing_details_set(principal=staff_principal(), org=world.org, **values)


def finalized(org: Organization, *, month: int = 9) -> Invoice:
    """3M input + 1M output tokens at 1 and 2 per million: lines 3.00 and 2.00."""
    usage(org, at(month, 3), input_tokens=3_000_000, output_tokens=1_000_000)
    draft = invoice_refresh_draft(org=org, month=at(month))
    assert draft is not None
    return invoice_finalize(principal=staff_principal(), invoice=draft, now=at(month + 1, 2))


def pdf_text(data: bytes) -> str:
    reader = pypdf.PdfReader(io.BytesIO(data))
    # Words joined by single spaces: the extraction breaks table cells into lines.
    return " ".join(" ".join(page.extract_text() for page in reader.pages).split())


def download(client: Client, org_id: str, invoice_id: str) -> Any:
    return client.get(org_url("console-invoice-pdf", org_id, invoice_id=invoice_id))


# --- the document ---------------------------------------------------------------------------


def test_the_pdf_of_a_finalized_invoice_holds_its_stored_numbers(world: OrgWorld) -> None:
    rate("DE", "19")
    details(world)
    GrantFactory(organization=world.org, amount=Decimal("1.00"))
    inv = finalized(world.org)
    assert (inv.subtotal, inv.tax, inv.credits_applied, inv.total) == (
        Decimal("5.00"),
        Decimal("0.95"),
        Decimal("1.00"),
        Decimal("4.95"),
    )
    response = download(world.client_for(Role.BILLING), world.org.id, inv.id)
    assert response.status_code == 200
    assert response["Content-Type"] == "application/pdf"
    assert response["Content-Disposition"] == f'attachment; filename="invoice-{inv.number}.pdf"'
    assert response["Cache-Control"] == "private, no-store"
    text = pdf_text(response.content)
    assert f"Invoice {inv.number}" in text
    assert "Mantle Cloud Ltd" in text and "Tax id: IE6388047V" in text and "Ireland" in text
    assert "Acme GmbH" in text and "Hauptstrasse 5" in text and "Germany" in text
    for line in inv.lines.all():
        assert f"{line.label}" in text
        assert f" {line.amount}" in text
    tax_line = inv.tax_lines.get()
    assert (tax_line.label, tax_line.taxable_amount, tax_line.amount) == (
        "VAT 19% (DE)",
        Decimal("5.00"),
        Decimal("0.95"),
    )
    assert "VAT 19% (DE) on 5.00 0.95" in text
    assert "Subtotal (net) 5.00" in text
    assert "Total including tax 5.95" in text
    assert "Credits applied -1.00" in text
    assert f"Total due {inv.total} USD" in text
    assert "DRAFT" not in text


def test_a_buyers_tax_id_is_printed_and_reverse_charge_says_so(world: OrgWorld) -> None:
    rate("DE", "19", reverse_charge=True)
    details(world, tax_id="de 136 695 976")
    inv = finalized(world.org)
    assert BillingDetails.objects.get(organization=world.org).tax_id == BUYER_VAT
    assert (inv.tax, inv.total) == (Decimal("0.00"), Decimal("5.00"))
    line = inv.tax_lines.get()
    assert (line.reverse_charge, line.rate, line.amount) == (True, Decimal(0), Decimal("0.00"))
    text = pdf_text(invoice_pdf(inv))
    assert f"Tax id: {BUYER_VAT}" in text and "Tax id: IE6388047V" in text
    assert "VAT reverse charge (DE) on 5.00 0.00" in text
    assert "Reverse charge: the recipient accounts for the VAT." in text
    assert "Total due 5.00 USD" in text


def test_reverse_charge_needs_another_country_than_the_sellers(
    world: OrgWorld, settings: Any
) -> None:
    settings.MANTLE_SELLER_COUNTRY = "DE"
    settings.MANTLE_SELLER_TAX_ID = "DE 811 907 980"
    rate("DE", "19", reverse_charge=True)
    details(world, tax_id=BUYER_VAT)
    inv = finalized(world.org)
    assert (inv.tax, inv.total) == (Decimal("0.95"), Decimal("5.95"))
    assert inv.seller["tax_id"] == "DE811907980"


def test_the_default_rate_covers_buyers_without_a_row_or_details(world: OrgWorld) -> None:
    rate("", "10", label="GST")
    rate("DE", "19")
    inv = finalized(world.org)  # no billing details: no country
    assert inv.buyer == {
        "legal_name": world.org.name,
        "address": [],
        "country": "",
        "tax_id": "",
    }
    assert [(t.label, t.amount) for t in inv.tax_lines.all()] == [("GST 10%", Decimal("0.50"))]
    assert inv.total == Decimal("5.50")


def test_without_a_rate_there_is_no_tax_line(world: OrgWorld) -> None:
    rate("FR", "20")
    details(world)
    inv = finalized(world.org)
    assert not inv.tax_lines.exists()
    assert (inv.tax, inv.total) == (Decimal("0.00"), Decimal("5.00"))
    text = pdf_text(invoice_pdf(inv))
    assert "Total including tax" not in text and "Total due 5.00 USD" in text


def test_a_rate_from_after_the_finalization_does_not_apply(world: OrgWorld) -> None:
    TaxRate.objects.create(
        country="DE",
        label="VAT",
        rate=Decimal("19"),
        effective_from=at(10, 3),  # a day after the finalization below
        reason="later",
    )
    details(world)
    assert finalized(world.org).tax == Decimal("0.00")


@pytest.mark.parametrize(
    ("taxable", "percent", "expected"),
    [
        ("0.50", "19", "0.10"),  # 0.095: half to even, up to 0.10
        ("0.25", "10", "0.02"),  # 0.025: half to even, down to 0.02
        ("123.45", "7.7", "9.51"),  # 9.50565
        ("0.00", "19", None),  # nothing taxable: no line
    ],
)
def test_tax_is_rounded_once_to_cents_half_even(
    taxable: str, percent: str, expected: str | None
) -> None:
    rate("CH", percent)
    buyer = tax.Party(legal_name="B", address=(), country="CH", tax_id="")
    lines = tax.tax_lines_for(
        taxable=Decimal(taxable), seller=tax.seller_now(), buyer=buyer, at=timezone.now()
    )
    assert [line.amount for line in lines] == ([Decimal(expected)] if expected else [])


def test_the_pdf_keeps_the_details_it_was_finalized_with(world: OrgWorld, settings: Any) -> None:
    rate("DE", "19")
    details(world, tax_id=BUYER_VAT)
    inv = finalized(world.org)
    first = download(world.client_for(Role.BILLING), world.org.id, inv.id).content
    # Everything the PDF was made from changes afterwards...
    details(world, legal_name="Acme Holding AG", address="Neuer Weg 1\n80331 Muenchen")
    settings.MANTLE_SELLER_LEGAL_NAME = "Someone Else Inc"
    settings.MANTLE_SELLER_TAX_ID = "IE9825613N"
    TaxRate.objects.create(
        country="DE",
        label="VAT",
        rate=Decimal("25"),
        effective_from=timezone.now() - timedelta(hours=1),
        reason="a new rate",
    )
    # ...and the invoice's PDF is the same document, byte for byte.
    again = download(world.client_for(Role.BILLING), world.org.id, inv.id).content
    assert again == first
    text = pdf_text(again)
    assert "Acme GmbH" in text and "Hauptstrasse 5" in text and "Acme Holding" not in text
    assert "Mantle Cloud Ltd" in text and "Someone Else" not in text
    assert "VAT 19% (DE) on 5.00 0.95" in text


def test_a_draft_is_watermarked_and_shows_todays_details(world: OrgWorld) -> None:
    details(world)
    usage(world.org, at(9, 3), input_tokens=1_000_000)
    draft = invoice_refresh_draft(org=world.org, month=at(9))
    assert draft is not None
    response = download(world.client_for(Role.OWNER), world.org.id, draft.id)
    assert response.status_code == 200
    assert response["Content-Disposition"] == f'attachment; filename="invoice-draft-{draft.id}.pdf"'
    text = pdf_text(response.content)
    assert "DRAFT" in text.split()
    assert "Draft invoice" in text and "not an invoice" in text
    assert "Acme GmbH" in text


def test_credits_pay_the_tax_too(world: OrgWorld) -> None:
    rate("DE", "19")
    details(world)
    GrantFactory(organization=world.org, amount=Decimal("10.00"))
    inv = finalized(world.org)
    assert (inv.tax, inv.credits_applied, inv.total, inv.status) == (
        Decimal("0.95"),
        Decimal("5.95"),
        Decimal("0.00"),
        Invoice.Status.PAID,
    )
    text = pdf_text(invoice_pdf(inv))
    assert "Credits applied -5.95" in text and "Total (paid) 0.00 USD" in text


def test_a_void_invoice_is_watermarked_void(world: OrgWorld) -> None:
    inv = invoice_void(principal=staff_principal(), invoice=finalized(world.org), reason="wrong")
    text = pdf_text(invoice_pdf(inv))
    assert "VOID" in text.split() and "nothing is due on this invoice" in text


def test_the_filename_is_safe_whatever_the_number(world: OrgWorld) -> None:
    inv = Invoice(organization=world.org, number='MAN"/../2026 \r\n1', id="inv_x")
    assert invoice_pdf_filename(inv) == "invoice-MAN__.._2026___1.pdf"


# --- who may download it -------------------------------------------------------------------


def test_another_organizations_invoice_is_404_everywhere(
    world: OrgWorld, other_world: OrgWorld
) -> None:
    theirs = finalized(other_world.org)
    client = world.client_for(Role.OWNER)
    assert download(client, world.org.id, theirs.id).status_code == 404
    api = client.get(f"/api/v1/organizations/{world.org.id}/billing/invoices/{theirs.id}/pdf")
    assert api.status_code == 404
    # Their organization in the URL: not a member, not found either.
    assert download(client, other_world.org.id, theirs.id).status_code == 404


@pytest.mark.parametrize("role", [Role.DEVELOPER, Role.VIEWER])
def test_members_without_billing_view_get_403(world: OrgWorld, role: Role) -> None:
    inv = finalized(world.org)
    client = world.client_for(role)
    response = download(client, world.org.id, inv.id)
    assert response.status_code == 403
    assert b"%PDF" not in response.content
    api = client.get(f"/api/v1/organizations/{world.org.id}/billing/invoices/{inv.id}/pdf")
    assert api.status_code == 403


def test_an_organization_looping_pdf_downloads_is_refused_past_its_budget(
    world: OrgWorld, other_world: OrgWorld, settings: Any
) -> None:
    """The attack: one tenant asks for its PDF in a loop; each render is CPU-bound under a
    process-wide lock, in processes that also serve the gateway. Past its budget the
    console and the API answer 429 without rendering; other organizations and the back
    office are not concerned."""
    settings.MANTLE_INVOICE_PDF_MAX_PER_ORG = 3
    inv = finalized(world.org)
    client = world.client_for(Role.BILLING)
    api = f"/api/v1/organizations/{world.org.id}/billing/invoices/{inv.id}/pdf"
    assert download(client, world.org.id, inv.id).status_code == 200
    assert client.get(api).status_code == 200
    assert download(client, world.org.id, inv.id).status_code == 200
    refused = download(client, world.org.id, inv.id)
    assert refused.status_code == 429
    assert b"%PDF" not in refused.content
    assert "at most 3 invoice PDFs per organization within 10 minutes" in refused.content.decode()
    answer = client.get(api)
    assert answer.status_code == 429
    assert answer.json()["error"]["code"] == "invoice_pdf_throttled"
    theirs = finalized(other_world.org)
    assert (
        download(other_world.client_for(Role.OWNER), other_world.org.id, theirs.id).status_code
        == 200
    )
    staff = make_staff()
    url = reverse("admin:backoffice-invoice-pdf", args=[inv.id])
    assert staff_client(staff.support).get(url).status_code == 200


def test_the_management_api_serves_the_pdf_and_the_tax_lines(world: OrgWorld) -> None:
    rate("DE", "19")
    details(world)
    inv = finalized(world.org)
    client = world.client_for(Role.BILLING)
    base = f"/api/v1/organizations/{world.org.id}/billing/invoices/{inv.id}"
    response = client.get(f"{base}/pdf")
    assert response.status_code == 200
    assert response["Content-Type"] == "application/pdf"
    assert response.content == invoice_pdf(inv)
    body = client.get(base).json()
    assert (body["subtotal"], body["tax"], body["total"]) == ("5.00", "0.95", "5.95")
    assert body["tax_lines"] == [
        {
            "label": "VAT 19% (DE)",
            "country": "DE",
            "rate": "19.000",
            "taxable_amount": "5.00",
            "amount": "0.95",
            "reverse_charge": False,
            "note": "",
        }
    ]


def test_the_back_office_downloads_the_same_pdf(world: OrgWorld) -> None:
    staff = make_staff()
    inv = finalized(world.org)
    url = reverse("admin:backoffice-invoice-pdf", args=[inv.id])
    response = staff_client(staff.support).get(url)
    assert response.status_code == 200
    assert response.content == invoice_pdf(inv)
    page = staff_client(staff.support).get(reverse("admin:backoffice-invoice", args=[inv.id]))
    assert url in page.content.decode()
    assert staff_client(staff.no_role).get(url).status_code == 403
    assert staff_client(staff.customer).get(url).status_code in (302, 403)
    missing = reverse("admin:backoffice-invoice-pdf", args=["inv_missing"])
    assert staff_client(staff.support).get(missing).status_code == 404
    # The rates and the buyers' details are listed, read-only.
    rate("DE", "19")
    details(world)
    for name in ("admin:billing_taxrate_changelist", "admin:billing_billingdetails_changelist"):
        listing = staff_client(staff.support).get(reverse(name))
        assert listing.status_code == 200
    body = staff_client(staff.support).get(reverse("admin:billing_billingdetails_changelist"))
    assert "Acme GmbH" in body.content.decode()


def test_the_console_invoice_page_links_the_pdf_and_shows_the_tax(world: OrgWorld) -> None:
    rate("DE", "19")
    details(world)
    inv = finalized(world.org)
    page = world.client_for(Role.BILLING).get(
        org_url("console-invoice", world.org.id, invoice_id=inv.id)
    )
    body = page.content.decode()
    assert org_url("console-invoice-pdf", world.org.id, invoice_id=inv.id) in body
    assert "Download PDF" in body and "VAT 19% (DE) on 5.00" in body
    # The parties as finalized, escaped like everything a customer wrote.
    assert "<strong>Acme GmbH</strong><br>Hauptstrasse 5<br>10115 Berlin<br>DE" in body
    assert "<strong>Mantle Cloud Ltd</strong><br>1 Harbour Road" in body


def test_the_stripe_invoice_carries_the_tax_and_adds_up(world: OrgWorld, settings: Any) -> None:
    fake = use_fake_stripe(settings)
    rate("DE", "19")
    details(world)
    inv = finalized(world.org)
    pushed = stripe_invoice_push(invoice_id=inv.id)
    stripe_invoice = fake.invoices[pushed.id]
    assert [(i["description"], i["amount"]) for i in stripe_invoice["lines"]] == [
        *((line.label, int(line.amount * 100)) for line in inv.lines.order_by("position")),
        ("VAT 19% (DE)", 95),
    ]
    assert stripe_invoice["total"] == 595 == int(inv.total * 100)


# --- tax rates ---------------------------------------------------------------------------------


def test_staff_add_a_tax_rate_with_the_command_and_it_is_audited() -> None:
    staff = staff_principal().user
    assert staff is not None
    start = (timezone.now() + timedelta(hours=2)).replace(minute=0, second=0, microsecond=0)
    out = StringIO()
    call_command(
        "billing",
        "tax-rate-set",
        "--actor",
        staff.email,
        "--country",
        "de",
        "--label",
        "VAT",
        "--rate",
        "19",
        "--reverse-charge",
        "--effective-from",
        start.isoformat(),
        "--reason",
        "German VAT registration",
        stdout=out,
    )
    row = TaxRate.objects.get()
    assert (row.country, row.label, row.rate, row.reverse_charge, row.effective_from) == (
        "DE",
        "VAT",
        Decimal("19.000"),
        True,
        start,
    )
    assert f"tax rate {row.id}" in out.getvalue()
    entry = AuditLog.objects.get(action="billing.tax_rate_set")
    assert entry.metadata["reason"] == "German VAT registration"


@pytest.mark.parametrize(
    ("changes", "param"),
    [
        ({"rate": "101"}, "rate"),
        ({"rate": "-1"}, "rate"),
        ({"rate": "19.0001"}, "rate"),
        ({"rate": "NaN"}, "rate"),
        ({"country": "XX"}, "country"),
        ({"label": ""}, "label"),
        ({"label": "V\x00AT"}, "label"),
        ({"effective_from": "past"}, "effective_from"),
        ({"effective_from": "not whole"}, "effective_from"),
        ({"reason": ""}, "reason"),
    ],
)
def test_bad_tax_rates_are_refused(changes: dict[str, str], param: str) -> None:
    start = (timezone.now() + timedelta(hours=2)).replace(minute=0, second=0, microsecond=0)
    values: dict[str, Any] = {
        "country": "DE",
        "label": "VAT",
        "rate": "19",
        "effective_from": start,
        "reason": "registration",
        **changes,
    }
    if values["effective_from"] == "past":
        values["effective_from"] = start - timedelta(days=1)
    elif values["effective_from"] == "not whole":
        values["effective_from"] = start + timedelta(minutes=30)
    with pytest.raises(InvalidInput) as caught:
        tax.tax_rate_set(principal=staff_principal(), **values)
    assert caught.value.param == param
    assert not TaxRate.objects.exists()


def test_customers_cannot_set_tax_rates(world: OrgWorld) -> None:
    owner = Principal(user=world.users[Role.OWNER])
    start = (timezone.now() + timedelta(hours=2)).replace(minute=0, second=0, microsecond=0)
    with pytest.raises(PermissionDenied):
        tax.tax_rate_set(
            principal=owner, country="DE", label="VAT", rate="0", effective_from=start, reason="x"
        )
    assert not TaxRate.objects.exists()


# --- the buyer's details ----------------------------------------------------------------------


def test_billing_members_set_the_details_and_it_is_audited(world: OrgWorld) -> None:
    client = world.client_for(Role.BILLING)
    url = org_url("console-billing-details", world.org.id)
    response = client.post(
        url,
        {
            "legal_name": "Acme Ltd",
            "address": "10 Downing Street\r\nLondon SW1A 2AA\r\n",
            "country": "gb",
            "tax_id": "GB 980 7806 84",
        },
    )
    assert response.status_code == 302
    row = BillingDetails.objects.get(organization=world.org)
    assert (row.legal_name, row.address, row.country, row.tax_id) == (
        "Acme Ltd",
        "10 Downing Street\nLondon SW1A 2AA",
        "GB",
        "980780684",
    )
    entry = AuditLog.objects.get(action="billing.details_set")
    assert entry.metadata["tax_id"] == "980780684"
    page = client.get(url).content.decode()
    assert "10 Downing Street<br>London SW1A 2AA" in page


def test_the_management_api_reads_and_sets_the_details(world: OrgWorld) -> None:
    client = world.client_for(Role.BILLING)
    url = f"/api/v1/organizations/{world.org.id}/billing/details"
    empty = client.get(url).json()
    assert empty == {
        "legal_name": "",
        "address": "",
        "country": "",
        "tax_id": "",
        "updated_at": None,
    }
    body = {
        "legal_name": "Acme GmbH",
        "address": "Hauptstrasse 5\n10115 Berlin",
        "country": "de",
        "tax_id": "136695976",
    }
    response = client.put(url, json.dumps(body), content_type="application/json")
    assert response.status_code == 200
    got = client.get(url).json()
    assert (got["legal_name"], got["address"], got["country"], got["tax_id"]) == (
        "Acme GmbH",
        "Hauptstrasse 5\n10115 Berlin",
        "DE",
        BUYER_VAT,
    )
    bad = client.put(
        url, json.dumps({**body, "tax_id": "DE123456789"}), content_type="application/json"
    )
    assert bad.status_code == 400
    assert bad.json()["error"]["param"] == "tax_id"
    assert BillingDetails.objects.get(organization=world.org).tax_id == BUYER_VAT
    # An admin reads them and may not change them.
    admin = world.client_for(Role.ADMIN)
    assert admin.get(url).status_code == 200
    denied = admin.put(url, json.dumps(body), content_type="application/json")
    assert denied.status_code == 403


def test_admins_see_the_details_but_may_not_change_them(world: OrgWorld) -> None:
    details(world)
    client = world.client_for(Role.ADMIN)
    url = org_url("console-billing-details", world.org.id)
    page = client.get(url)
    assert page.status_code == 200 and "Acme GmbH" in page.content.decode()
    assert "billing-details-form" not in page.content.decode()
    response = client.post(
        url, {"legal_name": "Evil", "address": "x", "country": "DE", "tax_id": ""}
    )
    assert response.status_code == 403
    assert BillingDetails.objects.get(organization=world.org).legal_name == "Acme GmbH"
    assert world.client_for(Role.DEVELOPER).get(url).status_code == 403


@pytest.mark.parametrize(
    ("fields", "param", "message"),
    [
        ({"legal_name": "x" * 201}, "legal_name", "at most 200 characters"),
        ({"legal_name": "   "}, "legal_name", "must not be empty"),
        ({"legal_name": "Acme\x00GmbH"}, "legal_name", "U+0000"),
        ({"legal_name": "Acme\u202eHbmG"}, "legal_name", "U+202E"),
        ({"address": "a" * 501}, "address", "at most 500 characters"),
        ({"address": "\n".join(["line"] * 7)}, "address", "at most 6 lines"),
        ({"address": "Street 1\x1b[2J"}, "address", "U+001B"),
        ({"country": "XX"}, "country", "not a two-letter country code"),
        ({"country": "DEU"}, "country", "not a two-letter country code"),
        ({"tax_id": "DE123456789"}, "tax_id", "not a valid DE VAT number"),
        ({"tax_id": "FR40303265045"}, "tax_id", "not a valid DE VAT number"),
        ({"country": "GB", "tax_id": "GB123"}, "tax_id", "not a valid GB tax number"),
        ({"country": "US", "tax_id": "<script>"}, "tax_id", "letters, digits"),
        ({"country": "US", "tax_id": "1" * 33}, "tax_id", "letters, digits"),
    ],
)
def test_bad_details_are_refused_and_nothing_is_written(
    world: OrgWorld, fields: dict[str, str], param: str, message: str
) -> None:
    with pytest.raises(InvalidInput) as caught:
        details(world, **fields)
    assert caught.value.param == param
    assert message in caught.value.message
    assert not BillingDetails.objects.exists()
    # The console says the same on the field, with a 400.
    data = {"legal_name": "Acme GmbH", "address": "Street 1", "country": "DE", "tax_id": ""}
    data.update(fields)
    response = world.client_for(Role.OWNER).post(
        org_url("console-billing-details", world.org.id), data
    )
    assert response.status_code == 400
    assert not BillingDetails.objects.exists()


def test_a_us_tax_id_is_bounded_free_text(world: OrgWorld) -> None:
    assert details(world, country="US", tax_id="12-3456789").tax_id == "12-3456789"


def test_bad_seller_settings_stop_the_start(settings: Any) -> None:
    settings.MANTLE_SELLER_COUNTRY = "ZZ"
    with pytest.raises(ImproperlyConfigured, match="MANTLE_SELLER_COUNTRY"):
        tax.check_seller_settings()
    settings.MANTLE_SELLER_COUNTRY = "IE"
    settings.MANTLE_SELLER_TAX_ID = "IE0000000X"
    with pytest.raises(ImproperlyConfigured, match="MANTLE_SELLER_TAX_ID"):
        tax.check_seller_settings()


def test_a_stored_snapshot_is_bounded_again_when_printed() -> None:
    party = tax.Party.from_json(
        {"legal_name": "n" * 10_000, "address": ["a" * 10_000] * 1000, "tax_id": "t" * 999}
    )
    assert len(party.legal_name) == tax.LEGAL_NAME_MAX
    assert len(party.address) == tax.ADDRESS_MAX_LINES
    assert all(len(line) == tax.ADDRESS_MAX for line in party.address)
    assert len(party.tax_id) == tax.TAX_ID_MAX


# --- markup that must fetch nothing ---------------------------------------------------------

HOSTILE = (
    '<img src="{url}/img.png"> <link rel="stylesheet" href="file:///etc/passwd">'
    '<link rel="stylesheet" href="{url}/x.css"> <img src="/etc/hostname">'
)


def test_customer_text_is_escaped_and_fetches_nothing(world: OrgWorld, listener: Listener) -> None:
    hostile = HOSTILE.format(url=listener.url)[:200]
    details(world, legal_name=hostile, address=f'<img src="{listener.url}/a.png">\nStreet 1')
    inv = finalized(world.org)
    html = invoice_html(inv)
    assert "<img" not in html.split("<body>", 1)[1]
    assert "&lt;img src=&quot;" in html
    data = invoice_pdf(inv)
    text = pdf_text(data)
    assert f'<img src="{listener.url}/img.png">' in text  # printed as text
    assert listener.hits == []
    assert all(not page.images for page in pypdf.PdfReader(io.BytesIO(data)).pages)
    # The console's invoice page shows the same text, escaped too.
    page = world.client_for(Role.BILLING).get(
        org_url("console-invoice", world.org.id, invoice_id=inv.id)
    )
    assert f'<img src="{listener.url}' not in page.content.decode()
    assert f"&lt;img src=&quot;{listener.url}/img.png&quot;&gt;" in page.content.decode()
    assert listener.hits == []


def test_the_renderer_refuses_every_url_and_file_even_in_raw_markup(
    listener: Listener, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """html_to_pdf with markup that names a local image, a stylesheet and URLs: nothing is
    read. The controls render the same markup under xhtml2pdf's own policies, which do
    read them, so the test would see a fetch."""
    monkeypatch.chdir(tmp_path)  # the default policy reads files under the working directory
    Image.new("RGB", (8, 8), "red").save(tmp_path / "pic.png")
    markup = (
        f'<html><body><p>x</p><img src="{tmp_path}/pic.png"><img src="file://{tmp_path}/pic.png">'
        f'<img src="{listener.url}/remote.png"><link rel="stylesheet" href="{listener.url}/s.css">'
        "</body></html>"
    )
    ours = html_to_pdf(markup)
    assert listener.hits == []
    assert all(not page.images for page in pypdf.PdfReader(io.BytesIO(ours)).pages)
    # Controls: the same markup under policies that allow the reads.
    out = io.BytesIO()
    pisa.CreatePDF(markup, dest=out, resource_policy=ResourceAccessPolicy(base_dir=tmp_path))
    assert any(page.images for page in pypdf.PdfReader(io.BytesIO(out.getvalue())).pages)
    pisa.CreatePDF(
        markup,
        dest=io.BytesIO(),
        resource_policy=ResourceAccessPolicy(base_dir=tmp_path, allow_private_networks=True),
    )
    assert listener.hits  # the permissive policy did reach the listener


class Listener:
    """A real HTTP server on localhost that records every request it gets."""

    def __init__(self) -> None:
        hits: list[str] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                hits.append(self.path)
                self.send_response(404)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.hits = hits
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        host, port = self.server.server_address[:2]
        self.url = f"http://{socket.gethostbyname(str(host))}:{port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def listener() -> Iterator[Listener]:
    server = Listener()
    try:
        yield server
    finally:
        server.close()
