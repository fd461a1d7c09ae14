"""batch output and error files remember the results they were written from

Revision ID: 0013
Revises: 0012

A batch's output and error files were written once, when it ended, and never again: a request requeued
from the dead letters and then run stayed in the error file and missing from the output file. Each such
file's row now keeps a fingerprint of the batch's results (counts by state, the last change) and the API
rewrites the files when it no longer matches. Files written before have none, and are rewritten once.
"""
import sqlalchemy as sa
from alembic import op

revision = '0013'
down_revision = '0012'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('files', sa.Column('results_fingerprint', sa.Text(), nullable=True))


def downgrade() -> None:
    op.drop_column('files', 'results_fingerprint')
