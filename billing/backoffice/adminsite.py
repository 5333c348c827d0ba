"""The admin site of the back office: Unfold's, plus Mantle's own pages and the dashboard."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from django.contrib.auth import REDIRECT_FIELD_NAME
from django.http import HttpRequest
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils.decorators import method_decorator
from unfold.sites import UnfoldAdminSite

from accounts.backends import present_login_refusal
from accounts.models import User
from accounts.two_factor import session_verified
from billing import staff_roles as roles
from billing.backoffice import two_factor_views


class BackOfficeSite(UnfoldAdminSite):
    site_header = "Mantle back office"
    site_title = "Mantle back office"
    index_title = "Dashboard"
    index_template = "backoffice/dashboard.html"

    def get_urls(self) -> list[URLPattern]:
        from billing.backoffice import views

        wrap = self.admin_view
        own = [
            path("customers/<str:org_id>/", wrap(views.customer), name="backoffice-customer"),
            path(
                "customers/<str:org_id>/status/",
                wrap(views.customer_status),
                name="backoffice-customer-status",
            ),
            path(
                "customers/<str:org_id>/credits/grant/",
                wrap(views.credit_grant),
                name="backoffice-credit-grant",
            ),
            path(
                "customers/<str:org_id>/overrides/new/",
                wrap(views.override_new),
                name="backoffice-override-new",
            ),
            path(
                "overrides/<int:override_id>/end/",
                wrap(views.override_end),
                name="backoffice-override-end",
            ),
            path("invoices/<str:invoice_id>/", wrap(views.invoice), name="backoffice-invoice"),
            path(
                "invoices/<str:invoice_id>/pdf/",
                wrap(views.invoice_pdf),
                name="backoffice-invoice-pdf",
            ),
            path(
                "invoices/<str:invoice_id>/<slug:action>/",
                wrap(views.invoice_action),
                name="backoffice-invoice-action",
            ),
            path("prices/new/", wrap(views.price_new), name="backoffice-price-new"),
            path(
                "customers/<str:org_id>/provisioned/new/",
                wrap(views.commitment_new),
                name="backoffice-commitment-new",
            ),
            path(
                "provisioned/<int:commitment_id>/change/",
                wrap(views.commitment_change),
                name="backoffice-commitment-change",
            ),
            path(
                "provisioned/<int:commitment_id>/end/",
                wrap(views.commitment_end),
                name="backoffice-commitment-end",
            ),
            path(
                "tier-multipliers/new/",
                wrap(views.tier_multiplier_new),
                name="backoffice-tier-multiplier-new",
            ),
            path("usage/", wrap(views.usage), name="backoffice-usage"),
            path("usage.csv", wrap(views.usage_csv), name="backoffice-usage-csv"),
            path("margin/", wrap(views.margin), name="backoffice-margin"),
            path("margin.csv", wrap(views.margin_csv), name="backoffice-margin-csv"),
        ]
        # The second sign-in step: outside admin_view, whose gate it opens.
        second_factor = [
            path("two-factor/", two_factor_views.verify, name="backoffice-two-factor-verify"),
            path("two-factor/enrol/", two_factor_views.enrol, name="backoffice-two-factor-enrol"),
            path(
                "two-factor/cancel/",
                two_factor_views.cancel,
                name="backoffice-two-factor-cancel",
            ),
        ]
        return second_factor + own + super().get_urls()

    def has_permission(self, request: HttpRequest) -> bool:
        """Active staff who passed both steps of signing in: password, then a TOTP or
        recovery code (accounts/two_factor.py). Every admin page, list and action is
        behind admin_view, which asks this."""
        return super().has_permission(request) and session_verified(request.user)

    # The password step is throttled by the authentication backend, like the console's
    # (accounts/backends.py); this shows its refusal as a 429 with its message.
    @method_decorator(present_login_refusal)
    def login(self, request: HttpRequest, extra_context: dict[str, Any] | None = None) -> Any:
        user = request.user
        if user.is_active and user.is_staff and not session_verified(user):
            # The password is done (this session is signed in); the code is not yet.
            assert isinstance(user, User)
            return two_factor_views.redirect_to_second_factor(request, user)
        # Unfold's login form has no hidden `next` field, so the form posts to a URL that
        # carries it: otherwise staff who open /admin/login/ land in the customer console.
        if REDIRECT_FIELD_NAME not in request.GET:
            target = urlencode({REDIRECT_FIELD_NAME: reverse("admin:index")})
            extra_context = {"app_path": f"{request.path}?{target}", **(extra_context or {})}
        return super().login(request, extra_context)

    def index(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> TemplateResponse:
        from billing.backoffice.views import dashboard_context

        return super().index(request, {**dashboard_context(request), **(extra_context or {})})


def sidebar_navigation(request: HttpRequest) -> list[dict[str, Any]]:
    """Unfold's sidebar: the back office's own pages above the model lists."""
    user = request.user

    def item(title: str, icon: str, url: str, perm: str | None = None) -> dict[str, Any]:
        return {
            "title": title,
            "icon": icon,
            "link": url,
            "permission": (lambda r: True) if perm is None else (lambda r: user.has_perm(perm)),
        }

    return [
        {
            "title": "Back office",
            "separator": False,
            "items": [
                item("Dashboard", "monitoring", reverse("admin:index")),
                item(
                    "Customers",
                    "corporate_fare",
                    reverse("admin:accounts_organization_changelist"),
                    "accounts.view_organization",
                ),
                item(
                    "Invoices",
                    "receipt_long",
                    reverse("admin:billing_invoice_changelist"),
                    "billing.view_invoice",
                ),
                item(
                    "Credit ledger",
                    "savings",
                    reverse("admin:billing_creditledgerentry_changelist"),
                    "billing.view_creditledgerentry",
                ),
                item(
                    "Price book",
                    "sell",
                    reverse("admin:billing_price_changelist"),
                    "billing.view_price",
                ),
                item(
                    "Tier multipliers",
                    "speed",
                    reverse("admin:billing_tiermultiplier_changelist"),
                    "billing.view_tiermultiplier",
                ),
                item(
                    "Usage explorer",
                    "query_stats",
                    reverse("admin:backoffice-usage"),
                    "billing.view_usagerollup",
                ),
                item(
                    "Margin",
                    "trending_up",
                    reverse("admin:backoffice-margin"),
                    roles.VIEW_REVENUE,
                ),
                item(
                    "Batches",
                    "stacks",
                    reverse("admin:gateway_batch_changelist"),
                    "gateway.view_batch",
                ),
                item(
                    "Audit log",
                    "history",
                    reverse("admin:accounts_auditlog_changelist"),
                    "accounts.view_auditlog",
                ),
            ],
        },
    ]
