"""Redis Cluster under what operators do to it, with producers adding and workers delivering:
the slots of a processor's partitions are migrated (as ``redis-cli --cluster reshard`` does),
a replica takes over by ``CLUSTER FAILOVER``, a primary is killed with SIGKILL.

A cluster of its own: 3 primaries with a replica each, a short ``cluster-node-timeout`` so that
a dead primary is replaced within seconds. The tests run in file order.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from redis.cluster import ClusterNode, RedisCluster

from redis_batcher import Batcher, BatcherError, Flush, NotSentClusterError, Processor, Worker
from redis_batcher import asyncio as aio
from redis_batcher.keys import KeySpace, key_slot
from redis_batcher.testing import RedisClusterServers, RedisServer, free_cluster_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

NODE_TIMEOUT_MS = 1000
IDS = [f"order:{i}" for i in range(60)]


class Cluster:
    """The nodes of the test cluster, whatever their roles are now."""

    def __init__(self, servers: RedisClusterServers, replicas: list[RedisServer]) -> None:
        self.servers = servers
        self.replicas = replicas
        self.nodes = {s.port: s for s in [*servers.nodes, *replicas]}
        self.clients = {port: redis.Redis(host="127.0.0.1", port=port) for port in self.nodes}

    def alive(self) -> list[redis.Redis]:
        return [self.clients[p] for p, s in self.nodes.items() if s.process is not None]

    def client(self) -> RedisCluster:
        return RedisCluster(startup_nodes=[ClusterNode("127.0.0.1", p) for p in self.ports(self.alive())])

    @staticmethod
    def ports(clients: list[redis.Redis]) -> list[int]:
        return [int(c.connection_pool.connection_kwargs["port"]) for c in clients]

    def table(self, node: redis.Redis | None = None) -> dict[int, dict[str, Any]]:
        """CLUSTER NODES of ``node`` (any live node by default) as redis-py parses it, by port."""
        node = node or self.alive()[0]
        parsed = node.execute_command("CLUSTER NODES")  # type: ignore[no-untyped-call]
        return {int(addr.rsplit(":", 1)[1]): info for addr, info in parsed.items()}

    def primaries(self) -> list[redis.Redis]:
        return [
            self.clients[port]
            for port, info in self.table().items()
            if "master" in info["flags"] and "fail" not in info["flags"]
        ]

    def owner(self, slot: int) -> redis.Redis:
        for lo, hi, primary, *_ in self.alive()[0].execute_command("CLUSTER SLOTS"):  # type: ignore[no-untyped-call]
            if int(lo) <= slot <= int(hi):
                return self.clients[int(primary[1])]
        raise AssertionError(f"no primary serves slot {slot}")

    def replica_of(self, primary: redis.Redis) -> redis.Redis:
        pid = primary.execute_command("CLUSTER MYID").decode()  # type: ignore[no-untyped-call]
        for port, info in self.table().items():
            if "slave" in info["flags"] and info["master_id"] == pid and "fail" not in info["flags"]:
                return self.clients[port]
        raise AssertionError(f"primary {pid} has no replica")

    def migrate(self, slot: int, dst: redis.Redis, batch: int = 4, pause: float = 0.03) -> int:
        """Move ``slot`` with its keys to ``dst`` the way ``redis-cli --cluster reshard`` does
        (IMPORTING, MIGRATING, MIGRATE a few keys at a time, then NODE everywhere), slowly, so
        that producers and workers meet the slot half-moved. MIGRATE without REPLACE fails
        (BUSYKEY) where a key exists on both sides. Returns the number of keys moved."""
        src = self.begin_migration(slot, dst)
        moved = 0
        port = self.ports([dst])[0]
        while keys := src.execute_command("CLUSTER GETKEYSINSLOT", slot, batch):  # type: ignore[no-untyped-call]
            src.execute_command("MIGRATE", "127.0.0.1", port, "", 0, 5000, "KEYS", *keys)  # type: ignore[no-untyped-call]
            moved += len(keys)
            time.sleep(pause)
        self.end_migration(slot, src, dst)
        return moved

    def begin_migration(self, slot: int, dst: redis.Redis) -> redis.Redis:
        """``slot`` IMPORTING on ``dst``, MIGRATING on its owner (returned)."""
        src = self.owner(slot)
        src_id, dst_id = (c.execute_command("CLUSTER MYID").decode() for c in (src, dst))  # type: ignore[no-untyped-call]
        dst.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", src_id)  # type: ignore[no-untyped-call]
        src.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", dst_id)  # type: ignore[no-untyped-call]
        return src

    def end_migration(self, slot: int, src: redis.Redis, dst: redis.Redis) -> None:
        dst_id = dst.execute_command("CLUSTER MYID").decode()  # type: ignore[no-untyped-call]
        for node in [dst, src, *[p for p in self.primaries() if p not in (dst, src)]]:
            node.execute_command("CLUSTER SETSLOT", slot, "NODE", dst_id)  # type: ignore[no-untyped-call]

    def open_slots(self) -> list[str]:
        """Slots some live node still holds as importing or migrating (``[slot-<-id]``,
        ``[slot->-id]`` in CLUSTER NODES): what ``redis-cli --cluster check`` calls open."""
        tables = [self.table(node) for node in self.alive()]
        return [str(m) for table in tables for info in table.values() for m in info["migrations"]]

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Every live node says cluster_state:ok and agrees on the slots' owners."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                states = [c.cluster("INFO")["cluster_state"] == "ok" for c in self.alive()]  # type: ignore[no-untyped-call]
                # CLUSTER SLOTS lists replicas in no fixed order: compare primaries only
                slots = [c.execute_command("CLUSTER SLOTS") for c in self.alive()]  # type: ignore[no-untyped-call]
                owners = {
                    tuple(sorted((int(lo), int(hi), int(p[1])) for lo, hi, p, *_ in view)) for view in slots
                }
                if all(states) and len(owners) == 1:
                    return
            except redis.RedisError:
                pass
            assert time.monotonic() < deadline, "the cluster did not settle"
            time.sleep(0.1)

    def close(self) -> None:
        for c in self.clients.values():
            c.close()
        for r in self.replicas:
            r.close()
        self.servers.stop()


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    servers = RedisClusterServers(3)
    replicas = [
        RedisServer(
            servers.binary,
            port=free_cluster_port(),
            extra_args=["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"],
        )
        for _ in range(3)
    ]
    c = Cluster(servers, replicas)
    try:
        servers.start()
        for r in replicas:
            r.start()
        for node in c.clients.values():
            node.config_set("cluster-node-timeout", NODE_TIMEOUT_MS)
            node.config_set("cluster-replica-validity-factor", 0)  # any replica may take over
        first = c.clients[servers.nodes[0].port]
        for r in replicas:
            first.execute_command("CLUSTER MEET", "127.0.0.1", r.port)  # type: ignore[no-untyped-call]
        deadline = time.monotonic() + 30
        for primary, r in zip(servers.nodes, replicas, strict=True):
            pid = c.clients[primary.port].execute_command("CLUSTER MYID").decode()  # type: ignore[no-untyped-call]
            while True:  # a replica learns its primary through the cluster bus first
                try:
                    c.clients[r.port].execute_command("CLUSTER REPLICATE", pid)  # type: ignore[no-untyped-call]
                    break
                except redis.ResponseError:
                    assert time.monotonic() < deadline, "a replica never learned its primary"
                    time.sleep(0.1)
        for r in replicas:
            while c.clients[r.port].info("replication").get("master_link_status") != "up":
                assert time.monotonic() < deadline, "a replica never synced"
                time.sleep(0.1)
        c.wait_healthy()
        yield c
    finally:
        c.close()


# -- load: producers add, workers deliver, everything is counted -----------------------------------


class Tally:
    """What producers were told and what handlers got (thread-safe)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.acked: list[str] = []  # add() returned
        self.refused: list[tuple[str, BaseException]] = []  # add() raised: may or may not be there
        self.delivered: Counter[str] = Counter()
        self.flush_ids: dict[str, set[str]] = {}

    def handler(self, flush: Flush) -> None:
        with self.lock:
            for item in flush.items:
                self.delivered[item] += 1
                self.flush_ids.setdefault(item, set()).add(flush.flush_id)

    def added(self, item: str, error: BaseException | None) -> None:
        with self.lock:
            if error is None:
                self.acked.append(item)
            else:
                self.refused.append((item, error))

    def missing(self) -> list[str]:
        with self.lock:
            return [i for i in self.acked if not self.delivered[i]]

    def wait_delivered(self, timeout: float) -> list[str]:
        """Acknowledged items not delivered after ``timeout`` seconds (none, normally)."""
        deadline = time.monotonic() + timeout
        while (missing := self.missing()) and time.monotonic() < deadline:
            time.sleep(0.1)
        return missing

    def duplicates(self) -> dict[str, int]:
        with self.lock:
            return {i: n for i, n in self.delivered.items() if n > 1}


