"""result cache: requests' cache keys, the job's switch, results that reuse another's, hits per job

Revision ID: 0004
Revises: 0003
"""

from alembic import op
import sqlalchemy as sa

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


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
    c.last_finished_at,
    (SELECT count(*) FROM results s WHERE s.job_id = j.id AND s.cached_from IS NOT NULL) AS cache_hits
FROM jobs j
JOIN counts c ON c.job_id = j.id
"""


def upgrade() -> None:
    op.add_column('jobs', sa.Column('use_result_cache', sa.Boolean(), server_default=sa.text('true'), nullable=False))
    op.add_column('requests', sa.Column('cache_key', sa.String(length=64), nullable=True))
    op.add_column('results', sa.Column('cached_from', sa.BigInteger(), nullable=True))
    op.create_index('ix_requests_cache_key_succeeded', 'requests', ['cache_key'], unique=False,
                    postgresql_where=sa.text("state = 'succeeded'"))
    op.execute("DROP VIEW job_progress")
    op.execute(JOB_PROGRESS_VIEW)


def downgrade() -> None:
    op.execute("DROP VIEW job_progress")
    op.execute(JOB_PROGRESS_VIEW.replace(
        ",\n    (SELECT count(*) FROM results s WHERE s.job_id = j.id AND s.cached_from IS NOT NULL) AS cache_hits", ""))
    op.drop_index('ix_requests_cache_key_succeeded', table_name='requests',
                  postgresql_where=sa.text("state = 'succeeded'"))
    op.drop_column('results', 'cached_from')
    op.drop_column('requests', 'cache_key')
    op.drop_column('jobs', 'use_result_cache')
