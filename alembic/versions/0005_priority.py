"""priority: per-job priority and broker queue, copied onto requests and indexed to claim the most urgent first

Revision ID: 0005
Revises: 0004
"""
from alembic import op
import sqlalchemy as sa

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('jobs', sa.Column('priority', sa.Integer(), server_default=sa.text('0'), nullable=False))
    op.add_column('jobs', sa.Column('queue', sa.Text(), server_default=sa.text("'deepbatch'"), nullable=False))
    op.add_column('requests', sa.Column('priority', sa.Integer(), server_default=sa.text('0'), nullable=False))
    op.add_column('requests', sa.Column('queue', sa.Text(), server_default=sa.text("'deepbatch'"), nullable=False))
    op.execute("UPDATE requests r SET queue = j.queue FROM jobs j WHERE j.id = r.job_id")
    op.create_index('ix_requests_queued_by_priority', 'requests', ['queue', sa.text('priority DESC'), 'id'],
                    unique=False, postgresql_where=sa.text("state = 'queued'"))


def downgrade() -> None:
    op.drop_index('ix_requests_queued_by_priority', table_name='requests', postgresql_where=sa.text("state = 'queued'"))
    op.drop_column('requests', 'queue')
    op.drop_column('requests', 'priority')
    op.drop_column('jobs', 'queue')
    op.drop_column('jobs', 'priority')
