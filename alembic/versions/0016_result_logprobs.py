"""results.logprobs: each output token's log-probability and its likeliest alternatives, when asked

Revision ID: 0016
Revises: 0015

A request that asks for log-probabilities (chat's `logprobs`/`top_logprobs`, completions' `logprobs`) stores
them beside its text, as one JSON array in the form schema/logprobs.py describes; other results leave the
column null. Nullable, no default: adding it rewrites no row.
"""
import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = '0016'
down_revision = '0015'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('results', sa.Column('logprobs', postgresql.JSONB(astext_type=sa.Text()), nullable=True))


def downgrade() -> None:
    op.drop_column('results', 'logprobs')
