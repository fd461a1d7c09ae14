"""SQLAlchemy 2 typed tables: jobs, requests, results, audit events, dead letters, the workers registry.

Postgres is the source of truth: a request row's `state` is authoritative, the broker only carries
request ids. Alembic's versions/ create exactly these tables (a test compares the two).
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class RequestState(str, enum.Enum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    dead = "dead"
    cancelled = "cancelled"
    expired = "expired"  # still queued when its job's completion window closed


FINAL_STATES = (RequestState.succeeded, RequestState.failed, RequestState.dead, RequestState.cancelled,
                RequestState.expired)

request_state_type = Enum(RequestState, name="request_state", values_callable=lambda e: [m.value for m in e])


def created_at_column() -> Mapped[datetime]:
    return mapped_column(DateTime(timezone=True), server_default=func.now(), nullable=False)


class Job(Base):
    __tablename__ = "jobs"
    # The newest jobs first (`deepbatch jobs`, the dashboard): a page of them without sorting every job.
    __table_args__ = (Index("ix_jobs_created_at", "created_at"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # batch_<uuid hex>
    input_file: Mapped[str] = mapped_column(Text)
    model: Mapped[str] = mapped_column(Text)
    total_lines: Mapped[int] = mapped_column(Integer, default=0)
    submitted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))  # all lines inserted
    metadata_json: Mapped[dict[str, Any]] = mapped_column("metadata", JSONB, server_default=text("'{}'::jsonb"))
    created_at: Mapped[datetime] = created_at_column()
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))  # end of the completion window
    cancel_requested_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    use_result_cache: Mapped[bool] = mapped_column(Boolean, server_default=text("true"))
    priority: Mapped[int] = mapped_column(Integer, server_default=text("0"))  # higher runs first
    queue: Mapped[str] = mapped_column(Text, server_default=text("'deepbatch'"))  # the broker queue it went to
    # Set for a batch created through the HTTP API: the key that created it, its input file, its endpoint.
    owner_key_id: Mapped[str | None] = mapped_column(String(64), index=True)
    input_file_id: Mapped[str | None] = mapped_column(String(64))
    endpoint: Mapped[str | None] = mapped_column(Text)
    # How far the submission got (alembic 0011): lines and bytes of the file stored, their sha256, and when
    # the last chunk was committed. A resumed submit checks and continues from here.
    submitted_lines: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    submitted_bytes: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))
    submitted_sha256: Mapped[str | None] = mapped_column(String(64))
    submission_heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Request(Base):
    __tablename__ = "requests"
    __table_args__ = (
        # custom_id is unique among a job's accepted lines; a rejected line (line_error) keeps the id it
        # gave, duplicates included, so its error can name it.
        Index(
            "uq_requests_job_id_custom_id",
            "job_id",
            "custom_id",
            unique=True,
            postgresql_where=text("line_error IS NULL"),
        ),
        Index("ix_requests_job_id_line_no", "job_id", "line_no", unique=True),
        Index("ix_requests_job_id_state", "job_id", "state"),
        # A job's first failure of each error code (the dashboard), without reading all its failures.
        Index("ix_requests_job_id_error_code", "job_id", "error_code", "line_no",
              postgresql_where=text("error_code IS NOT NULL")),
        Index("ix_requests_cache_key_succeeded", "cache_key", postgresql_where=text("state = 'succeeded'")),
        # What a worker claims next: the most urgent queued request, oldest first.
        Index("ix_requests_queued_by_priority", "queue", text("priority DESC"), "id",
              postgresql_where=text("state = 'queued'")),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    # No foreign key: submit writes a job's rows right after the job, and the per-row check was a sixth of
    # Postgres's work per submitted line (alembic 0009).
    job_id: Mapped[str] = mapped_column(String(64))
    line_no: Mapped[int] = mapped_column(Integer)
    custom_id: Mapped[str | None] = mapped_column(Text)
    url: Mapped[str | None] = mapped_column(Text)
    body: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    state: Mapped[RequestState] = mapped_column(request_state_type, default=RequestState.queued)
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    worker: Mapped[str | None] = mapped_column(Text)  # host:pid of the worker that holds or held it
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    line_error: Mapped[str | None] = mapped_column(Text)  # why the input line was rejected
    # Greedy requests only: identical model, endpoint and parameters give identical output (schema/cache.py).
    cache_key: Mapped[str | None] = mapped_column(String(64))
    priority: Mapped[int] = mapped_column(Integer, server_default=text("0"))  # the job's, copied for the index
    queue: Mapped[str] = mapped_column(Text, server_default=text("'deepbatch'"))  # likewise
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    # A retried request waits out its backoff queued; only the worker retrying it claims it before then.
    retry_after: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # A suspect: the requests a lost worker held, run together and apart from the rest (worker/transitions.py).
    isolation_group: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = created_at_column()
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), onupdate=func.now()
    )


class Result(Base):
    __tablename__ = "results"
    # A job's results of the last minutes (the dashboard's rate) without reading the others (migration 0018).
    __table_args__ = (Index("ix_results_job_id_created_at", "job_id", "created_at"),)

    request_id: Mapped[int] = mapped_column(ForeignKey("requests.id", ondelete="CASCADE"), primary_key=True)
    # No foreign key of its own: the request's already ties the row to its job (and cascades), and a
    # second check per row cost the recorder a tenth of its database time (migration 0008).
    job_id: Mapped[str] = mapped_column(String(64))
    text: Mapped[str] = mapped_column(Text)
    finish_reason: Mapped[str] = mapped_column(String(16))
    prompt_tokens: Mapped[int] = mapped_column(Integer)
    completion_tokens: Mapped[int] = mapped_column(Integer)
    model: Mapped[str] = mapped_column(Text)
    worker: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = created_at_column()
    cached_from: Mapped[int | None] = mapped_column(BigInteger)  # the request whose result this reuses
    # Per output token, its log-probability and likeliest alternatives, when the request asked for them
    # (schema/logprobs.py: the form, token texts escaped like `text`); migration 0016.
    logprobs: Mapped[list[Any] | None] = mapped_column(JSONB)
    # A request with n > 1: its choices 1..n-1 (the first is this row's own columns, and completion_tokens
    # counts every choice's tokens); schema/logprobs.py: stored_choice; migration 0017.
    choices: Mapped[list[Any] | None] = mapped_column(JSONB)


class JobCount(Base):
    """How many of a job's requests are in a state, kept by every transition in its own statement, so that
    progress is read from a few rows whatever the job's size (counting its requests took seconds at a
    million). Summed on read over `label` and `shard` (job_progress does).

    `shard` is the writing backend's pid: no two transactions open at once write the same row, so workers
    never wait on one another's counts (nor deadlock over them). A shard's count may be negative — a request
    claimed by one backend and recorded by another — the sum is what counts. `label`: for succeeded, the
    model that answered; for failed and dead, the error code; else ''. Migration 0018 backfilled it.
    """

    __tablename__ = "job_counts"

    job_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    state: Mapped[RequestState] = mapped_column(request_state_type, primary_key=True)
    label: Mapped[str] = mapped_column(Text, primary_key=True)
    shard: Mapped[int] = mapped_column(Integer, primary_key=True)
    requests: Mapped[int] = mapped_column(BigInteger)
    rejected: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))  # failed lines refused at submission
    cache_hits: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))  # succeeded with a reused result
    prompt_tokens: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))  # of the succeeded
    completion_tokens: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))
    last_finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))  # a request entered this final state


class AuditEvent(Base):
    """Append-only: one row per state transition of a request (or per job-level event).

    Each INSERT statement is sealed as one (migration 0007): its rows share a `seal_id`, and an AuditSeal
    chains a digest of them to the previous seal, so an edited or deleted row breaks the chain
    (`deepbatch audit verify`). Another trigger refuses UPDATE and DELETE outside the retention purge.
    """

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    # No foreign key: the log outlives what it describes (a cascade from jobs could only be refused by
    # the append-only trigger), and the check per row cost every audited transition (migration 0008).
    job_id: Mapped[str] = mapped_column(String(64), index=True)
    request_id: Mapped[int | None] = mapped_column(BigInteger, index=True)
    event: Mapped[str] = mapped_column(String(32))
    from_state: Mapped[str | None] = mapped_column(String(16))
    to_state: Mapped[str | None] = mapped_column(String(16))
    attempt: Mapped[int | None] = mapped_column(Integer)
    worker: Mapped[str | None] = mapped_column(Text)
    detail: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = created_at_column()
    # A statement trigger draws the statement's seal number before its first row; this default reads it.
    seal_id: Mapped[int] = mapped_column(BigInteger, server_default=text("currval('audit_seal_ids'::regclass)"))


class AuditSeal(Base):
    """One INSERT statement's events, sealed: their count and digest, chained to the previous seal's hash.

    Written only by the statement trigger of migration 0007; append-only (the retention purge deletes whole
    seals). `chain_seq` is the contiguous order of the chain; `id` is the statement's seal number, which
    its events carry as `seal_id` (drawn when the statement starts, so ids and chain order may differ).
    """

    __tablename__ = "audit_seals"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    chain_seq: Mapped[int] = mapped_column(BigInteger, unique=True)
    row_count: Mapped[int] = mapped_column(Integer)
    first_event_id: Mapped[int] = mapped_column(BigInteger)  # the id range the purge deletes by
    last_event_id: Mapped[int] = mapped_column(BigInteger)
    digest: Mapped[str] = mapped_column(String(64))  # sha256 over the events' texts, in id order
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))  # over all the fields above
    created_at: Mapped[datetime] = created_at_column()


class AuditChainHead(Base):
    """The last seal's position and hash, in one row: its row lock serialises sealers, one per statement.

    It also shows a truncated tail: seals deleted from the end leave the head pointing past them.
    """

    __tablename__ = "audit_chain_head"
    __table_args__ = (CheckConstraint("id = 1", name="one_row"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False, server_default=text("1"))
    chain_seq: Mapped[int] = mapped_column(BigInteger)
    hash: Mapped[str] = mapped_column(String(64))


class AuditAnchor(Base):
    """Where the audit chain resumes after a retention purge deleted its oldest seals."""

    __tablename__ = "audit_anchors"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    chain_seq: Mapped[int] = mapped_column(BigInteger, unique=True)  # the last purged seal's
    hash: Mapped[str] = mapped_column(String(64))  # and its hash
    purged_before: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = created_at_column()
    hmac: Mapped[str | None] = mapped_column(String(64))  # signed by a purge run with the audit key (0012)


class AuditSignature(Base):
    """A head of the audit chain signed with the HMAC key that stays out of the database (migration 0012).

    Written by `deepbatch audit anchor` after it verified the chain; append-only (the retention purge
    deletes those of the seals it deletes). schema/audit_signing.py says what it protects against.
    """

    __tablename__ = "audit_signatures"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    chain_seq: Mapped[int] = mapped_column(BigInteger, index=True)  # the signed seal's
    hash: Mapped[str] = mapped_column(String(64))  # and its hash
    sealed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    signed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))  # the signer's clock
    hmac: Mapped[str] = mapped_column(String(64))


class DeadLetter(Base):
    __tablename__ = "dead_letters"

    request_id: Mapped[int] = mapped_column(ForeignKey("requests.id", ondelete="CASCADE"), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    attempts: Mapped[int] = mapped_column(Integer)
    last_error: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = created_at_column()


class ApiKey(Base):
    """A key of the HTTP API: only the sha256 of its secret is kept. Its token bucket (API requests per
    second) lives here so that every `deepbatch serve` process draws from the same one."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # key_<hex>
    name: Mapped[str] = mapped_column(Text)
    secret_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = created_at_column()
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    bucket_tokens: Mapped[float | None] = mapped_column(Float)
    bucket_refilled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class StoredFile(Base):
    """A file uploaded through the HTTP API (its bytes are in DEEPBATCH_FILES_DIR, named by its id)."""

    __tablename__ = "files"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # file-<hex>
    owner_key_id: Mapped[str | None] = mapped_column(String(64), index=True)
    filename: Mapped[str] = mapped_column(Text)
    purpose: Mapped[str] = mapped_column(Text)
    bytes: Mapped[int] = mapped_column(BigInteger)
    lines: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = created_at_column()
    deleted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # A batch's output or error file: the results it was written from; rewritten when they change (0013).
    results_fingerprint: Mapped[str | None] = mapped_column(Text)


