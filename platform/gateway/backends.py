"""The gateway's dependencies failing: clean 503s for Redis and PostgreSQL, and reconnecting."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from asgiref.sync import sync_to_async
from django.db import DatabaseError, InterfaceError, OperationalError, connection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError
from redis.exceptions import TimeoutError as RedisTimeoutError

from core import turns
from core.redis import get_async_redis
from gateway.errors import OpenAIError, dependency_unavailable

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

# Redis refusing, resetting, timing out, still loading its data after a restart
# (BusyLoadingError is a ConnectionError), or a replica not yet promoted. Any other
# RedisError (a script bug) is not an outage and stays a 500.
REDIS_DOWN = (RedisConnectionError, RedisTimeoutError, ReadOnlyError)
DATABASE_DOWN = (OperationalError, InterfaceError)


def redis_unavailable() -> OpenAIError:
    return dependency_unavailable("redis", "request state store")


async def forget_idle_redis_connections() -> None:
    """After a Redis error, drops the pool's idle connections: they share the fate of the
    one that failed (a restarted server, a cut link), and each would otherwise fail once
    more at its next use, well after Redis is back. In-use ones fail on their own."""
    with contextlib.suppress(Exception):
        await get_async_redis().connection_pool.disconnect(inuse_connections=False)


def database_unavailable() -> OpenAIError:
    return dependency_unavailable("database", "database")


def _read_with_reconnect(fn: Callable[..., _T], *args: object) -> _T:
    """Runs a read, once more on a fresh connection if the first one had broken.

    The gateway's reads run in executor threads that no request signal looks
    after (see gateway.apps), so a connection broken by a database restart or a
    network cut would stay broken in its thread for good: it is closed here, and
    the next read (this retry, or a later request) connects afresh.
    """
    try:
        return fn(*args)
    except DATABASE_DOWN:
        _discard_connection()
    try:
        return fn(*args)
    except DATABASE_DOWN:
        _discard_connection()
        raise


def _discard_connection() -> None:
    with contextlib.suppress(DatabaseError):
        connection.close()  # forgets the connection even when closing it fails


async def database_read(
    fn: Callable[..., _T], *args: object, executor: ThreadPoolExecutor | None = None
) -> _T:
    """`fn(*args)` in an executor thread (the loop's default one, or `executor`); a database
    that is down becomes a clean 503."""
    try:
        run = sync_to_async(_read_with_reconnect, thread_sensitive=False, executor=executor)
        async with turns.away():
            return await run(fn, *args)
    except DATABASE_DOWN as exc:
        logger.warning("database unreachable: %s", exc)
        raise database_unavailable() from exc
