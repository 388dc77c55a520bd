"""The data layout's version stamp and where partitions live.

A process refuses to write (producers) or to start (workers) when Redis holds another layout
than the one it writes, and ``redis-batcher layout --upgrade`` moves data of layout 1 over once
nothing is left under its key names. Partitions' hash tags put each partition into its share of
the slot space, so a cluster sliced evenly holds them evenly (``redis-batcher ls --nodes``).
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator

import pytest
import redis
from click.testing import CliRunner, Result
from redis.cluster import ClusterNode, RedisCluster

import redis_batcher as rb
import redis_batcher.asyncio as aio
from redis_batcher import Batcher, Worker, calls, layout_ops
from redis_batcher.cli import main
from redis_batcher.keys import LAYOUT, MAX_PARTITIONS, key_slot, layout_key, partition_tag, slot_range
from redis_batcher.testing import RedisClusterServers, RedisServer
from tests.conftest import snapshot

PREFIX = "lay"


def invoke(*args: str) -> Result:
    return CliRunner(env={"COLUMNS": "200"}).invoke(main, list(args), catch_exceptions=False)


@pytest.fixture
def fresh(real_client: redis.Redis) -> redis.Redis:
    real_client.flushall()
    return real_client


def make(batcher: Batcher, partitions: int = 1) -> rb.Processor:
    return batcher.processor(name="p", max_batch_size=10, flush_interval=None, partitions=partitions)(
        lambda f: None
    )


def layout1(client: redis.Redis, prefix: str = PREFIX) -> None:
    """What a version before the stamp left: a registry entry, no ``<prefix>:layout``."""
    cfg = make(Batcher.definitions_only(prefix=prefix), partitions=3).config
    client.hset(f"{prefix}:processors", "p", cfg.to_json())


# -- the stamp -----------------------------------------------------------------------------------


def test_the_first_write_stamps_the_layout_and_later_ones_find_it(
    redis_server: RedisServer, fresh: redis.Redis
) -> None:
    batcher = Batcher(redis_server.url, prefix=PREFIX)
    proc = make(batcher)
    assert batcher.layout() is None  # reading does not stamp
    assert fresh.get(layout_key(PREFIX)) is None
    proc.add("a", 1)
    assert fresh.get(layout_key(PREFIX)) == str(LAYOUT).encode()
    other = Batcher(redis_server.url, prefix=PREFIX)
    assert make(other).add("a", 2).pending == 2
    assert other.check_layout() == LAYOUT == batcher.layout()
    assert invoke("layout", "--redis-url", redis_server.url, "--prefix", PREFIX).exit_code == 0
    # another prefix is another layout of its own
    assert fresh.get(layout_key("elsewhere")) is None
    batcher.close()
    other.close()


def test_layout_1_data_is_refused_before_anything_is_written(
    redis_server: RedisServer, fresh: redis.Redis
) -> None:
    layout1(fresh)
    before = snapshot(fresh)
    batcher = Batcher(redis_server.url, prefix=PREFIX)
    proc = make(batcher, partitions=3)
    for call in (lambda: proc.add("a", 1), lambda: proc.add_many("a", [1, 2]), lambda: proc.flush("a")):
        with pytest.raises(rb.LayoutMismatch) as raised:
            call()
        assert (raised.value.found, raised.value.expected) == (1, LAYOUT)
        assert "layout 1" in str(raised.value) and "redis-batcher layout --upgrade" in str(raised.value)
    assert snapshot(fresh) == before
    # a worker does not start: run() raises, in burst mode and serving
    with pytest.raises(rb.LayoutMismatch):
        Worker(batcher).run(burst=True)
    outcome: list[BaseException] = []

    def serve() -> None:
        try:
            Worker(batcher, max_idle_wait=0.1).run()
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=serve)
    thread.start()
    thread.join(timeout=10)
    assert not thread.is_alive() and len(outcome) == 1 and isinstance(outcome[0], rb.LayoutMismatch)
    assert snapshot(fresh) == before
    # the CLI: one line, exit status 1 (the app's batcher has the prefix "slow")
    layout1(fresh, "slow")
    result = CliRunner().invoke(
        main, ["worker", "tests.apps.slow:batcher", "--burst", "--redis-url", redis_server.url]
    )
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert "layout 1" in result.output and fresh.get(layout_key("slow")) is None
    shown = invoke("layout", "--redis-url", redis_server.url, "--prefix", PREFIX)
    assert shown.exit_code == 1 and "layout 1 (written before layouts were stamped)" in shown.output
    batcher.close()


def test_a_newer_layout_is_refused_with_what_to_do(redis_server: RedisServer, fresh: redis.Redis) -> None:
    fresh.set(layout_key(PREFIX), LAYOUT + 1)
    batcher = Batcher(redis_server.url, prefix=PREFIX)
    with pytest.raises(rb.LayoutMismatch) as raised:
        make(batcher).add("a", 1)
    assert raised.value.found == LAYOUT + 1
    assert f"upgrade this process to the redis-batcher version that writes layout {LAYOUT + 1}" in str(
        raised.value
    )
    fresh.set(layout_key(PREFIX), "garbage")
    with pytest.raises(rb.LayoutMismatch, match="not a layout version"):
        Batcher(redis_server.url, prefix=PREFIX).check_layout()
    assert fresh.dbsize() == 1
    shown = invoke("layout", "--redis-url", redis_server.url, "--prefix", PREFIX)
    assert shown.exit_code == 1 and "layout garbage" in shown.output
    batcher.close()


def test_the_async_batcher_and_worker_check_the_layout(redis_server: RedisServer, fresh: redis.Redis) -> None:
    async def main_() -> None:
        ab = aio.Batcher(redis_server.url, prefix=PREFIX)
        proc = ab.processor(name="p", max_batch_size=10, flush_interval=None)(lambda f: None)
        layout1(fresh)
        with pytest.raises(rb.LayoutMismatch):
            await proc.add("a", 1)
        many = await asyncio.gather(*(proc.add(f"g{i}", i) for i in range(3)), return_exceptions=True)
        assert all(isinstance(e, rb.LayoutMismatch) for e in many), many
        with pytest.raises(rb.LayoutMismatch):
            await aio.Worker(ab).run(burst=True)
        fresh.delete(f"{PREFIX}:processors")
        assert (await proc.add("a", 1)).pending == 1  # a fresh prefix: stamped, written
        assert await ab.check_layout() == LAYOUT
        await ab.aclose()

    asyncio.run(main_())
    assert fresh.get(layout_key(PREFIX)) == str(LAYOUT).encode()


def test_upgrade_from_layout_1_waits_for_its_keys_to_drain(
    redis_server: RedisServer, fresh: redis.Redis
) -> None:
    layout1(fresh)
    # layout 1 named partition k of "p" {p:k}: its queue still holds a sequence, and a dead letter
    moved = [k for k in range(3) if partition_tag("p", k, 3) != f"p:{k}"]
    assert moved, "at least one of the three partitions changed its hash tag"
    old = f"{PREFIX}:{{p:{moved[0]}}}:"
    fresh.zadd(old + "due", {"x::0": 0})
    fresh.zadd(old + "dead", {"d1": 0})
    refused = invoke("layout", "--upgrade", "--redis-url", redis_server.url, "--prefix", PREFIX)
    assert refused.exit_code == 1 and "Traceback" not in refused.output
    assert old + "due" in refused.output and old + "dead" in refused.output
    assert fresh.get(layout_key(PREFIX)) is None
    fresh.delete(old + "due", old + "dead")  # drained by the old version's workers (and purged)
    done = invoke("layout", "--upgrade", "--redis-url", redis_server.url, "--prefix", PREFIX)
    assert done.exit_code == 0 and f"upgraded from layout 1 to layout {LAYOUT}" in done.output
    assert fresh.get(layout_key(PREFIX)) == str(LAYOUT).encode()
    again = invoke("layout", "--upgrade", "--redis-url", redis_server.url, "--prefix", PREFIX)
    assert again.exit_code == 0 and "already holds" in again.output
    batcher = Batcher(redis_server.url, prefix=PREFIX)
    assert make(batcher, partitions=3).add("a", 1).pending == 1
    batcher.close()


# -- where partitions live -----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["events", "a:b", "myapp.handlers.on_click", "日本"])
def test_partition_tags_fall_into_their_share_of_the_slots(name: str) -> None:
    assert partition_tag(name, 0, 1) == f"{name}:0"  # one partition: the plain tag
    for partitions in (2, 3, 4, 5, 8, 16, 100, MAX_PARTITIONS):
        for k in range(partitions):
            tag = partition_tag(name, k, partitions)
            assert tag == f"{name}:{k}" or tag.startswith(f"{name}:{k}~")
            first, end = slot_range(k, partitions)
            slot = key_slot(f"rb:{{{tag}}}:due")
            assert first <= slot < end, (partitions, k, tag, slot)
            if end - first >= 4:  # the middle half, for slices that are not exactly even
                assert first + (end - first) // 4 <= slot < end - (end - first) // 4


def test_partition_count_is_bounded() -> None:
    batcher = Batcher.definitions_only(prefix=PREFIX)
    with pytest.raises(rb.ConfigError, match="at most 256"):
        batcher.processor(name="big", partitions=MAX_PARTITIONS + 1)(lambda f: None)


@pytest.fixture
def cluster(redis_cluster: RedisClusterServers) -> Iterator[tuple[RedisCluster, list[redis.Redis]]]:
    nodes = [redis.Redis(host=h, port=p) for h, p in redis_cluster.startup_nodes]
    for c in nodes:
        c.flushall()
    client = RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in redis_cluster.startup_nodes])
    try:
        yield client, nodes
    finally:
        client.close()
        for c in nodes:
            c.close()


@pytest.mark.slow
def test_three_partitions_spread_over_three_masters(
    redis_cluster: RedisClusterServers, cluster: tuple[RedisCluster, list[redis.Redis]]
) -> None:
    client, nodes = cluster
    batcher = Batcher(client, prefix=PREFIX)
    proc = batcher.processor(name="events", partitions=3, max_batch_size=7, flush_interval=None)(
        lambda f: None
    )
    for i in range(600):
        proc.add_many(f"order:{i}", list(range(10)))  # one sequence sealed, 3 items accumulating
    keys = [c.dbsize() for c in nodes]
    assert min(keys) > 0 and max(keys) / min(keys) <= 1.3, keys
    # ls --nodes: each partition with its slot and master, one partition per master
    url = f"redis://{redis_cluster.startup_nodes[0][0]}:{redis_cluster.startup_nodes[0][1]}"
    result = invoke("ls", "--nodes", "--json", "--cluster", "--redis-url", url, "--prefix", PREFIX)
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert [(r["processor"], r["partition"]) for r in rows] == [("events", k) for k in range(3)]
    ports = {str(c.connection_pool.connection_kwargs["port"]) for c in nodes}
    assert {r["node"].rsplit(":", 1)[1] for r in rows} == ports
    for r in rows:
        assert r["slot"] == int(client.execute_command("CLUSTER KEYSLOT", r["key_prefix"] + "due"))
        assert r["queued_sequences"] > 0
    table = invoke("ls", "--nodes", "--cluster", "--redis-url", url, "--prefix", PREFIX)
    assert table.exit_code == 0 and table.output.count(": 1 partition(s)") == 3, table.output
    batcher.close()


def test_ls_nodes_on_one_server(redis_server: RedisServer, fresh: redis.Redis) -> None:
    batcher = Batcher(redis_server.url, prefix=PREFIX)
    make(batcher, partitions=2).add("a", 1)
    result = invoke("ls", "--nodes", "--json", "--redis-url", redis_server.url, "--prefix", PREFIX)
    rows = json.loads(result.output)
    assert [r["node"] for r in rows] == [f"127.0.0.1:{redis_server.port}"] * 2
    assert sum(r["queued_sequences"] for r in rows) == 0
    assert invoke("ls", "--nodes", "-p", "p", "--redis-url", redis_server.url).exit_code == 2
    batcher.close()


@pytest.mark.parametrize("after", [0, 1, 2, 3])
def test_processes_starting_together_never_take_each_other_for_layout_1(
    redis_server: RedisServer, fresh: redis.Redis, after: int
) -> None:
    """Another process stamps and registers between any two of this one's reads: this one
    still finds layout 2 (it reads the registry before the stamp)."""
    other = Batcher(redis_server.url, prefix=PREFIX)
    steps = layout_ops.layout_steps(PREFIX)
    reply = None
    done = False
    for n in range(10):
        if n == after:
            make(other).add("x", 1)  # stamps, then registers
        try:
            step = steps.send(reply)
        except StopIteration as stop:
            assert stop.value == LAYOUT
            done = True
            break
        assert isinstance(step, calls.Read)
        reply = step.send(fresh)
    assert done
    assert fresh.get(layout_key(PREFIX)) == str(LAYOUT).encode()
    other.close()


def test_with_allow_eviction_a_missing_stamp_is_stamped_again(
    redis_server: RedisServer, fresh: redis.Redis
) -> None:
    """Under an evicting policy the stamp itself may be evicted while the registry stays: a
    batcher with allow_eviction=True stamps it again instead of refusing."""
    layout1(fresh)
    with pytest.raises(rb.LayoutMismatch):
        Batcher(redis_server.url, prefix=PREFIX).check_layout()
    assert Batcher(redis_server.url, prefix=PREFIX, allow_eviction=True).check_layout() == LAYOUT
    assert fresh.get(layout_key(PREFIX)) == str(LAYOUT).encode()
