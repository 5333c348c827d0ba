"""The drain's lag over time: one sample a minute (beat) for the back office's chart."""

from __future__ import annotations

import logging
import time

from billing.metering.stream import drain_lag_seconds
from core.redis import get_redis

logger = logging.getLogger(__name__)

DRAIN_LAG_SAMPLES = "mantle:backoffice:drain-lag"
DRAIN_LAG_KEEP = 24 * 60  # one sample a minute, a day of them


def drain_lag_now() -> float:
    try:
        return drain_lag_seconds(get_redis())
    except Exception:  # the dashboard must render with Redis down; the lag is then unknown
        logger.exception("cannot read the usage drain lag")
        return -1.0


def drain_lag_record(*, at: float | None = None) -> float:
    """Appends one sample of the drain lag to the history the dashboard charts (beat task)."""
    client = get_redis()
    lag = drain_lag_seconds(client)
    pipe = client.pipeline()
    pipe.lpush(DRAIN_LAG_SAMPLES, f"{at if at is not None else time.time():.0f}:{lag:.3f}")
    pipe.ltrim(DRAIN_LAG_SAMPLES, 0, DRAIN_LAG_KEEP - 1)
    pipe.execute()
    return lag


def drain_lag_history() -> list[tuple[float, float]]:
    """The recorded samples, oldest first."""
    try:
        raw: list[str] = get_redis().lrange(DRAIN_LAG_SAMPLES, 0, -1)  # type: ignore[assignment]
    except Exception:
        logger.exception("cannot read the drain lag history")
        return []
    samples = []
    for item in reversed(raw):
        ts, _, lag = item.partition(":")
        try:
            samples.append((float(ts), float(lag)))
        except ValueError:
            continue
    return samples
