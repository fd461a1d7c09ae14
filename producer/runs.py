"""Which job a `deepbatch run` of a file works on, and on which broker queue.

A run that is interrupted (Ctrl-C, SIGTERM, a closed terminal) or killed leaves its job unfinished in the
data directory's database. The next run of the same file goes on with that job, so only what is left
runs and every line is answered once; `--new` cancels it and starts over. An unfinished job of another
file is reported (how to go on with it or cancel it) and left alone.

Each file's runs use a queue of their own, `<DEEPBATCH_QUEUE_NAME>-run-<digest of the file's path>`, so
an abandoned job of another file never stands ahead of this run's requests. The name is outside the
deployment's queues (`<DEEPBATCH_QUEUE_NAME>` and `<DEEPBATCH_QUEUE_NAME>.<model>`): a `submit` into the same
database never routes to a run's worker, whose queue nobody consumes once the run ends; and only jobs on
such queues count as runs, so a `run` never takes over, nor cancels, a job that `submit` made. A higher priority for the
new job would let it overtake the backlog too, but the run's worker would still claim the abandoned
job's requests whenever it had room (while this job waits out a retry, or as it winds down, finishing
what it holds before it can stop), and it would take the meaning of `--priority` over for housekeeping.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from producer import queries
from producer.staging import FilePrefix, SubmitError
from schema.settings import Settings


def run_queue(base_queue: str, path: Path) -> str:
    """The broker queue of the runs of the file at `path` (absolute)."""
    return f"{run_queue_prefix(base_queue)}{hashlib.sha256(str(path).encode()).hexdigest()[:12]}"


def run_queue_prefix(base_queue: str) -> str:
    return f"{base_queue}-run-"


@dataclass(frozen=True)
class UnfinishedRuns:
    """What earlier runs left: the newest unfinished job of this file, if any, and those of other files."""

    this_file: queries.UnfinishedJob | None
    other_files: list[queries.UnfinishedJob]


def unfinished_runs(session: Session, path: Path, base_queue: str) -> UnfinishedRuns:
    jobs = queries.unfinished_jobs(session, run_queue_prefix(base_queue))
    mine = [job for job in jobs if job.input_file == str(path)]
    return UnfinishedRuns(mine[0] if mine else None, [job for job in jobs if job.input_file != str(path)])


def stored_part_unchanged(path: Path, job: queries.UnfinishedJob) -> bool:
    """Whether the file still begins with the bytes the job stored (their sha256 is kept with the job)."""
    if not job.submitted_bytes:
        return True
    try:
        with path.open("rb") as stream:
            return FilePrefix().extend(stream, job.submitted_bytes) == job.submitted_sha256
    except SubmitError:  # the file is shorter now
        return False


def publish_what_is_left(settings: Settings, sessions: sessionmaker[Session], job_id: str) -> int:
    """Publish the job's queued requests again: the broker may have lost them with the run that was killed
    (a slice is a right to claim, so a message too many claims nothing twice). Returns how many."""
    from worker.app import make_celery_app, publish_groups, publish_slices
    from worker.transitions import queued_request_ids

    with sessions() as session:
        suspect_groups, others = queued_request_ids(session, settings.queue_name, timedelta(0), job_id)
    app = make_celery_app(settings)
    publish_slices(app, others, settings.slice_size)
    publish_groups(app, suspect_groups)
    return len(others) + sum(len(group) for group in suspect_groups.values())
