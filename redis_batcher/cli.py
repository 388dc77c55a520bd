"""The ``redis-batcher`` command: worker daemon, inspection, manual flush and the demo.

Each ``cli_*`` module holds the commands of one topic and lists them in its ``COMMANDS``; a new
command module joins :data:`COMMAND_MODULES` below. The commands parse their options, call the
library (:mod:`redis_batcher.overview` and the ``Batcher``/``Processor`` API) and render what it
returns as text or JSON.

Exit status: 0 done, 1 failed (one line on stderr), 2 bad usage. The ``main`` group turns the
errors an operator can fix (:func:`~redis_batcher.cli_common.error_line`) into that one line;
``--debug`` shows their traceback instead.
"""

from __future__ import annotations

import traceback
from typing import Any

import click

from . import (
    cli_batches,
    cli_common,
    cli_dashboard,
    cli_dead,
    cli_demo,
    cli_jobs,
    cli_top,
    cli_worker,
    cli_workers,
)

COMMAND_MODULES = (
    cli_worker,
    cli_workers,
    cli_top,
    cli_batches,
    cli_dead,
    cli_jobs,
    cli_dashboard,
    cli_demo,
)


class Main(click.Group):
    """The command group that reports an operator's error as one line (exit status 1)."""

    def invoke(self, ctx: click.Context) -> Any:
        debug = bool(ctx.params.get("debug"))
        try:
            return super().invoke(ctx)
        except click.ClickException as exc:
            if debug and exc.__cause__ is not None:  # a library error made a usage or command error
                traceback.print_exception(exc.__cause__)
            raise
        except Exception as exc:
            line = cli_common.error_line(exc, ctx.meta.get(cli_common.TARGET))
            if line is None or debug:
                raise
            raise click.ClickException(line) from exc


@click.group(cls=Main, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="redis-batcher")
@click.option("--debug", is_flag=True, help="Show the traceback of an error.")
def main(debug: bool) -> None:
    """Batch items in Redis and deliver them to handlers.

    Exit status: 0 done, 1 failed (one line on stderr: --debug shows the traceback), 2 bad usage.
    """


for _module in COMMAND_MODULES:
    for _command in _module.COMMANDS:
        main.add_command(_command)
