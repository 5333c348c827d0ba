"""The request rate of the files and batches surface (/v1/files, /v1/batches) per
organization: MANTLE_FILES_BATCHES_RPM a minute, in Redis, apart from the inference RPM/TPM.

Each of these requests touches the database (and an upload or a download the file store);
without a rate one customer's loop of lists or uploads would take the gateway's threads and
the database's connections from everyone's inference. A fixed one-minute window per
organization: one round trip, and the refusal says when the window ends.
"""

from __future__ import annotations

import logging
import time

from django.conf import settings

from core.redis import get_async_redis
from gateway.errors import OpenAIError

logger = logging.getLogger(__name__)

WINDOW_S = 60

_HIT = """
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
return n
"""


def rate_key(organization_id: str, window: int) -> str:
    return f"mantle:files-batches-rpm:{organization_id}:{window}"


async def management_rate(organization_id: str) -> None:
    """Counts one request of the organization's; a 429 `rate_limit_exceeded` past the limit.
    Redis unreachable lets the request through (logged): these endpoints answer from the
    database, and the inference path reports Redis's state on its own."""
    limit = settings.MANTLE_FILES_BATCHES_RPM
    if limit <= 0:
        return
    now = time.time()
    window = int(now // WINDOW_S)
    try:
        count = int(
            await get_async_redis().eval(_HIT, 1, rate_key(organization_id, window), WINDOW_S * 2)
        )
    except Exception:
        logger.warning("files/batches rate not counted: Redis unreachable", exc_info=True)
        return
    if count > limit:
        wait = max(1, int((window + 1) * WINDOW_S - now) + 1)
        raise OpenAIError(
            429,
            f"Rate limit reached for /v1/files and /v1/batches: {limit} requests per minute "
            f"per organization (MANTLE_FILES_BATCHES_RPM). Try again in {wait} s.",
            code="rate_limit_exceeded",
            headers={"retry-after": str(wait)},
        )
