"""The job dashboard at `/`: every job of the caller with a live progress bar, counts by state, tokens/s,
ETA, its first failures, a cancel button and download links. Server-rendered HTML that reloads itself
every two seconds: no front-end build, no script. Its cancel is safe from other sites' pages, and no page
can frame it (browsers.py).
"""

from __future__ import annotations

from html import escape

from fastapi import FastAPI
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from producer import queries
from producer.api import batches, files
from producer.api.auth import Caller
from schema.settings import Settings

RATE_WINDOW_S = 30  # tokens/s and ETA over the last half minute
RECENT_RATE = text(f"""
    SELECT coalesce(sum(completion_tokens), 0) AS tokens, count(*) AS finished
    FROM results WHERE job_id = :job_id AND created_at > now() - interval '{RATE_WINDOW_S} seconds'
""")
STATES = ("queued", "running", "succeeded", "failed", "dead", "cancelled", "expired")
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem; color: #222; }
table { border-collapse: collapse; width: 100%; } td, th { padding: .4rem .6rem; border-bottom: 1px solid #ddd;
text-align: left; vertical-align: top; } progress { width: 12rem; height: 1rem; } .status { font-weight: 600; }
.failures { font-size: .85rem; color: #a00; } form { display: inline; } code { font-size: .85rem; }
"""


def eta(remaining: int, finished_recently: int) -> str:
    if remaining == 0:
        return "—"
    if finished_recently == 0:
        return "?"
    seconds = round(remaining * RATE_WINDOW_S / finished_recently)
    return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m {seconds % 60:02d}s"


def job_row(session: Session, job, directory) -> str:
    progress = batches.progress_of(session, job.id)
    recent = session.execute(RECENT_RATE, {"job_id": job.id}).mappings().one()
    counts = " · ".join(f"{state} {getattr(progress, state)}" for state in STATES if getattr(progress, state))
    remaining = progress.queued + progress.running
    failures = "".join(f"<div>line {error.first_line}: <code>{escape(error.code)}</code> {escape(error.first_message)}"
                       f"{f' (and {error.count - 1} more)' if error.count > 1 else ''}</div>"
                       for error in queries.failed_lines(session, job.id)[:3])
    actions = ""
    output_id, error_id = files.batch_files(session, job, progress, directory)
    if output_id:
        actions = f'<a href="/dashboard/files/{output_id}">results</a>'
        if error_id:
            actions += f' · <a href="/dashboard/files/{error_id}">errors</a>'
    elif progress.status != "cancelling":
        actions = (f'<form method="post" action="/dashboard/batches/{job.id}/cancel">'
                   f'<button type="submit">cancel</button></form>')
    return (f'<tr id="{job.id}"><td><code>{job.id}</code><br><small>{escape(job.input_file_id or job.input_file)}'
            f'</small></td><td class="status">{progress.status}</td>'
            f'<td><progress value="{progress.finished}" max="{max(progress.total, 1)}"></progress> '
            f'<span class="done">{progress.finished}/{progress.total}</span><br><small>{counts}</small></td>'
            f'<td>{recent["tokens"] / RATE_WINDOW_S:.1f}</td><td>{eta(remaining, recent["finished"])}</td>'
            f'<td class="failures">{failures}</td><td>{actions}</td></tr>')


def add_dashboard(app: FastAPI, settings: Settings, sessions: sessionmaker[Session]) -> None:
    directory = settings.stored_files_dir

    @app.get("/", response_class=HTMLResponse)
    def dashboard(owner: Caller) -> str:
        with sessions.begin() as session:
            rows = "".join(job_row(session, job, directory) for job in batches.list_jobs(session, owner, 50, None))
        return (f'<!doctype html><html><head><meta charset="utf-8"><meta http-equiv="refresh" content="2">'
                f"<title>DeepBatch jobs</title><style>{STYLE}</style></head><body><h1>DeepBatch jobs</h1>"
                f"<table><tr><th>job</th><th>status</th><th>progress</th><th>tokens/s</th><th>ETA</th>"
                f"<th>failures</th><th></th></tr>{rows or '<tr><td colspan=7>no jobs yet</td></tr>'}</table>"
                f"</body></html>")

    @app.post("/dashboard/batches/{batch_id}/cancel")
    def cancel(owner: Caller, batch_id: str) -> RedirectResponse:
        with sessions.begin() as session:
            if batches.owned_job(session, batch_id, owner) is not None:
                queries.cancel_job(session, batch_id, actor=f"dashboard:{owner}")
        return RedirectResponse("/", status_code=303)

    @app.get("/dashboard/files/{file_id}")
    def download(owner: Caller, file_id: str) -> FileResponse:
        with sessions() as session:
            row = files.owned_file(session, file_id, owner)
        if row is None or not (directory / file_id).is_file():
            return HTMLResponse("no such file", status_code=404)
        return FileResponse(directory / file_id, media_type="application/jsonl", filename=row.filename)
