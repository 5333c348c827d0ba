"""Django's admin, served by the back office's own site class (dashboard and custom pages)."""

from __future__ import annotations

from django.contrib.admin.apps import AdminConfig


class BackOfficeAdminConfig(AdminConfig):
    default_site = "billing.backoffice.adminsite.BackOfficeSite"
