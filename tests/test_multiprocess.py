"""Producer processes and worker processes against one real redis-server.

4 producer processes add 20,000 items (single ``add`` calls and ``add_many`` calls that may
span several sequences) to 32 batch ids while 2 ``redis-batcher worker`` subprocesses deliver
them. Every item must be delivered exactly once, no flush may exceed ``max_batch_size`` and the
add order of each producer must survive within and across the sequences of each batch id.
"""

from __future__ import annotations

import multiprocessing
import signal
import subprocess
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pytest
import redis

from redis_batcher import wake
from redis_batcher.testing import RedisServer
from tests.apps import ledger
from tests.conftest import ROOT, cli_command, subprocess_env

pytestmark = pytest.mark.slow

PRODUCERS = 4
ITEMS_PER_PRODUCER = 5_000
TOTAL = PRODUCERS * ITEMS_PER_PRODUCER
BATCH_IDS = 32
WORKERS = 2
DELIVERY_TIMEOUT = 60.0


def _start_worker(url: str, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as err:
        return subprocess.Popen(
            cli_command("worker", "tests.apps.ledger:batcher", "--redis-url", url, "--concurrency", "4"),
            cwd=ROOT,
            env=subprocess_env(url),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )


def _wait_for_subscribers(
    client: redis.Redis, channel: str, count: int, procs: list[Any], logs: list[Path]
) -> None:
    """Wait until ``count`` workers listen on the wake-up channel (they are serving)."""
    deadline = time.monotonic() + 20
    while True:
        subscribed = wake.subscribers(client, channel)
        if subscribed >= count:
            return
        for p, log in zip(procs, logs, strict=True):
            assert p.poll() is None, f"worker exited early with {p.returncode}:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"only {subscribed}/{count} workers subscribed to {channel}"
        time.sleep(0.05)


def _scan(client: redis.Redis, pattern: str) -> list[bytes]:
    return sorted(client.scan_iter(match=pattern, count=1000))


def test_producer_processes_and_worker_processes_deliver_every_item_once(
    redis_server: RedisServer, real_client: redis.Redis, tmp_path: Path
) -> None:
    url = redis_server.url
    _, proc = ledger.make(real_client)
    logs = [tmp_path / f"worker{i}.log" for i in range(WORKERS)]
    workers: list[subprocess.Popen[bytes]] = []
    ctx = multiprocessing.get_context("spawn")
    producers: list[Any] = []
    t0 = time.monotonic()
    try:
        workers = [_start_worker(url, log) for log in logs]
        _wait_for_subscribers(real_client, proc.keys.channels[0], WORKERS, workers, logs)

        start = ctx.Barrier(PRODUCERS)
        producers = [
            ctx.Process(
                target=ledger.produce,
                args=(idx, url, ITEMS_PER_PRODUCER, BATCH_IDS, 1000 + idx, start),
                name=f"producer-{idx}",
            )
            for idx in range(PRODUCERS)
        ]
        for p in producers:
            p.start()
        for p in producers:
            p.join(60)
        assert [p.exitcode for p in producers] == [0] * PRODUCERS
        t_produced = time.monotonic()

        deadline = time.monotonic() + DELIVERY_TIMEOUT
        while int(real_client.get(ledger.COUNT_KEY) or 0) < TOTAL:
            for w, log in zip(workers, logs, strict=True):
                assert w.poll() is None, f"worker exited with {w.returncode}:\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, (
                f"only {int(real_client.get(ledger.COUNT_KEY) or 0)}/{TOTAL} items delivered in time"
            )
            time.sleep(0.05)
        t_delivered = time.monotonic()

        for w in workers:
            w.send_signal(signal.SIGTERM)
        codes = [w.wait(15) for w in workers]
        assert codes == [0] * WORKERS, [log.read_text()[-4000:] for log in logs]
    finally:
        for p in producers:
            if p.is_alive():
                p.kill()
                p.join(5)
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.wait(5)

    flushes = ledger.read_ledger(real_client)
    seen: Counter[tuple[int, str, int]] = Counter()
    by_sequence: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    oversize, misrouted, disordered = [], [], []
    for batch_id, sequence, _flush_id, _attempt, items in flushes:
        if len(items) > ledger.MAX_BATCH_SIZE:
            oversize.append((batch_id, sequence, len(items)))
        last: dict[int, int] = {}
        for item in items:
            seen[(item["p"], item["b"], item["n"])] += 1
            if item["b"] != batch_id:
                misrouted.append((batch_id, sequence, item))
            if item["n"] <= last.get(item["p"], -1):
                disordered.append((batch_id, sequence, item))
            last[item["p"]] = item["n"]
        by_sequence[(batch_id, sequence)].extend(items)

    # expected (p, b, n): each producer's counter per batch id runs 0..k-1 without gaps
    per_pb: dict[tuple[int, str], set[int]] = defaultdict(set)
    for p, b, n in seen:
        per_pb[(p, b)].add(n)
    lost = sum(max(ns) + 1 - len(ns) for ns in per_pb.values())
    duplicates = sum(c - 1 for c in seen.values() if c > 1)
    delivered = sum(seen.values())
    flush_ids = Counter(f[2] for f in flushes)
    print(
        f"\nmultiprocess: delivered={delivered} unique={len(seen)} duplicates={duplicates} lost={lost} "
        f"flushes={len(flushes)} sequences={len(by_sequence)} batch_ids={len({b for b, _ in by_sequence})} "
        f"produce={t_produced - t0:.2f}s deliver={t_delivered - t0:.2f}s"
    )

    assert duplicates == 0, [k for k, c in seen.items() if c > 1][:10]
    assert lost == 0
    assert len(seen) == delivered == TOTAL
    assert Counter(p for p, _, _ in seen) == {p: ITEMS_PER_PRODUCER for p in range(PRODUCERS)}
    assert len({b for _, b, _ in seen}) == BATCH_IDS
    assert not oversize, oversize[:10]
    assert not misrouted, misrouted[:10]
    assert not disordered, disordered[:10]
    assert all(attempt == 1 for _, _, _, attempt, _ in flushes)
    assert all(c == 1 for c in flush_ids.values()), "a flush id was delivered twice"
    assert len(by_sequence) == len(flushes), "a sequence was delivered in more than one flush"

    # add order across sequences: for each producer, every n of sequence k < every n of k+1
    crossed = []
    sequences_of: dict[str, list[int]] = defaultdict(list)
    for batch_id, sequence in by_sequence:
        sequences_of[batch_id].append(sequence)
    for batch_id, seqs in sequences_of.items():
        assert sorted(seqs) == list(range(len(seqs))), f"{batch_id}: sequence numbers {sorted(seqs)}"
        high: dict[int, int] = {}
        for seq in sorted(seqs):
            items = by_sequence[(batch_id, seq)]
            for p in {i["p"] for i in items}:
                ns = [i["n"] for i in items if i["p"] == p]
                if min(ns) <= high.get(p, -1):
                    crossed.append((batch_id, seq, p, min(ns), high[p]))
            for p in {i["p"] for i in items}:
                high[p] = max(i["n"] for i in items if i["p"] == p)
    assert not crossed, crossed[:10]

    # nothing left behind in the batcher's key layout
    pfx = proc.keys.parts[0].pfx
    assert pfx == "ledger:{ledger:0}:"
    assert _scan(real_client, f"{pfx}i:*") == []
    assert _scan(real_client, f"{pfx}s:*") == []
    assert real_client.zcard(f"{pfx}due") == 0
    assert real_client.scard(f"{pfx}ids") == 0
    assert list(proc.batch_ids()) == []
    # the history of each batch id records exactly its flushes, all successful
    for batch_id, seqs in sequences_of.items():
        assert proc.status(batch_id) is None
        records = proc.history(batch_id, limit=1000)
        assert sorted(r.sequence for r in records) == sorted(seqs)
        assert all(r.success for r in records)
        assert sum(r.item_count for r in records) == sum(len(by_sequence[(batch_id, s)]) for s in seqs)
        assert real_client.ttl(f"{pfx}b:{batch_id}") > 0  # retention countdown started
