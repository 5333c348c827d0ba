"""Routes of the customer web console; organization pages live under /console/o/<org id>/."""

from __future__ import annotations

from django.urls import include, path

from console.views import (
    account,
    audit,
    auth,
    batches,
    billing_pages,
    catalog_pages,
    keys,
    org,
    playground,
    sso,
    topups,
    usage,
    webhooks,
)

org_patterns = [
    path("", org.quickstart, name="console-quickstart"),
    path("team/", org.team, name="console-team"),
    path("team/mfa/", org.organization_mfa, name="console-org-mfa"),
    path("audit/", audit.audit, name="console-audit"),
    path("sso/", sso.sso_settings, name="console-sso"),
    path("sso/domains/", sso.sso_domain_add, name="console-sso-domain-add"),
    path(
        "sso/domains/<str:domain_id>/<slug:action>/",
        sso.sso_domain_action,
        name="console-sso-domain-action",
    ),
    path("audit.csv", audit.audit_csv, name="console-audit-csv"),
    path("team/<str:membership_id>/role/", org.member_role, name="console-member-role"),
    path(
        "team/invitations/<str:invitation_id>/<slug:action>/",
        org.invitation_action,
        name="console-invitation-action",
    ),
    path("team/<str:membership_id>/remove/", org.member_remove, name="console-member-remove"),
    path("projects/", org.projects, name="console-projects"),
    path("projects/<str:project_id>/rename/", org.project_rename, name="console-project-rename"),
    path("keys/", keys.keys, name="console-keys"),
    path("keys/<str:key_id>/revoke/", keys.key_revoke, name="console-key-revoke"),
    path("keys/<str:key_id>/controls/", keys.key_controls, name="console-key-controls"),
    path("models/", catalog_pages.models, name="console-models"),
    path("endpoints/", catalog_pages.endpoints, name="console-endpoints"),
    path(
        "endpoints/<str:endpoint_id>/",
        catalog_pages.endpoint_detail,
        name="console-endpoint",
    ),
    path(
        "endpoints/<str:endpoint_id>/status/",
        catalog_pages.endpoint_status,
        name="console-endpoint-status",
    ),
    path(
        "endpoints/<str:endpoint_id>/limits/",
        catalog_pages.endpoint_limits,
        name="console-endpoint-limits",
    ),
    path(
        "endpoints/<str:endpoint_id>/delete/",
        catalog_pages.endpoint_delete,
        name="console-endpoint-delete",
    ),
    path("compile-jobs/<str:job_id>/", catalog_pages.compile_job, name="console-compile-job"),
    path("playground/", playground.playground, name="console-playground"),
    path("playground/key/", playground.playground_key, name="console-playground-key"),
    path("usage/", usage.usage, name="console-usage"),
    path("usage.csv", usage.usage_csv, name="console-usage-csv"),
    path("batches/", batches.batches, name="console-batches"),
    # config.asgi matches this path to give a member's upload the Files API's body limit.
    path("batches/upload/", batches.batch_file_upload, name="console-batch-upload"),
    path("batches/<str:batch_id>/", batches.batch_detail, name="console-batch"),
    path("batches/<str:batch_id>/cancel/", batches.batch_cancel, name="console-batch-cancel"),
    path("files/<str:file_id>/content/", batches.file_content, name="console-file-content"),
    path("billing/", billing_pages.billing, name="console-billing"),
    path("billing/budgets/", billing_pages.budget_save, name="console-budget-save"),
    path(
        "billing/budgets/<str:budget_id>/delete/",
        billing_pages.budget_delete,
        name="console-budget-delete",
    ),
    path(
        "billing/invoices/<str:invoice_id>/",
        billing_pages.invoice,
        name="console-invoice",
    ),
    path(
        "billing/invoices/<str:invoice_id>/print/",
        billing_pages.invoice_print,
        name="console-invoice-print",
    ),
    path(
        "billing/invoices/<str:invoice_id>/pdf/",
        billing_pages.invoice_pdf,
        name="console-invoice-pdf",
    ),
    path("billing/details/", billing_pages.billing_details, name="console-billing-details"),
    path("billing/webhooks/", webhooks.webhook_list, name="console-webhooks"),
    path(
        "billing/webhooks/contacts/",
        webhooks.alert_settings_save,
        name="console-alert-settings",
    ),
    path(
        "billing/webhooks/<str:endpoint_id>/",
        webhooks.webhook_detail,
        name="console-webhook",
    ),
    path(
        "billing/webhooks/<str:endpoint_id>/toggle/",
        webhooks.webhook_toggle,
        name="console-webhook-toggle",
    ),
    path(
        "billing/webhooks/<str:endpoint_id>/delete/",
        webhooks.webhook_delete,
        name="console-webhook-delete",
    ),
    path(
        "billing/webhooks/<str:endpoint_id>/test/",
        webhooks.webhook_test,
        name="console-webhook-test",
    ),
    path(
        "billing/payment-methods/add/",
        billing_pages.payment_method_add,
        name="console-payment-method-add",
    ),
    path("billing/top-up/", topups.topup_page, name="console-topup"),
    path("billing/top-up/start/", topups.topup_start, name="console-topup-start"),
    path(
        "billing/auto-recharge/",
        topups.auto_recharge_save,
        name="console-auto-recharge",
    ),
]

urlpatterns = [
    path("", org.home, name="console-home"),
    path("signup/", auth.signup, name="console-signup"),
    path("signup/sent/", auth.signup_sent, name="console-signup-sent"),
    path("signup/confirm/<str:token>/", auth.signup_verify, name="console-signup-verify"),
    path("invitations/<str:token>/", auth.invitation, name="console-invitation"),
    path("login/", auth.LoginView.as_view(), name="console-login"),
    path("login/code/", auth.login_verify, name="console-login-verify"),
    path("login/sso/", sso.sso_start, name="console-sso-start"),
    path("login/sso/callback/", sso.sso_callback, name="console-sso-callback"),
    path("account/", account.account, name="console-account"),
    path("account/mfa/enrol/", account.mfa_enrol, name="console-mfa-enrol"),
    path("account/mfa/recovery-codes/", account.recovery_codes, name="console-mfa-codes"),
    path("account/mfa/remove/", account.mfa_remove, name="console-mfa-remove"),
    path("logout/", auth.LogoutView.as_view(), name="console-logout"),
    path("password-reset/", auth.PasswordResetView.as_view(), name="console-password-reset"),
    path(
        "password-reset/sent/",
        auth.PasswordResetDoneView.as_view(),
        name="console-password-reset-done",
    ),
    path(
        "reset/<uidb64>/<token>/",
        auth.PasswordResetConfirmView.as_view(),
        name="console-password-reset-confirm",
    ),
    path(
        "reset/done/",
        auth.PasswordResetCompleteView.as_view(),
        name="console-password-reset-complete",
    ),
    path("switch/", org.switch, name="console-switch"),
    path("organizations/new/", org.organization_new, name="console-org-new"),
    path("o/<str:org_id>/", include(org_patterns)),
]
