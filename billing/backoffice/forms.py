"""Forms of the back office's actions. They parse; the services validate and decide."""

from __future__ import annotations

import secrets
from typing import Any

from django import forms

from billing.models import (
    CreditLedgerEntry,
    PriceOverride,
    ProvisionedCommitment,
    TierMultiplier,
    TokenKind,
)

# <input type="datetime-local"> sends this; times are UTC (TIME_ZONE = "UTC").
DATETIME_FORMATS = ["%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M", "%Y-%m-%d"]
REASON_HELP = "Why: it goes into the audit log with your name."


def new_form_token() -> str:
    return secrets.token_hex(16)


class DateTimeInput(forms.DateTimeInput):
    input_type = "datetime-local"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(format="%Y-%m-%dT%H:%M", **kwargs)


def _when(*, required: bool, help_text: str = "UTC") -> forms.DateTimeField:
    return forms.DateTimeField(
        required=required,
        input_formats=DATETIME_FORMATS,
        widget=DateTimeInput(),
        help_text=help_text,
    )


def _reason() -> forms.CharField:
    return forms.CharField(
        max_length=500, help_text=REASON_HELP, widget=forms.Textarea(attrs={"rows": 2})
    )


class ActionForm(forms.Form):
    """Every action form carries a one-time token, so a double submit acts once."""

    form_token = forms.CharField(widget=forms.HiddenInput, max_length=64, min_length=8)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not self.is_bound:
            self.initial.setdefault("form_token", new_form_token())


class StatusForm(ActionForm):
    status = forms.ChoiceField(choices=[("suspended", "suspend"), ("active", "reactivate")])
    reason = _reason()


class CreditGrantForm(ActionForm):
    kind = forms.ChoiceField(
        choices=[(k, CreditLedgerEntry.Kind(k).label) for k in CreditLedgerEntry.STAFF_GRANT_KINDS]
    )
    amount = forms.CharField(max_length=32, help_text="In the billing currency, e.g. 250.00")
    expires_at = _when(required=False, help_text="Optional, UTC; usual for promotional credit")
    reference = forms.CharField(
        max_length=100, required=False, help_text="Purchase order, bank transfer id..."
    )
    reason = _reason()


class FinalizeForm(ActionForm):
    reason = _reason()


class MarkPaidForm(ActionForm):
    payment_reference = forms.CharField(
        max_length=200, help_text="The bank transfer's reference, as on the statement"
    )
    reason = _reason()


class VoidForm(ActionForm):
    reason = _reason()


class CreditNoteForm(ActionForm):
    amount = forms.CharField(max_length=32, help_text="Given back as credit for the next invoices")
    reason = _reason()


class PriceForm(ActionForm):
    model_name = forms.ChoiceField(choices=[])
    token_kind = forms.ChoiceField(choices=TokenKind.choices)
    unit_price = forms.CharField(max_length=32, help_text="Per million tokens, e.g. 0.15")
    effective_from = _when(required=True, help_text="A whole UTC hour, not in the past")
    reason = _reason()

    def __init__(self, *args: Any, model_names: list[str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["model_name"].choices = [(m, m) for m in model_names]  # type: ignore[attr-defined]


class TierMultiplierForm(ActionForm):
    service_tier = forms.ChoiceField(choices=TierMultiplier.Tier.choices)
    model_name = forms.ChoiceField(choices=[], required=False)  # blank: every model
    multiplier = forms.CharField(
        max_length=16, help_text="Of the online price: priority 1-100 (e.g. 2), flex 0-1 (0.5)"
    )
    effective_from = _when(required=True, help_text="A whole UTC hour, not in the past")
    reason = _reason()

    def __init__(self, *args: Any, model_names: list[str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["model_name"].choices = [  # type: ignore[attr-defined]
            ("", "every model without its own"),
            *((m, m) for m in model_names),
        ]


class CommitmentForm(ActionForm):
    endpoint_id = forms.ChoiceField(choices=[], label="Endpoint")
    units = forms.IntegerField(min_value=1, max_value=10_000)
    unit_hour_price = forms.CharField(max_length=32, help_text="Per unit-hour, e.g. 2.50")
    overflow = forms.ChoiceField(
        choices=ProvisionedCommitment.Overflow.choices,
        help_text="Past the units: spill to pay-as-you-go, or refuse with a 429",
    )
    tokens_per_minute_per_unit = forms.IntegerField(
        min_value=1, required=False, help_text="Blank: the model's measured figure"
    )
    starts_at = _when(required=True, help_text="A whole UTC hour, not in the past")
    ends_at = _when(required=False, help_text="Optional, a whole UTC hour")
    reason = _reason()

    def __init__(self, *args: Any, endpoints: list[tuple[str, str]], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["endpoint_id"].choices = endpoints  # type: ignore[attr-defined]


class CommitmentChangeForm(ActionForm):
    at = _when(required=True, help_text="A whole UTC hour, not in the past")
    units = forms.IntegerField(min_value=1, max_value=10_000, required=False)
    unit_hour_price = forms.CharField(max_length=32, required=False)
    overflow = forms.ChoiceField(
        choices=[("", "unchanged"), *ProvisionedCommitment.Overflow.choices], required=False
    )
    reason = _reason()


class OverrideForm(ActionForm):
    kind = forms.ChoiceField(choices=PriceOverride.Kind.choices)
    model_name = forms.CharField(max_length=120, required=False)
    token_kind = forms.ChoiceField(choices=[("", "any"), *TokenKind.choices], required=False)
    unit_price = forms.CharField(max_length=32, required=False, help_text="rate: per million")
    discount_percent = forms.CharField(max_length=16, required=False, help_text="discount, tier")
    threshold = forms.CharField(max_length=32, required=False, help_text="commit tier only")
    effective_from = _when(required=True, help_text="A whole UTC hour, not in the past")
    effective_until = _when(required=False, help_text="Optional, a whole UTC hour")
    reason = _reason()


class OverrideEndForm(ActionForm):
    at = _when(required=True, help_text="A whole UTC hour, not in the past")
    reason = _reason()
