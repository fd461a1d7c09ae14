"""job_counts: each job's requests per state, kept by the transitions, so that progress is read in O(1)

Revision ID: 0018
Revises: 0017

Counting a job's requests per state on every read took seconds at a million rows (status 3.1 s, jobs 4.1 s,
the dashboard 4.2 s: bench/results/scale-redis-1m.json). Every statement that moves requests now adds its
deltas to job_counts in the same statement (worker/transitions.py: counted), and job_progress sums a job's
few rows of it instead of counting its requests. The table is backfilled here from the rows there are,
under shard 0; run the migration with the workers stopped, as any migration (a transition written while
it runs by code that does not count would be missed).

Also: results (job_id, created_at) in place of results (job_id), for the dashboard's rate of the last
minutes; jobs (created_at), for the newest jobs first; requests (job_id, error_code, line_no) where there
is an error code, for a job's first failure of each code.
"""
import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = '0018'
down_revision = '0017'
branch_labels = None
depends_on = None

# The documented polling surface for plain SQL clients (README: "Polling from SQL"): the columns of
# migration 0004's view, read from job_counts (one LATERAL per job: a job's rows, by its key).
JOB_PROGRESS_VIEW = """
CREATE VIEW job_progress AS
SELECT
    j.id AS job_id, j.model, j.input_file, j.created_at, j.submitted_at, j.expires_at, j.cancel_requested_at,
    c.total, c.queued, c.running, c.succeeded, c.failed, c.dead, c.cancelled, c.expired,
    c.total - c.queued - c.running AS finished,
    c.succeeded AS completed_requests,
    c.failed + c.dead AS failed_requests,
    CASE
        WHEN j.submitted_at IS NULL THEN 'validating'
        WHEN j.cancel_requested_at IS NOT NULL AND c.queued + c.running > 0 THEN 'cancelling'
        WHEN j.cancel_requested_at IS NOT NULL THEN 'cancelled'
        WHEN c.queued + c.running > 0 THEN 'in_progress'
        WHEN c.expired > 0 THEN 'expired'
        WHEN c.total > 0 AND c.failed = c.total THEN 'failed'
        ELSE 'completed'
    END AS status,
    c.last_finished_at,
    c.cache_hits
FROM jobs j
CROSS JOIN LATERAL (
    SELECT
        coalesce(sum(n.requests), 0)::bigint AS total,
        coalesce(sum(n.requests) FILTER (WHERE n.state = 'queued'), 0)::bigint AS queued,
        coalesce(sum(n.requests) FILTER (WHERE n.state = 'running'), 0)::bigint AS running,
        coalesce(sum(n.requests) FILTER (WHERE n.state = 'succeeded'), 0)::bigint AS succeeded,
        coalesce(sum(n.requests) FILTER (WHERE n.state = 'failed'), 0)::bigint AS failed,
        coalesce(sum(n.requests) FILTER (WHERE n.state = 'dead'), 0)::bigint AS dead,
        coalesce(sum(n.requests) FILTER (WHERE n.state = 'cancelled'), 0)::bigint AS cancelled,
        coalesce(sum(n.requests) FILTER (WHERE n.state = 'expired'), 0)::bigint AS expired,
        max(n.last_finished_at) FILTER (WHERE n.state NOT IN ('queued', 'running')) AS last_finished_at,
        coalesce(sum(n.cache_hits), 0)::bigint AS cache_hits
    FROM job_counts n WHERE n.job_id = j.id
) AS c
"""

