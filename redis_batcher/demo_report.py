"""What ``redis-batcher demo`` shows: its live progress and its summary (with the latency
percentiles, loss and duplicate counts it judges the run by), rendered for rich."""

from __future__ import annotations

import math
from dataclasses import dataclass

from rich.console import Group
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text


@dataclass
class Progress:
    """What the live view shows while the demo runs."""

    added: int = 0
    delivered: int = 0
    unique: int = 0
    flushes: int = 0
    elapsed: float = 0.0


@dataclass
class Summary:
    """A finished run: counts, wall time and the latency samples (ms)."""

    items: int
    added: int
    delivered: int
    unique: int
    flushes: int
    wall_time: float
    latencies: list[float]

    @property
    def lost(self) -> int:
        return self.items - self.unique

    @property
    def duplicates(self) -> int:
        return self.delivered - self.unique

    @property
    def mean_batch_size(self) -> float:
        return self.delivered / self.flushes if self.flushes else 0.0

    @property
    def throughput(self) -> float:
        return self.unique / self.wall_time if self.wall_time > 0 else 0.0

    def percentile(self, p: float) -> float | None:
        """Nearest-rank percentile of the latency samples (ms)."""
        if not self.latencies:
            return None
        ordered = sorted(self.latencies)
        rank = max(1, math.ceil(p / 100.0 * len(ordered)))
        return ordered[rank - 1]


def render_progress(progress: Progress, total: int, header: str) -> Group:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column(width=40)
    grid.add_column(justify="right")
    for label, count in (("added", progress.added), ("delivered", progress.unique)):
        grid.add_row(label, ProgressBar(total=total, completed=count), f"{count:,} / {total:,}")
    rate = progress.unique / progress.elapsed if progress.elapsed > 0 else 0.0
    grid.add_row("flushes", "", f"{progress.flushes:,}")
    grid.add_row("throughput", "", f"{rate:,.0f} items/s")
    grid.add_row("elapsed", "", f"{progress.elapsed:.1f} s")
    return Group(Text(header, style="dim"), grid)


def summary_table(s: Summary) -> Table:
    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:,.1f}"

    table = Table(title="redis-batcher demo summary")
    table.add_column("metric")
    table.add_column("value", justify="right")
    rows = [
        ("items", f"{s.items:,}"),
        ("added", f"{s.added:,}"),
        ("delivered", f"{s.delivered:,}"),
        ("flushes", f"{s.flushes:,}"),
        ("mean batch size", f"{s.mean_batch_size:,.1f}"),
        ("wall time", f"{s.wall_time:.2f} s"),
        ("throughput", f"{s.throughput:,.0f} items/s"),
        ("latency p50", f"{ms(s.percentile(50))} ms"),
        ("latency p99", f"{ms(s.percentile(99))} ms"),
        ("lost", f"{s.lost:,}"),
        ("duplicates", f"{s.duplicates:,}"),
    ]
    for name, value in rows:
        style = "red" if (name == "lost" and s.lost) or (name == "duplicates" and s.duplicates) else None
        table.add_row(name, value, style=style)
    return table
