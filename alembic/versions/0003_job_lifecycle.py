"""job lifecycle: completion window, cancellation, the `expired` request state, OpenAI Batch statuses

Revision ID: 0003
Revises: 0002
"""
from alembic import op
import sqlalchemy as sa

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None

# OpenAI Batch statuses. `finalizing` never shows: results are rows in Postgres as soon as each request
# finishes, so there is no output file to assemble at the end.
JOB_PROGRESS_VIEW = """
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
    c.last_finished_at
FROM jobs j
JOIN counts c ON c.job_id = j.id
"""

PREVIOUS_VIEW = """
CREATE VIEW job_progress AS
SELECT
    j.id AS job_id, j.model, j.input_file, j.created_at, j.submitted_at,
    count(r.id) AS total,
    count(r.id) FILTER (WHERE r.state = 'queued') AS queued,
    count(r.id) FILTER (WHERE r.state = 'running') AS running,
    count(r.id) FILTER (WHERE r.state = 'succeeded') AS succeeded,
    count(r.id) FILTER (WHERE r.state = 'failed') AS failed,
    count(r.id) FILTER (WHERE r.state = 'dead') AS dead,
    count(r.id) FILTER (WHERE r.state = 'cancelled') AS cancelled,
    count(r.id) FILTER (WHERE r.state NOT IN ('queued', 'running')) AS finished,
    CASE
        WHEN j.submitted_at IS NULL THEN 'validating'
        WHEN count(r.id) FILTER (WHERE r.state IN ('queued', 'running')) > 0 THEN 'in_progress'
        ELSE 'completed'
    END AS status,
    max(r.updated_at) FILTER (WHERE r.state NOT IN ('queued', 'running')) AS last_finished_at
FROM jobs j
LEFT JOIN requests r ON r.job_id = j.id
GROUP BY j.id
"""


def upgrade() -> None:
    # A new enum value must be committed before the view below can name it.
    with op.get_context().autocommit_block():
        op.execute("ALTER TYPE request_state ADD VALUE IF NOT EXISTS 'expired'")
    op.add_column('jobs', sa.Column('expires_at', sa.DateTime(timezone=True), nullable=True))
    op.add_column('jobs', sa.Column('cancel_requested_at', sa.DateTime(timezone=True), nullable=True))
    op.execute("DROP VIEW job_progress")
    op.execute(JOB_PROGRESS_VIEW)


def downgrade() -> None:
    op.execute("DROP VIEW job_progress")
    op.execute(PREVIOUS_VIEW)
    op.drop_column('jobs', 'cancel_requested_at')
    op.drop_column('jobs', 'expires_at')
    # Postgres cannot drop an enum value; 'expired' stays in request_state, unused.
