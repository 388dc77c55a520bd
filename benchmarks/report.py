"""Benchmark results: the JSON-lines records, the summary table and BENCHMARKS.md.

With ``--json PATH`` every benchmark appends one JSON object per line per figure::

    {"suite": "add_path", "figure": "add() items/s", "median": 2584.0, "min": 2490.1,
     "max": 2650.7, "unit": "items/s", "ratio": 0.70, "ratio_of": "bare RPUSH x1 items/s",
     "target": "≥ 0.80", "met": false, "lost": null, "duplicates": null}

``median``/``min``/``max`` are over the runs (at least 3 by default). ``ratio`` compares the
median with a baseline measured in the same run (``ratio_of`` names that baseline's figure).
``target`` is checked against ``ratio`` when there is one, else against ``median``. ``lost`` and
``duplicates`` count items a delivery benchmark lost or delivered twice (null elsewhere).

``python -m benchmarks`` collects these records, prints :func:`summary_table` and writes
BENCHMARKS.md with :func:`write_report` (machine, versions, command, table, chart).
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

# the sample item every add benchmark sends (~95 bytes of msgpack)
ITEM = {
    "user": "user:000042",
    "type": "click",
    "page": "/products/12345?ref=home",
    "ts": 1795876429.123,
    "session": "9f8e7d6c5b4a",
    "n": 0,
}

Record = dict[str, Any]

FIELDS = (
    "suite", "figure", "median", "min", "max", "unit",
    "ratio", "ratio_of", "target", "met", "lost", "duplicates",
)  # fmt: skip

_TARGET = re.compile(r"^\s*(≥|≤|>=|<=)\s*(-?\d+(?:\.\d+)?)")


def exit_on_sigterm() -> None:
    """SIGTERM (from ``python -m benchmarks`` stopping a suite, or a user) unwinds like Ctrl-C:
    every ``finally`` and context manager runs, so the suite's redis-server and other
    processes are stopped rather than left behind."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def check(target: str | None, value: float | None) -> bool | None:
    """Whether ``value`` meets a target such as ``"≥ 0.80"`` or ``"≤ 20 ms"`` (None: no target)."""
    if target is None or value is None or not math.isfinite(value):
        return None
    found = _TARGET.match(target)
    if not found:
        raise ValueError(f"unreadable target {target!r} (expected e.g. '≥ 0.80' or '≤ 20 ms')")
    op, bound = found.group(1), float(found.group(2))
    return value >= bound if op in ("≥", ">=") else value <= bound


def record(
    suite: str,
    figure: str,
    values: Sequence[float],
    unit: str,
    *,
    ratio: float | None = None,
    ratio_of: str | None = None,
    target: str | None = None,
    lost: int | None = None,
    duplicates: int | None = None,
) -> Record:
    """One figure: median, min and max of ``values`` (one per run), and its target checked."""
    if not values:
        raise ValueError(f"{suite}/{figure}: no values")
    median = float(statistics.median(values))
    return {
        "suite": suite,
        "figure": figure,
        "median": median,
        "min": float(min(values)),
        "max": float(max(values)),
        "unit": unit,
        "ratio": None if ratio is None else float(ratio),
        "ratio_of": ratio_of,
        "target": target,
        "met": check(target, ratio if ratio is not None else median),
        "lost": lost,
        "duplicates": duplicates,
    }


def append_json(path: str | os.PathLike[str] | None, records: Iterable[Record]) -> None:
    """Append records to ``path`` as JSON lines (nothing when path is None)."""
    if path is None:
        return
    with open(path, "a", encoding="utf-8") as out:
        for rec in records:
            out.write(json.dumps({k: rec.get(k) for k in FIELDS}, ensure_ascii=False) + "\n")


def read_json(path: str | os.PathLike[str]) -> list[Record]:
    """Records from a JSON-lines file (blank lines skipped)."""
    text = Path(path).read_text(encoding="utf-8") if Path(path).exists() else ""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


# -- formatting ---------------------------------------------------------------------------------


def num(value: float | None) -> str:
    """A figure for a table: thousands separators for large values, 2 decimals for small ones."""
    if value is None:
        return ""
    if not math.isfinite(value):
        return str(value)
    mag = abs(value)
    if mag >= 1000:
        return f"{value:,.0f}"
    if mag >= 100:
        return f"{value:.0f}"
    if mag >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _met(rec: Record) -> str:
    met = rec.get("met")
    return "" if met is None else ("yes" if met else "NO")


