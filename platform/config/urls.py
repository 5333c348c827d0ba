"""URL map: /v1 gateway, /api/v1 management API, console, admin, operations."""

from __future__ import annotations

from django.contrib import admin
from django.urls import include, path
from django.views.generic import RedirectView

from config.api import api
from core import ops

urlpatterns = [
    path("v1/", include("gateway.urls")),
    path("v2/", include("gateway.v2")),
    path("api/v1/", api.urls),
    path("console/", include("console.urls")),
    path("admin/", admin.site.urls),
    path("billing/", include("billing.urls")),
    path("healthz", ops.healthz, name="healthz"),
    path("readyz", ops.readyz, name="readyz"),
    path("metrics", ops.metrics_view, name="metrics"),
    path("", RedirectView.as_view(url="/console/", permanent=False)),
]