def define(batcher: Any, tally: Tally) -> Any:
    # an interval as well as a size: sequences are sealed by both while slots move
    return batcher.processor(name="ev", partitions=3, max_batch_size=25, flush_interval=0.3)(tally.handler)


class SyncLoad:
    """3 producer threads and 2 worker threads on a sync Batcher."""

    def __init__(self, cluster: Cluster, tally: Tally, prefix: str, wait_replicas: int = 0) -> None:
        self.client = cluster.client()
        self.batcher = Batcher(self.client, prefix=prefix, wait_replicas=wait_replicas, wait_timeout=0.2)
        self.proc: Processor = define(self.batcher, tally)
        self.batcher.register()
        self.tally = tally
        self.stop_adding = threading.Event()
        self.errors: list[BaseException] = []
        self.workers = [Worker(self.batcher, concurrency=2, max_idle_wait=0.5) for _ in range(2)]
        self.threads = [threading.Thread(target=self._produce, args=(t,), daemon=True) for t in range(3)]
        self.threads += [threading.Thread(target=self._serve, args=(w,), daemon=True) for w in self.workers]

    def _produce(self, t: int) -> None:
        i = 0
        while not self.stop_adding.is_set():
            item = f"{t}-{i}"
            try:
                self.proc.add(IDS[(i * 7 + t) % len(IDS)], item)
                self.tally.added(item, None)
            except BatcherError as exc:
                self.tally.added(item, exc)
            i += 1
            time.sleep(0.002)

    def _serve(self, worker: Worker) -> None:
        try:
            worker.run()
        except BaseException as exc:
            self.errors.append(exc)

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def stop_producers(self) -> None:
        self.stop_adding.set()
        for t in self.threads[:3]:
            t.join(timeout=30)

    def stop(self) -> None:
        self.stop_producers()
        for w in self.workers:
            w.stop()
        for t in self.threads[3:]:
            t.join(timeout=30)
        assert not any(t.is_alive() for t in self.threads)
        self.client.close()


