"""Smoke tests on a real 3-master Redis Cluster: hash tags keep every script on one slot,
partitions spread a processor over slots, NOSCRIPT is recovered, and the worker's pub/sub
wake-up works through ``RedisCluster``."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from redis.cluster import ClusterNode, RedisCluster

from redis_batcher import Batcher, Flush, Processor, Worker
from redis_batcher.keys import partition_of
from redis_batcher.scripts import scripts
from redis_batcher.testing import RedisClusterServers

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

# Batch ids that could confuse hash-tag routing or key parsing: braces (a tag of their own, empty,
# unbalanced, or looking like a partition tag), colons, spaces, "::" and non-ASCII text.
ODD_IDS = [
    "{user}:1",
    "{user}:2",
    "a b",
    "ü:{x}",
    "{",
    "}",
    "{}",
    "}{",
    "x{}y",
    "{events:0}",
    "{events:2}:tail",
    "a::b",
    "::",
    "日本語 {id}",
    "emoji 🎉",
    " leading and trailing ",
]
IDS = ODD_IDS + [f"order:{i}" for i in range(30 - len(ODD_IDS))]


# -- the cluster ---------------------------------------------------------------------------------


@pytest.fixture
def nodes(redis_cluster: RedisClusterServers) -> Iterator[list[redis.Redis]]:
    """One plain client per master, emptied before the test."""
    clients = [redis.Redis(host=h, port=p) for h, p in redis_cluster.startup_nodes]
    for c in clients:
        c.flushall()
    try:
        yield clients
    finally:
        for c in clients:
            c.close()


@pytest.fixture
def cluster_client(redis_cluster: RedisClusterServers, nodes: list[redis.Redis]) -> Iterator[RedisCluster]:
    client = RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in redis_cluster.startup_nodes])
    try:
        yield client
    finally:
        client.close()


def keyslot(client: RedisCluster, key: str) -> int:
    """The slot of ``key`` according to the server (CLUSTER KEYSLOT)."""
    return int(client.execute_command("CLUSTER KEYSLOT", key))


def owner_of(nodes: list[redis.Redis], slot: int) -> redis.Redis:
    """The master serving ``slot``, according to CLUSTER SLOTS."""
    for lo, hi, master, *_ in nodes[0].execute_command("CLUSTER SLOTS"):
        if int(lo) <= slot <= int(hi):
            port = int(master[1])
            return next(c for c in nodes if c.connection_pool.connection_kwargs["port"] == port)
    raise AssertionError(f"no node serves slot {slot}")


class Recorder:
    """A handler that records every flush it is given (thread-safe)."""

    def __init__(self) -> None:
        self.flushes: list[Flush] = []
        self.times: list[float] = []
        self.lock = threading.Lock()
        self.event = threading.Event()

    def __call__(self, flush: Flush) -> None:
        with self.lock:
            self.flushes.append(flush)
            self.times.append(time.monotonic())
        self.event.set()

    def wait_for(self, count: int, timeout: float) -> float | None:
        """Seconds until ``count`` flushes were recorded, or None after ``timeout``."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            with self.lock:
                if len(self.flushes) >= count:
                    return self.times[count - 1] - t0
            self.event.wait(0.01)
            self.event.clear()
        return None


# -- smoke test ----------------------------------------------------------------------------------


