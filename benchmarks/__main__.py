"""Run the benchmark suites in sequence and report every figure.

    python -m benchmarks [--quick] [--only NAME ...] [--out BENCHMARKS.md] [--json PATH]

Each suite runs as a subprocess (``python -m benchmarks.<name> [--quick] --json TMP``) that
starts its own redis-server on a free loopback port; a suite whose module does not exist yet is
skipped with a note. The JSON-lines figures of all suites (see ``benchmarks/report.py``) are
collected, printed as a summary table and, unless --quick, written to BENCHMARKS.md in the
repository root together with the machine, the versions, this command and a chart
(``benchmarks/end_to_end.png``). --quick is a smoke run (well under a minute) that writes no
BENCHMARKS.md unless --out is given. Exit status 1 if a suite failed (targets missed do not
fail the run: they are reported).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.report import (
    Record,
    append_json,
    command_line,
    exit_on_sigterm,
    misses,
    read_json,
    summary_table,
    write_report,
)

ROOT = Path(__file__).resolve().parent.parent
SUITES = ("machine", "add_path", "async_add", "cluster", "worker", "memory", "scale", "end_to_end")


def exists(name: str) -> bool:
    return (ROOT / "benchmarks" / f"{name}.py").is_file()


def run_suite(name: str, quick: bool, json_path: Path) -> tuple[int, str, float]:
    """Run one suite, echoing its output as it comes; (exit status, output, seconds)."""
    cmd = [
        sys.executable,
        "-m",
        f"benchmarks.{name}",
        *(["--quick"] if quick else []),
        "--json",
        str(json_path),
    ]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    t0 = time.perf_counter()
    lines: list[str] = []
    with subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    ) as proc:
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                lines.append(line)
                print(f"  | {line}", end="", flush=True)
            status = proc.wait()
        except BaseException:
            proc.terminate()
            proc.wait(timeout=30)
            raise
    return status, "".join(lines), time.perf_counter() - t0


def default_chart(out: Path | None) -> Path:
    """Where the chart goes without --chart: the committed one only for the committed report."""
    committed = ROOT / "benchmarks" / "end_to_end.png"
    if out is None or out.resolve() == (ROOT / "BENCHMARKS.md").resolve():
        return committed
    return out.with_suffix(".png")


def main() -> None:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="smoke run of every suite; no BENCHMARKS.md")
    ap.add_argument(
        "--only", nargs="+", choices=SUITES, metavar="NAME", help=f"suites to run: {', '.join(SUITES)}"
    )
    ap.add_argument(
        "--out", type=Path, help="report path (default: BENCHMARKS.md in the repository, not with --quick)"
    )
    ap.add_argument(
        "--chart",
        type=Path,
        help="chart PNG path (default: benchmarks/end_to_end.png for BENCHMARKS.md, "
        "else beside --out as <out>.png, so a trial run never overwrites the committed chart)",
    )
    ap.add_argument("--json", type=Path, metavar="PATH", help="also write every figure as JSON lines to PATH")
    args = ap.parse_args()
    exit_on_sigterm()  # stopped: the running suite is terminated too (run_suite), then we exit
    out: Path | None = args.out if args.out else (None if args.quick else ROOT / "BENCHMARKS.md")
    chart_path: Path = args.chart or default_chart(out)
    command = command_line()
    wanted = [s for s in SUITES if args.only is None or s in args.only]

    records: list[Record] = []
    outputs: dict[str, str] = {}
    notes: list[str] = []
    failed: list[str] = []
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="rb-bench-") as tmp:
        for name in wanted:
            if not exists(name):
                note = f"{name}: skipped, benchmarks/{name}.py does not exist yet"
                print(f"== {note}", flush=True)
                notes.append(note)
                continue
            print(f"== {name}{' --quick' if args.quick else ''}", flush=True)
            path = Path(tmp) / f"{name}.jsonl"
            status, text, seconds = run_suite(name, args.quick, path)
            got = read_json(path)
            outputs[name] = text
            print(f"== {name}: exit {status}, {len(got)} figures, {seconds:.1f} s", flush=True)
            if status != 0:
                failed.append(name)
                notes.append(f"{name}: FAILED with exit status {status} (figures it wrote are kept)")
            elif not got:
                failed.append(name)
                notes.append(f"{name}: wrote no figures")
            records += got
    elapsed = time.perf_counter() - t_all

    print()
    print(f"summary ({len(records)} figures from {len(outputs)} suite(s) in {elapsed:.0f} s):")
    print(summary_table(records) if records else "(no figures)")
    missed = misses(records)
    print("targets missed: " + (", ".join(f"{m['suite']}/{m['figure']}" for m in missed) or "none"))
    for note in notes:
        print(f"note: {note}")
    if args.json:
        args.json.unlink(missing_ok=True)
        append_json(args.json, records)
    if out is not None:
        write_report(out, records, command, chart_path, notes, outputs)
        print(f"wrote {out} and {chart_path}")
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
