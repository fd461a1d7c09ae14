"""The job dashboard at `/`: every job of the caller with a live progress bar, counts by state, tokens/s,
ETA, its first failures, a cancel button and download links; below them, the workers of the registry
(worker/registry.py): model, devices, batch, queue, live or stale. Server-rendered HTML that reloads itself
every two seconds: no front-end build, no script. A refresh is one query (store.dashboard_page) whatever
the number of jobs. Its cancel and downloads are the API's (batches.cancel, files.readable_file) answered
for a browser: a redirect back, a plain 404. Other sites' pages can neither post to it nor frame it
(browsers.py).
"""

from __future__ import annotations

from html import escape

from fastapi import APIRouter
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse

from producer.api import batches, files, outputs, store
from producer.api.auth import Caller
from producer.api.dependencies import Db, FilesDirectory, ServerSettings
from producer.queries import ERROR_STATES
from schema.tables import RequestState
from worker.registry import RegisteredWorker, registered_workers

JOBS_SHOWN, FAILURES_SHOWN = 50, 3
RATE_WINDOW_S = 30  # tokens/s and ETA over the last half minute
DONE_STATUSES = ("completed", "failed", "expired", "cancelled")  # queries.JobProgress.done
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem; color: #222; }
table { border-collapse: collapse; width: 100%; } td, th { padding: .4rem .6rem; border-bottom: 1px solid #ddd;
text-align: left; vertical-align: top; } progress { width: 12rem; height: 1rem; } .status { font-weight: 600; }
.failures { font-size: .85rem; color: #a00; } form { display: inline; } code { font-size: .85rem; }
"""
HEADER = ("<tr><th>job</th><th>status</th><th>progress</th><th>tokens/s</th><th>ETA</th><th>failures</th>"
          "<th></th></tr>")

router = APIRouter()


def eta(remaining: int, finished_recently: int) -> str:
    if remaining == 0:
        return "—"
    if finished_recently == 0:
        return "?"
    seconds = round(remaining * RATE_WINDOW_S / finished_recently)
    return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m {seconds % 60:02d}s"


def failure_html(code: str, count: int, first_line: int, first_message: str) -> str:
    more = f" (and {count - 1} more)" if count > 1 else ""
    message = escape(first_message or "")
    return f"<div>line {first_line}: <code>{escape(code)}</code> {message}{more}</div>"


def actions_html(job: store.DashboardRow) -> str:
    """Links to the results and errors of a job that ended; a cancel button while it runs."""
    if job.status in DONE_STATUSES:
        output_id, errors_id = outputs.output_file_ids(job.id)
        links = f'<a href="/dashboard/files/{output_id}">results</a>'
        if any(getattr(job, state.value) for state in ERROR_STATES):  # what the error file holds
            links += f' · <a href="/dashboard/files/{errors_id}">errors</a>'
        return links
    if job.status == "cancelling":
        return ""
    return f'<form method="post" action="/dashboard/batches/{job.id}/cancel"><button type="submit">cancel</button></form>'


def job_html(job: store.DashboardRow) -> str:
    """A job's row of the table."""
    counts = " · ".join(f"{state.value} {getattr(job, state.value)}" for state in RequestState
                        if getattr(job, state.value))
    failures = "".join(failure_html(**failure) for failure in job.failures)
    return (f'<tr id="{job.id}"><td><code>{job.id}</code><br><small>{escape(job.input_file)}</small></td>'
            f'<td class="status">{job.status}</td>'
            f'<td><progress value="{job.finished}" max="{max(job.total, 1)}"></progress> '
            f'<span class="done">{job.finished}/{job.total}</span><br><small>{counts}</small></td>'
            f'<td>{job.recent_tokens / RATE_WINDOW_S:.1f}</td>'
            f'<td>{eta(job.queued + job.running, job.recent_finished)}</td>'
            f'<td class="failures">{failures}</td><td>{actions_html(job)}</td></tr>')


WORKERS_HEADER = ("<tr><th>worker</th><th>status</th><th>model</th><th>devices</th><th>max batch</th>"
                  "<th>KV cache tokens</th><th>queue</th><th>heartbeat</th></tr>")


def worker_html(worker: RegisteredWorker) -> str:
    """A worker's row: what it serves, where, and whether it is live."""
    also = f"<br><small>also {escape(', '.join(worker.aliases))}</small>" if worker.aliases else ""
    details = " · ".join(escape(str(part)) for part in (worker.architecture, worker.quantization, worker.dtype,
                                                        f"tp {worker.tensor_parallel_size}") if part)
    return (f'<tr class="worker {worker.status}"><td><code>{escape(worker.id)}</code></td>'
            f'<td class="status">{worker.status}</td><td>{escape(worker.model)}{also}<br><small>{details}</small></td>'
            f"<td>{escape(', '.join(worker.devices))}</td><td>{worker.max_batch_size or ''}</td>"
            f"<td>{worker.kv_cache_tokens or ''}</td><td><code>{escape(worker.queue)}</code></td>"
            f"<td>{int(worker.heartbeat_age_s)} s ago</td></tr>")


@router.get("/", response_class=HTMLResponse)
def dashboard(owner: Caller, session: Db, settings: ServerSettings) -> str:
    jobs = store.dashboard_page(session, owner, JOBS_SHOWN, RATE_WINDOW_S, FAILURES_SHOWN)
    rows = "".join(job_html(job) for job in jobs) or "<tr><td colspan=7>no jobs yet</td></tr>"
    workers = "".join(worker_html(worker) for worker in registered_workers(session, settings)) or \
        "<tr><td colspan=8>no worker has announced itself yet</td></tr>"
    return (f'<!doctype html><html><head><meta charset="utf-8"><meta http-equiv="refresh" content="2">'
            f"<title>DeepBatch jobs</title><style>{STYLE}</style></head><body><h1>DeepBatch jobs</h1>"
            f"<table>{HEADER}{rows}</table>"
            f'<h2>Workers</h2><table id="workers">{WORKERS_HEADER}{workers}</table></body></html>')


@router.post("/dashboard/batches/{batch_id}/cancel")
def cancel(owner: Caller, session: Db, batch_id: str) -> RedirectResponse:
    batches.cancel(session, batch_id, owner, actor=f"dashboard:{owner}")
    return RedirectResponse("/", status_code=303)


@router.get("/dashboard/files/{file_id}")
def download(owner: Caller, session: Db, directory: FilesDirectory, file_id: str) -> FileResponse:
    row = files.readable_file(session, file_id, owner, directory)
    return (row and files.content_response(row, directory)) or HTMLResponse("no such file", status_code=404)
