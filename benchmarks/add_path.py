"""Add path, side by side in one run: redis-batcher add()/add_many() vs bare redis-py RPUSH, and
add() of a processor with flush_idle (one ZADD more per add) vs the same processor without it.

Starts its own redis-server on a free loopback port (--save '' --appendonly no). Each figure is
the median of --runs runs (runs interleave the systems so noise hits both alike); the ratios are
what to read (ratio of the medians). Usage:
    python -m benchmarks.add_path [--quick] [--runs N] [--seconds S] [--json PATH]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import msgpack
import redis

import redis_batcher
from benchmarks.report import ITEM, append_json, exit_on_sigterm, record
from redis_batcher.testing import RedisServer


def rate(fn: Callable[[], int], seconds: float) -> float:
    """Items per second of fn (which returns how many items it handled), over ~seconds."""
    done = 0
    t0 = time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < seconds:
        done += fn()
    return done / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="short smoke run (asserts nothing about speed)")
    ap.add_argument("--runs", type=int, default=5, help="runs per figure (median shown; at least 3)")
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--json", metavar="PATH", help="append the figures as JSON lines to PATH")
    args = ap.parse_args()
    exit_on_sigterm()
    runs, seconds = (1, 0.3) if args.quick else (max(3, args.runs), args.seconds)
    payload = msgpack.packb(ITEM)
    hundred = [payload] * 100
    with RedisServer() as server:
        client = redis.Redis(host="127.0.0.1", port=server.port)
        batcher = redis_batcher.Batcher(client, prefix="bench")
        proc = batcher.processor(name="bench", max_batch_size=1_000_000, flush_interval=None)(lambda f: None)
        # the same processor with debounce; never quiet for an hour: no worker would be woken
        idle = batcher.processor(
            name="bench-idle", max_batch_size=1_000_000, flush_interval=None, flush_idle=3600.0
        )(lambda f: None)
        items = [dict(ITEM, n=i) for i in range(100)]
        print(
            f"redis-server {client.info()['redis_version']}, item {len(payload)} bytes, "
            f"{runs} run(s) x {seconds}s, median shown"
        )

        def bare_one() -> int:
            client.rpush("bare:one", payload)
            return 1

        def rb_one() -> int:
            proc.add("b1", ITEM)
            return 1

        def rb_idle_one() -> int:
            idle.add("b1", ITEM)
            return 1

        def bare_many() -> int:
            client.rpush("bare:many", *hundred)
            return 100

        def rb_many() -> int:
            proc.add_many("b2", items)
            return 100

        cases = {
            "bare RPUSH x1": bare_one,
            "add()": rb_one,
            "add() flush_idle": rb_idle_one,
            "bare RPUSH x100": bare_many,
            "add_many(100)": rb_many,
        }
        results: dict[str, list[float]] = {k: [] for k in cases}
        for _ in range(runs):
            for name, fn in cases.items():
                client.flushall()
                results[name].append(rate(fn, seconds))
        med = {k: statistics.median(v) for k, v in results.items()}
        for k, v in results.items():
            print(f"  {k:<16} {med[k]:>12,.0f} items/s   (min {min(v):,.0f}, max {max(v):,.0f})")
        print(f"add() / bare RPUSH = {med['add()'] / med['bare RPUSH x1']:.2f}  (target >= 0.80)")
        print(
            f"add_many(100) / bare variadic RPUSH = {med['add_many(100)'] / med['bare RPUSH x100']:.2f}"
            "  (target >= 0.60)"
        )
        print(f"add() with flush_idle / add() without = {med['add() flush_idle'] / med['add()']:.2f}")
        client.close()
    one = med["add()"] / med["bare RPUSH x1"]
    many = med["add_many(100)"] / med["bare RPUSH x100"]
    debounced = med["add() flush_idle"] / med["add()"]
    append_json(
        args.json,
        [
            record("add_path", "bare RPUSH x1 items/s", results["bare RPUSH x1"], "items/s"),
            record(
                "add_path", "add() items/s", results["add()"], "items/s",
                ratio=one, ratio_of="bare RPUSH x1 items/s", target="≥ 0.80",
            ),
            record(
                "add_path", "add() with flush_idle items/s", results["add() flush_idle"], "items/s",
                ratio=debounced, ratio_of="add() items/s",
            ),
            record("add_path", "bare RPUSH x100 items/s", results["bare RPUSH x100"], "items/s"),
            record(
                "add_path", "add_many(100) items/s", results["add_many(100)"], "items/s",
                ratio=many, ratio_of="bare RPUSH x100 items/s", target="≥ 0.60",
            ),
        ],
    )  # fmt: skip


if __name__ == "__main__":
    main()
