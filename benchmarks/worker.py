"""Worker figures, measured on a real worker process (``redis-batcher worker``):

1. CPU of an idle worker over --idle-seconds while --idle-ids batch ids sit in the delay queue
   (timers an hour away): shows the worker sleeps instead of scanning.
2. Seal -> handler start latency (p50/p99) with an idle worker: each sample is an add_many that
   fills and seals a sequence; the handler measures the time since that add (--seals samples).
3. Interval-flush lateness (p50/p99) for --interval-ids batch ids with 1 s intervals, added
   together (so their timers fall due together).

The handlers (``benchmarks/apps.py``) append their samples to files in a temporary directory
(one write per sample), so recording them costs the worker and Redis next to nothing.
Each measurement is repeated --runs times (default 3): the figures are the medians of the
per-run values (min and max with --json). Starts its own redis-server on a free loopback port.
Usage:
    python -m benchmarks.worker [--quick] [--runs N] [--json PATH]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

from benchmarks.report import append_json, exit_on_sigterm, record
from redis_batcher import ops, wake
from redis_batcher.scripts import scripts
from redis_batcher.testing import RedisServer

ROOT = Path(__file__).resolve().parent.parent
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def read_samples(path: Path) -> list[float]:
    """The complete lines of a samples file (a line being written is left for the next read)."""
    text = path.read_text() if path.exists() else ""
    return [float(x) for x in text[: text.rfind("\n") + 1].split()]


def wait_samples(path: Path, count: int, worker: subprocess.Popen[bytes]) -> list[float]:
    """The handlers' samples in ``path`` (benchmarks.apps.sample), once there are ``count``."""
    deadline = time.monotonic() + 120
    while len(samples := read_samples(path)) < count:
        if time.monotonic() > deadline or worker.poll() is not None:
            raise SystemExit(f"the worker did not record {count} samples in {path}")
        time.sleep(0.05)
    return samples


def clear_samples(path: Path) -> None:
    """Empty a samples file; the worker's O_APPEND writes go on at its new end."""
    if path.exists():
        os.truncate(path, 0)