class AsyncLoad:
    """The same on the asyncio API, in an event loop of its own thread: 3 producer tasks and
    2 workers on one ``redis.asyncio.RedisCluster``."""

    def __init__(self, cluster: Cluster, tally: Tally, prefix: str) -> None:
        self.port = Cluster.ports(cluster.alive())[0]
        self.tally = tally
        self.prefix = prefix
        self.stop_adding = threading.Event()
        self.stop_all = threading.Event()
        self.ready = threading.Event()
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _main(self) -> None:
        try:
            client = aioredis.RedisCluster(host="127.0.0.1", port=self.port)
            ab = aio.Batcher(client, prefix=self.prefix)
            proc = define(ab, self.tally)
            await ab.register()
            workers = [aio.Worker(ab, concurrency=2, max_idle_wait=0.5) for _ in range(2)]
            runs = [asyncio.ensure_future(w.run()) for w in workers]

            async def produce(t: int) -> None:
                i = 0
                while not self.stop_adding.is_set():
                    item = f"{t}-{i}"
                    try:
                        await proc.add(IDS[(i * 7 + t) % len(IDS)], item)
                        self.tally.added(item, None)
                    except BatcherError as exc:
                        self.tally.added(item, exc)
                    i += 1
                    await asyncio.sleep(0.002)

            producers = [asyncio.ensure_future(produce(t)) for t in range(3)]
            self.ready.set()
            await asyncio.gather(*producers)
            while not self.stop_all.is_set():
                await asyncio.sleep(0.05)
            for w in workers:
                w.stop()
            await asyncio.gather(*runs)
            await ab.aclose()
        except BaseException as exc:
            self.errors.append(exc)
            self.ready.set()

    def start(self) -> None:
        self.thread.start()
        assert self.ready.wait(30)

    def stop_producers(self) -> None:
        self.stop_adding.set()

    def stop(self) -> None:
        self.stop_adding.set()
        self.stop_all.set()
        self.thread.join(timeout=30)
        assert not self.thread.is_alive()


