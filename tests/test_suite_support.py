"""The suite's own machinery: the per-test Redis wipe spares live workers' heartbeats."""

from __future__ import annotations

from config.redis import get_redis
from tests.conftest import wipe_sparing_heartbeats
from tests.stack import stack_node
from workers.contract import pool_live_key, worker_info_key


def test_the_wipe_keeps_heartbeats_and_nothing_else() -> None:
    client = get_redis()
    node = stack_node("w")  # a worker process this session started
    client.zadd(pool_live_key("cpu"), {node: 123.5, "made-up": 124.0})
    client.zadd(pool_live_key("test-pool"), {"made-up": 125.0})
    client.set(worker_info_key("made-up"), "{}", px=9000)  # a test's own beat
    client.set(worker_info_key(node), '{"node": "w"}', px=9000)
    client.set("mantle:key:abc", "cached", ex=60)
    client.xadd("mantle:usage", {"request_id": "r1"})

    wipe_sparing_heartbeats(client)

    assert client.zrange(pool_live_key("cpu"), 0, -1, withscores=True) == [(node, 123.5)]
    assert client.get(worker_info_key(node)) == '{"node": "w"}'
    assert 0 < client.pttl(worker_info_key(node)) <= 9000
    assert client.exists("mantle:key:abc", "mantle:usage") == 0
    assert not client.exists(pool_live_key("test-pool"), worker_info_key("made-up"))
    client.delete(worker_info_key(node), pool_live_key("cpu"))  # it would look alive


def test_the_wipe_of_a_database_without_beats_empties_it() -> None:
    client = get_redis()
    client.zadd(pool_live_key("cpu"), {"gone": 1.0})
    client.set("anything", "1")
    wipe_sparing_heartbeats(client)
    assert client.dbsize() == 0