def test_cluster_end_to_end_with_partitions_and_odd_ids(
    cluster_client: RedisCluster, nodes: list[redis.Redis]
) -> None:
    batcher = Batcher(cluster_client, prefix="c")
    assert batcher.is_cluster
    rec = Recorder()
    proc = batcher.processor(name="events", partitions=3, max_batch_size=5, flush_interval=None)(rec)

    expected: dict[str, list[Any]] = {}
    for n, bid in enumerate(IDS):
        items: list[Any] = [{"id": bid, "i": i} for i in range(3)]
        for item in items:
            proc.add(bid, item)
        more = [[n, i] for i in range(3, 7)] + [f"{bid}/{n}"]
        res = proc.add_many(bid, more)  # 8 items in all: sequence 0 sealed by size, 3 accumulating
        assert res.sealed == 1 and res.sequence == 1 and res.pending == 3, (bid, res)
        expected[bid] = items + more

    # -- pending: batch_ids and status list every id, on every partition
    assert sorted(proc.batch_ids()) == sorted(IDS)
    assert sorted(batcher.batch_ids("events")) == sorted(IDS)
    for bid in IDS:
        st = proc.status(bid)
        assert st is not None and st.batch_id == bid and st.pending == 8
        assert [(b.sequence, b.status, b.item_count) for b in st.batches] == [
            (0, "flushing", 5),
            (1, "accumulating", 3),
        ]
    used_partitions = {partition_of(bid, 3) for bid in IDS}
    assert used_partitions == {0, 1, 2}

    # -- slots: one per partition, all different; every key of a base id in its partition's slot
    part_slots = [keyslot(cluster_client, part.due) for part in proc.keys.parts]
    assert len(set(part_slots)) == 3, part_slots
    for part, slot in zip(proc.keys.parts, part_slots, strict=True):
        assert keyslot(cluster_client, part.ids) == slot
        assert keyslot(cluster_client, part.pfx + "anything {else}") == slot
    for bid in IDS:
        k = partition_of(bid, 3)
        part = proc.keys.parts[k]
        assert part is proc.keys.for_base(bid)
        keys = [part.head(bid), part.history(bid), part.meta(bid, 0), part.meta(bid, 1)]
        keys += [part.items(bid, 0), part.open_items(bid)]  # sealed 0, accumulating 1
        for key in keys:
            assert keyslot(cluster_client, key) == part_slots[k], (bid, key)
        assert cluster_client.exists(part.head(bid), part.items(bid, 0), part.open_items(bid)) == 3, bid
    # a brace pair inside the id does not make a hash tag of its own
    user_part = proc.keys.for_base("{user}:1")
    assert keyslot(cluster_client, user_part.head("{user}:1")) != keyslot(cluster_client, "user")
    assert keyslot(cluster_client, user_part.head("{user}:1")) == part_slots[partition_of("{user}:1", 3)]

    # every key the scripts wrote (on whichever node) sits in one of the partition slots
    written: list[bytes] = []
    for c in nodes:
        written += list(c.scan_iter(match="c:*", count=1000))
    assert written
    data_keys = [k for k in written if k not in (b"c:processors", b"c:layout")]
    assert len(data_keys) == len(written) - 2
    for key in data_keys:
        assert keyslot(cluster_client, key.decode()) in part_slots, key
    # ... and the scan saw every key of those slots (but the wake-up hold keys "<pfx>woke",
    # which live at most 100 ms and may expire in between)
    in_slots: set[str] = set()
    for s in part_slots:
        got = owner_of(nodes, s).execute_command("CLUSTER GETKEYSINSLOT", s, 1_000_000)
        in_slots |= {k.decode() if isinstance(k, bytes) else k for k in got}
    scanned = {k.decode() for k in data_keys}
    assert {k for k in in_slots if not k.endswith(":woke")} == {k for k in scanned if not k.endswith(":woke")}

    # -- flush every id, deliver with a concurrent burst worker
    for bid in IDS:
        fr = proc.flush(bid)
        assert fr.flushed and fr.sequence == 1 and fr.item_count == 3, (bid, fr)
    stats = Worker(batcher, concurrency=4).run(burst=True)
    assert stats.delivered == 2 * len(IDS) and stats.failed == 0 and stats.lease_lost == 0
    assert stats.items == 8 * len(IDS)

    # exactly once, in order per id
    by_id: dict[str, list[Flush]] = defaultdict(list)
    for f in rec.flushes:
        by_id[f.batch_id].append(f)
    assert sorted(by_id) == sorted(IDS)
    assert len({f.flush_id for f in rec.flushes}) == len(rec.flushes)
    for bid, flushes in by_id.items():
        flushes.sort(key=lambda f: f.sequence)
        assert [(f.sequence, len(f.items), f.attempt) for f in flushes] == [(0, 5, 1), (1, 3, 1)], bid
        assert [f.reason for f in flushes] == ["size", "manual"], bid
        delivered = [item for f in flushes for item in f.items]
        assert delivered == expected[bid], bid

    # -- afterwards: nothing active, history recorded, the last sequence shown as completed
    assert list(proc.batch_ids()) == []
    for bid in IDS:
        assert proc.status(bid) is None, bid
        assert proc.pending(bid) == 0
        hist = proc.history(bid)
        assert sorted((h.sequence, h.item_count, h.success) for h in hist) == [(0, 5, True), (1, 3, True)]
        seqs = proc.sequences(bid)
        assert [(s.sequence, s.status) for s in seqs] == [(1, "completed")], bid
    # items and sequence state are gone; only heads and histories remain (with a TTL)
    for c in nodes:
        for key in c.scan_iter(match="c:*", count=1000):
            if key in (b"c:processors", b"c:layout"):
                continue
            assert b":b:" in key or b":h:" in key, key
            assert c.ttl(key) > 0, key


