"""Script calls on Redis Cluster go to the primary serving their slot over a connection of its
own (as on a single server), follow a slot that moved to another primary, and ``WAIT`` on the
primary that ran them (``wait_replicas``).

A cluster of its own (3 primaries, one of them with a replica), since slots are moved here.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from redis.cluster import ClusterNode, RedisCluster

import redis_batcher as rb
from redis_batcher import Batcher, Flush, Worker
from redis_batcher.connection import ClusterNodePool
from redis_batcher.testing import RedisClusterServers, RedisServer, free_cluster_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


class Cluster:
    def __init__(self, servers: RedisClusterServers, replica: RedisServer) -> None:
        self.servers = servers
        self.replica = replica
        self.primaries = [redis.Redis(host=h, port=p) for h, p in servers.startup_nodes]

    def client(self) -> RedisCluster:
        return RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in self.servers.startup_nodes])

    def owner(self, slot: int) -> redis.Redis:
        for lo, hi, primary, *_ in self.primaries[0].execute_command("CLUSTER SLOTS"):
            if int(lo) <= slot <= int(hi):
                port = int(primary[1])
                return next(c for c in self.primaries if c.connection_pool.connection_kwargs["port"] == port)
        raise AssertionError(f"no primary serves slot {slot}")

    def move_slot(self, slot: int, dst: redis.Redis) -> None:
        """Migrate ``slot`` with its keys to ``dst`` as ``redis-cli --cluster reshard`` does."""
        src = self.owner(slot)
        src_id, dst_id = (c.execute_command("CLUSTER MYID").decode() for c in (src, dst))
        dst.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", src_id)
        src.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", dst_id)
        while keys := src.execute_command("CLUSTER GETKEYSINSLOT", slot, 100):
            port = dst.connection_pool.connection_kwargs["port"]
            src.execute_command("MIGRATE", "127.0.0.1", port, "", 0, 5000, "KEYS", *keys)
        for node in self.primaries:
            node.execute_command("CLUSTER SETSLOT", slot, "NODE", dst_id)
        for node in self.primaries:  # every primary agrees before the test goes on
            deadline = time.monotonic() + 10
            while self._owner_port(node, slot) != dst.connection_pool.connection_kwargs["port"]:
                assert time.monotonic() < deadline, "the slot's new owner did not propagate"
                time.sleep(0.05)

    @staticmethod
    def _owner_port(node: redis.Redis, slot: int) -> int | None:
        for lo, hi, primary, *_ in node.execute_command("CLUSTER SLOTS"):
            if int(lo) <= slot <= int(hi):
                return int(primary[1])
        return None


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    servers = RedisClusterServers(3).start()
    replica = RedisServer(
        servers.binary,
        port=free_cluster_port(),
        extra_args=["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"],
    )
    try:
        replica.start()
        c = Cluster(servers, replica)
        first = c.primaries[0]
        first.execute_command("CLUSTER MEET", "127.0.0.1", replica.port)
        r = redis.Redis(port=replica.port)
        primary_id = first.execute_command("CLUSTER MYID").decode()
        deadline = time.monotonic() + 20
        while True:  # the replica learns the primary through the cluster bus first
            try:
                r.execute_command("CLUSTER REPLICATE", primary_id)
                break
            except redis.ResponseError:
                assert time.monotonic() < deadline, "the replica never learned its primary"
                time.sleep(0.1)
        while r.info("replication").get("master_link_status") != "up":
            assert time.monotonic() < deadline, "the replica never synced"
            time.sleep(0.1)
        r.close()
        yield c
    finally:
        replica.stop()
        servers.stop()


@pytest.fixture
def client(cluster: Cluster) -> Iterator[RedisCluster]:
    for node in cluster.primaries:
        node.flushall()
    rc = cluster.client()
    try:
        yield rc
    finally:
        rc.close()


def slot_of(rc: RedisCluster, key: str) -> int:
    return int(rc.execute_command("CLUSTER KEYSLOT", key))  # type: ignore[no-untyped-call]


def port_of(node: redis.Redis) -> int:
    return int(node.connection_pool.connection_kwargs["port"])


def test_wait_replicas_waits_on_the_primary_that_ran_the_script(
    cluster: Cluster, client: RedisCluster
) -> None:
    batcher = Batcher(client, prefix="w", wait_replicas=1, wait_timeout=1.0)
    proc = batcher.processor(name="ev", partitions=3, max_batch_size=100, flush_interval=None)(lambda f: None)
    with_replica = port_of(cluster.primaries[0])
    by_owner: dict[bool, str] = {}
    for i in range(100):
        bid = f"id{i}"
        owner = cluster.owner(slot_of(client, proc.keys.for_base(bid).head(bid)))
        by_owner.setdefault(port_of(owner) == with_replica, bid)
    assert set(by_owner) == {True, False}
    # the primary with a replica: the add and its WAIT on one connection, one replica acked
    r = proc.add(by_owner[True], 1)
    assert r.pending == 1
    assert proc.add_many(by_owner[True], [2, 3]).pending == 3
    # a primary without: the item is written, but the replica count is not met
    with pytest.raises(rb.NotReplicated) as raised:
        proc.add(by_owner[False], 1)
    assert (raised.value.wanted, raised.value.got) == (1, 0)
    st = proc.status(by_owner[False])
    assert st is not None and st.pending == 1
    batcher.close()


def test_adds_and_deliveries_follow_a_slot_moved_to_another_primary(
    cluster: Cluster, client: RedisCluster
) -> None:
    got: list[Flush] = []
    batcher = Batcher(client, prefix="m")
    proc = batcher.processor(name="ev", max_batch_size=5, flush_interval=None)(got.append)
    bid = "moving"
    head = proc.keys.for_base(bid).head(bid)
    slot = slot_of(client, head)
    for i in range(7):  # one sequence sealed, two items accumulating
        proc.add(bid, i)
    src = cluster.owner(slot)
    dst = next(c for c in cluster.primaries if c is not src)
    before = dst.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0)
    cluster.move_slot(slot, dst)
    assert src.dbsize() == 0 and dst.exists(head)
    # the producer's connection to the old owner answers MOVED: the add goes to the new one
    for i in range(7, 10):
        assert proc.add(bid, i).pending in (3, 4, 5)
    assert dst.info("commandstats")["cmdstat_evalsha"]["calls"] >= before + 3
    assert src.dbsize() == 0
    # a worker started before the move of its claims' slot carries on too
    proc.add_many("other", [100])
    Worker(batcher).run(burst=True)
    back = cluster.owner(slot_of(client, head))
    assert back is dst
    cluster.move_slot(slot, src)  # and back, under the worker's feet
    proc.flush(bid)
    Worker(batcher).run(burst=True)
    items: list[Any] = [
        i for f in sorted(got, key=lambda f: f.sequence) if f.batch_id == bid for i in f.items
    ]
    assert items == list(range(10))
    batcher.close()


def test_async_wait_replicas_and_a_moved_slot(cluster: Cluster, client: RedisCluster) -> None:
    """The asyncio batcher: lone calls over a link per primary, WAIT on the primary that ran
    the script, and adds that follow a slot moved to another primary."""
    import asyncio

    import redis.asyncio as aioredis

    import redis_batcher.asyncio as aio

    with_replica = port_of(cluster.primaries[0])

    async def main() -> None:
        arc = aioredis.RedisCluster(
            startup_nodes=[aioredis.cluster.ClusterNode(h, p) for h, p in cluster.servers.startup_nodes]
        )
        if not ClusterNodePool.supports(aioredis.cluster.ClusterNode):  # redis-py 5.x
            with pytest.raises(rb.ConfigError, match="redis-py 6"):
                aio.Batcher(arc, prefix="aw", wait_replicas=1)
            ab = aio.Batcher(arc, prefix="aw")
        else:
            ab = aio.Batcher(arc, prefix="aw", wait_replicas=1, wait_timeout=1.0)
        proc = ab.processor(name="ev", partitions=3, max_batch_size=100, flush_interval=None)(lambda f: None)
        by_owner: dict[bool, str] = {}
        for i in range(100):
            bid = f"id{i}"
            owner = cluster.owner(slot_of(client, proc.keys.for_base(bid).head(bid)))
            by_owner.setdefault(port_of(owner) == with_replica, bid)
        if ab.wait_replicas:
            assert (await proc.add(by_owner[True], 1)).pending == 1
            with pytest.raises(rb.NotReplicated):
                await proc.add(by_owner[False], 1)
            # several calls of one group commit: each waits on its own primary
            outs = await asyncio.gather(
                proc.add(by_owner[True], 2), proc.add(by_owner[False], 2), return_exceptions=True
            )
            assert not isinstance(outs[0], BaseException) and outs[0].pending == 2, outs
            assert isinstance(outs[1], rb.NotReplicated), outs
        else:
            for n in (1, 2):
                await proc.add(by_owner[False], n)

        # without wait_replicas: a slot moved under a lone caller's feet
        plain = aio.Batcher(arc, prefix="aw")
        pproc = plain.processor(name="ev", partitions=3, max_batch_size=100, flush_interval=None)(
            lambda f: None
        )
        bid = by_owner[False]
        slot = slot_of(client, pproc.keys.for_base(bid).head(bid))
        src = cluster.owner(slot)
        dst = next(c for c in cluster.primaries if c is not src)
        assert (await pproc.add(bid, 3)).pending == 3
        cluster.move_slot(slot, dst)
        for n in range(4, 7):
            assert (await pproc.add(bid, n)).pending == n
        assert cluster.owner(slot) is dst
        await ab.aclose()
        await plain.aclose()

    asyncio.run(main())
