"""Scale: add throughput and claim cost with 1, 1,000 and 100,000 active batch ids.

The add path must be O(1) per add and a claim O(log n) in the number of active ids, so both
should stay flat as the id count grows. One redis-server per id count (free loopback ports,
--save '' --appendonly no), all up at once so the runs can interleave the id counts (noise hits
all alike). Each server holds one processor (max_batch_size larger than anything added,
flush_interval 1 h: every active id has a timer in the delay queue, as in production) whose n
ids are pre-created with pipelined EVALSHA of the add script (setup, not measured).

Per run and id count:
1. add() items/s: single-item ``add()`` calls into random existing ids for --seconds, the id
   counts taking turns in pieces of 0.25 s; also add.lua's server-side cost (``INFO
   commandstats`` usec of EVALSHA, read around add()'s own pieces).
1b. the floor, taking turns with 1. piece by piece: a minimal script touching the same key as
   an add into an open sequence (``RPUSHX`` onto the base id's open list, ``LINDEX`` of its
   header), pre-framed and sent over the same kind of connection (``connection.Link``). Any
   atomic add with this data layout touches this key; at 100,000 ids it is cold in the CPU's
   caches at every call. The floor's extra µs per call at the most ids over 1 id is
   that memory cost; add()'s extra µs set against it shows whether add() has any cost of its
   own that grows with the id count.
2. claim cost, a few due: --claims claim.lua calls (``ops.claim_call``, limit 10), each finding
   --due sequences due (sealed just before with EVAL add + EVAL flush, acked after with EVAL
   ack: only the claims go through EVALSHA, so usec_per_call of EVALSHA is theirs alone).
3. claim cost, none due: --claims claim.lua calls on the same queue with nothing due (an idle
   worker's poll).
Figures: median of --runs runs (min, max); ratios against the 1-id case of the same run:
add@max ÷ add@1 (target ≥ 0.9), floor@max ÷ floor@1, claim@max ÷ claim@1 (reported; expected
about flat); and µs per call at the most ids minus at 1 id, add() against the floor.

Usage: python -m benchmarks.scale [--quick] [--runs N] [--ids 1 1000 100000] [--seconds S]
                                  [--claims N] [--due K] [--json PATH]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from typing import Any

import redis

import redis_batcher
from benchmarks.report import ITEM, Record, append_json, exit_on_sigterm, record
from redis_batcher import ops
from redis_batcher.connection import Link, pack
from redis_batcher.scripts import scripts
from redis_batcher.testing import RedisServer

SUITE = "scale"
CLAIM_LIMIT = 10
PIECE = 0.25  # seconds of add() on one server before the next takes its turn
# the least an atomic add into an open sequence does: push onto the base id's open list, read
# the list's header (which sequence the item went to)
FLOOR_SCRIPT = """local n = redis.call('RPUSHX', KEYS[1], ARGV[1])
local header = redis.call('LINDEX', KEYS[1], 0)
return n"""


def noop(flush: redis_batcher.Flush) -> None:
    """Never called: no worker runs."""


def evalsha_totals(client: redis.Redis) -> tuple[int, float]:
    """(calls, usec) of EVALSHA since the last CONFIG RESETSTAT: differences of two readings
    give one phase's share when several scripts take turns."""
    stats: dict[str, Any] = client.info("commandstats")
    entry = stats.get("cmdstat_evalsha", {})
    return int(entry.get("calls", 0)), float(entry.get("usec", 0.0))


def evalsha_usec_per_call(client: redis.Redis) -> tuple[int, float]:
    """(calls, usec per call) of EVALSHA since the last CONFIG RESETSTAT."""
    calls, usec = evalsha_totals(client)
    return calls, usec / calls if calls else 0.0


