"""The `deepbatch` command: a module per command group, assembled here.

jobs.py: submit, status, cancel, jobs, results. services.py: run, worker, serve, flower. admin.py: migrate,
keys, reconcile, dlq, audit. retention.py: purge (old finished jobs). workers.py: workers (the registry).
progress.py: a job's progress bar and counts. common.py: the settings, a command's database sessions, errors.

Errors print one clear line and exit non-zero: 1 for a failed operation, 2 for bad usage (typer's).

The command modules import at their top only typer, rich and each other; a command imports the rest (the
database layer, the Celery app's module, the engine's checks) when it runs, so `deepbatch --help` and each
command load only what they use.
"""

from __future__ import annotations

import typer

from producer.cli import admin, jobs, retention, services, workers

cli = typer.Typer(help="DeepBatch: bulk LLM inference on your own GPUs.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
cli.add_typer(jobs.commands)
cli.add_typer(services.commands)
cli.add_typer(admin.commands)
cli.add_typer(retention.commands)
cli.add_typer(workers.commands)


def main() -> None:
    cli()
