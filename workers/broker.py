"""A guard for kombu's Redis transport: a lost connection must not end the worker process."""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)

_installed = False


def guard_redis_unacked_restore() -> None:
    """Keep a consumer that lost its broker connection alive while it reconnects.

    When the connection to a Redis broker drops while messages are unacknowledged
    (a request finished but its ack could not be sent), kombu closes the channel and
    restores those messages through a client built from the connection, which is
    already gone: an AttributeError that Celery treats as unrecoverable, so the whole
    worker exits (kombu issues #582 and #970 show the same path). Refusing the restore
    instead is safe: kombu keeps each delivered message in the broker's `unacked` hash
    until it is acknowledged, and any consumer restores it after the visibility
    timeout; our tasks are idempotent per request id (the claim key), so a finished
    request that comes back is dropped. Installed once per process.
    """
    global _installed
    if _installed:
        return
    from kombu.transport import redis as kombu_redis

    base: Any = kombu_redis.QoS

    class GuardedQoS(base):
        def restore_unacked(self, client: Any = None) -> Any:
            try:
                return super().restore_unacked(client)
            except AttributeError:
                logger.warning(
                    "broker connection lost with %d unacknowledged message(s): they stay "
                    "in the broker and come back after the visibility timeout",
                    len(self._delivered),
                )
                self._delivered.clear()
                return None

    kombu_redis.Channel.QoS = GuardedQoS
    _installed = True