def test_batcher_from_cluster_url(redis_cluster: RedisClusterServers, nodes: list[redis.Redis]) -> None:
    batcher = Batcher(redis_cluster.url, cluster=True, prefix="u")
    try:
        assert batcher.is_cluster and isinstance(batcher.client, RedisCluster)
        rec = Recorder()
        proc = batcher.processor(name="url", partitions=2, max_batch_size=10, flush_interval=None)(rec)
        for i in range(3):
            proc.add("k", i)
        assert proc.flush("k").item_count == 3
        assert batcher.registered()["url"].partitions == 2
        assert Worker(batcher).run(burst=True).delivered == 1
        assert [f.items for f in rec.flushes] == [[0, 1, 2]]
    finally:
        batcher.close()


# -- a node busy past the socket timeout ----------------------------------------------------------

# keeps the server it runs on busy for ARGV[1] microseconds: it answers nobody meanwhile, and the
# commands sent to it wait in its socket buffers and run afterwards
BUSY = """local t0 = redis.call('TIME')
local start = t0[1] * 1000000 + t0[2]
repeat
  local t = redis.call('TIME')
until t[1] * 1000000 + t[2] - start >= tonumber(ARGV[1])
return 1"""


def keep_busy(node: redis.Redis, seconds: float) -> threading.Thread:
    port = node.connection_pool.connection_kwargs["port"]

    def run() -> None:
        busy = redis.Redis(port=port)
        try:
            busy.eval(BUSY, 0, int(seconds * 1e6))
        finally:
            busy.close()

    thread = threading.Thread(target=run)
    thread.start()
    time.sleep(0.05)  # the script is running
    return thread


def stored_once(nodes: list[redis.Redis], proc: Processor, base: str, expected: list[Any]) -> None:
    """The items of ``base``'s accumulating sequence are ``expected``, and stay so (no late
    duplicate arrives)."""
    part = proc.keys.for_base(base)
    owner = owner_of(nodes, keyslot_of(nodes[0], part.head(base)))

    def items() -> list[Any]:
        return [proc.codec.decode(i) for i in owner.lrange(part.open_items(base), 1, -1)]

    deadline = time.monotonic() + 5
    while items() != expected:
        assert time.monotonic() < deadline, items()
        time.sleep(0.02)
    time.sleep(0.5)
    assert items() == expected


def keyslot_of(node: redis.Redis, key: str) -> int:
    return int(node.execute_command("CLUSTER KEYSLOT", key))  # type: ignore[no-untyped-call]