# Migration 0004's view, which counts the requests.
PREVIOUS_VIEW = """
CREATE VIEW job_progress AS
WITH counts AS (
    SELECT
        j.id AS job_id,
        count(r.id) AS total,
        count(r.id) FILTER (WHERE r.state = 'queued') AS queued,
        count(r.id) FILTER (WHERE r.state = 'running') AS running,
        count(r.id) FILTER (WHERE r.state = 'succeeded') AS succeeded,
        count(r.id) FILTER (WHERE r.state = 'failed') AS failed,
        count(r.id) FILTER (WHERE r.state = 'dead') AS dead,
        count(r.id) FILTER (WHERE r.state = 'cancelled') AS cancelled,
        count(r.id) FILTER (WHERE r.state = 'expired') AS expired,
        max(r.updated_at) FILTER (WHERE r.state NOT IN ('queued', 'running')) AS last_finished_at
    FROM jobs j
    LEFT JOIN requests r ON r.job_id = j.id
    GROUP BY j.id
)
SELECT
    j.id AS job_id, j.model, j.input_file, j.created_at, j.submitted_at, j.expires_at, j.cancel_requested_at,
    c.total, c.queued, c.running, c.succeeded, c.failed, c.dead, c.cancelled, c.expired,
    c.total - c.queued - c.running AS finished,
    c.succeeded AS completed_requests,
    c.failed + c.dead AS failed_requests,
    CASE
        WHEN j.submitted_at IS NULL THEN 'validating'
        WHEN j.cancel_requested_at IS NOT NULL AND c.queued + c.running > 0 THEN 'cancelling'
        WHEN j.cancel_requested_at IS NOT NULL THEN 'cancelled'
        WHEN c.queued + c.running > 0 THEN 'in_progress'
        WHEN c.expired > 0 THEN 'expired'
        WHEN c.total > 0 AND c.failed = c.total THEN 'failed'
        ELSE 'completed'
    END AS status,
    c.last_finished_at,
    (SELECT count(*) FROM results s WHERE s.job_id = j.id AND s.cached_from IS NOT NULL) AS cache_hits
FROM jobs j
JOIN counts c ON c.job_id = j.id
"""

# What the rows there are add up to, as the transitions would have counted them (schema/tables.py: JobCount).
BACKFILL = """
INSERT INTO job_counts (job_id, state, label, shard, requests, rejected, cache_hits, prompt_tokens,
                        completion_tokens, last_finished_at)
SELECT r.job_id, r.state,
       CASE WHEN r.state = 'succeeded' THEN coalesce(s.model, '')
            WHEN r.state IN ('failed', 'dead') THEN coalesce(r.error_code, '') ELSE '' END,
       0, count(*), count(*) FILTER (WHERE r.line_error IS NOT NULL), count(s.cached_from),
       coalesce(sum(s.prompt_tokens), 0), coalesce(sum(s.completion_tokens), 0),
       max(r.updated_at) FILTER (WHERE r.state NOT IN ('queued', 'running'))
FROM requests r LEFT JOIN results s ON s.request_id = r.id
GROUP BY 1, 2, 3
"""


def upgrade() -> None:
    op.create_table('job_counts',
    sa.Column('job_id', sa.String(length=64), nullable=False),
    sa.Column('state', postgresql.ENUM(name='request_state', create_type=False), nullable=False),
    sa.Column('label', sa.Text(), nullable=False),
    sa.Column('shard', sa.Integer(), nullable=False),
    sa.Column('requests', sa.BigInteger(), nullable=False),
    sa.Column('rejected', sa.BigInteger(), server_default=sa.text('0'), nullable=False),
    sa.Column('cache_hits', sa.BigInteger(), server_default=sa.text('0'), nullable=False),
    sa.Column('prompt_tokens', sa.BigInteger(), server_default=sa.text('0'), nullable=False),
    sa.Column('completion_tokens', sa.BigInteger(), server_default=sa.text('0'), nullable=False),
    sa.Column('last_finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('job_id', 'state', 'label', 'shard', name=op.f('pk_job_counts'))
    )
    op.execute(BACKFILL)
    op.execute("DROP VIEW job_progress")
    op.execute(JOB_PROGRESS_VIEW)
    op.create_index('ix_results_job_id_created_at', 'results', ['job_id', 'created_at'], unique=False)
    op.drop_index('ix_results_job_id', table_name='results')
    op.create_index('ix_jobs_created_at', 'jobs', ['created_at'], unique=False)
    op.create_index('ix_requests_job_id_error_code', 'requests', ['job_id', 'error_code', 'line_no'], unique=False,
                    postgresql_where=sa.text('error_code IS NOT NULL'))


def downgrade() -> None:
    op.drop_index('ix_requests_job_id_error_code', table_name='requests',
                  postgresql_where=sa.text('error_code IS NOT NULL'))
    op.drop_index('ix_jobs_created_at', table_name='jobs')
    op.create_index('ix_results_job_id', 'results', ['job_id'], unique=False)
    op.drop_index('ix_results_job_id_created_at', table_name='results')
    op.execute("DROP VIEW job_progress")
    op.execute(PREVIOUS_VIEW)
    op.drop_table('job_counts')
