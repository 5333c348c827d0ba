"""Shared fixtures for the worker tests (Django-free)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

# The suite's one Redis database: what bin/test exports as REDIS_URL, with the default of
# bin/test and config/settings/test.py.
TEST_REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/15")


@pytest.fixture
def redis_client() -> Iterator[object]:
    """A real Redis on the test database, emptied before and after each test."""
    import redis

    client = redis.Redis.from_url(TEST_REDIS_URL, decode_responses=True)
    try:
        client.ping()
    except redis.ConnectionError:
        pytest.skip(f"no Redis at {TEST_REDIS_URL}")
    client.flushdb()
    yield client
    client.flushdb()
    client.close()
