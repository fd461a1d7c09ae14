"""isolation groups: the requests a lost worker held come back together, and are split only if they kill again

Revision ID: 0014
Revises: 0013

A queued request with an `isolation_group` is a suspect: its worker was lost while running it. The
requests lost together form one group, run by one worker with nothing else in its engine, at full
depth; a group that loses its worker again is split in two, down to one request (worker/transitions.py).
The group lives here rather than in a broker message so that a lost or redelivered message can never
run a different set: Postgres is the source of truth, and `reconcile` rebuilds the messages from it.
Suspects from before this migration (`error_code = 'worker_lost'`, queued) become groups of one, as
they ran before.
"""
import sqlalchemy as sa
from alembic import op

revision = '0014'
down_revision = '0013'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("CREATE SEQUENCE request_isolation_groups")
    op.add_column('requests', sa.Column('isolation_group', sa.BigInteger(), nullable=True))
    op.execute("""
        UPDATE requests SET isolation_group = nextval('request_isolation_groups')
        WHERE state = 'queued' AND error_code = 'worker_lost'
    """)


def downgrade() -> None:
    op.drop_column('requests', 'isolation_group')
    op.execute("DROP SEQUENCE request_isolation_groups")