@pytest.mark.parametrize("how", ["url", "client", "async-url", "async-client"])
def test_an_add_to_a_node_busy_past_the_socket_timeout_runs_once(
    redis_cluster: RedisClusterServers, nodes: list[redis.Redis], how: str
) -> None:
    """The add's reply times out while the node is busy: OutcomeUnknown, and the script runs
    once when the node is free. redis-py's cluster clients would re-send it (their own retries:
    cluster_error_retry_attempts on 5.x, retry on 6.x+, on by default for a client passed in):
    the batcher names the key's node as the command's target, which turns them off."""
    import asyncio

    import redis.asyncio as aioredis

    import redis_batcher as rb
    from redis_batcher import asyncio as aio

    prefix = how.replace("-", "")
    host, port = redis_cluster.startup_nodes[0]
    if how.startswith("async"):

        async def main() -> Processor:
            if how == "async-url":
                ab = aio.Batcher(redis_cluster.url, cluster=True, prefix=prefix, socket_timeout=0.3)
            else:
                client = aioredis.RedisCluster(host=host, port=port, socket_timeout=0.3)
                ab = aio.Batcher(client, prefix=prefix)
            aproc = ab.processor(name="b", max_batch_size=1000, flush_interval=None)(lambda f: None)
            await aproc.add("x", 0)
            part = aproc.keys.for_base("x")
            busy = keep_busy(owner_of(nodes, keyslot_of(nodes[0], part.head("x"))), 0.45)
            try:
                with pytest.raises(rb.OutcomeUnknownTimeoutError):
                    await aproc.add("x", 1)
            finally:
                busy.join()
            await ab.aclose()
            return aproc.definition

        proc = asyncio.run(main())
    else:
        if how == "url":
            batcher = Batcher(redis_cluster.url, cluster=True, prefix=prefix, socket_timeout=0.3)
        else:
            client = RedisCluster(startup_nodes=[ClusterNode(host, port)], socket_timeout=0.3)
            batcher = Batcher(client, prefix=prefix)
        proc = batcher.processor(name="b", max_batch_size=1000, flush_interval=None)(lambda f: None)
        proc.add("x", 0)
        busy = keep_busy(owner_of(nodes, keyslot_of(nodes[0], proc.keys.for_base("x").head("x"))), 0.45)
        try:
            with pytest.raises(rb.OutcomeUnknownTimeoutError):
                proc.add("x", 1)
        finally:
            busy.join()
        batcher.close()
    stored_once(nodes, proc, "x", [0, 1])


# -- NOSCRIPT ------------------------------------------------------------------------------------


def _script_cached(node: redis.Redis, sha: str) -> bool:
    return bool(node.script_exists(sha)[0])


def _eval_calls(node: redis.Redis) -> tuple[int, int]:
    """(EVALSHA calls, EVAL calls) since the last CONFIG RESETSTAT."""
    stats = node.info("commandstats")
    return (
        int(stats.get("cmdstat_evalsha", {}).get("calls", 0)),
        int(stats.get("cmdstat_eval", {}).get("calls", 0)),
    )


def test_noscript_on_cluster_is_recovered(cluster_client: RedisCluster, nodes: list[redis.Redis]) -> None:
    batcher = Batcher(cluster_client, prefix="ns")
    rec = Recorder()
    proc: Processor = batcher.processor(name="ns", partitions=3, max_batch_size=100, flush_interval=None)(rec)
    ids = ["{a}", "ö ö", "b b", "d"]
    assert [partition_of(b, 3) for b in ids] == [0, 1, 2, 0]
    for bid in ids:
        proc.add(bid, 0)
    add_sha = scripts().add.sha
    owners = {bid: owner_of(nodes, keyslot(cluster_client, proc.keys.for_base(bid).due)) for bid in ids}
    for bid in ids:
        assert _script_cached(owners[bid], add_sha)

    # cached: a second add is one EVALSHA, no EVAL
    for c in nodes:
        c.config_resetstat()
    proc.add("d", 1)
    assert _eval_calls(owners["d"]) == (1, 0)

    # SCRIPT FLUSH on every node
    assert cluster_client.execute_command("SCRIPT FLUSH", target_nodes=RedisCluster.ALL_NODES)
    for c in nodes:
        assert not _script_cached(c, add_sha)
        c.config_resetstat()

    # the next add answers normally: EVALSHA got NOSCRIPT, EVAL ran it and cached it again
    res = proc.add("d", 2)
    assert res.added == 1 and res.pending == 3
    evalsha_calls, eval_calls = _eval_calls(owners["d"])
    assert eval_calls == 1, (evalsha_calls, eval_calls)
    assert _script_cached(owners["d"], add_sha)
    proc.add("d", 3)
    assert _eval_calls(owners["d"])[1] == 1  # cached again: no further EVAL

    # flush/claim/ack/status scripts recover the same way on every node
    for bid in ids:
        assert proc.flush(bid).flushed
    stats = Worker(batcher, concurrency=2).run(burst=True)
    assert stats.delivered == len(ids) and stats.failed == 0
    got = {f.batch_id: f.items for f in rec.flushes}
    assert got == {"{a}": [0], "ö ö": [0], "b b": [0], "d": [0, 1, 2, 3]}
    assert all(proc.status(bid) is None for bid in ids)
    for name in ("flush", "claim", "ack", "status"):
        sha = scripts().scripts[name].variant(cluster_client).sha  # with script flags on Redis 7
        assert all(_script_cached(owners[bid], sha) for bid in ids), name