class Scale:
    """One redis-server holding ``n`` active batch ids of one processor."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.server = RedisServer().start()
        try:
            self._setup(n)
        except BaseException:  # stopped (SIGTERM) or failed while setting up: stop the server too
            self.server.close()
            raise

    def _setup(self, n: int) -> None:
        self.client = redis.Redis(host="127.0.0.1", port=self.server.port)
        self.batcher = redis_batcher.Batcher(self.client, prefix="scale")
        processor = self.batcher.processor(name="scale", max_batch_size=10_000_000, flush_interval=3600.0)
        self.proc = processor(noop)
        self.part = self.proc.keys.parts[0]
        self.ids = [f"id:{i:07d}" for i in range(n)]
        rng = random.Random(n)
        self.order = [self.ids[rng.randrange(n)] for _ in range(1 << 16)]
        self.script = scripts().add
        self.batcher.register()
        for script in scripts().scripts.values():
            script.load(self.client)  # with script flags where the server has them
        self.floor_sha = str(self.client.script_load(FLOOR_SCRIPT))
        self.link = Link(self.client)
        self.floor_frames: list[bytes] = []

    def close(self) -> None:
        self.link.close()
        self.client.close()
        self.server.close()

    def populate(self) -> None:
        """Make every id active: one item each, pipelined EVALSHA (setup, as benchmarks.worker does)."""
        encoded = self.proc.encode([ITEM])
        pipe = self.client.pipeline(transaction=False)
        for bid in self.ids:
            call = ops.add_call(self.proc, bid, encoded)
            pipe.evalsha(self.script.sha, len(call.keys), *call.keys, *call.args)
            if len(pipe) >= 1000:
                pipe.execute()
        pipe.execute()
        active = int(self.client.scard(self.part.ids))
        if active != self.n:
            raise SystemExit(f"expected {self.n} active ids, found {active}")
        # the floor's calls, framed beforehand: every id's open list exists (a sequence is open)
        if not self.client.exists(self.part.open_items(self.order[0])):
            raise SystemExit("expected a sequence to be open")
        item = encoded[0]
        sha = self.floor_sha
        frames = {bid: pack(("EVALSHA", sha, 1, self.part.open_items(bid), item)) for bid in set(self.order)}
        self.floor_frames = [frames[bid] for bid in self.order]

    def add_piece(self, seconds: float, offset: int) -> int:
        """Single-item add() calls into random existing ids for ``seconds``; how many were made."""
        add, order, mask = self.proc.add, self.order, len(self.order) - 1
        done = 0
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            add(order[(offset + done) & mask], ITEM)
            done += 1
        return done

    def floor_piece(self, seconds: float, offset: int) -> int:
        """The floor script on the same random ids as add_piece for ``seconds``; how many calls."""
        request, frames, mask = self.link.request, self.floor_frames, len(self.floor_frames) - 1
        done = 0
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            request(frames[(offset + done) & mask])
            done += 1
        return done

    def piece(self, kind: str, seconds: float, offset: int) -> tuple[int, float, float]:
        """One piece of ``add`` (add_piece) or ``floor`` (floor_piece): (calls, seconds taken,
        EVALSHA server usec over the piece)."""
        calls0, usec0 = evalsha_totals(self.client)
        t0 = time.perf_counter()
        calls = (self.add_piece if kind == "add" else self.floor_piece)(seconds, offset)
        taken = time.perf_counter() - t0
        calls1, usec1 = evalsha_totals(self.client)
        if calls1 - calls0 < calls:
            raise SystemExit(f"commandstats counted {calls1 - calls0} EVALSHA calls for {calls} {kind} calls")
        return calls, taken, usec1 - usec0

    def _eval(self, pipe: Any, call: ops.Call) -> None:
        pipe.eval(call.script.variant(self.client).source, len(call.keys), *call.keys, *call.args)

    def claim_cost(self, claims: int, due: int) -> tuple[float, float]:
        """(claim.lua server usec per call, wall usec per call) over ``claims`` claims, each
        finding ``due`` sealed sequences due. Setup and acks run with EVAL, so EVALSHA's
        commandstats are the claims' alone."""
        pool = [f"due:{j}" for j in range(due)]
        encoded = self.proc.encode([ITEM])
        self.client.config_resetstat()
        wall = 0.0
        for _ in range(claims):
            pipe = self.client.pipeline(transaction=False)
            for bid in pool:
                self._eval(pipe, ops.add_call(self.proc, bid, encoded))
                self._eval(pipe, ops.flush_call(self.proc, bid, None))
            pipe.execute()
            owner = ops.new_token()
            call = ops.claim_call(self.proc, self.part, CLAIM_LIMIT, owner)
            sha = call.script.variant(self.client).sha
            t0 = time.perf_counter()
            reply = self.client.evalsha(sha, len(call.keys), *call.keys, *call.args)
            wall += time.perf_counter() - t0
            _, claimed = ops.parse_claim(self.proc, self.part, owner, reply)
            if len(claimed) != due:
                raise SystemExit(f"claim found {len(claimed)} due sequences, expected {due}")
            pipe = self.client.pipeline(transaction=False)
            for c in claimed:
                entry = ops.history_entry(c, int(time.time() * 1000), 0.0, True, None)
                self._eval(pipe, ops.ack_call(c, entry))
            pipe.execute()
        calls, usec = evalsha_usec_per_call(self.client)
        if calls != claims:
            raise SystemExit(f"commandstats counted {calls} EVALSHA calls for {claims} claims")
        return usec, wall / claims * 1e6

    def idle_claim_cost(self, claims: int) -> float:
        """claim.lua server usec per call when nothing is due."""
        owner = ops.new_token()
        call = ops.claim_call(self.proc, self.part, CLAIM_LIMIT, owner)
        sha = call.script.variant(self.client).sha
        self.client.config_resetstat()
        for _ in range(claims):
            reply = self.client.evalsha(sha, len(call.keys), *call.keys, *call.args)
            if len(reply) != 1:
                raise SystemExit("a claim found something due in the idle case")
        return evalsha_usec_per_call(self.client)[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1, 1,000 and 10,000 ids, one short run")
    ap.add_argument("--runs", type=int, default=5, help="runs per figure (median shown; at least 3)")
    ap.add_argument("--ids", type=int, nargs="+", default=[1, 1000, 100_000], help="active id counts")
    ap.add_argument("--seconds", type=float, default=2.0, help="duration of each add() measurement")
    ap.add_argument("--claims", type=int, default=2000, help="claim calls per claim measurement")
    ap.add_argument("--due", type=int, default=4, help="sequences due at each claim")
    ap.add_argument("--json", metavar="PATH", help="append the figures as JSON lines to PATH")
    args = ap.parse_args()
    exit_on_sigterm()
    if args.quick:
        args.ids, args.runs, args.seconds, args.claims = [1, 1000, 10_000], 1, 0.3, 200
    ns = sorted(set(args.ids))
    fig: dict[tuple[str, int], list[float]] = {}
    benches: list[Scale] = []
    try:
        for n in ns:
            bench = Scale(n)
            benches.append(bench)
            t0 = time.perf_counter()
            bench.populate()
            print(f"{n:>9,} active ids created in {time.perf_counter() - t0:.1f} s")
        version = benches[0].client.info()["redis_version"]
        piece = min(PIECE, args.seconds)
        for r in range(args.runs):
            # rotate which id count goes first, so drift over the run hits all alike
            turn = benches[r % len(benches) :] + benches[: r % len(benches)]
            # 1. add() and the floor: every id count in alternating pieces, so noise hits all
            # alike; add.lua's server time is read around add()'s own pieces
            done = {(kind, n): 0 for kind in ("add", "floor") for n in ns}
            taken = dict.fromkeys(done, 0.0)
            script_usec = dict.fromkeys(done, 0.0)  # each script's EVALSHA server usec
            left = args.seconds
            while left > 1e-9:
                kinds = ("add", "floor") if round(left / piece) % 2 else ("floor", "add")
                for bench in turn:
                    for kind in kinds:
                        slot = (kind, bench.n)
                        calls, seconds, usec = bench.piece(kind, min(piece, left), done[slot])
                        done[slot] += calls
                        taken[slot] += seconds
                        script_usec[slot] += usec
                left -= piece
            for bench in turn:
                for kind in ("add", "floor"):
                    fig.setdefault((kind, bench.n), []).append(done[kind, bench.n] / taken[kind, bench.n])
                    usec = script_usec[kind, bench.n] / done[kind, bench.n]
                    fig.setdefault((f"{kind}_usec", bench.n), []).append(usec)
            # 2. and 3. claims
            for bench in turn:
                claim_usec, claim_wall = bench.claim_cost(args.claims, args.due)
                idle_usec = bench.idle_claim_cost(args.claims)
                for key, value in (
                    ("claim_usec", claim_usec),
                    ("claim_wall", claim_wall),
                    ("idle_usec", idle_usec),
                ):
                    fig.setdefault((key, bench.n), []).append(value)
    finally:
        for bench in benches:
            bench.close()

    med = statistics.median
    lo, hi = ns[0], ns[-1]
    print(
        f"redis-server {version}; {args.runs} run(s): add() for {args.seconds}s, {args.claims} claims "
        f"with {args.due} due and {args.claims} with none due, per id count; median shown (min, max)"
    )
    # every per-id-count figure: (key in fig, name in the report, unit, printed format)
    figures = (
        ("add", "add() items/s", "items/s", ",.0f"),
        ("floor", "floor script (RPUSHX + LINDEX open list) calls/s", "calls/s", ",.0f"),
        ("add_usec", "add.lua server µs/call", "µs", ".1f"),
        ("floor_usec", "floor script server µs/call", "µs", ".1f"),
        ("claim_usec", f"claim.lua server µs/call, {args.due} due", "µs", ".1f"),
        ("claim_wall", f"claim round trip µs, {args.due} due", "µs", ".1f"),
        ("idle_usec", "claim.lua server µs/call, none due", "µs", ".1f"),
    )

    def ids(n: int, active: str = "") -> str:
        return f"{n:,} {active}id{'s' if n != 1 else ''}"

    for key, label, _, fmt in figures:
        cells = []
        for n in ns:
            v = fig[(key, n)]
            cells.append(f"{ids(n)} {format(med(v), fmt)} ({format(min(v), fmt)}..{format(max(v), fmt)})")
        print(f"  {label:<48} " + "; ".join(cells))

    def ratio(key: str) -> float:
        return med(fig[(key, hi)]) / med(fig[(key, lo)])

    # µs per call at the most ids minus at 1 id, per run: what the cold keys cost each call
    extra = {
        kind: [1e6 / h - 1e6 / lo_ for lo_, h in zip(fig[(kind, lo)], fig[(kind, hi)], strict=True)]
        for kind in ("add", "floor")
    }
    print(f"add() items/s at {hi:,} ids / at {lo:,} id = {ratio('add'):.2f}  (target >= 0.9)")
    print(f"floor script calls/s at {hi:,} ids / at {lo:,} id = {ratio('floor'):.2f}")
    print(
        f"µs per call at {hi:,} ids minus at {lo:,} id: add() {med(extra['add']):+.1f}, "
        f"floor script {med(extra['floor']):+.1f}  (the same key, cold)"
    )
    print(f"claim.lua cost at {hi:,} ids / at {lo:,} id = {ratio('claim_usec'):.2f}  (expected about flat)")
    print(f"idle claim.lua cost at {hi:,} ids / at {lo:,} id = {ratio('idle_usec'):.2f}")

    records: list[Record] = []
    for key, label, unit, _ in figures:
        base_name = f"{label}, {ids(lo, 'active ')}"
        for n in ns:
            name = f"{label}, {ids(n, 'active ')}"
            if n == lo:
                records.append(record(SUITE, name, fig[(key, n)], unit))
                continue
            records.append(
                record(
                    SUITE,
                    name,
                    fig[(key, n)],
                    unit,
                    ratio=med(fig[(key, n)]) / med(fig[(key, lo)]),
                    ratio_of=base_name,
                    target="≥ 0.9" if key == "add" and n == hi else None,
                )
            )
    floor_name = f"floor script µs per call, {hi:,} active ids minus {lo:,}"
    records.append(record(SUITE, floor_name, extra["floor"], "µs"))
    records.append(
        record(
            SUITE,
            f"add() µs per call, {hi:,} active ids minus {lo:,}",
            extra["add"],
            "µs",
            ratio=med(extra["add"]) / med(extra["floor"]) if med(extra["floor"]) > 0 else None,
            ratio_of=floor_name,
        )
    )
    append_json(args.json, records)


if __name__ == "__main__":
    main()