def partition_slots(prefix: str) -> list[int]:
    """The slot of each partition of the processor ``define`` makes."""
    return [key_slot(part.due) for part in KeySpace(prefix, "ev", 3).parts]


def run_under_load(load: Any, tally: Tally, during: Callable[[], None], settle: float = 1.0) -> None:
    """Start ``load``, let it run, call ``during``, let it run, stop the producers, wait for
    every acknowledged item, stop the rest."""
    load.start()
    try:
        deadline = time.monotonic() + 30
        while len(tally.acked) < 100:  # producers are under way
            assert time.monotonic() < deadline and not load.errors, load.errors
            time.sleep(0.05)
        time.sleep(settle)
        during()
        time.sleep(settle)
        load.stop_producers()
        missing = tally.wait_delivered(timeout=30)
    finally:
        load.stop()
    assert not load.errors, load.errors
    assert len(tally.acked) > 500, len(tally.acked)
    assert not missing, f"{len(missing)} acknowledged items never delivered, e.g. {missing[:5]}"


# -- slot migration --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_partition_slots_migrate_under_load_and_nothing_is_lost(cluster: Cluster, kind: str) -> None:
    """Every partition's slot moves to another primary and back while producers add and workers
    deliver: each migration completes (MIGRATE never finds a key on both sides, no slot is left
    open), every acknowledged item is delivered exactly once, no add is refused, producers and
    workers carry on without a restart."""
    prefix = f"mig{kind}"
    tally = Tally()
    load = SyncLoad(cluster, tally, prefix) if kind == "sync" else AsyncLoad(cluster, tally, prefix)
    slots = partition_slots(prefix)
    moved: list[int] = []

    def migrate_all() -> None:
        homes = {slot: cluster.owner(slot) for slot in slots}
        for there_and_back in range(2):
            for slot in slots:
                home = homes[slot]
                if there_and_back == 0:
                    dst = next(p for p in cluster.primaries() if p is not home)
                else:
                    dst = home
                moved.append(cluster.migrate(slot, dst))
                assert cluster.owner(slot) is dst
        assert not cluster.open_slots()

    run_under_load(load, tally, migrate_all)
    # the slots held the partitions' keys, mid-accumulation, while they moved
    assert min(moved) > 0, moved
    assert not tally.refused, tally.refused[:3]
    assert not tally.duplicates(), list(tally.duplicates().items())[:5]
    assert set(tally.delivered) <= set(tally.acked)
    cluster.wait_healthy()
    assert not cluster.open_slots()
    for slot in slots:  # every key of a partition lives on its owner alone
        owner = cluster.owner(slot)
        for p in cluster.primaries():
            if p is not owner:
                assert p.execute_command("CLUSTER COUNTKEYSINSLOT", slot) == 0  # type: ignore[no-untyped-call]


def test_a_script_of_a_migrating_slot_is_refused_before_it_runs(cluster: Cluster) -> None:
    """The add that seals a sequence renames its open list to a new key. On a slot that has
    begun migrating (its keys all still on the source) the old layout ran it there and failed
    half-way ("non local key") after its RPUSH; with the guard declared, Redis refuses the
    call before it runs: nothing changes on either node, the add is retried, and once the slot
    has moved it runs on the new owner."""
    client = cluster.client()
    try:
        batcher = Batcher(client, prefix="half", connect_retry=0.5)
        proc = batcher.processor(name="h", max_batch_size=3, flush_interval=None)(lambda flush: None)
        proc.add("x", 1)
        proc.add("x", 2)  # the next add seals
        slot = key_slot(proc.keys.parts[0].due)
        src = cluster.owner(slot)
        dst = next(p for p in cluster.primaries() if p is not src)
        keys = src.execute_command("CLUSTER GETKEYSINSLOT", slot, 100)  # type: ignore[no-untyped-call]
        before = {k: src.dump(k) for k in keys}
        cluster.begin_migration(slot, dst)
        try:
            with pytest.raises(NotSentClusterError, match=r"did not run"):
                proc.add("x", 3)
            after = src.execute_command("CLUSTER GETKEYSINSLOT", slot, 100)  # type: ignore[no-untyped-call]
            assert {k: src.dump(k) for k in after} == before
            assert dst.execute_command("CLUSTER COUNTKEYSINSLOT", slot) == 0  # type: ignore[no-untyped-call]
            port = Cluster.ports([dst])[0]
            src.execute_command("MIGRATE", "127.0.0.1", port, "", 0, 5000, "KEYS", *keys)  # type: ignore[no-untyped-call]
        finally:
            cluster.end_migration(slot, src, dst)
        result = proc.add("x", 3)
        assert (result.sequence, result.flushed, result.pending) == (0, True, 3)
        assert dst.execute_command("CLUSTER COUNTKEYSINSLOT", slot) > 0  # type: ignore[no-untyped-call]
        assert src.execute_command("CLUSTER COUNTKEYSINSLOT", slot) == 0  # type: ignore[no-untyped-call]
    finally:
        client.close()


