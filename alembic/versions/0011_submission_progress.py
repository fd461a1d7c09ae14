"""how far a job's submission got, so an interrupted submit can be resumed or seen as stopped

Revision ID: 0011
Revises: 0010

Each committed chunk of a submission records, in the same transaction, the lines and bytes of the file
stored so far and the sha256 of those bytes: `deepbatch submit FILE --resume JOB` checks the file's prefix
against it and reads on from there. The heartbeat (the last chunk's time) tells a submission in progress
from one that stopped.
"""
import sqlalchemy as sa
from alembic import op

revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('jobs', sa.Column('submitted_lines', sa.Integer(), server_default=sa.text('0'), nullable=False))
    op.add_column('jobs', sa.Column('submitted_bytes', sa.BigInteger(), server_default=sa.text('0'), nullable=False))
    op.add_column('jobs', sa.Column('submitted_sha256', sa.String(length=64), nullable=True))
    op.add_column('jobs', sa.Column('submission_heartbeat_at', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.drop_column('jobs', 'submission_heartbeat_at')
    op.drop_column('jobs', 'submitted_sha256')
    op.drop_column('jobs', 'submitted_bytes')
    op.drop_column('jobs', 'submitted_lines')
