"""`deepbatch workers`: the workers registry (worker/registry.py) — what each worker serves, where, and
whether it is live, stale (no heartbeat for DEEPBATCH_LEASE_S) or stopped."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from producer.cli.common import command_sessions, configured_settings

commands = typer.Typer()

COLUMNS = ("worker", "status", "model", "also", "architecture", "quantization", "devices", "dtype", "tp",
           "max batch", "KV cache tokens", "queue", "version", "started", "heartbeat")


def age(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s ago"
    return f"{seconds // 60}m ago" if seconds < 7200 else f"{seconds // 3600}h ago"


@commands.command()
def workers(
    everywhere: Annotated[bool, typer.Option("--all", help="every worker in the database, not only those of "
                                             "DEEPBATCH_QUEUE_NAME's queues")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """The workers that announced themselves: model, device, batch and queue, live, stale or stopped."""
    from worker.registry import registered_workers

    settings = configured_settings()
    with command_sessions(settings)() as session:
        rows = registered_workers(session, settings, everywhere)
    if as_json:
        print(json.dumps([{**row.row._asdict(), "status": row.status} for row in rows], default=str))
        return
    live = sum(row.status == "live" for row in rows)
    table = Table(*COLUMNS, title=f"{len(rows)} workers, {live} live")
    for row in rows:
        status = {"live": "[green]live[/]", "stale": "[red]stale[/]"}.get(row.status, row.status)
        table.add_row(row.id, status, row.model, ", ".join(row.aliases), row.architecture or "",
                      row.quantization or "", ", ".join(row.devices), row.dtype or "", str(row.tensor_parallel_size),
                      str(row.max_batch_size or ""), str(row.kv_cache_tokens or ""), row.queue, row.version or "",
                      f"{row.started_at:%Y-%m-%d %H:%M:%S}", age(row.heartbeat_age_s))
    Console(width=250).print(table)
