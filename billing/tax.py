"""Tax on invoices: the seller's and the buyer's details, and the tax lines of a finalization.

- The **seller** is the operator: `MANTLE_SELLER_*` settings (docs/deployment.md), checked at
  start-up (`check_seller_settings`, from BillingConfig.ready).
- The **buyer** is the organization's `BillingDetails` (legal name, address, country, tax
  id), set by its billing managers in the console (`billing_details_set`, audited).
- **Tax lines** come from the `TaxRate` rows in effect at finalization for the buyer's
  country (or the default row), computed once on the invoice's subtotal and stored
  (`InvoiceTaxLine`, `Invoice.tax`), with a snapshot of both parties (`Invoice.seller`,
  `Invoice.buyer`): a finalized invoice never changes when settings, rates or the
  organization's details do (docs/billing.md, "Tax").

Every field a customer sends is bounded, printable text; countries are ISO 3166-1 alpha-2
codes (pycountry); a tax id is checked by python-stdnum where it knows the country's VAT
or GST number, else it is bounded free text.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

import pycountry
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db import transaction
from django.db.models import Q
from django.utils import timezone
from stdnum.eu import vat as eu_vat
from stdnum.exceptions import ValidationError as NumberInvalid
from stdnum.util import get_cc_module

from accounts.models import Organization
from accounts.principal import Principal
from accounts.services import audit_record
from billing import checks
from billing.models import BillingDetails, TaxRate
from billing.money import check_places, parse_decimal, round_cents
from core.errors import InvalidInput

LEGAL_NAME_MAX = 200
ADDRESS_MAX = 500
ADDRESS_MAX_LINES = 6
TAX_ID_MAX = 32
LABEL_MAX = 32
# A tax id of a country python-stdnum does not know: letters, digits and a few separators.
_FREE_TAX_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ./-]{1,31}")
# The prefix of an EU VAT number is the country code, except Greece's (EL).
_EU_PREFIX = {"GR": "EL"}
ZERO_CENTS = Decimal("0.00")
# What the invoice says when the buyer accounts for the tax (B2B reverse charge).
REVERSE_CHARGE_NOTE = "Reverse charge: the recipient accounts for the {label}."


@dataclass(frozen=True)
class Party:
    """One side of an invoice, as printed on it (and stored on it at finalization)."""

    legal_name: str
    address: tuple[str, ...]
    country: str  # ISO 3166-1 alpha-2, or "" when not given
    tax_id: str

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["address"] = list(self.address)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Party:
        """A stored snapshot, bounded again (it is printed): never trusted for its size."""
        address = data.get("address") or []
        return cls(
            legal_name=str(data.get("legal_name", ""))[:LEGAL_NAME_MAX],
            address=tuple(str(line)[:ADDRESS_MAX] for line in address[:ADDRESS_MAX_LINES]),
            country=str(data.get("country", ""))[:2],
            tax_id=str(data.get("tax_id", ""))[:TAX_ID_MAX],
        )

    @property
    def country_name(self) -> str:
        found = pycountry.countries.get(alpha_2=self.country) if self.country else None
        return str(found.name) if found is not None else self.country


@dataclass(frozen=True)
class TaxLineDraft:
    label: str
    country: str
    rate: Decimal
    taxable_amount: Decimal
    amount: Decimal
    reverse_charge: bool
    note: str


# --- checking what people type --------------------------------------------------------------


def clean_text(value: object, *, param: str, max_length: int, multiline: bool = False) -> str:
    """Stripped, printable text of at most `max_length` characters (lines kept when
    `multiline`, at most ADDRESS_MAX_LINES non-empty ones)."""
    if not isinstance(value, str):
        raise InvalidInput(f"{param} must be text", param=param)
    text = value.replace("\r\n", "\n").strip()
    if multiline:
        lines = [line.strip() for line in text.split("\n")]
        text = "\n".join(line for line in lines if line)
    if len(text) > max_length:
        raise InvalidInput(f"{param} must be at most {max_length} characters", param=param)
    for ch in text:
        if ch == "\n" and multiline:
            continue
        if unicodedata.category(ch)[0] == "C" or ch in "\u2028\u2029":
            raise InvalidInput(
                f"{param} must be printable text (it contains the control or format "
                f"character U+{ord(ch):04X})",
                param=param,
            )
    if multiline and text.count("\n") >= ADDRESS_MAX_LINES:
        raise InvalidInput(f"{param} must be at most {ADDRESS_MAX_LINES} lines", param=param)
    return text


def clean_country(value: object, *, param: str = "country") -> str:
    """An ISO 3166-1 alpha-2 code, upper case."""
    if not isinstance(value, str) or not value.strip():
        raise InvalidInput(f"{param} must be a two-letter country code (ISO 3166-1)", param=param)
    code = value.strip().upper()
    if len(code) != 2 or pycountry.countries.get(alpha_2=code) is None:
        raise InvalidInput(
            f"{param} {code[:8]!r} is not a two-letter country code (ISO 3166-1)", param=param
        )
    return code


def clean_tax_id(value: object, *, country: str, param: str = "tax_id") -> str:
    """The tax id in its compact form, or "" for none.

    EU countries: a VAT number (python-stdnum checks its format and check digits; the
    country prefix is added when missing). Other countries whose VAT or GST number
    python-stdnum knows (GB, CH, NO, AU, IN, ...): checked by it. Anything else:
    2 to 32 letters, digits, spaces, '.', '/' or '-'.
    """
    text = clean_text(value, param=param, max_length=TAX_ID_MAX * 2)
    if not text:
        return ""
    if country.lower() in eu_vat.MEMBER_STATES:
        prefix = _EU_PREFIX.get(country, country)
        number = text if text[:2].upper() == prefix else prefix + text
        try:
            compact = str(eu_vat.validate(number))
        except NumberInvalid as exc:
            raise InvalidInput(
                f"{param} is not a valid {country} VAT number ({exc}); write it as on the "
                f"registration, e.g. {prefix}123456789",
                param=param,
            ) from exc
        if compact[:2].upper() != prefix:
            raise InvalidInput(
                f"{param} is a VAT number of another country than {country}", param=param
            )
        return compact
    module = get_cc_module(country.lower(), "vat") if country else None
    if module is not None:
        try:
            return str(module.validate(text))[:TAX_ID_MAX]
        except NumberInvalid as exc:
            raise InvalidInput(
                f"{param} is not a valid {country} tax number ({exc})", param=param
            ) from exc
    if not _FREE_TAX_ID.fullmatch(text):
        raise InvalidInput(
            f"{param} must be 2 to {TAX_ID_MAX} letters, digits, spaces, '.', '/' or '-'",
            param=param,
        )
    return text


# --- the buyer --------------------------------------------------------------------------------


def billing_details_get(org: Organization) -> BillingDetails | None:
    return BillingDetails.objects.filter(organization=org).first()


def billing_details_set(
    *,
    principal: Principal,
    org: Organization,
    legal_name: object,
    address: object,
    country: object,
    tax_id: object = "",
) -> BillingDetails:
    """Sets whom the organization's invoices are made out to (billing managers; the
    caller checks the permission). Every field is checked before anything is written;
    the change is audited. Invoices already finalized keep the details they were issued
    with."""
    name = clean_text(legal_name, param="legal_name", max_length=LEGAL_NAME_MAX)
    if not name:
        raise InvalidInput("legal_name must not be empty", param="legal_name")
    addr = clean_text(address, param="address", max_length=ADDRESS_MAX, multiline=True)
    if not addr:
        raise InvalidInput("address must not be empty", param="address")
    code = clean_country(country)
    tid = clean_tax_id(tax_id, country=code)
    with transaction.atomic():
        details, _ = BillingDetails.objects.select_for_update().get_or_create(
            organization=org,
            defaults={"legal_name": name, "address": addr, "country": code, "tax_id": tid},
        )
        details.legal_name, details.address, details.country, details.tax_id = (
            name,
            addr,
            code,
            tid,
        )
        details.updated_by = principal.user
        details.save()
        audit_record(
            principal=principal,
            action="billing.details_set",
            target=org,
            organization=org,
            metadata={"legal_name": name, "country": code, "tax_id": tid},
        )
    return details


def buyer_of(org: Organization) -> Party:
    """The organization as a buyer now: its billing details, or its name alone."""
    details = billing_details_get(org)
    if details is None:
        return Party(legal_name=org.name[:LEGAL_NAME_MAX], address=(), country="", tax_id="")
    return Party(
        legal_name=details.legal_name,
        address=tuple(details.address.split("\n")),
        country=details.country,
        tax_id=details.tax_id,
    )


# --- the seller -------------------------------------------------------------------------------


def seller_now() -> Party:
    """The operator as the seller, from the MANTLE_SELLER_* settings (checked at start-up
    by `check_seller_settings`; checked again here, so a bad value never reaches an
    invoice)."""
    address = str(settings.MANTLE_SELLER_ADDRESS).replace("\\n", "\n")
    country = str(settings.MANTLE_SELLER_COUNTRY)
    return Party(
        legal_name=clean_text(
            settings.MANTLE_SELLER_LEGAL_NAME,
            param="MANTLE_SELLER_LEGAL_NAME",
            max_length=LEGAL_NAME_MAX,
        ),
        address=tuple(
            line
            for line in clean_text(
                address, param="MANTLE_SELLER_ADDRESS", max_length=ADDRESS_MAX, multiline=True
            ).split("\n")
            if line
        ),
        country=clean_country(country, param="MANTLE_SELLER_COUNTRY") if country else "",
        tax_id=clean_tax_id(
            settings.MANTLE_SELLER_TAX_ID, country=country.upper(), param="MANTLE_SELLER_TAX_ID"
        ),
    )


def check_seller_settings() -> None:
    """Refuses to start with MANTLE_SELLER_* settings an invoice could not carry
    (BillingConfig.ready, in every process: servers, workers, commands)."""
    try:
        seller_now()
    except InvalidInput as exc:
        raise ImproperlyConfigured(exc.message) from exc


# --- rates and tax lines ----------------------------------------------------------------------


def rate_for(country: str, at: datetime) -> TaxRate | None:
    """The rate in effect at `at` for a buyer of `country`: its own row, else the default
    (blank country) row; None: no tax."""
    rows = TaxRate.objects.filter(effective_from__lte=at).order_by("-effective_from", "-id")
    if country:
        own = rows.filter(country=country).first()
        if own is not None:
            return own
    return rows.filter(country="").first()


def tax_lines_for(
    *, taxable: Decimal, seller: Party, buyer: Party, at: datetime
) -> list[TaxLineDraft]:
    """The tax lines of an invoice finalized at `at` with `taxable` (its subtotal, whole
    cents): at most one, from the rate in effect for the buyer's country.

    - no rate, or nothing taxable: no line;
    - a reverse-charge rate, a buyer with a tax id, and buyer and seller in different
      countries: a line of rate 0 and amount 0 with the reverse-charge note;
    - else: taxable x rate / 100, rounded once to cents (half-even, billing.money).
    """
    if taxable <= 0:
        return []
    rate = rate_for(buyer.country, at)
    if rate is None:
        return []
    where = buyer.country or rate.country
    if rate.reverse_charge and buyer.tax_id and buyer.country and buyer.country != seller.country:
        return [
            TaxLineDraft(
                label=f"{rate.label} reverse charge ({where})",
                country=rate.country,
                rate=Decimal(0),
                taxable_amount=taxable,
                amount=ZERO_CENTS,
                reverse_charge=True,
                note=REVERSE_CHARGE_NOTE.format(label=rate.label),
            )
        ]
    percent = rate.rate.normalize()
    return [
        TaxLineDraft(
            label=f"{rate.label} {percent:f}%" + (f" ({where})" if where else ""),
            country=rate.country,
            rate=rate.rate,
            taxable_amount=taxable,
            amount=round_cents(taxable * rate.rate / 100),
            reverse_charge=False,
            note="",
        )
    ]


def tax_rate_set(
    *,
    principal: Principal,
    country: str,
    label: str,
    rate: Decimal | str,
    effective_from: datetime,
    reason: str,
    reverse_charge: bool = False,
) -> TaxRate:
    """Adds a tax rate version (staff, audited). Whole future hours only, like prices: an
    invoice already finalized never meets a rate that was not in effect when it was."""
    checks.check_staff(principal)
    reason = checks.check_reason(reason)
    code = clean_country(country) if country else ""
    name = clean_text(label, param="label", max_length=LABEL_MAX)
    if not name:
        raise InvalidInput("label must not be empty (e.g. VAT, GST)", param="label")
    value = check_places(parse_decimal(rate, param="rate"), 3, param="rate")
    if value < 0 or value > 100:
        raise InvalidInput("rate must be a percentage in [0, 100]", param="rate")
    checks.check_aware(effective_from, param="effective_from")
    whole_hour = effective_from.replace(minute=0, second=0, microsecond=0) == effective_from
    if effective_from <= timezone.now() or not whole_hour:
        raise InvalidInput(
            "effective_from must be a whole hour in the future", param="effective_from"
        )
    with transaction.atomic():
        if TaxRate.objects.filter(country=code, effective_from=effective_from).exists():
            raise InvalidInput(
                f"a rate for {code or 'the default'} already starts at {effective_from}",
                param="effective_from",
            )
        row = TaxRate.objects.create(
            country=code,
            label=name,
            rate=value,
            reverse_charge=reverse_charge,
            effective_from=effective_from,
            reason=reason,
            created_by=principal.user,
        )
        audit_record(
            principal=principal,
            action="billing.tax_rate_set",
            target=row,
            organization=None,
            metadata={
                "country": code,
                "label": name,
                "rate": str(value),
                "reverse_charge": reverse_charge,
                "effective_from": effective_from.isoformat(),
                "reason": reason,
            },
        )
    return row


def tax_rates_in_effect(at: datetime | None = None) -> Sequence[TaxRate]:
    """The row in effect now for each country (and the default), for the back office."""
    at = at or timezone.now()
    latest: dict[str, TaxRate] = {}
    for row in TaxRate.objects.filter(Q(effective_from__lte=at)).order_by(
        "country", "-effective_from", "-id"
    ):
        latest.setdefault(row.country, row)
    return list(latest.values())