def _ratio(rec: Record) -> str:
    if rec.get("ratio") is None:
        return ""
    return f"{rec['ratio']:.2f}" + (f" of {rec['ratio_of']}" if rec.get("ratio_of") else "")


def summary_table(records: Sequence[Record]) -> str:
    """A plain-text table of every figure, for the terminal."""
    head = ("suite", "figure", "median", "min", "max", "unit", "ratio", "target", "met")
    rows = [
        (
            r["suite"], r["figure"], num(r["median"]), num(r["min"]), num(r["max"]), r["unit"],
            "" if r.get("ratio") is None else f"{r['ratio']:.2f}", r.get("target") or "", _met(r),
        )
        for r in records
    ]  # fmt: skip
    widths = [max(len(str(row[i])) for row in [head, *rows]) for i in range(len(head))]
    numeric = {2, 3, 4, 6}

    def line(row: Sequence[str]) -> str:
        cells = [
            str(c).rjust(w) if i in numeric else str(c).ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        return "  ".join(cells).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(head), rule, *(line(r) for r in rows)])


def misses(records: Sequence[Record]) -> list[Record]:
    return [r for r in records if r.get("met") is False]


# -- the machine and versions -------------------------------------------------------------------


def machine() -> dict[str, str]:
    """nproc, memory, CPU model and kernel of this machine."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "unknown"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
                break
    except OSError:
        pass
    return {
        "cores (nproc)": str(os.cpu_count() or "unknown"),
        "memory": mem,
        "CPU": cpu,
        "kernel": f"{platform.system()} {platform.release()}",
    }


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def redis_server_version() -> str:
    from redis_batcher.testing import find_redis_server

    binary = find_redis_server()
    if not binary:
        return "not found"
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{binary} ({exc})"
    found = re.search(r"v=(\S+)", out)
    malloc = re.search(r"malloc=(\S+)", out)
    return f"{found.group(1) if found else out.strip()} ({binary}{', ' + malloc.group(1) if malloc else ''})"


def versions() -> dict[str, str]:
    """Python, redis-server and the Python packages the figures depend on."""
    out = {
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "redis-server": redis_server_version(),
    }
    for label, dist in (
        ("redis-py", "redis"),
        ("msgpack", "msgpack"),
        ("redis-batcher", "redis-batcher"),
        ("celery", "celery"),
        ("celery-batches", "celery-batches"),
    ):
        version = _dist_version(dist)
        if version is not None:
            out[label] = version
        elif label not in ("celery", "celery-batches"):
            out[label] = "not installed"
    return out


# -- the chart ----------------------------------------------------------------------------------


def chart(records: Sequence[Record], path: Path) -> str:
    """Bar chart (PNG) of end-to-end items/s of redis-batcher and its peers; returns a note on
    what was charted. Without end_to_end figures, charts every items/s figure there is."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rate = [r for r in records if r["unit"] == "items/s"]
    chosen = [r for r in rate if r["suite"] == "end_to_end"]
    # one bar per measurement: a figure repeated under another name (to carry a second ratio) once
    seen: set[tuple[str, float, float, float]] = set()
    unique = []
    for r in chosen:
        key = (r["suite"], r["median"], r["min"], r["max"])
        if key not in seen:
            seen.add(key)
            unique.append(r)
    chosen = unique
    if chosen:
        title = "End-to-end throughput: redis-batcher vs peers (median, min-max)"
        note = "end-to-end items/s of every system of the end_to_end suite"
        labels = [r["figure"] for r in chosen]
    else:
        chosen = rate
        title = "items/s figures (no end_to_end suite results in this run)"
        note = "the end_to_end suite has no results in this run, so the chart shows every items/s figure"
        labels = [f"{r['suite']}: {r['figure']}" for r in chosen]
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(9, 0.45 * max(4, len(chosen)) + 1.2))
    if chosen:
        med = [r["median"] for r in chosen]
        err = [
            [max(0.0, r["median"] - r["min"]) for r in chosen],
            [max(0.0, r["max"] - r["median"]) for r in chosen],
        ]
        colors = ["#c0392b" if re.search(r"redis[-_ ]batcher", lab, re.I) else "#5d6d7e" for lab in labels]
        ypos = list(range(len(chosen)))
        ax.barh(ypos, med, xerr=err, color=colors, capsize=3)
        ax.set_yticks(ypos, labels=labels, fontsize=8)
        ax.invert_yaxis()
        # each label just past the bar's max whisker, so the two never overlap
        ends = [max(v, r["max"]) for v, r in zip(med, chosen, strict=True)]
        for y, v, end in zip(ypos, med, ends, strict=True):
            ax.text(end * 1.04, y, f"{v:,.0f}", va="center", fontsize=8)
        positive = [v for v in med if v > 0]
        log = bool(positive) and max(positive) / min(positive) > 50
        if log:
            ax.set_xscale("log")
        if max(ends) > 0:  # room for the longest bar's label
            ax.set_xlim(right=max(ends) * (4.0 if log else 1.2))
        ax.set_xlabel("items/s (higher is better)" + (", log scale" if log else ""))
    else:
        ax.text(0.5, 0.5, "no items/s figures", ha="center", va="center")
        note = "no items/s figures in this run"
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return note