# -- non-burst workers: sharded wake-ups ---------------------------------------------------------


def port_of(node: redis.Redis) -> int:
    return int(node.connection_pool.connection_kwargs["port"])


def shard_subscribers(node: redis.Redis, channel: str) -> int:
    reply = node.execute_command("PUBSUB", "SHARDNUMSUB", channel)  # type: ignore[no-untyped-call]
    return int(reply[1])


def plain_subscribers(node: redis.Redis, channel: str) -> int:
    reply = node.execute_command("PUBSUB", "NUMSUB", channel)  # type: ignore[no-untyped-call]
    return int(reply[1])


def subscriptions(nodes: list[redis.Redis], channels: list[str]) -> dict[str, dict[int, int]]:
    """For each channel, the sharded subscribers on each node (by port) that has some, plus
    plain ones under -port."""
    out: dict[str, dict[int, int]] = {}
    for channel in channels:
        seen: dict[int, int] = {}
        for node in nodes:
            if n := shard_subscribers(node, channel):
                seen[port_of(node)] = n
            if n := plain_subscribers(node, channel):
                seen[-port_of(node)] = n
        out[channel] = seen
    return out


def bus_publishes(nodes: list[redis.Redis]) -> int:
    """PUBLISH messages the nodes have sent each other over the cluster bus (CLUSTER INFO): a
    plain PUBLISH goes to every node, a sharded one only to the slot's replicas (none here)."""
    total = 0
    for node in nodes:
        text = node.execute_command("CLUSTER", "INFO")  # type: ignore[no-untyped-call]
        text = text.decode() if isinstance(text, bytes) else str(text)
        for line in text.splitlines():
            name, _, value = line.strip().partition(":")
            if name == "cluster_stats_messages_publish_sent":
                total += int(value)
    return total


def ids_by_partition(partitions: int) -> list[str]:
    """A batch id for each partition, in partition order."""
    found: dict[int, str] = {}
    for i in range(10_000):
        found.setdefault(partition_of(f"id{i}", partitions), f"id{i}")
        if len(found) == partitions:
            return [found[k] for k in range(partitions)]
    raise AssertionError("no id for some partition")


def spread_processor(batcher: Any, nodes: list[redis.Redis], cluster: Any, rec: Recorder) -> Any:
    """A processor whose partitions' slots are on every node."""
    proc = batcher.processor(name="spread", partitions=6, max_batch_size=5, flush_interval=None)(rec)
    owners = {port_of(owner_of(nodes, keyslot_of(nodes[0], ch))) for ch in proc.keys.channels}
    assert len(owners) == len(nodes), owners
    return proc


def wait_subscribed(
    nodes: list[redis.Redis], channels: list[str], count: int, alive: Callable[[], bool]
) -> None:
    """Until each channel has ``count`` sharded subscribers on the node serving its slot and none
    anywhere else."""
    deadline = time.monotonic() + 15
    while True:
        subs = subscriptions(nodes, channels)
        want = {ch: {port_of(owner_of(nodes, keyslot_of(nodes[0], ch))): count} for ch in channels}
        if subs == want:
            return
        assert time.monotonic() < deadline, (subs, want)
        assert alive()
        time.sleep(0.05)