# -- failover ----------------------------------------------------------------------------------------


def test_manual_failover_under_load_loses_nothing(cluster: Cluster) -> None:
    """``CLUSTER FAILOVER`` on the replica of a partition's primary while producers add and
    workers deliver: the replica catches up before it takes over, so without ``wait_replicas``
    nothing acknowledged is lost, and no add is refused."""
    prefix = "mfo"
    tally = Tally()
    load = SyncLoad(cluster, tally, prefix)
    slot = partition_slots(prefix)[1]
    old = cluster.owner(slot)
    new = cluster.replica_of(old)

    def failover() -> None:
        new.execute_command("CLUSTER FAILOVER")  # type: ignore[no-untyped-call]
        deadline = time.monotonic() + 20
        while cluster.owner(slot) is not new:
            assert time.monotonic() < deadline, "the replica did not take over"
            time.sleep(0.05)

    run_under_load(load, tally, failover)
    assert not tally.refused, tally.refused[:3]
    cluster.wait_healthy()
    print(f"manual failover: {len(tally.acked)} acknowledged, {len(tally.duplicates())} delivered twice")


def test_primary_killed_under_load_loses_no_replicated_add(cluster: Cluster) -> None:
    """SIGKILL of a partition's primary while producers add with ``wait_replicas=1`` and workers
    deliver: its replica takes over within seconds; every add that returned (it had reached the
    replica) is delivered; adds the dead primary could not confirm raised (not acknowledged);
    producers and workers carry on. Redeliveries are allowed (at-least-once): a lost ack
    delivers its flush again. The killed primary then comes back as a replica of its heir."""
    prefix = "kill"
    tally = Tally()
    load = SyncLoad(cluster, tally, prefix, wait_replicas=1)
    slot = partition_slots(prefix)[2]
    victim = cluster.owner(slot)
    heir = cluster.replica_of(victim)
    server = cluster.nodes[Cluster.ports([victim])[0]]

    def kill() -> None:
        server.stop(kill=True)
        deadline = time.monotonic() + 30
        while True:
            try:
                if heir.info("replication")["role"] == "master":
                    break
            except redis.RedisError:
                pass
            assert time.monotonic() < deadline, "the replica did not take over"
            time.sleep(0.1)
        cluster.wait_healthy()
        # what an operator does next: the old primary comes back, as the new one's replica
        server.start()
        while True:
            try:
                info = victim.info("replication")
                if info["role"] == "slave" and info.get("master_link_status") == "up":
                    break
            except redis.RedisError:
                pass
            assert time.monotonic() < deadline, "the old primary did not come back as a replica"
            time.sleep(0.1)

    acked_before = 0

    def during() -> None:
        nonlocal acked_before
        acked_before = len(tally.acked)
        kill()

    run_under_load(load, tally, during, settle=1.5)
    # producers carried on: adds to the other partitions (and, before the kill, to this one)
    assert len(tally.acked) > acked_before + 300
    reasons = Counter(type(e).__name__ for _, e in tally.refused)
    print(
        f"kill -9: {len(tally.acked)} acknowledged, refused {dict(reasons)}, "
        f"{len(tally.duplicates())} delivered more than once"
    )