def spread(values: list[float], fmt: str) -> str:
    """Per-run values, for the line under each figure."""
    return ", ".join(format(v, fmt) for v in values)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small smoke run (asserts nothing about speed)")
    ap.add_argument("--runs", type=int, default=3, help="repetitions of each measurement (median shown)")
    ap.add_argument("--idle-ids", type=int, default=100_000)
    ap.add_argument("--idle-seconds", type=float, default=5.0, help="per run")
    ap.add_argument("--seals", type=int, default=300, help="per run")
    ap.add_argument("--interval-ids", type=int, default=1000, help="per run")
    ap.add_argument("--json", metavar="PATH", help="append the figures as JSON lines to PATH")
    args = ap.parse_args()
    exit_on_sigterm()
    runs = max(3, args.runs)
    if args.quick:
        args.idle_ids, args.idle_seconds, args.seals, args.interval_ids, runs = 1000, 1.0, 20, 50, 1
    with RedisServer() as server, tempfile.TemporaryDirectory(prefix="rb-bench-") as samples:
        env = dict(os.environ, REDIS_URL=server.url, PYTHONPATH=str(ROOT), BENCH_SAMPLES_DIR=samples)
        os.environ["REDIS_URL"] = server.url
        seal_file, late_file = Path(samples, "seal_ms"), Path(samples, "late_ms")
        from benchmarks import apps  # reads REDIS_URL

        client = redis.Redis(host="127.0.0.1", port=server.port)
        # 1. fill the delay queue with idle ids, pipelined (this is setup, not the add path)
        apps.batcher.register()
        script = scripts().add
        client.script_load(script.source)
        pipe = client.pipeline(transaction=False)
        encoded = apps.idle.encode([{"x": 1}])
        for i in range(args.idle_ids):
            call = ops.add_call(apps.idle, f"idle:{i}", encoded)
            pipe.evalsha(script.sha, len(call.keys), *call.keys, *call.args)
            if len(pipe) >= 1000:
                pipe.execute()
        pipe.execute()
        worker = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "redis_batcher",
                "worker",
                "benchmarks.apps:batcher",
                "--concurrency",
                "4",
                "--log-level",
                "WARNING",
            ],
            env=env,
            cwd=ROOT,
        )
        try:
            deadline = time.monotonic() + 30
            while wake.subscribers(client, apps.wake.keys.channels[0]) == 0:
                if time.monotonic() > deadline or worker.poll() is not None:
                    raise SystemExit("worker did not start")
                time.sleep(0.05)
            time.sleep(0.3 if args.quick else 1.0)  # let the worker settle
            idle: list[float] = []
            for _ in range(runs):
                before = cpu_seconds(worker.pid)
                time.sleep(args.idle_seconds)
                idle.append((cpu_seconds(worker.pid) - before) / args.idle_seconds * 100)
            idle_cpu = statistics.median(idle)
            print(
                f"redis-server {client.info()['redis_version']}; {runs} run(s) of each figure, median shown"
            )
            print(
                f"idle worker CPU with {args.idle_ids:,} idle batch ids over {args.idle_seconds:.0f} s: "
                f"{idle_cpu:.2f}% of one core  (target <= 1%)"
            )
            print(f"  per run: {spread(idle, '.2f')} %")

            # 2. seal -> handler start
            seal_p50: list[float] = []
            seal_p99: list[float] = []
            seal_max: list[float] = []
            for _ in range(runs):
                clear_samples(seal_file)
                for i in range(args.seals):
                    apps.wake.add_many(f"w{i % 10}", [{"t": 0.0}] * 9 + [{"t": time.time()}])
                    time.sleep(0.02)
                seal = wait_samples(seal_file, args.seals, worker)
                seal_p50.append(pct(seal, 50))
                seal_p99.append(pct(seal, 99))
                seal_max.append(max(seal))
            med = statistics.median
            print(
                f"seal -> handler start over {args.seals} seals: p50 {med(seal_p50):.2f} ms, "
                f"p99 {med(seal_p99):.2f} ms, max {med(seal_max):.2f} ms  (target p99 <= 20 ms)"
            )
            print(f"  per run: p50 {spread(seal_p50, '.2f')} ms; p99 {spread(seal_p99, '.2f')} ms")

            # 3. interval lateness
            late_p50: list[float] = []
            late_p99: list[float] = []
            late_med: list[float] = []
            for r in range(runs):
                time.sleep(0.5)  # the worker is idle again
                clear_samples(late_file)
                for i in range(args.interval_ids):
                    apps.interval.add(f"iv{r}:{i}", {"t": time.time()})
                late = wait_samples(late_file, args.interval_ids, worker)
                late_p50.append(pct(late, 50))
                late_p99.append(pct(late, 99))
                late_med.append(statistics.median(late))
            print(
                f"interval lateness over {args.interval_ids} ids (1 s interval): p50 {med(late_p50):.1f} ms, "
                f"p99 {med(late_p99):.1f} ms, median {med(late_med):.1f} ms  (target p99 <= 100 ms)"
            )
            print(f"  per run: p50 {spread(late_p50, '.1f')} ms; p99 {spread(late_p99, '.1f')} ms")
        finally:
            worker.terminate()
            worker.wait(timeout=30)
            client.close()
    suite = "worker"
    ids = f"{args.interval_ids:,} ids due together"
    append_json(
        args.json,
        [
            record(suite, f"idle worker CPU, {args.idle_ids:,} idle batch ids", idle, "% of a core",
                   target="≤ 1 %"),
            record(suite, "seal → handler start p50", seal_p50, "ms", target="≤ 20 ms"),
            record(suite, "seal → handler start p99", seal_p99, "ms", target="≤ 20 ms"),
            record(suite, f"interval lateness p50, {ids}", late_p50, "ms", target="≤ 100 ms"),
            record(suite, f"interval lateness p99, {ids}", late_p99, "ms", target="≤ 100 ms"),
        ],
    )  # fmt: skip


if __name__ == "__main__":
    main()