# -- BENCHMARKS.md -------------------------------------------------------------------------------


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def markdown(
    records: Sequence[Record],
    command: str,
    notes: Sequence[str] = (),
    chart_rel: str | None = None,
    chart_note: str | None = None,
    outputs: Mapping[str, str] | None = None,
) -> str:
    lines = [
        "# Benchmarks",
        "",
        f"Generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC} by:",
        "",
        "```bash",
        command,
        "```",
        "",
        "Every figure is the median of the runs shown by min and max (at least 3 runs unless "
        "`--quick`); a ratio compares the median with a baseline measured side by side in the same "
        "run (the figure it is a ratio *of* is named). A target applies to the ratio when there is "
        "one, else to the median. On a shared machine, read the ratios.",
        "",
        "## Machine",
        "",
        *(f"- {k}: {v}" for k, v in machine().items()),
        "",
        "## Versions",
        "",
        *(f"- {k}: {v}" for k, v in versions().items()),
        "",
        "## Figures",
        "",
        "| suite | figure | median | min | max | unit | ratio | target | met |",
        "|---|---|---:|---:|---:|---|---|---|---|",
    ]
    for r in records:
        extra = []
        if r.get("lost") is not None:
            extra.append(f"lost {r['lost']}")
        if r.get("duplicates") is not None:
            extra.append(f"duplicates {r['duplicates']}")
        figure = r["figure"] + (f" ({', '.join(extra)})" if extra else "")
        cells = (
            r["suite"], figure, num(r["median"]), num(r["min"]), num(r["max"]), r["unit"],
            _ratio(r), r.get("target") or "", _met(r),
        )  # fmt: skip
        lines.append("| " + " | ".join(_md_escape(c) for c in cells) + " |")
    missed = misses(records)
    lines += ["", "Targets missed: " + (", ".join(f"{m['suite']}/{m['figure']}" for m in missed) or "none")]
    if notes:
        lines += ["", "## Notes", "", *(f"- {n}" for n in notes)]
    if chart_rel:
        lines += ["", "## Chart", "", f"![end-to-end throughput]({chart_rel})", ""]
        if chart_note:
            lines.append(f"Chart: {chart_note}.")
    if outputs:
        lines += ["", "## Output of each benchmark", ""]
        for name, text in outputs.items():
            lines += [
                f"<details><summary>{name}</summary>",
                "",
                "```text",
                text.rstrip(),
                "```",
                "",
                "</details>",
                "",
            ]
    return "\n".join(lines).rstrip() + "\n"


def write_report(
    out: Path,
    records: Sequence[Record],
    command: str,
    chart_path: Path,
    notes: Sequence[str] = (),
    outputs: Mapping[str, str] | None = None,
) -> None:
    """Write BENCHMARKS.md at ``out`` and the chart at ``chart_path`` (linked relatively)."""
    note = chart(records, chart_path)
    rel = os.path.relpath(chart_path, out.resolve().parent)
    out.write_text(markdown(records, command, notes, rel, note, outputs), encoding="utf-8")


def command_line(argv: Sequence[str] | None = None) -> str:
    """How this run was started, as a shell command (with $REDIS_SERVER when set)."""
    args = list(sys.argv[1:] if argv is None else argv)
    env = f"REDIS_SERVER={os.environ['REDIS_SERVER']} " if os.environ.get("REDIS_SERVER") else ""
    return f"{env}python -m benchmarks {' '.join(args)}".rstrip()