def deliver_each(proc: Any, rec: Recorder, ids: list[str], rounds: int = 1) -> list[float]:
    """Seal a batch of each id in turn (one per partition), each delivered before the next;
    the latencies. The workers' timed checks are 30 s away: only a wake-up delivers at once."""
    latencies: list[float] = []
    for _ in range(rounds):
        for bid in ids:
            n = len(rec.flushes)
            proc.add_many(bid, [f"{bid}-{i}" for i in range(5)])
            waited = rec.wait_for(n + 1, timeout=5.0)
            part = partition_of(bid, proc.config.partitions)
            assert waited is not None, f"{bid!r} (partition {part}) not delivered: no wake-up"
            latencies.append(waited)
            time.sleep(0.1)  # every worker idle again
    return latencies


WAKE_WORKERS = 6


def test_wake_ups_reach_only_the_workers_of_the_partition_on_cluster(
    cluster_client: RedisCluster, nodes: list[redis.Redis]
) -> None:
    """Six idle workers serve a processor whose partitions' slots are on every node. Each sealed
    batch is delivered at once (their timed checks are 30 s away); each worker listens with
    SSUBSCRIBE on the node serving each partition's slot, nowhere else; no wake-up crosses the
    cluster bus (a plain PUBLISH went to every node); and each wake-up costs about one claim in
    all: every idle worker hears it, but it is a token (``<pfx>woke``) that one of them takes."""
    batcher = Batcher(cluster_client, prefix="w")
    rec = Recorder()
    proc = spread_processor(batcher, nodes, cluster_client, rec)
    batcher.register()
    workers = [Worker(batcher, concurrency=1, max_idle_wait=30) for _ in range(WAKE_WORKERS)]
    threads = [threading.Thread(target=w.run, name=f"worker-{i}", daemon=True) for i, w in enumerate(workers)]
    for t in threads:
        t.start()
    try:
        wait_subscribed(nodes, proc.keys.channels, WAKE_WORKERS, lambda: all(t.is_alive() for t in threads))
        time.sleep(0.5)  # their first claim rounds are over: all asleep for 30 s
        claims, published = sum(w.stats.claims for w in workers), bus_publishes(nodes)
        ids = ids_by_partition(proc.config.partitions)
        latencies = deliver_each(proc, rec, ids, rounds=2)
        per_flush = (sum(w.stats.claims for w in workers) - claims) / len(latencies)
        print(f"wake-up latencies (s): max {max(latencies):.4f}; claims per flush {per_flush:.2f}")
        assert max(latencies) < 2.0, latencies
        assert bus_publishes(nodes) == published  # SPUBLISH: nothing broadcast
        # every idle worker is woken (they all serve every partition), but only the one that
        # took the wake-up's token claims: not one claim per worker, nor one of every partition
        assert per_flush <= 1.2, per_flush
    finally:
        for w in workers:
            w.stop()
        for t in threads:
            t.join(timeout=15)
    assert not any(t.is_alive() for t in threads)
    assert sum(w.stats.delivered for w in workers) == len(latencies)
    assert subscriptions(nodes, proc.keys.channels) == {ch: {} for ch in proc.keys.channels}


