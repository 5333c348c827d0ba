"""Back-office pages of the catalog: read-only lists of models, versions, pools and
endpoints; upstream providers (create, edit, enable, disable, delete) and an endpoint's route
targets, written only through the services (catalog/providers.py), which validate and audit.

Permissions are Django's own on Provider and RouteTarget, which the staff roles hand out
(billing/staff_roles.py: the billing admin changes them, support reads them). Every page is
behind the back office's admin_view (staff, both sign-in steps). A provider's credential is
a password input that is never rendered back; the pages say only whether one is set.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.db.models import Count, Q, QuerySet
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseBase
from django.shortcuts import redirect
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils.html import format_html
from unfold.admin import ModelAdmin
from unfold.decorators import action

from accounts.models import User
from accounts.principal import Principal
from catalog import providers
from catalog.models import AcceleratorPool, Endpoint, Model, ModelVersion, Provider, RouteTarget
from core.errors import DomainError

MANAGE_TARGETS = "catalog.change_routetarget"
VIEW_TARGETS = "catalog.view_routetarget"


class ReadOnlyAdmin(ModelAdmin):
    list_per_page = 50

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(Endpoint)
class EndpointAdmin(ReadOnlyAdmin):
    list_display = (
        "id",
        "name",
        "organization",
        "model_version",
        "pool",
        "status",
        "rpm_limit",
        "tpm_limit",
    )
    list_filter = ("status", "pool")
    search_fields = ("id", "name", "organization__id", "organization__name")
    list_select_related = ("organization", "model_version__model", "pool")

    def get_list_display(self, request: HttpRequest) -> Any:
        shown = super().get_list_display(request)
        if request.user.has_perm(VIEW_TARGETS):
            return (*shown, "route_targets")
        return shown

    def get_queryset(self, request: HttpRequest) -> QuerySet[Endpoint]:
        return super().get_queryset(request).annotate(target_count=Count("targets"))

    @admin.display(description="route targets")
    def route_targets(self, obj: Endpoint) -> str:
        url = reverse("admin:catalog_endpoint_targets", args=[obj.pk])
        count = getattr(obj, "target_count", 0)
        return format_html('<a href="{}">{}</a>', url, f"{count} target(s)" if count else "pool")

    def get_urls(self) -> list[URLPattern]:
        own = [
            path(
                "<str:object_id>/targets/",
                self.admin_site.admin_view(self.targets_view),
                name="catalog_endpoint_targets",
            )
        ]
        return own + super().get_urls()

    def targets_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        """The endpoint's route targets: listed to staff who may view them, replaced as a
        whole (route_targets_set) by staff who may change them."""
        if not request.user.has_perm(VIEW_TARGETS):
            raise PermissionDenied
        endpoint = (
            Endpoint.objects.select_related("model_version__model", "pool", "organization")
            .filter(pk=object_id)
            .first()
        )
        if endpoint is None:
            raise Http404(f"endpoint {object_id!r} not found")
        can_change = request.user.has_perm(MANAGE_TARGETS)
        usable = Provider.objects.filter(
            Q(organization__isnull=True) | Q(organization_id=endpoint.organization_id)
            if endpoint.organization_id
            else Q(organization__isnull=True)
        ).order_by("name")
        choices = [("", "-")] + [
            (p.id, f"{p.name} ({p.kind}{'' if p.enabled else ', disabled'})") for p in usable
        ]
        current = list(
            RouteTarget.objects.filter(endpoint=endpoint)
            .select_related("provider")
            .order_by("position", "created_at", "id")
        )
        initial = [
            {
                "kind": t.kind,
                "provider_id": t.provider_id or "",
                "upstream_model": t.upstream_model,
                "position": t.position,
                "weight": t.weight,
                "cost_input": f"{t.cost_input.normalize():f}",
                "cost_output": f"{t.cost_output.normalize():f}",
                "cost_cached_input": f"{t.cost_cached_input.normalize():f}",
                "enabled": t.enabled,
            }
            for t in current
        ]
        status = 200
        if request.method == "POST":
            if not can_change:
                raise PermissionDenied
            formset = TargetFormSet(request.POST, initial=initial, form_kwargs={"choices": choices})
            if formset.is_valid():
                wanted = [
                    {k: v for k, v in f.cleaned_data.items() if k != "DELETE"}
                    for f in formset.forms
                    if f.cleaned_data and not f.cleaned_data.get("DELETE")
                ]
                try:
                    providers.route_targets_set(
                        principal=_principal(request), endpoint=endpoint, targets=wanted
                    )
                except DomainError as exc:
                    formset_error = exc.message
                    status = exc.status
                else:
                    messages.success(
                        request, f"{endpoint.name}: {len(wanted)} route target(s) saved"
                    )
                    return redirect(reverse("admin:catalog_endpoint_targets", args=[endpoint.pk]))
            else:
                formset_error = "Correct the rows marked below."
                status = 400
        else:
            formset = TargetFormSet(initial=initial, form_kwargs={"choices": choices})
            formset_error = ""
        context = {
            **self.admin_site.each_context(request),
            "title": f"Route targets of {endpoint.name}",
            "endpoint": endpoint,
            "upstream": endpoint.model_version.runtime == "upstream",
            "formset": formset,
            "formset_error": formset_error,
            "can_change": can_change,
            "current": current,
            "back_url": reverse("admin:catalog_endpoint_changelist"),
        }
        return TemplateResponse(request, "catalog/route_targets.html", context, status=status)


@admin.register(Model)
class CatalogModelAdmin(ReadOnlyAdmin):
    list_display = ("name", "kind", "family", "context_length", "licence", "organization")
    list_filter = ("kind",)
    search_fields = ("name", "family")


@admin.register(ModelVersion)
class ModelVersionAdmin(ReadOnlyAdmin):
    list_display = ("id", "model", "version", "runtime", "status", "size_bytes", "created_at")
    list_filter = ("status", "runtime")
    search_fields = ("id", "model__name", "sha256")
    list_select_related = ("model",)
    exclude = ("manifest", "chat_template")


@admin.register(AcceleratorPool)
class AcceleratorPoolAdmin(ReadOnlyAdmin):
    list_display = ("name", "region", "providers", "description")
    search_fields = ("name", "region")


def _principal(request: HttpRequest) -> Principal:
    user = request.user
    assert isinstance(user, User)
    return Principal(user=user, ip_address=request.META.get("REMOTE_ADDR"))


# --- Upstream providers -------------------------------------------------------------------------


class ProviderForm(forms.Form):
    """Parses; catalog/providers.py validates and decides."""

    name = forms.CharField(max_length=120)
    kind = forms.ChoiceField(choices=Provider.Kind.choices)
    base_url = forms.CharField(
        max_length=500,
        help_text="The API root (https://api.openai.com/v1); Azure: the resource endpoint "
        "(https://<resource>.openai.azure.com)",
    )
    api_version = forms.CharField(
        max_length=40, required=False, help_text="Azure OpenAI only, e.g. 2024-10-21"
    )
    credential = forms.CharField(
        max_length=4096,
        required=False,
        strip=True,
        widget=forms.PasswordInput(render_value=False, attrs={"autocomplete": "new-password"}),
    )
    connect_timeout_s = forms.FloatField(initial=5.0, label="Connect timeout (s)")
    first_byte_timeout_s = forms.FloatField(initial=30.0, label="First byte timeout (s)")
    max_concurrency = forms.IntegerField(
        initial=64, help_text="Requests in flight at this provider from all gateways together"
    )
    enabled = forms.BooleanField(required=False, initial=True)

    def __init__(self, *args: Any, has_credential: bool | None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        field = self.fields["credential"]
        if has_credential is None:
            field.help_text = "The provider's API key. Write-only: it is never shown again."
        else:
            state = "set" if has_credential else "not set"
            field.help_text = (
                f"Credential: {state}. Write-only: a new value replaces it; blank keeps it."
            )


@admin.register(Provider)
class ProviderAdmin(ModelAdmin):
    """The operator's providers (and, read here, organizations' own). Add and change go
    to forms that call the services; the credential is never rendered back."""

    list_per_page = 50
    list_display = (
        "name",
        "kind",
        "base_url",
        "owner",
        "enabled",
        "credential",
        "target_count",
        "updated_at",
    )
    list_filter = ("kind", "enabled", ("organization", admin.EmptyFieldListFilter))
    search_fields = ("id", "name", "base_url", "organization__id", "organization__name")
    list_select_related = ("organization",)
    ordering = ("organization_id", "name")
    # The read-only detail (staff who may only view): never the sealed credential.
    fields = (
        "id",
        "name",
        "kind",
        "base_url",
        "api_version",
        "credential",
        "connect_timeout_s",
        "first_byte_timeout_s",
        "max_concurrency",
        "enabled",
        "organization",
        "created_at",
        "updated_at",
    )
    readonly_fields = fields
    actions = ("enable_selected", "disable_selected")
    actions_list = ("register_model",)

    def get_queryset(self, request: HttpRequest) -> QuerySet[Provider]:
        return super().get_queryset(request).annotate(targets_used=Count("targets"))

    @admin.display(description="owner")
    def owner(self, obj: Provider) -> str:
        return obj.organization.name if obj.organization is not None else "operator"

    @admin.display(description="credential")
    def credential(self, obj: Provider) -> str:
        return "set" if obj.credential_encrypted else "not set"

    @admin.display(description="targets")
    def target_count(self, obj: Provider) -> int:
        return int(getattr(obj, "targets_used", 0))

    def get_actions(self, request: HttpRequest) -> Any:
        found = super().get_actions(request)
        found.pop("delete_selected", None)  # deletes go through provider_delete, one by one
        if not self.has_change_permission(request):
            found.pop("enable_selected", None)
            found.pop("disable_selected", None)
        return found

    @admin.action(description="Enable the selected providers")
    def enable_selected(self, request: HttpRequest, queryset: QuerySet[Provider]) -> None:
        self._set_enabled(request, queryset, enabled=True)

    @admin.action(description="Disable the selected providers (their targets stop serving)")
    def disable_selected(self, request: HttpRequest, queryset: QuerySet[Provider]) -> None:
        self._set_enabled(request, queryset, enabled=False)

    def _set_enabled(
        self, request: HttpRequest, queryset: QuerySet[Provider], *, enabled: bool
    ) -> None:
        if not self.has_change_permission(request):
            raise PermissionDenied
        for provider in queryset:
            providers.provider_set_enabled(
                principal=_principal(request), provider=provider, enabled=enabled
            )
        word = "enabled" if enabled else "disabled"
        messages.success(request, f"{queryset.count()} provider(s) {word}")

    def add_view(
        self, request: HttpRequest, form_url: str = "", extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        if not self.has_add_permission(request):
            raise PermissionDenied

        def create(data: dict[str, Any]) -> Provider:
            return providers.provider_create(
                principal=_principal(request), organization=None, **data
            )

        return self._form_view(request, None, "New upstream provider", create)

    def change_view(
        self,
        request: HttpRequest,
        object_id: str,
        form_url: str = "",
        extra_context: dict[str, Any] | None = None,
    ) -> HttpResponse:
        provider = Provider.objects.filter(pk=object_id).first()
        if provider is None or not self.has_change_permission(request, provider):
            return super().change_view(request, object_id, form_url, extra_context)

        def update(data: dict[str, Any]) -> Provider:
            enabled = data.pop("enabled")
            changed = providers.provider_update(
                principal=_principal(request), provider=provider, **data
            )
            return providers.provider_set_enabled(
                principal=_principal(request), provider=changed, enabled=enabled
            )

        return self._form_view(request, provider, f"Edit provider {provider.name}", update)

    def _form_view(
        self,
        request: HttpRequest,
        provider: Provider | None,
        title: str,
        perform: Callable[[dict[str, Any]], Provider],
    ) -> HttpResponse:
        back = reverse("admin:catalog_provider_changelist")
        has_credential = None if provider is None else bool(provider.credential_encrypted)
        initial = (
            {}
            if provider is None
            else {
                f: getattr(provider, f)
                for f in ProviderForm.base_fields
                if f != "credential" and hasattr(provider, f)
            }
        )
        data = request.POST if request.method == "POST" else None
        form = ProviderForm(data, initial=initial, has_credential=has_credential)
        status = 200
        if data is not None:
            if form.is_valid():
                try:
                    saved = perform(dict(form.cleaned_data))
                except DomainError as exc:
                    field = exc.param if exc.param in form.fields else None
                    form.add_error(field, exc.message)
                    status = exc.status
                else:
                    messages.success(request, f"provider {saved.name} saved")
                    return redirect(back)
            else:
                status = 400
        hint = ""
        if provider is not None:
            hint = (
                f"{'Operator' if provider.organization is None else provider.organization.name}"
                f"'s provider {provider.id}. Disabling it takes its targets out of every "
                "endpoint at once."
            )
        context = {
            **self.admin_site.each_context(request),
            "title": title,
            "form": form,
            "back_url": back,
            "hint": hint,
        }
        return TemplateResponse(request, "backoffice/action.html", context, status=status)

    def has_register_model_permission(self, request: HttpRequest) -> bool:
        return bool(request.user.has_perm("catalog.add_provider")) and bool(
            request.user.has_perm(MANAGE_TARGETS)
        )

    @action(
        description="Register a provider-only model",
        url_path="register-model",
        # A permission method, not permission names: Unfold checks named permissions against
        # the database in a system check, which runs before a fresh database is migrated.
        permissions=["register_model"],
    )
    def register_model(self, request: HttpRequest) -> HttpResponse:
        """A public model served only by providers (catalog.providers.upstream_model_register),
        with its first target; more on its endpoint's route targets page."""
        operator = Provider.objects.filter(organization__isnull=True).order_by("name")
        choices = [(p.id, f"{p.name} ({p.kind})") for p in operator]
        data = request.POST if request.method == "POST" else None
        form = UpstreamModelForm(data, providers=choices)
        status = 200
        if data is not None:
            if form.is_valid():
                fields = dict(form.cleaned_data)
                target = {
                    "kind": "provider",
                    **{k: fields.pop(k) for k in list(fields) if k in TARGET_FIELDS},
                }
                try:
                    endpoint = providers.upstream_model_register(
                        principal=_principal(request), targets=[target], **fields
                    )
                except DomainError as exc:
                    field = exc.param if exc.param in form.fields else None
                    if (exc.param or "").startswith("targets[0]."):
                        field = (exc.param or "").removeprefix("targets[0].")
                        field = field if field in form.fields else None
                    form.add_error(field, exc.message)
                    status = exc.status
                else:
                    messages.success(
                        request,
                        f"{endpoint.name} is served by its providers; give it a price in the "
                        "price book before customers call it",
                    )
                    return redirect(reverse("admin:catalog_endpoint_targets", args=[endpoint.pk]))
            else:
                status = 400
        context = {
            **self.admin_site.each_context(request),
            "title": "Register a provider-only model",
            "form": form,
            "back_url": reverse("admin:catalog_provider_changelist"),
            "hint": "A public model of runtime upstream (no artifact; no worker loads it), its "
            "endpoint on the pool 'upstream', and its first provider target. Registering an "
            "existing provider-only model again replaces its targets.",
        }
        return TemplateResponse(request, "backoffice/action.html", context, status=status)

    def delete_view(
        self, request: HttpRequest, object_id: str, extra_context: dict[str, Any] | None = None
    ) -> HttpResponseBase:
        provider = Provider.objects.filter(pk=object_id).first()
        if request.method == "POST" and provider is not None:
            if not self.has_delete_permission(request, provider):
                raise PermissionDenied
            try:
                providers.provider_delete(principal=_principal(request), provider=provider)
            except DomainError as exc:
                messages.error(request, exc.message)
                return redirect(reverse("admin:catalog_provider_change", args=[provider.pk]))
            messages.success(request, f"provider {provider.name} deleted")
            return redirect(reverse("admin:catalog_provider_changelist"))
        return super().delete_view(request, object_id, extra_context)


