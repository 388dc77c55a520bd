"""Worker figures, measured on a real worker process (``redis-batcher worker``):

1. CPU of an idle worker over --idle-seconds while --idle-ids batch ids sit in the delay queue
   (timers an hour away): shows the worker sleeps instead of scanning.
2. Seal -> handler start latency (p50/p99) with an idle worker: each sample is an add_many that
   fills and seals a sequence; the handler measures the time since that add.
3. Interval-flush lateness (p50/p99) for --interval-ids batch ids with 1 s intervals.

Starts its own redis-server on a free loopback port. Usage:
    python -m benchmarks.worker [--quick]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import redis

from redis_batcher import ops
from redis_batcher.embedded import RedisServer
from redis_batcher.scripts import scripts

ROOT = Path(__file__).resolve().parent.parent
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small smoke run (asserts nothing about speed)")
    ap.add_argument("--idle-ids", type=int, default=100_000)
    ap.add_argument("--idle-seconds", type=float, default=10.0)
    ap.add_argument("--seals", type=int, default=300)
    ap.add_argument("--interval-ids", type=int, default=1000)
    args = ap.parse_args()
    if args.quick:
        args.idle_ids, args.idle_seconds, args.seals, args.interval_ids = 1000, 1.0, 20, 50
    with RedisServer() as server:
        env = dict(os.environ, REDIS_URL=server.url, PYTHONPATH=str(ROOT))
        os.environ["REDIS_URL"] = server.url
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
            while int(client.pubsub_numsub("bench:wake:wake")[0][1]) == 0:
                if time.monotonic() > deadline or worker.poll() is not None:
                    raise SystemExit("worker did not start")
                time.sleep(0.05)
            time.sleep(1.0)
            before = cpu_seconds(worker.pid)
            time.sleep(args.idle_seconds)
            idle_cpu = (cpu_seconds(worker.pid) - before) / args.idle_seconds * 100
            print(f"redis-server {client.info()['redis_version']}")
            print(
                f"idle worker CPU with {args.idle_ids:,} idle batch ids over {args.idle_seconds:.0f} s: "
                f"{idle_cpu:.2f}% of one core  (target <= 1%)"
            )

            # 2. seal -> handler start
            for i in range(args.seals):
                apps.wake.add_many(f"w{i % 10}", [{"t": 0.0}] * 9 + [{"t": time.time()}])
                time.sleep(0.02)
            while client.llen("bench:stats:seal_ms") < args.seals:
                time.sleep(0.05)
            seal = [float(x) for x in client.lrange("bench:stats:seal_ms", 0, -1)]
            print(
                f"seal -> handler start over {len(seal)} seals: p50 {pct(seal, 50):.2f} ms, "
                f"p99 {pct(seal, 99):.2f} ms, max {max(seal):.2f} ms  (target p99 <= 20 ms)"
            )

            # 3. interval lateness
            for i in range(args.interval_ids):
                apps.interval.add(f"iv{i}", {"t": time.time()})
            while client.llen("bench:stats:late_ms") < args.interval_ids:
                time.sleep(0.05)
            late = [float(x) for x in client.lrange("bench:stats:late_ms", 0, -1)]
            print(
                f"interval lateness over {len(late)} ids (1 s interval): p50 {pct(late, 50):.1f} ms, "
                f"p99 {pct(late, 99):.1f} ms, median {statistics.median(late):.1f} ms  (target p99 <= 100 ms)"
            )
        finally:
            worker.terminate()
            worker.wait(timeout=30)
            client.close()


if __name__ == "__main__":
    main()
