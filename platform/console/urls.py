"""Routes of the customer web console."""

from __future__ import annotations

from django.contrib.auth import views as auth_views
from django.urls import path

from console import views

urlpatterns = [
    path("", views.home, name="console-home"),
    path(
        "login/",
        auth_views.LoginView.as_view(template_name="console/login.html"),
        name="console-login",
    ),
    path("logout/", auth_views.LogoutView.as_view(), name="console-logout"),
]