TARGET_FIELDS = ("provider_id", "upstream_model", "cost_input", "cost_output", "cost_cached_input")


class UpstreamModelForm(forms.Form):
    name = forms.CharField(max_length=120, help_text="The model name customers call")
    kind = forms.ChoiceField(
        choices=[(k, k) for k in (Model.Kind.CHAT, Model.Kind.COMPLETION, Model.Kind.EMBEDDING)]
    )
    context_length = forms.IntegerField(min_value=1, help_text="Tokens")
    provider_id = forms.ChoiceField(choices=[], label="Provider")
    upstream_model = forms.CharField(
        max_length=200, help_text="The provider's model name, or the Azure deployment's"
    )
    cost_input = forms.DecimalField(
        min_value=0, decimal_places=9, max_digits=20, help_text="The provider's charge per token"
    )
    cost_output = forms.DecimalField(min_value=0, decimal_places=9, max_digits=20)
    cost_cached_input = forms.DecimalField(min_value=0, decimal_places=9, max_digits=20, initial=0)

    def __init__(self, *args: Any, providers: list[tuple[str, str]], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["provider_id"].choices = providers  # type: ignore[attr-defined]


# --- Route targets ------------------------------------------------------------------------------


class TargetForm(forms.Form):
    kind = forms.ChoiceField(choices=RouteTarget.Kind.choices, initial="provider")
    provider_id = forms.ChoiceField(choices=[], required=False, label="Provider")
    upstream_model = forms.CharField(max_length=200, required=False)
    position = forms.IntegerField(initial=0, min_value=0)
    weight = forms.IntegerField(initial=1, min_value=1)
    cost_input = forms.DecimalField(initial=0, min_value=0, decimal_places=9, max_digits=20)
    cost_output = forms.DecimalField(initial=0, min_value=0, decimal_places=9, max_digits=20)
    cost_cached_input = forms.DecimalField(initial=0, min_value=0, decimal_places=9, max_digits=20)
    enabled = forms.BooleanField(required=False, initial=True)

    def __init__(self, *args: Any, choices: list[tuple[str, str]], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["provider_id"].choices = choices  # type: ignore[attr-defined]


TargetFormSet = forms.formset_factory(TargetForm, extra=2, can_delete=True, max_num=16)


@admin.register(RouteTarget)
class RouteTargetAdmin(ReadOnlyAdmin):
    """Every endpoint's targets; they are changed on the endpoint's route targets page."""

    list_display = (
        "endpoint_link",
        "kind",
        "provider",
        "upstream_model",
        "position",
        "weight",
        "cost_input",
        "cost_output",
        "cost_cached_input",
        "enabled",
    )
    list_filter = ("kind", "enabled", "provider")
    search_fields = ("endpoint__id", "endpoint__name", "upstream_model", "provider__name")
    list_select_related = ("endpoint", "provider")
    ordering = ("endpoint_id", "position", "created_at")

    @admin.display(description="endpoint")
    def endpoint_link(self, obj: RouteTarget) -> str:
        url = reverse("admin:catalog_endpoint_targets", args=[obj.endpoint_id])
        return format_html('<a href="{}">{}</a>', url, obj.endpoint.name)
