"""The ``redis-batcher`` command: worker daemon, inspection, manual flush and the demo.

Each ``cli_*`` module holds the commands of one topic and lists them in its ``COMMANDS``; a new
command module joins :data:`COMMAND_MODULES` below. The commands parse their options, call the
library (:mod:`redis_batcher.overview` and the ``Batcher``/``Processor`` API) and render what it
returns as text or JSON.
"""

from __future__ import annotations

import click

from . import cli_batches, cli_dead, cli_demo, cli_jobs, cli_worker, cli_workers

COMMAND_MODULES = (cli_worker, cli_workers, cli_batches, cli_dead, cli_jobs, cli_demo)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="redis-batcher")
def main() -> None:
    """Batch items in Redis and deliver them to handlers."""


for _module in COMMAND_MODULES:
    for _command in _module.COMMANDS:
        main.add_command(_command)
