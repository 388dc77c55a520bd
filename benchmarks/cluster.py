"""Redis Cluster vs one server, side by side in one run: the latency of a sync ``add()``.

Starts a 3-primary cluster and a single redis-server on free loopback ports (the same binary,
--save '' --appendonly no). One processor with 3 partitions on each; a sequential loop of
single-item ``add()`` calls over 20 batch ids, the two systems taking turns in blocks of 100
calls. Figure: median µs per call, median of --runs runs; the ratio cluster ÷ single server is
what to read (target ≤ 1.3: on a cluster, a script call goes to the primary serving its slot
over a connection of its own, as on a single server).

Usage: python -m benchmarks.cluster [--quick] [--runs N] [--calls N] [--json PATH]
"""

from __future__ import annotations

import argparse
import statistics
import time

import redis
from redis.cluster import ClusterNode, RedisCluster

import redis_batcher
from benchmarks.report import ITEM, append_json, exit_on_sigterm, record
from redis_batcher.testing import RedisClusterServers, RedisServer

SUITE = "cluster"
IDS = [f"b{i}" for i in range(20)]


def per_call(proc: redis_batcher.Processor, calls: int, offset: int) -> list[float]:
    """µs of each of ``calls`` sequential adds."""
    out = []
    for i in range(calls):
        t0 = time.perf_counter()
        proc.add(IDS[(offset + i) % len(IDS)], ITEM)
        out.append((time.perf_counter() - t0) * 1e6)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="short smoke run (asserts nothing about speed)")
    ap.add_argument("--runs", type=int, default=5, help="runs per figure (median shown; at least 3)")
    ap.add_argument("--calls", type=int, default=3000, help="calls per system per run")
    ap.add_argument("--json", metavar="PATH", help="append the figures as JSON lines to PATH")
    args = ap.parse_args()
    exit_on_sigterm()
    runs, calls = (1, 300) if args.quick else (max(3, args.runs), args.calls)
    block = 100
    with RedisServer() as server, RedisClusterServers(3) as servers:
        single = redis_batcher.Batcher(redis.Redis(host="127.0.0.1", port=server.port), prefix="bench")
        cluster = redis_batcher.Batcher(
            RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in servers.startup_nodes]), prefix="bench"
        )
        systems = {
            "one server": single.processor(
                name="bench", partitions=3, max_batch_size=1_000_000, flush_interval=None
            )(lambda f: None),
            "cluster": cluster.processor(
                name="bench", partitions=3, max_batch_size=1_000_000, flush_interval=None
            )(lambda f: None),
        }
        for proc in systems.values():
            per_call(proc, 200, 0)  # warm up: registration, scripts loaded, connections made
        print(
            f"3-primary cluster vs one redis-server; {runs} run(s) of {calls} calls each, blocks of {block}"
        )
        medians: dict[str, list[float]] = {name: [] for name in systems}
        for run in range(runs):
            samples: dict[str, list[float]] = {name: [] for name in systems}
            order = list(systems) if run % 2 == 0 else list(reversed(systems))
            for start in range(0, calls, block):
                for name in order:
                    samples[name] += per_call(systems[name], min(block, calls - start), start)
            for name in systems:
                medians[name].append(statistics.median(samples[name]))
        med = {name: statistics.median(v) for name, v in medians.items()}
        for name, v in medians.items():
            print(f"  add() latency, {name:<11} {med[name]:>8.1f} us  (min {min(v):.1f}, max {max(v):.1f})")
        ratio = med["cluster"] / med["one server"]
        print(f"cluster add() latency / one server add() latency = {ratio:.2f}  (target <= 1.3)")
        single.close()
        cluster.close()
    append_json(
        args.json,
        [
            record(SUITE, "add() latency, one server (median per call)", medians["one server"], "µs"),
            record(
                SUITE, "add() latency, 3-primary cluster (median per call)", medians["cluster"], "µs",
                ratio=ratio, ratio_of="add() latency, one server (median per call)", target="≤ 1.3",
            ),
        ],
    )  # fmt: skip


if __name__ == "__main__":
    main()
