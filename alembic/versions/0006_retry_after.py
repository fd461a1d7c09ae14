"""retry_after: a retried request waits out its backoff in the queued state, invisible to other claims

Revision ID: 0006
Revises: 0005
"""
from alembic import op
import sqlalchemy as sa

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('requests', sa.Column('retry_after', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.drop_column('requests', 'retry_after')
