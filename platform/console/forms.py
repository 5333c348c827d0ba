"""Console forms: they parse and show errors; the services decide what is valid to store."""

from __future__ import annotations

from collections.abc import Collection, Iterable
from datetime import date, datetime, time, timedelta
from typing import Any

from django import forms
from django.contrib.auth.forms import AuthenticationForm, PasswordResetForm
from django.utils import timezone

from accounts.models import Project, User
from accounts.permissions import Role, Scope
from core.errors import DomainError
from gateway.protocol_batches import ENDPOINTS

EXPIRY_CHOICES = [
    ("never", "Never"),
    ("1", "1 day"),
    ("7", "7 days"),
    ("30", "30 days"),
    ("90", "90 days"),
    ("365", "1 year"),
    ("custom", "On a date…"),
]


def add_domain_error(form: forms.Form, exc: DomainError) -> None:
    """Shows a service's error on the field it names (or on the whole form)."""
    field = exc.param.split(".")[0] if exc.param else None
    form.add_error(field if field in form.fields else None, exc.message)


class LoginForm(AuthenticationForm):
    """Email and password. Throttling is the authentication backend's
    (accounts/backends.py), so the back office's form gets the same policy."""


class CodeForm(forms.Form):
    """A code of the authenticator (six digits) or a recovery code."""

    code = forms.CharField(
        label="Code",
        max_length=32,
        strip=True,
        widget=forms.TextInput(
            attrs={"autocomplete": "one-time-code", "spellcheck": "false", "inputmode": "text"}
        ),
    )


class AuditFilterForm(forms.Form):
    """The audit page's filters: the API's parameters (accounts/audit_log.py parses them)."""

    actor = forms.CharField(required=False, max_length=200, help_text="email or api-key:<id>")
    action = forms.CharField(required=False, max_length=200, help_text="e.g. api_key.created")
    target_type = forms.CharField(required=False, max_length=200, label="Target type")
    target_id = forms.CharField(required=False, max_length=200, label="Target id")
    since = forms.CharField(
        required=False, max_length=40, help_text="from (UTC): 2026-01-31 or 2026-01-31T09:00"
    )
    until = forms.CharField(required=False, max_length=40, help_text="before (UTC)")


class ConsolePasswordResetForm(PasswordResetForm):
    """Also reaches accounts with no usable password yet.

    Django's form skips such accounts; invitations sent before they needed an accepted
    link created exactly such accounts and told the person to set a password this way.
    """

    def get_users(self, email: str) -> Iterable[Any]:
        return User.objects.filter(email__iexact=email.strip(), is_active=True)


class AccountForm(forms.Form):
    """The account an invitation link creates for someone new (the link verifies the email)."""

    full_name = forms.CharField(max_length=200, required=False, label="Your name")
    password = forms.CharField(widget=forms.PasswordInput, min_length=1)
    password_again = forms.CharField(widget=forms.PasswordInput, label="Password (again)")

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean() or {}
        if cleaned.get("password") and cleaned.get("password") != cleaned.get("password_again"):
            self.add_error("password_again", "the two passwords differ")
        return cleaned


class SignupForm(AccountForm):
    """A sign-up: the account's fields and the address and organization it is for."""

    email = forms.EmailField(max_length=254)
    organization_name = forms.CharField(max_length=120, label="Organization")

    field_order = ["email", "full_name", "organization_name", "password", "password_again"]


class OrganizationForm(forms.Form):
    name = forms.CharField(max_length=120)


class InviteForm(forms.Form):
    email = forms.EmailField(max_length=254)
    role = forms.ChoiceField(choices=[(r.value, r.value) for r in Role], initial=Role.DEVELOPER)


class RoleForm(forms.Form):
    role = forms.ChoiceField(choices=[(r.value, r.value) for r in Role])


class ProjectForm(forms.Form):
    name = forms.CharField(max_length=120)


class KeyControlsForm(forms.Form):
    """A key's monthly budget, its mode, and the models it may use (one name a line)."""

    monthly_budget = forms.DecimalField(
        required=False,
        min_value=0,
        max_digits=14,
        decimal_places=2,
        label="Monthly budget",
        help_text="Empty: no budget of its own.",
    )
    budget_mode = forms.ChoiceField(
        choices=[
            ("hard", "Hard: refuse requests that could pass it"),
            ("soft", "Soft: only alert when it is reached"),
        ],
        initial="hard",
        label="Budget mode",
    )
    allowed_models = forms.CharField(
        required=False,
        widget=forms.Textarea(attrs={"rows": 4}),
        label="Allowed models",
        help_text="One model name a line; empty: every model.",
    )

    def models(self) -> list[str]:
        text = self.cleaned_data.get("allowed_models") or ""
        return [line.strip() for line in text.replace(",", "\n").splitlines() if line.strip()]


