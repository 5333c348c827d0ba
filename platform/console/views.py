"""Console pages (server-rendered; the management API does the writes behind them)."""

from __future__ import annotations

from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render

from accounts import selectors
from accounts.principal import Principal


@login_required
def home(request: HttpRequest) -> HttpResponse:
    principal = Principal(user=request.user)  # type: ignore[arg-type]
    orgs = list(selectors.organizations_for(principal))
    return render(request, "console/home.html", {"organizations": orgs})
