"""Reading a process's Prometheus /metrics in end-to-end tests."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families


def scraped(url: str, sample: str, **labels: str) -> float:
    """The sum of the samples named `sample` (exactly) whose labels include `labels`, from
    `url`/metrics (the caller must be allowed to read it: MANTLE_OPS_NETWORKS or a token)."""
    reply = httpx.get(f"{url}/metrics", timeout=10)
    reply.raise_for_status()
    return sum(
        s.value
        for family in text_string_to_metric_families(reply.text)
        for s in family.samples
        if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())
    )