class ApiKeyForm(forms.Form):
    name = forms.CharField(max_length=120)
    project = forms.ChoiceField()
    scopes = forms.MultipleChoiceField(
        choices=[(s.value, s.value) for s in Scope],
        widget=forms.CheckboxSelectMultiple,
        initial=[Scope.INFERENCE.value],
    )
    expiry = forms.ChoiceField(choices=EXPIRY_CHOICES, initial="90", label="Expires")
    expires_on = forms.DateField(
        required=False, label="Expiry date", widget=forms.DateInput(attrs={"type": "date"})
    )
    rpm_limit = forms.IntegerField(required=False, min_value=1, label="Requests per minute")
    tpm_limit = forms.IntegerField(required=False, min_value=1, label="Tokens per minute")

    def __init__(
        self,
        *args: Any,
        projects: Iterable[Project],
        scopes: Collection[Scope] = (Scope.INFERENCE,),
        **kwargs: Any,
    ) -> None:
        """`scopes`: those the signed-in member's role may hand out; only they are offered."""
        super().__init__(*args, **kwargs)
        field = self.fields["project"]
        assert isinstance(field, forms.ChoiceField)
        field.choices = [(p.id, p.name) for p in projects]
        scope_field = self.fields["scopes"]
        assert isinstance(scope_field, forms.MultipleChoiceField)
        scope_field.choices = [(s.value, s.value) for s in Scope if s in scopes]

    def expires_at(self, now: datetime | None = None) -> datetime | None:
        now = now or timezone.now()
        choice = self.cleaned_data["expiry"]
        if choice == "never":
            return None
        if choice == "custom":
            day: date | None = self.cleaned_data.get("expires_on")
            if day is None:
                raise forms.ValidationError("choose the expiry date")
            # The key works through the whole chosen day (UTC).
            return datetime.combine(day + timedelta(days=1), time.min, tzinfo=now.tzinfo)
        return now + timedelta(days=int(choice))


