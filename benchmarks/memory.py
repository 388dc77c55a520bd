"""Memory per pending item: Redis ``used_memory`` growth while --items ~100-byte msgpack items sit
pending in --batch-ids batch ids of one processor (max_batch_size larger than any batch and no
flush_interval, so nothing is sealed and nothing is due).

Each run starts a fresh redis-server on a free loopback port (--save '' --appendonly no), warms
it up (scripts loaded, processor registered, one item added elsewhere), reads ``used_memory``,
fills the batch ids with ``add_many`` in chunks of --chunk items and reads ``used_memory``
again. Figures (median of --runs runs, min and max): bytes per pending item
((after - before) / items) and its ratio to the msgpack payload bytes per item (target <= 1.5).

Usage: python -m benchmarks.memory [--quick] [--runs N] [--items N] [--batch-ids N] [--json PATH]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import msgpack
import redis

import redis_batcher
from benchmarks.report import append_json, exit_on_sigterm, record
from redis_batcher.testing import RedisServer

SUITE = "memory"
ITEM: dict[str, Any] = {
    "user": "user:000042",
    "type": "click",
    "page": "/products/12345?ref=home",
    "ts": 1795876429.123,
    "session": "9f8e7d6c5b4a",
    "v": 1,
    "n": 0,
}


def noop(flush: redis_batcher.Flush) -> None:
    """Never called: nothing is sealed."""


def used_memory(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


def run_once(items: int, batch_ids: int, chunk: int) -> dict[str, float]:
    """One fill on a fresh server: {"bytes_per_item", "payload_per_item", "seconds"}."""
    per_id = items // batch_ids
    with RedisServer() as server:
        client = redis.Redis(host="127.0.0.1", port=server.port)
        batcher = redis_batcher.Batcher(client, prefix="mem")
        proc = batcher.processor(name="mem", max_batch_size=per_id * 10 + 1, flush_interval=None)(noop)
        warm = batcher.processor(name="warm", max_batch_size=10, flush_interval=None)(noop)
        warm.add("warm", ITEM)  # loads the add script, registers both processors
        batcher.register()
        time.sleep(0.1)
        before = used_memory(client)
        payload = 0
        seconds = 0.0  # inside add_many only
        n = 0
        for b in range(batch_ids):
            bid = f"batch:{b:06d}"
            for start in range(0, per_id, chunk):
                part = [dict(ITEM, n=n + i) for i in range(min(chunk, per_id - start))]
                payload += sum(len(msgpack.packb(x)) for x in part)
                t0 = time.perf_counter()
                proc.add_many(bid, part)
                seconds += time.perf_counter() - t0
                n += len(part)
        client.ping()  # our own query buffer is back to small before the reading
        time.sleep(0.1)
        after = used_memory(client)
        client.close()
    return {"bytes_per_item": (after - before) / n, "payload_per_item": payload / n, "seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="50,000 items, one run (asserts nothing)")
    ap.add_argument("--runs", type=int, default=3, help="runs (a fresh server each; median shown)")
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--batch-ids", type=int, default=1000)
    ap.add_argument("--chunk", type=int, default=1000, help="items per add_many call")
    ap.add_argument("--json", metavar="PATH", help="append the figures as JSON lines to PATH")
    args = ap.parse_args()
    exit_on_sigterm()
    if args.quick:
        args.items, args.batch_ids, args.runs = 50_000, 50, 1
    args.items -= args.items % args.batch_ids
    runs = [run_once(args.items, args.batch_ids, args.chunk) for _ in range(args.runs)]
    per_item = [r["bytes_per_item"] for r in runs]
    payload = statistics.median(r["payload_per_item"] for r in runs)
    ratios = [r["bytes_per_item"] / r["payload_per_item"] for r in runs]
    fill = [args.items / r["seconds"] for r in runs]
    med = statistics.median
    print(
        f"{args.items:,} pending items in {args.batch_ids:,} batch ids "
        f"({args.items // args.batch_ids:,} each, add_many chunks of {args.chunk}); "
        f"{len(runs)} run(s) on a fresh server each, median shown"
    )
    print(f"  msgpack payload          {payload:>10.1f} bytes/item")
    print(
        f"  used_memory growth       {med(per_item):>10.1f} bytes/item   "
        f"(min {min(per_item):.1f}, max {max(per_item):.1f})"
    )
    print(
        f"  fill rate (add_many)     {med(fill):>10,.0f} items/s     "
        f"(min {min(fill):,.0f}, max {max(fill):,.0f})"
    )
    print(f"used_memory per pending item / payload bytes = {med(ratios):.2f}  (target <= 1.5)")
    append_json(
        args.json,
        [
            record(SUITE, "msgpack payload per item", [r["payload_per_item"] for r in runs], "B"),
            record(
                SUITE,
                "used_memory per pending item",
                per_item,
                "B",
                ratio=med(ratios),
                ratio_of="msgpack payload per item",
                target="≤ 1.5",
            ),
            record(SUITE, "fill rate, add_many(1000)", fill, "items/s"),
        ],
    )


if __name__ == "__main__":
    main()
