"""The suite's own machinery: the per-test Redis wipe spares live workers' heartbeats.

Live worker processes of this session may be beating beside these tests (non-database
tests run last), so they use a pool of their own and check only what they wrote.
"""

from __future__ import annotations

from core.redis import get_redis
from tests.conftest import wipe_sparing_heartbeats
from tests.support.stack import is_stack_node, stack_node
from workers.contract import POOL_LIVE_PREFIX, WORKER_INFO_PREFIX, pool_live_key, worker_info_key

POOL = "suite-support"


def test_the_wipe_keeps_heartbeats_and_nothing_else() -> None:
    client = get_redis()
    node = stack_node("w")  # a worker process this session started
    client.zadd(pool_live_key(POOL), {node: 123.5, "made-up": 124.0})
    client.zadd(pool_live_key(f"{POOL}-2"), {"made-up": 125.0})
    client.set(worker_info_key("made-up"), "{}", px=9000)  # a test's own beat
    client.set(worker_info_key(node), '{"node": "w"}', px=9000)
    client.set("mantle:key:abc", "cached", ex=60)
    client.xadd("mantle:usage", {"request_id": "r1"})
    try:
        wipe_sparing_heartbeats(client)

        assert client.zrange(pool_live_key(POOL), 0, -1, withscores=True) == [(node, 123.5)]
        assert client.get(worker_info_key(node)) == '{"node": "w"}'
        assert 0 < client.pttl(worker_info_key(node)) <= 9000
        assert client.exists("mantle:key:abc", "mantle:usage") == 0
        assert not client.exists(pool_live_key(f"{POOL}-2"), worker_info_key("made-up"))
    finally:
        client.delete(worker_info_key(node), pool_live_key(POOL))  # it would look alive


def test_the_wipe_leaves_only_this_sessions_heartbeats() -> None:
    client = get_redis()
    client.zadd(pool_live_key(POOL), {"gone": 1.0})
    client.set("anything", "1")
    wipe_sparing_heartbeats(client)
    for key in client.scan_iter():
        if key.startswith(WORKER_INFO_PREFIX):
            assert is_stack_node(key.removeprefix(WORKER_INFO_PREFIX)), key
        else:
            assert key.startswith(POOL_LIVE_PREFIX), key
            nodes = client.zrange(key, 0, -1)
            assert nodes and all(is_stack_node(n) for n in nodes), (key, nodes)


def test_every_test_module_has_its_own_name() -> None:
    """The test directories are not packages: pytest imports each module by its basename,
    so two files of one name in two directories stop the whole run at collection."""
    from collections import Counter
    from pathlib import Path

    names = Counter(p.name for p in Path(__file__).parent.rglob("test_*.py"))
    assert [name for name, count in names.items() if count > 1] == []
