"""Liveness, readiness and Prometheus metrics endpoints.

/healthz and /readyz's verdict are public (load balancers and kubelets probe them), but
what is behind it is not: /readyz's timings and backend errors (hosts, ports, driver
messages) and /metrics (traffic, rejections, per-route latency) are served only to an
operator, that is a request with `Authorization: Bearer <MANTLE_OPS_TOKEN>` or from a
peer address inside MANTLE_OPS_NETWORKS. Everyone else gets /readyz's status and the
names of failing components, and a 404 for /metrics.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import time
from functools import lru_cache

from django.conf import settings
from django.db import connection
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.http import require_GET
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from core.redis import get_redis

logger = logging.getLogger(__name__)


@require_GET
def healthz(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"status": "ok"})


def _check_database() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")


def _check_redis() -> None:
    get_redis().ping()


def _check_broker() -> None:
    from kombu import Connection

    with Connection(settings.CELERY_BROKER_URL, connect_timeout=2) as conn:
        conn.ensure_connection(max_retries=1, timeout=2)


CHECKS = {"database": _check_database, "redis": _check_redis, "broker": _check_broker}


@lru_cache(maxsize=8)
def _networks(
    cidrs: tuple[str, ...],
) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(c, strict=False) for c in cidrs)


def is_operator(request: HttpRequest) -> bool:
    """The ops token (compared in constant time), or a peer inside MANTLE_OPS_NETWORKS.

    The peer is REMOTE_ADDR: behind a proxy it is the address the ASGI server's
    --proxy-headers took from a trusted proxy, so list the scraper's network, not the
    proxy's (a proxy's own address would vouch for every client behind it).
    """
    token = str(settings.MANTLE_OPS_TOKEN or "")
    if token:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(
            given.strip().encode(), token.encode()
        ):
            return True
    cidrs = tuple(settings.MANTLE_OPS_NETWORKS or ())
    if not cidrs:
        return False
    try:
        peer = ipaddress.ip_address(str(request.META.get("REMOTE_ADDR") or ""))
    except ValueError:
        return False
    return any(peer in network for network in _networks(cidrs))


@require_GET
def readyz(request: HttpRequest) -> JsonResponse:
    results: dict[str, dict[str, object]] = {}
    down = []
    for name, check in CHECKS.items():
        started = time.perf_counter()
        try:
            check()
        except Exception as exc:
            # The error text (hosts, ports, driver messages) goes to the log and to
            # operators only.
            logger.warning("readiness: %s unreachable: %s", name, exc)
            results[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            down.append(name)
        else:
            results[name] = {"ok": True, "ms": round((time.perf_counter() - started) * 1000, 1)}
    body: dict[str, object] = {"status": "ok" if not down else "unavailable", "down": down}
    if is_operator(request):
        body["checks"] = results
    return JsonResponse(body, status=200 if not down else 503)


@require_GET
def metrics_view(request: HttpRequest) -> HttpResponse:
    if not is_operator(request):
        raise Http404  # as if there were none: nothing here for the public
    return HttpResponse(generate_latest(), content_type=CONTENT_TYPE_LATEST)