def test_async_wake_ups_reach_only_the_workers_of_the_partition_on_cluster(
    redis_cluster: RedisClusterServers, cluster_client: RedisCluster, nodes: list[redis.Redis]
) -> None:
    """The same with asyncio workers (one event loop, a redis.asyncio cluster client)."""
    import asyncio

    import redis.asyncio as aioredis

    from redis_batcher import asyncio as aio

    rec = Recorder()
    host, port = redis_cluster.startup_nodes[0]
    stop = threading.Event()
    state: dict[str, Any] = {}

    async def serve() -> None:
        ab = aio.Batcher(aioredis.RedisCluster(host=host, port=port), prefix="aw")
        ab.processor(name="spread", partitions=6, max_batch_size=5, flush_interval=None)(rec)
        workers = [aio.Worker(ab, concurrency=1, max_idle_wait=30) for _ in range(WAKE_WORKERS)]
        state["workers"] = workers
        runs = [asyncio.ensure_future(w.run()) for w in workers]
        while not stop.is_set():
            await asyncio.sleep(0.05)
        for w in workers:
            w.stop()
        await asyncio.gather(*runs)
        await ab.aclose()

    thread = threading.Thread(target=lambda: asyncio.run(serve()), name="async-workers", daemon=True)
    batcher = Batcher(cluster_client, prefix="aw")
    proc = spread_processor(batcher, nodes, cluster_client, rec)
    thread.start()
    try:
        wait_subscribed(nodes, proc.keys.channels, WAKE_WORKERS, thread.is_alive)
        time.sleep(0.5)
        workers = state["workers"]
        claims, published = sum(w.stats.claims for w in workers), bus_publishes(nodes)
        latencies = deliver_each(proc, rec, ids_by_partition(proc.config.partitions), rounds=2)
        per_flush = (sum(w.stats.claims for w in workers) - claims) / len(latencies)
        print(f"async wake-up latencies (s): max {max(latencies):.4f}; claims per flush {per_flush:.2f}")
        assert max(latencies) < 2.0, latencies
        assert bus_publishes(nodes) == published
        assert per_flush <= 1.2, per_flush
    finally:
        stop.set()
        thread.join(timeout=30)
    assert not thread.is_alive()
    assert subscriptions(nodes, proc.keys.channels) == {ch: {} for ch in proc.keys.channels}


def move_slot(nodes: list[redis.Redis], slot: int, target: redis.Redis) -> None:
    """Move an empty ``slot`` to ``target`` as redis-cli's resharding does (IMPORTING,
    MIGRATING, then NODE on the target, the source and the others)."""
    source = owner_of(nodes, slot)
    assert int(source.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot)) == 0  # type: ignore[no-untyped-call]
    target_id = target.execute_command("CLUSTER", "MYID")  # type: ignore[no-untyped-call]
    source_id = source.execute_command("CLUSTER", "MYID")  # type: ignore[no-untyped-call]
    target.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)  # type: ignore[no-untyped-call]
    source.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)  # type: ignore[no-untyped-call]
    for node in [target, source] + [n for n in nodes if n not in (target, source)]:
        node.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)  # type: ignore[no-untyped-call]
    deadline = time.monotonic() + 10
    while any(owner_port(n, slot) != port_of(target) for n in nodes):
        assert time.monotonic() < deadline, "the nodes do not agree on the slot's new owner"
        time.sleep(0.05)


def owner_port(node: redis.Redis, slot: int) -> int:
    """The port of the master serving ``slot``, as ``node`` sees it (CLUSTER SLOTS)."""
    for lo, hi, master, *_ in node.execute_command("CLUSTER SLOTS"):  # type: ignore[no-untyped-call]
        if int(lo) <= slot <= int(hi):
            return int(master[1])
    raise AssertionError(f"{node} knows no owner of slot {slot}")


