"""initial schema: jobs, requests, results, audit events, dead letters and the job_progress view

Revision ID: 0001
Revises: 
Create Date: 2026-11-22 12:20:09.244872
"""
from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None

# The documented polling surface for plain SQL clients (README: "Polling from SQL").
JOB_PROGRESS_VIEW = """
CREATE VIEW job_progress AS
SELECT
    j.id AS job_id,
    j.model,
    j.input_file,
    j.created_at,
    j.submitted_at,
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
    op.create_table('jobs',
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('input_file', sa.Text(), nullable=False),
    sa.Column('model', sa.Text(), nullable=False),
    sa.Column('total_lines', sa.Integer(), nullable=False),
    sa.Column('submitted_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('metadata', postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'{}'::jsonb"), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_jobs'))
    )
    op.create_table('audit_events',
    sa.Column('id', sa.BigInteger(), autoincrement=True, nullable=False),
    sa.Column('job_id', sa.String(length=64), nullable=False),
    sa.Column('request_id', sa.BigInteger(), nullable=True),
    sa.Column('event', sa.String(length=32), nullable=False),
    sa.Column('from_state', sa.String(length=16), nullable=True),
    sa.Column('to_state', sa.String(length=16), nullable=True),
    sa.Column('attempt', sa.Integer(), nullable=True),
    sa.Column('worker', sa.Text(), nullable=True),
    sa.Column('detail', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_audit_events_job_id_jobs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_audit_events'))
    )
    op.create_index(op.f('ix_audit_events_job_id'), 'audit_events', ['job_id'], unique=False)
    op.create_index(op.f('ix_audit_events_request_id'), 'audit_events', ['request_id'], unique=False)
    op.create_table('requests',
    sa.Column('id', sa.BigInteger(), autoincrement=True, nullable=False),
    sa.Column('job_id', sa.String(length=64), nullable=False),
    sa.Column('line_no', sa.Integer(), nullable=False),
    sa.Column('custom_id', sa.Text(), nullable=True),
    sa.Column('url', sa.Text(), nullable=True),
    sa.Column('body', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    sa.Column('state', sa.Enum('queued', 'running', 'succeeded', 'failed', 'dead', 'cancelled', name='request_state'), nullable=False),
    sa.Column('attempt', sa.Integer(), nullable=False),
    sa.Column('max_attempts', sa.Integer(), nullable=False),
    sa.Column('worker', sa.Text(), nullable=True),
    sa.Column('lease_expires_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('line_error', sa.Text(), nullable=True),
    sa.Column('error_code', sa.String(length=64), nullable=True),
    sa.Column('error_message', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_requests_job_id_jobs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_requests'))
    )
    op.create_index('ix_requests_job_id_line_no', 'requests', ['job_id', 'line_no'], unique=True)
    op.create_index('ix_requests_job_id_state', 'requests', ['job_id', 'state'], unique=False)
    op.create_index('uq_requests_job_id_custom_id', 'requests', ['job_id', 'custom_id'], unique=True, postgresql_where=sa.text('line_error IS NULL'))
    op.create_table('dead_letters',
    sa.Column('request_id', sa.BigInteger(), nullable=False),
    sa.Column('job_id', sa.String(length=64), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('last_error', sa.Text(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_dead_letters_job_id_jobs'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['request_id'], ['requests.id'], name=op.f('fk_dead_letters_request_id_requests'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('request_id', name=op.f('pk_dead_letters'))
    )
    op.create_index(op.f('ix_dead_letters_job_id'), 'dead_letters', ['job_id'], unique=False)
    op.create_table('results',
    sa.Column('request_id', sa.BigInteger(), nullable=False),
    sa.Column('job_id', sa.String(length=64), nullable=False),
    sa.Column('text', sa.Text(), nullable=False),
    sa.Column('finish_reason', sa.String(length=16), nullable=False),
    sa.Column('prompt_tokens', sa.Integer(), nullable=False),
    sa.Column('completion_tokens', sa.Integer(), nullable=False),
    sa.Column('model', sa.Text(), nullable=False),
    sa.Column('worker', sa.Text(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_results_job_id_jobs'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['request_id'], ['requests.id'], name=op.f('fk_results_request_id_requests'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('request_id', name=op.f('pk_results'))
    )
    op.create_index(op.f('ix_results_job_id'), 'results', ['job_id'], unique=False)
    op.execute(JOB_PROGRESS_VIEW)


def downgrade() -> None:
    op.execute("DROP VIEW job_progress")
    op.drop_index(op.f('ix_results_job_id'), table_name='results')
    op.drop_table('results')
    op.drop_index(op.f('ix_dead_letters_job_id'), table_name='dead_letters')
    op.drop_table('dead_letters')
    op.drop_index('uq_requests_job_id_custom_id', table_name='requests', postgresql_where=sa.text('line_error IS NULL'))
    op.drop_index('ix_requests_job_id_state', table_name='requests')
    op.drop_index('ix_requests_job_id_line_no', table_name='requests')
    op.drop_table('requests')
    op.drop_index(op.f('ix_audit_events_request_id'), table_name='audit_events')
    op.drop_index(op.f('ix_audit_events_job_id'), table_name='audit_events')
    op.drop_table('audit_events')
    op.drop_table('jobs')
    sa.Enum(name='request_state').drop(op.get_bind())