class UsageForm(forms.Form):
    start = forms.DateField(required=False, widget=forms.DateInput(attrs={"type": "date"}))
    end = forms.DateField(required=False, widget=forms.DateInput(attrs={"type": "date"}))
    group = forms.ChoiceField(
        required=False,
        choices=[("day", "Day"), ("model", "Model"), ("key", "API key"), ("project", "Project")],
        label="Group by",
    )
    # A plain value, not a choice: the view looks it up in the organization, so another
    # organization's project id is a 404 like everywhere else.
    project = forms.CharField(required=False, max_length=40, widget=forms.Select)

    def __init__(self, *args: Any, projects: Iterable[Project], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        widget = self.fields["project"].widget
        assert isinstance(widget, forms.Select)
        widget.choices = [("", "All projects"), *((p.id, p.name) for p in projects)]


class BillingDetailsForm(forms.Form):
    """Whom invoices are made out to; billing.tax.billing_details_set checks each field
    (printable text, the country code, the tax id's format) and names the one that is
    wrong. The lengths here only stop oversized posts early."""

    legal_name = forms.CharField(label="Legal name", max_length=200, strip=False)
    address = forms.CharField(
        label="Postal address",
        max_length=500,
        strip=False,
        widget=forms.Textarea(attrs={"rows": 4}),
        help_text="At most 6 lines.",
    )
    country = forms.CharField(
        label="Country", max_length=2, min_length=2, help_text="Two-letter code, e.g. DE, GB, US."
    )
    tax_id = forms.CharField(
        label="Tax id (VAT/GST number)",
        max_length=64,
        required=False,
        strip=False,
        help_text="With the country prefix for EU VAT numbers, e.g. DE123456789.",
    )


class BudgetForm(forms.Form):
    project = forms.ChoiceField(required=False, label="Applies to")
    monthly_amount = forms.DecimalField(min_value=0, decimal_places=2, max_digits=20)
    alert_thresholds = forms.CharField(
        initial="50, 80, 100", label="Alert at (% of budget)", max_length=100
    )
    hard_limit = forms.BooleanField(required=False, label="Refuse requests beyond the budget")

    def __init__(self, *args: Any, projects: Iterable[Project], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        field = self.fields["project"]
        assert isinstance(field, forms.ChoiceField)
        field.choices = [("", "The whole organization"), *((p.id, p.name) for p in projects)]

    def clean_alert_thresholds(self) -> list[int]:
        raw = self.cleaned_data["alert_thresholds"]
        parts = [p.strip() for p in raw.replace(";", ",").split(",") if p.strip()]
        try:
            return [int(p) for p in parts]
        except ValueError as exc:
            raise forms.ValidationError(
                "alert thresholds are whole percentages separated by commas, e.g. 50, 80, 100"
            ) from exc


class EndpointForm(forms.Form):
    name = forms.CharField(max_length=120)
    # Plain values looked up by the catalog's services (another organization's is a 404).
    model_version = forms.CharField(max_length=40, widget=forms.Select, label="Model")
    pool = forms.CharField(max_length=64, widget=forms.Select)
    rpm_limit = forms.IntegerField(required=False, min_value=1, label="Requests per minute")
    tpm_limit = forms.IntegerField(required=False, min_value=1, label="Tokens per minute")

    def __init__(
        self,
        *args: Any,
        versions: Iterable[tuple[str, str]],
        pools: Iterable[str],
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        version_widget = self.fields["model_version"].widget
        pool_widget = self.fields["pool"].widget
        assert isinstance(version_widget, forms.Select) and isinstance(pool_widget, forms.Select)
        version_widget.choices = list(versions)
        pool_widget.choices = [(p, p) for p in pools]


class EndpointLimitsForm(forms.Form):
    rpm_limit = forms.IntegerField(min_value=1, label="Requests per minute")
    tpm_limit = forms.IntegerField(min_value=1, label="Tokens per minute")


class BatchFileForm(forms.Form):
    """A batch's input file: JSONL, one request a line (the Batch API checks the lines)."""

    file = forms.FileField(
        label="Input file (.jsonl)",
        widget=forms.ClearableFileInput(attrs={"accept": ".jsonl,application/jsonl"}),
    )


class BatchForm(forms.Form):
    """A batch of an uploaded file, run under one of the organization's inference keys.

    Every value is a choice of what the page offered: another organization's file or key
    (or one revoked since) is refused as an invalid choice, and nothing is created."""

    input_file = forms.ChoiceField(label="Input file")
    endpoint = forms.ChoiceField(choices=[(e, e) for e in ENDPOINTS])
    api_key = forms.ChoiceField(
        label="Runs under the API key",
        help_text="Every line runs, and is billed, as a request of this key.",
    )
    description = forms.CharField(
        required=False, max_length=512, help_text="Optional; kept as the batch's metadata."
    )

    def __init__(
        self,
        *args: Any,
        input_files: Iterable[tuple[str, str]],
        keys: Iterable[tuple[str, str]],
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        for name, choices in (("input_file", input_files), ("api_key", keys)):
            field = self.fields[name]
            assert isinstance(field, forms.ChoiceField)
            field.choices = list(choices)


class WebhookEndpointForm(forms.Form):
    url = forms.CharField(label="URL", max_length=2000, help_text="https://, a public address")
    description = forms.CharField(label="Description", max_length=200, required=False)
    event_types = forms.MultipleChoiceField(
        label="Events",
        required=False,
        widget=forms.CheckboxSelectMultiple,
        help_text="None ticked: every event.",
    )

    def __init__(self, *args: Any, kinds: Iterable[str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["event_types"].choices = [(k, k) for k in kinds]  # type: ignore[attr-defined]


class AlertSettingsForm(forms.Form):
    billing_emails = forms.CharField(
        label="Billing contacts",
        required=False,
        max_length=2000,
        help_text="Comma-separated; empty: the owners and billing members.",
    )
    low_balance_amount = forms.DecimalField(
        label="Low prepaid balance at",
        required=False,
        min_value=0,
        max_digits=20,
        decimal_places=2,
        help_text="Empty: the platform's default.",
    )


class SsoStartForm(forms.Form):
    """The log-in page's single sign-on step: the work email decides the organization."""

    email = forms.EmailField(max_length=254, label="Work email")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("prefix", "sso")
        super().__init__(*args, **kwargs)


class SsoConnectionForm(forms.Form):
    """An organization's identity provider. The secret is write-only: never rendered back
    (an empty field keeps the stored one)."""

    issuer = forms.CharField(
        max_length=500,
        label="Issuer URL",
        help_text="e.g. https://login.example.com/realms/acme (its /.well-known/"
        "openid-configuration is read when you save)",
    )
    client_id = forms.CharField(max_length=255, label="Client id")
    client_secret = forms.CharField(
        max_length=1000,
        required=False,
        label="Client secret",
        strip=False,
        widget=forms.PasswordInput(render_value=False, attrs={"autocomplete": "off"}),
    )
    default_role = forms.ChoiceField(
        choices=[(r.value, r.value) for r in Role if r is not Role.OWNER],
        initial=Role.VIEWER,
        label="Role of just-in-time members",
    )
    jit_enabled = forms.BooleanField(
        required=False, initial=True, label="Add people of verified domains at first sign-in"
    )
    enabled = forms.BooleanField(required=False, label="Enabled")
    sso_required = forms.BooleanField(
        required=False,
        label="SSO required (no password sign-in for verified domains; owners excepted)",
    )


class SsoDomainForm(forms.Form):
    domain = forms.CharField(max_length=253, label="Email domain", help_text="e.g. example.com")


class TopUpForm(forms.Form):
    """Prepaid credit to buy; the bounds are the service's (billing/payments/topups.py)."""

    amount = forms.DecimalField(decimal_places=2, max_digits=20, label="Amount")


class AutoRechargeForm(forms.Form):
    enabled = forms.BooleanField(required=False, label="Recharge automatically")
    threshold = forms.DecimalField(
        decimal_places=2, max_digits=20, label="When the balance falls under"
    )
    amount = forms.DecimalField(decimal_places=2, max_digits=20, label="Charge the saved card")
    daily_cap = forms.DecimalField(decimal_places=2, max_digits=20, label="At most per day (UTC)")
