"""Machine: what this VM's round trips and CPU cost, measured without the library.

Several targets compare a figure bound by round trips with one bound by CPU (a sync ``add()``
with a bare RPUSH, a lone ``await add()`` with a sync one, 100 coroutines with a sync loop,
celery-batches' solo worker with our producers), so their ratios move with the machine's
balance of the two. This suite measures that balance, so BENCHMARKS.md of two machines can be
read side by side. No targets; nothing of redis-batcher runs here.

Starts its own redis-server on a free loopback port (--save '' --appendonly no). Per run, in
alternating blocks of --block calls (noise hits all alike):
1. ``PING`` round trip over a blocking socket (``sendall`` + ``recv``), median µs per call;
2. the same over asyncio streams (``write`` + ``read`` on one event loop), median µs per call:
   its ratio to (1) is what the event loop adds to a lone round trip;
3. client CPU: msgpack ``packb`` + ``unpackb`` of the benchmarks' ~100-byte item, µs per item;
4. server CPU: ``RPUSH`` of 100 such items, Redis' own µs per call (``INFO commandstats``).
Figures: median of --runs runs (min, max).

Usage: python -m benchmarks.machine [--quick] [--runs N] [--calls N] [--block N] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import time
from typing import Any

import msgpack
import redis

from benchmarks.report import ITEM, append_json, exit_on_sigterm, record
from redis_batcher.testing import RedisServer

SUITE = "machine"
PING = b"*1\r\n$4\r\nPING\r\n"
PONG = b"+PONG\r\n"


def _blocking_block(sock: socket.socket, block: int) -> float:
    t0 = time.perf_counter()
    for _ in range(block):
        sock.sendall(PING)
        reply = sock.recv(64)
        while len(reply) < len(PONG) and reply:  # a reply split in two reads
            reply += sock.recv(64)
        if reply != PONG:
            raise SystemExit(f"unexpected reply to PING: {reply!r}")
    return (time.perf_counter() - t0) / block * 1e6


async def _asyncio_block(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, block: int) -> float:
    t0 = time.perf_counter()
    for _ in range(block):
        writer.write(PING)
        reply = await reader.read(64)
        while len(reply) < len(PONG) and reply:  # a reply split in two reads
            reply += await reader.read(64)
        if reply != PONG:
            raise SystemExit(f"unexpected reply to PING: {reply!r}")
    return (time.perf_counter() - t0) / block * 1e6


async def _round_trips(port: int, calls: int, block: int) -> tuple[list[float], list[float]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as asyncio's transports do
    blocking: list[float] = []
    streams: list[float] = []
    try:
        _blocking_block(sock, block)  # warm up both
        await _asyncio_block(reader, writer, block)
        for _ in range(max(1, calls // block)):
            blocking.append(_blocking_block(sock, block))
            streams.append(await _asyncio_block(reader, writer, block))
    finally:
        sock.close()
        writer.close()
        await writer.wait_closed()
    return blocking, streams


def round_trips(port: int, calls: int, block: int) -> tuple[float, float]:
    """Median µs per PING round trip (blocking socket, asyncio streams), in alternating blocks
    of ``block`` calls on one event loop's thread."""
    blocking, streams = asyncio.run(_round_trips(port, calls, block))
    return statistics.median(blocking), statistics.median(streams)


def codec_cpu(loops: int) -> float:
    """µs of CPU per msgpack packb + unpackb of the benchmarks' item."""
    packb, unpackb = msgpack.packb, msgpack.unpackb
    t0 = time.process_time()
    for _ in range(loops):
        unpackb(packb(ITEM), raw=False)
    return (time.process_time() - t0) / loops * 1e6


def rpush_server_usec(client: redis.Redis, calls: int) -> float:
    """Redis' own µs per RPUSH of 100 items (INFO commandstats), pipelined."""
    hundred = [msgpack.packb(ITEM)] * 100
    client.config_resetstat()
    pipe = client.pipeline(transaction=False)
    for i in range(calls):
        pipe.rpush(f"machine:{i % 20}", *hundred)
        if len(pipe) >= 50:
            pipe.execute()
    pipe.execute()
    stats: dict[str, Any] = client.info("commandstats")
    client.flushall()
    return float(stats["cmdstat_rpush"]["usec_per_call"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one short run (asserts nothing about speed)")
    ap.add_argument("--runs", type=int, default=5, help="runs per figure (median shown; at least 3)")
    ap.add_argument("--calls", type=int, default=3000, help="round trips per kind and run")
    ap.add_argument("--block", type=int, default=100, help="calls per alternating block")
    ap.add_argument("--json", metavar="PATH", help="append the figures as JSON lines to PATH")
    args = ap.parse_args()
    exit_on_sigterm()
    runs, calls = (1, 300) if args.quick else (max(3, args.runs), args.calls)
    block = min(args.block, calls)
    fig: dict[str, list[float]] = {"blocking": [], "asyncio": [], "ratio": [], "codec": [], "rpush": []}
    with RedisServer() as server:
        client = redis.Redis(host="127.0.0.1", port=server.port)
        version = client.info()["redis_version"]
        for _ in range(runs):
            sync_us, async_us = round_trips(server.port, calls, block)
            fig["blocking"].append(sync_us)
            fig["asyncio"].append(async_us)
            fig["ratio"].append(async_us / sync_us)
            fig["codec"].append(codec_cpu(2_000 if args.quick else 20_000))
            fig["rpush"].append(rpush_server_usec(client, 200 if args.quick else 2_000))
        client.close()

    med = {k: statistics.median(v) for k, v in fig.items()}
    print(f"redis-server {version}; {runs} run(s), {calls} round trips per kind in blocks of {block}")
    rows = (
        ("blocking", "PING round trip, blocking socket", ".1f", "us"),
        ("asyncio", "PING round trip, asyncio streams", ".1f", "us"),
        ("codec", "msgpack pack+unpack of the item (CPU)", ".2f", "us"),
        ("rpush", "RPUSH of 100 items, Redis' own time", ".1f", "us"),
    )
    for key, label, fmt, unit in rows:
        v = fig[key]
        print(f"  {label:<38} {format(med[key], fmt):>7} {unit}  (min {min(v):{fmt}}, max {max(v):{fmt}})")
    print(
        f"asyncio round trip / blocking round trip = {med['asyncio'] / med['blocking']:.2f} "
        f"(per-run ratios: {', '.join(f'{r:.2f}' for r in fig['ratio'])})"
    )
    append_json(
        args.json,
        [
            record(SUITE, "PING round trip, blocking socket", fig["blocking"], "µs"),
            record(
                SUITE, "PING round trip, asyncio streams", fig["asyncio"], "µs",
                ratio=med["asyncio"] / med["blocking"], ratio_of="PING round trip, blocking socket",
            ),
            record(SUITE, "msgpack packb + unpackb of the item, client CPU", fig["codec"], "µs"),
            record(SUITE, "RPUSH of 100 items, Redis' own time", fig["rpush"], "µs"),
        ],
    )  # fmt: skip


if __name__ == "__main__":
    main()