class Worker(Base):
    """A worker as it announced itself (worker/registry.py): what it serves, where, and its heartbeat.

    The producer routes each line to the queue of a live worker serving the line's model; a worker whose
    heartbeat is older than DEEPBATCH_LEASE_S is stale (its leases have expired too). A worker that stopped
    cleanly keeps its row, with `stopped_at`, until the same host and pid announce themselves again.
    """

    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(Text, primary_key=True)  # host:pid, as its requests' `worker` names it
    model: Mapped[str] = mapped_column(Text)  # the model setting it serves, as its results name it
    aliases: Mapped[list[str]] = mapped_column(JSONB, server_default=text("'[]'::jsonb"))  # other names a line may give
    architecture: Mapped[str | None] = mapped_column(Text)  # e.g. DeepseekV3ForCausalLM
    model_format: Mapped[str | None] = mapped_column(Text)  # built-in, gguf, checkpoint
    quantization: Mapped[str | None] = mapped_column(Text)
    devices: Mapped[list[str]] = mapped_column(JSONB, server_default=text("'[]'::jsonb"))
    dtype: Mapped[str | None] = mapped_column(Text)
    tensor_parallel_size: Mapped[int] = mapped_column(Integer, server_default=text("1"))
    max_batch_size: Mapped[int | None] = mapped_column(Integer)
    kv_cache_tokens: Mapped[int | None] = mapped_column(BigInteger)
    queue: Mapped[str] = mapped_column(Text, index=True)
    host: Mapped[str] = mapped_column(Text)
    pid: Mapped[int] = mapped_column(Integer)
    version: Mapped[str | None] = mapped_column(Text)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    heartbeat_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    stopped_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
