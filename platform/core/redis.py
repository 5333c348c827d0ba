"""Shared Redis clients: one sync pool per process, one asyncio pool per event loop."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from typing import Any

import redis
import redis.asyncio as aredis
from django.conf import settings
from redis.exceptions import NoScriptError

_sync_client: redis.Redis | None = None
_sync_lock = threading.Lock()
_async_clients: dict[int, aredis.Redis] = {}


def get_redis() -> redis.Redis:
    global _sync_client
    if _sync_client is None:
        with _sync_lock:
            if _sync_client is None:
                _sync_client = redis.Redis.from_url(
                    settings.REDIS_URL,
                    decode_responses=True,
                    socket_connect_timeout=2,
                    socket_timeout=5,
                    health_check_interval=30,
                )
    return _sync_client


def get_async_redis() -> aredis.Redis:
    """The asyncio client bound to the running loop (a pool cannot cross loops)."""
    loop_id = id(asyncio.get_running_loop())
    client = _async_clients.get(loop_id)
    if client is None:
        client = aredis.Redis.from_url(
            settings.REDIS_URL,
            decode_responses=True,
            socket_connect_timeout=2,
            max_connections=512,
            health_check_interval=30,
        )
        _async_clients[loop_id] = client
    return client


# Deletes a key only while it still holds the value read: a write made since is kept.
_DELETE_IF_UNCHANGED_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


_async_scripts: dict[str, Any] = {}


def async_script(source: str) -> Any:
    """The script for `source`, run by EVALSHA with the client given at each call (loaded
    once on NOSCRIPT): a script sent whole with EVAL on a hot path costs its text on the
    wire and a hash of it in Redis every time."""
    found = _async_scripts.get(source)
    if found is None:
        found = _async_scripts[source] = aredis.Redis().register_script(source)
    return found


ScriptCall = tuple[str, Sequence[Any], Sequence[Any]]  # (source, keys, args)


async def run_scripts(client: aredis.Redis, calls: Sequence[ScriptCall]) -> list[Any]:
    """Runs the scripts in one round trip, in order (a pipeline without MULTI: each script
    is atomic, the batch is not), by EVALSHA; one that Redis does not know yet (NOSCRIPT:
    it did not run) is loaded and run again alone. The results in order, an error as its
    exception; a lost connection raises (a prefix of the batch may have run)."""
    pipe = client.pipeline(transaction=False)
    for source, keys, args in calls:
        pipe.execute_command("EVALSHA", async_script(source).sha, len(keys), *keys, *args)
    results: list[Any] = await pipe.execute(raise_on_error=False)
    for index, found in enumerate(results):
        if isinstance(found, NoScriptError):
            source, keys, args = calls[index]
            try:
                results[index] = await async_script(source)(keys=keys, args=args, client=client)
            except Exception as exc:
                results[index] = exc
    return results


async def delete_if_unchanged(key: str, value: str) -> None:
    """Deletes `key` if it still holds `value` (a cached record found bad, say)."""
    await get_async_redis().eval(_DELETE_IF_UNCHANGED_LUA, 1, key, value)
