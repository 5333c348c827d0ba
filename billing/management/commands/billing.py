"""`manage.py billing <action>`: the staff money actions until the back office has a UI.

Every action names the staff member who takes it (`--actor`, an is_staff user) and,
where money moves, a `--reason`; each goes through its service, so it is validated
and recorded in the audit log exactly as the back office will do it.
"""

from __future__ import annotations

from argparse import ArgumentParser
from datetime import datetime
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from accounts.models import Organization, User
from accounts.principal import Principal
from billing import invoicing, pricing, tax, wallet
from billing.credits import credit_adjust, credit_grant
from billing.held_usage import held_usage_release, held_usage_write_off
from billing.models import CreditLedgerEntry, HeldUsage, Invoice, TokenKind
from billing.periods import parse_month
from billing.tasks import wallet_sync_all
from core.errors import DomainError


def _when(value: str) -> datetime:
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if parsed.tzinfo is None:
        raise ValueError(f"{value!r} has no time zone (add Z or +00:00)")
    return parsed


class Command(BaseCommand):
    help = __doc__

    def add_arguments(self, parser: ArgumentParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True)

        def action(name: str, help_: str, *, actor: bool = True) -> ArgumentParser:
            p = sub.add_parser(name, help=help_)
            if actor:
                p.add_argument("--actor", required=True, help="email of the staff member acting")
            return p

        p = action("price-set", "a new list price per million tokens, from a whole hour on")
        p.add_argument("--model", required=True)
        p.add_argument("--kind", required=True, choices=TokenKind.values)
        p.add_argument("--unit-price", required=True, help="per million units, e.g. 0.15")
        p.add_argument("--effective-from", required=True, type=_when)
        p.add_argument("--currency", default="USD")
        p.add_argument("--reason", required=True)

        p = action("tax-rate-set", "a tax rate for buyers of a country, from a whole hour on")
        p.add_argument("--country", default="", help="ISO 3166-1 alpha-2; empty: the default")
        p.add_argument("--label", required=True, help="what the invoice calls it: VAT, GST")
        p.add_argument("--rate", required=True, help="percent, e.g. 19 or 7.7")
        p.add_argument(
            "--reverse-charge",
            action="store_true",
            help="buyers with a tax id in another country than the seller's pay no tax",
        )
        p.add_argument("--effective-from", required=True, type=_when)
        p.add_argument("--reason", required=True)

        p = action("override-create", "contract terms: rate, discount or commit_tier")
        p.add_argument("--org", required=True)
        p.add_argument("--kind", required=True, choices=["rate", "discount", "commit_tier"])
        p.add_argument("--model", default="")
        p.add_argument("--token-kind", default="")
        p.add_argument("--unit-price")
        p.add_argument("--discount-percent")
        p.add_argument("--threshold")
        p.add_argument("--effective-from", required=True, type=_when)
        p.add_argument("--effective-until", type=_when)
        p.add_argument("--reason", required=True)

        p = action("mode-set", "prepaid, postpaid or unlimited")
        p.add_argument("--org", required=True)
        p.add_argument("--mode", required=True, choices=["prepaid", "postpaid", "unlimited"])
        p.add_argument("--reason", required=True)

        p = action("credit-grant", "add prepaid or promotional credit")
        p.add_argument("--org", required=True)
        p.add_argument("--kind", required=True, choices=["prepaid_purchase", "promotional"])
        p.add_argument("--amount", required=True)
        p.add_argument("--expires-at", type=_when)
        p.add_argument("--reference", default="")
        p.add_argument("--reason", required=True)

        p = action("credit-adjust", "correct one grant by an amount of either sign")
        p.add_argument("--grant", required=True, type=int)
        p.add_argument("--amount", required=True)
        p.add_argument("--reason", required=True)

        p = action("invoice-refresh", "recompute (or create) a month's draft", actor=False)
        p.add_argument("--org", required=True)
        p.add_argument("--month", required=True, type=parse_month, help="YYYY-MM")

        p = action("invoice-finalize", "freeze, apply credits, number")
        p.add_argument("--invoice", required=True)

        p = action("invoice-mark-paid", "record a payment (e.g. a bank transfer)")
        p.add_argument("--invoice", required=True)
        p.add_argument("--payment-reference", required=True)
        p.add_argument("--paid-at", type=_when)
        p.add_argument("--reason", required=True)

        p = action("invoice-void", "write a finalized invoice off; its credits come back")
        p.add_argument("--invoice", required=True)
        p.add_argument("--reason", required=True)

        p = action("held-release", "bill held (unpriced) usage at a price, on the next invoice")
        p.add_argument("--held", required=True, type=int, help="the held usage id")
        p.add_argument("--unit-price", required=True, help="per million units")
        p.add_argument("--reason", required=True)

        p = action("held-write-off", "never bill held (unpriced) usage")
        p.add_argument("--held", required=True, type=int, help="the held usage id")
        p.add_argument("--reason", required=True)

        action("wallet-sync", "rewrite every active wallet in Redis", actor=False)

    def handle(self, *args: Any, **o: Any) -> None:
        try:
            self._say(self._run(o))
        except DomainError as exc:
            where = f" ({exc.param})" if exc.param else ""
            raise CommandError(f"{exc.message}{where}") from exc

    def _run(self, o: dict[str, Any]) -> str:
        action = o["action"]
        if action == "wallet-sync":
            return f"{wallet_sync_all()} wallets synced"
        if action == "invoice-refresh":
            inv = invoicing.invoice_refresh_draft(org=_org(o["org"]), month=o["month"])
            return f"draft {inv.id}: subtotal {inv.subtotal}" if inv else "nothing to bill"
        principal = _staff(o["actor"])
        if action == "price-set":
            price = pricing.price_set(
                principal=principal,
                model_name=o["model"],
                token_kind=o["kind"],
                unit_price=o["unit_price"],
                effective_from=o["effective_from"],
                currency=o["currency"],
                reason=o["reason"],
            )
            return f"price {price.id}: {price}"
        if action == "tax-rate-set":
            row = tax.tax_rate_set(
                principal=principal,
                country=o["country"],
                label=o["label"],
                rate=o["rate"],
                reverse_charge=o["reverse_charge"],
                effective_from=o["effective_from"],
                reason=o["reason"],
            )
            return f"tax rate {row.id}: {row}"
        if action == "override-create":
            override = pricing.price_override_create(
                principal=principal,
                org=_org(o["org"]),
                kind=o["kind"],
                model_name=o["model"],
                token_kind=o["token_kind"],
                unit_price=o["unit_price"],
                discount_percent=o["discount_percent"],
                threshold=o["threshold"],
                effective_from=o["effective_from"],
                effective_until=o["effective_until"],
                reason=o["reason"],
            )
            return f"override {override.id}: {override}"
        if action == "mode-set":
            account = wallet.billing_mode_set(
                principal=principal, org=_org(o["org"]), mode=o["mode"], reason=o["reason"]
            )
            return f"{account.organization_id} is {account.mode}"
        if action == "credit-grant":
            entry = credit_grant(
                principal=principal,
                org=_org(o["org"]),
                kind=o["kind"],
                amount=o["amount"],
                expires_at=o["expires_at"],
                reference=o["reference"],
                reason=o["reason"],
            )
            return f"grant {entry.id}: {entry.amount} {entry.currency}"
        if action == "credit-adjust":
            grant = CreditLedgerEntry.objects.filter(id=o["grant"]).first()
            if grant is None:
                raise CommandError(f"no ledger entry {o['grant']}")
            entry = credit_adjust(
                principal=principal, grant=grant, amount=o["amount"], reason=o["reason"]
            )
            return f"adjustment {entry.id}: {entry.amount}"
        if action in ("held-release", "held-write-off"):
            held = HeldUsage.objects.filter(id=o["held"]).first()
            if held is None:
                raise CommandError(f"no held usage {o['held']}")
            if action == "held-release":
                held = held_usage_release(
                    principal=principal,
                    held=held,
                    unit_price=o["unit_price"],
                    reason=o["reason"],
                )
            else:
                held = held_usage_write_off(principal=principal, held=held, reason=o["reason"])
            return f"held usage {held.id}: {held}"
        inv = _invoice(o["invoice"])
        if action == "invoice-finalize":
            inv = invoicing.invoice_finalize(principal=principal, invoice=inv)
        elif action == "invoice-mark-paid":
            inv = invoicing.invoice_mark_paid(
                principal=principal,
                invoice=inv,
                payment_reference=o["payment_reference"],
                paid_at=o["paid_at"],
                reason=o["reason"],
            )
        elif action == "invoice-void":
            inv = invoicing.invoice_void(principal=principal, invoice=inv, reason=o["reason"])
        return f"invoice {inv.id} {inv.number or ''}: {inv.status}, total {inv.total}"

    def _say(self, text: str) -> None:
        self.stdout.write(text)


def _staff(email: str) -> Principal:
    user = User.objects.filter(email=email.strip().lower()).first()
    if user is None or not user.is_staff:
        raise CommandError(f"{email} is not a staff user")
    return Principal(user=user)


def _org(organization_id: str) -> Organization:
    org = Organization.objects.filter(id=organization_id).first()
    if org is None:
        raise CommandError(f"no organization {organization_id}")
    return org


def _invoice(invoice_id: str) -> Invoice:
    inv = Invoice.objects.select_related("organization").filter(id=invoice_id).first()
    if inv is None:
        raise CommandError(f"no invoice {invoice_id}")
    return inv
