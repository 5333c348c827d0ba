"""Prometheus metrics of the control plane and gateway process."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

HTTP_REQUESTS = Counter(
    "mantle_http_requests_total",
    "HTTP requests by method, route and status",
    ["method", "route", "status"],
)
HTTP_LATENCY = Histogram(
    "mantle_http_request_seconds",
    "HTTP request latency by route",
    ["route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
GATEWAY_TOKENS = Counter(
    "mantle_gateway_tokens_total", "Tokens served by the gateway, by kind", ["kind"]
)
GATEWAY_REJECTIONS = Counter(
    "mantle_gateway_rejections_total", "Requests refused by the gateway, by code", ["code"]
)
GATEWAY_TTFT = Histogram(
    "mantle_gateway_time_to_first_token_seconds",
    "From a generation request's arrival at the gateway to its first token there, by tier",
    ["tier"],
    buckets=(0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 30, 60, 120),
)
INFLIGHT = Gauge("mantle_gateway_inflight_requests", "Gateway requests in flight")
TURNS_HANDED = Counter(
    "mantle_gateway_turns_handed_total",
    "Turns passed from one request to the oldest waiting one on a gateway loop (core/turns.py)",
)
TURN_WAITS_EXPIRED = Counter(
    "mantle_gateway_turn_waits_expired_total",
    "Requests that waited MAX_WAIT_S for a turn and went on beside its holder",
)
TURNS_HELD = Gauge(
    "mantle_gateway_turns_held", "Requests holding a turn on this process's loops now"
)
TURNS_WAITING = Gauge(
    "mantle_gateway_turns_waiting", "Requests waiting for a turn on this process's loops now"
)
