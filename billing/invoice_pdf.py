"""Invoices as PDF documents: one template, rendered by xhtml2pdf (docs/decisions.md).

What the PDF shows comes from the invoice alone once it is finalized: its lines, its tax
lines and the snapshot of the seller and the buyer taken at finalization (billing/tax.py),
so the same invoice gives the same bytes on every download. A draft shows the current
details and a DRAFT watermark; a void invoice a VOID one.

The renderer fetches nothing: every URL and path the markup could name (images,
stylesheets, fonts) is refused by xhtml2pdf's resource policy (no remote fetch, no
directory to read from, no resource at all) and the link callback maps every link to an
empty `data:` URI. Text a customer wrote is escaped by the template (Django's autoescape)
and bounded when it is written and again when it is printed (`tax.Party.from_json`).
"""

from __future__ import annotations

import io
import re
import threading
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.http import HttpResponse
from django.template.loader import render_to_string
from reportlab import rl_config
from xhtml2pdf import pisa
from xhtml2pdf.config.resources import ResourceAccessPolicy

from billing import tax
from billing.models import Invoice
from core.errors import DomainError
from core.redis import get_redis

# Nothing to fetch, nothing to read: no remote, no base directory, no resource at all; a
# template that has grown too big or too slow is an error rather than a long render.
NO_FETCH_POLICY = ResourceAccessPolicy.server(
    base_dir=None,
    allow_remote=False,
    allowed_hosts=frozenset(),
    max_resources=0,
    max_total_bytes=0,
    max_render_seconds=60,
    max_document_bytes=4 * 1024 * 1024,
    max_depth=60,
)

# ReportLab's invariant mode (no creation time or random document id in the file) is a
# module setting: it is switched on for our renders only, one render at a time.
_RENDER_LOCK = threading.Lock()
_UNSAFE_FILENAME = re.compile(r"[^A-Za-z0-9._-]")


# Renders an organization may ask for within a window (console and management API; the
# back office is not counted): a render is CPU-bound Python under the process-wide lock
# below, in the processes that serve the gateway too, so it must not be free to loop.
BUDGET_PREFIX = "mantle:invoice-pdf:"
_TAKE = """
local n = redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], ARGV[1], 'NX')
return {n, redis.call('TTL', KEYS[1])}
"""


class InvoicePdfThrottled(DomainError):
    status = 429
    code = "invoice_pdf_throttled"


def invoice_pdf_budget_take(organization_id: str) -> None:
    """Counts one render for the organization; InvoicePdfThrottled past
    MANTLE_INVOICE_PDF_MAX_PER_ORG within MANTLE_INVOICE_PDF_WINDOW_S (a window from its
    first render, so a steady trickle cannot keep it refused)."""
    limit: int = settings.MANTLE_INVOICE_PDF_MAX_PER_ORG
    window: int = settings.MANTLE_INVOICE_PDF_WINDOW_S
    count, ttl = get_redis().eval(_TAKE, 1, f"{BUDGET_PREFIX}{organization_id}", window)
    if int(count) <= limit:
        return
    wait = max(1, -(-(int(ttl) if int(ttl) > 0 else window) // 60))
    raise InvoicePdfThrottled(
        f"at most {limit} invoice PDFs per organization within {window // 60} minutes: "
        f"try again in {wait} minute{'s' if wait != 1 else ''}"
    )


class InvoicePdfError(RuntimeError):
    """xhtml2pdf could not render the invoice (a bug of the template, never of the data)."""


def _no_link(uri: str, rel: str) -> str:
    """The link callback: every link the markup names becomes an empty data URI."""
    return "data:,"


def _parties(inv: Invoice) -> tuple[tax.Party, tax.Party, bool]:
    """(seller, buyer, whether they are the invoice's own snapshot)."""
    if inv.status == Invoice.Status.DRAFT:
        return tax.seller_now(), tax.buyer_of(inv.organization), False
    if inv.seller or inv.buyer:
        return tax.Party.from_json(inv.seller), tax.Party.from_json(inv.buyer), True
    # Finalized before the snapshot existed: the names alone, nothing from today's details.
    seller = tax.Party(legal_name="", address=(), country="", tax_id="")
    buyer = tax.Party(
        legal_name=inv.organization.name[: tax.LEGAL_NAME_MAX], address=(), country="", tax_id=""
    )
    return seller, buyer, False


def _watermark(inv: Invoice) -> str:
    return {Invoice.Status.DRAFT: "DRAFT", Invoice.Status.VOID: "VOID"}.get(inv.status, "")  # type: ignore[call-overload]


def invoice_html(inv: Invoice) -> str:
    """The invoice as the XHTML the PDF is rendered from."""
    seller, buyer, snapshot = _parties(inv)
    context: dict[str, Any] = {
        "inv": inv,
        "lines": list(inv.lines.order_by("position")),
        "tax_lines": list(inv.tax_lines.order_by("position")),
        "gross": inv.subtotal + inv.tax,
        "seller": seller,
        "buyer": buyer,
        "snapshot": snapshot,
        "watermark": _watermark(inv),
        "period_last": inv.period_end - timedelta(days=1),
    }
    return render_to_string("billing/invoice_pdf.html", context)


def invoice_pdf(inv: Invoice) -> bytes:
    """The invoice as a PDF document (bytes); the same bytes for the same invoice."""
    try:
        return html_to_pdf(invoice_html(inv))
    except InvoicePdfError as exc:
        raise InvoicePdfError(f"the PDF of invoice {inv.id} could not be rendered: {exc}") from exc


def html_to_pdf(html: str) -> bytes:
    """XHTML to PDF under NO_FETCH_POLICY, in ReportLab's invariant mode."""
    out = io.BytesIO()
    with _RENDER_LOCK:
        previous = rl_config.invariant
        rl_config.invariant = 1
        try:
            status = pisa.CreatePDF(
                html,
                dest=out,
                encoding="utf-8",
                link_callback=_no_link,
                resource_policy=NO_FETCH_POLICY,
            )
        finally:
            rl_config.invariant = previous
    if status.err:
        raise InvoicePdfError(f"xhtml2pdf reported {status.err} error(s)")
    return out.getvalue()


def invoice_pdf_filename(inv: Invoice) -> str:
    """`MAN-2026-000123.pdf`, or `draft-inv_....pdf`: letters, digits, '.', '_' and '-'."""
    stem = inv.number or f"draft-{inv.id}"
    return _UNSAFE_FILENAME.sub("_", f"invoice-{stem}")[:120] + ".pdf"


def invoice_pdf_response(inv: Invoice) -> HttpResponse:
    """The PDF as a download: an attachment with a safe name, never cached by a proxy."""
    response = HttpResponse(invoice_pdf(inv), content_type="application/pdf")
    response["Content-Disposition"] = f'attachment; filename="{invoice_pdf_filename(inv)}"'
    response["Cache-Control"] = "private, no-store"
    response["X-Content-Type-Options"] = "nosniff"
    return response
