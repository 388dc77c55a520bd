"""``redis-batcher demo``: producers and a worker on a throwaway redis-server (:mod:`.demo`)."""

from __future__ import annotations

import sys
from typing import Any

import click

from .cli_common import console


@click.command()
@click.option("--redis-url", default=None, help="Use this Redis instead of a throwaway redis-server.")
@click.option("--items", type=click.IntRange(min=1), default=20_000, show_default=True, help="Items to add.")
@click.option("--producers", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--batch-ids", "batch_ids", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--max-batch-size", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--flush-interval", type=click.FloatRange(min=0, min_open=True), default=0.5, show_default=True)
def demo(**options: Any) -> None:
    """Run producers and a worker against a throwaway redis-server and report throughput."""
    from .demo import run_demo  # not at the top: it makes its batcher when imported

    sys.exit(run_demo(console=console, **options))


COMMANDS: tuple[click.Command, ...] = (demo,)