def empty_slot(nodes: list[redis.Redis], slot: int) -> None:
    owner = owner_of(nodes, slot)
    keys = owner.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 10_000)  # type: ignore[no-untyped-call]
    if keys:
        owner.delete(*keys)


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_worker_follows_a_partition_whose_slot_moves(
    redis_cluster: RedisClusterServers, cluster_client: RedisCluster, nodes: list[redis.Redis], kind: str
) -> None:
    """A partition's slot moves to another node while a worker listens: the old node drops the
    sharded subscription; the worker subscribes on the new owner, and a batch sealed there
    afterwards is delivered at once (the timed check is 30 s away). Then the slot moves back."""
    import asyncio

    import redis.asyncio as aioredis

    from redis_batcher import asyncio as aio

    prefix = f"mv{kind}"
    batcher = Batcher(cluster_client, prefix=prefix)
    rec = Recorder()
    proc = batcher.processor(name="mv", partitions=3, max_batch_size=5, flush_interval=None)(rec)
    batcher.register()
    ids = ids_by_partition(3)
    channel = proc.keys.channels[0]
    slot = keyslot_of(nodes[0], channel)
    home = owner_of(nodes, slot)
    other = next(n for n in nodes if n is not home)
    stop = threading.Event()
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            if kind == "sync":
                worker = Worker(batcher, concurrency=2, max_idle_wait=30)
                threading.Thread(target=lambda: (stop.wait(), worker.stop()), daemon=True).start()
                worker.run()
            else:

                async def main() -> None:
                    host, port = redis_cluster.startup_nodes[0]
                    ab = aio.Batcher(aioredis.RedisCluster(host=host, port=port), prefix=prefix)
                    ab.processor(name="mv", partitions=3, max_batch_size=5, flush_interval=None)(rec)
                    worker = aio.Worker(ab, concurrency=2, max_idle_wait=30)
                    run = asyncio.ensure_future(worker.run())
                    while not stop.is_set():
                        await asyncio.sleep(0.05)
                    worker.stop()
                    await run
                    await ab.aclose()

                asyncio.run(main())
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=serve, name="mv-worker", daemon=True)
    thread.start()
    try:
        wait_subscribed(nodes, proc.keys.channels, 1, thread.is_alive)
        time.sleep(0.5)
        move_slot(nodes, slot, other)  # partition 0 was never used: its slot is empty
        try:
            wait_subscribed(nodes, proc.keys.channels, 1, thread.is_alive)
            assert shard_subscribers(other, channel) == 1 and shard_subscribers(home, channel) == 0
            time.sleep(0.3)
            latencies = deliver_each(proc, rec, ids)  # partition 0 on its new node, and the others
            assert max(latencies) < 2.0, latencies
        finally:
            empty_slot(nodes, slot)
            move_slot(nodes, slot, home)
        wait_subscribed(nodes, proc.keys.channels, 1, thread.is_alive)
        time.sleep(0.3)
        assert max(deliver_each(proc, rec, ids[:1])) < 2.0
    finally:
        stop.set()
        thread.join(timeout=20)
    assert not thread.is_alive() and not errors, errors


# -- iterator jobs -------------------------------------------------------------------------------


def test_iterator_jobs_on_a_cluster(cluster_client: RedisCluster, nodes: list[redis.Redis]) -> None:
    """Iterator jobs with brace-laden ids on two iterators: every job script touches one slot
    (the iterator's {jobs:<name>} tag), jobs run to completion, and control and listing work."""
    from redis_batcher import JobContext, Page

    batcher = Batcher(cluster_client, prefix="cj")
    seen: list[tuple[str, int]] = []

    def define(name: str) -> Any:
        @batcher.iterator(name=name, batch_size=3, delay_between_batches=0.0)
        class Walk:
            def next_batch(self, cursor: str | None, batch_size: int, job: JobContext) -> Page:
                start = int(cursor or 0)
                stop = min(start + batch_size, 10)
                return Page(list(range(start, stop)), str(stop), stop >= 10)

            def process(self, items: list[int], job: JobContext) -> None:
                seen.extend((job.job_id, i) for i in items)

        return Walk

    walks = [define("users"), define("orders")]
    assert len({keyslot(cluster_client, w.keys.due) for w in walks}) == 2  # two slots
    ids = ["{user}:1", "}{", "a::b", "日本語 {id}"]
    for w in walks:
        for job_id in ids:
            w.start(job_id, params={"w": w.name})
    walks[0].start("paused")
    walks[0].pause("paused")
    Worker(batcher).run(burst=True)

    for w in walks:
        slot = keyslot(cluster_client, w.keys.due)
        keys = [k.decode() for n in nodes for k in n.scan_iter(match=f"cj:{{jobs:{w.name}}}:*")]
        assert keys and {keyslot(cluster_client, k) for k in keys} == {slot}
        for job_id in ids:
            st = w.status(job_id)
            assert st is not None and (st.status, st.processed, st.params) == ("completed", 10, {"w": w.name})
    assert sorted(seen) == sorted((job_id, i) for job_id in ids for i in range(10) for _ in walks)
    assert [j.job_id for j in batcher.jobs(status="paused")] == ["paused"]
    assert len(batcher.jobs(status="completed")) == 8
    assert walks[0].cancel("paused").status == "cancelled"
    assert walks[0].delete("paused") is True
