"""results.choices: the further choices of a request that asked for several (n > 1)

Revision ID: 0017
Revises: 0016

A result's own columns hold its first choice; a request with n > 1 keeps choices 1..n-1 here, as one JSON
array of {"text", "finish_reason", "completion_tokens", "logprobs"} (schema/logprobs.py: stored_choice; texts
escaped like `text`), and its `completion_tokens` counts the tokens of every choice. Null for n = 1.
Nullable, no default: adding it rewrites no row.
"""
import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = '0017'
down_revision = '0016'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('results', sa.Column('choices', postgresql.JSONB(astext_type=sa.Text()), nullable=True))


def downgrade() -> None:
    op.drop_column('results', 'choices')
