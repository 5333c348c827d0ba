"""Console test helpers: URLs of organization pages, and clients (optionally enforcing CSRF)."""

from __future__ import annotations

from django.test import Client
from django.urls import reverse

from accounts.models import User


def org_url(name: str, org_id: str, **kwargs: str) -> str:
    return reverse(name, kwargs={"org_id": org_id, **kwargs})


def logged_in(user: User, *, csrf: bool = False) -> Client:
    client = Client(enforce_csrf_checks=csrf)
    client.force_login(user)
    return client
