"""workers registry: each worker announces its model, device, batch and queue, and beats its heart

Revision ID: 0015
Revises: 0014

A worker upserts its row when its engine is ready, renews `heartbeat_at` from its maintenance thread and
sets `stopped_at` when it stops cleanly (worker/registry.py). The producer routes each line to the queue of
a live worker serving the line's model; `deepbatch workers` and the dashboard list the rows.
"""
import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = '0015'
down_revision = '0014'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'workers',
        sa.Column('id', sa.Text(), nullable=False),
        sa.Column('model', sa.Text(), nullable=False),
        sa.Column('aliases', postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'[]'::jsonb"),
                  nullable=False),
        sa.Column('architecture', sa.Text(), nullable=True),
        sa.Column('model_format', sa.Text(), nullable=True),
        sa.Column('quantization', sa.Text(), nullable=True),
        sa.Column('devices', postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'[]'::jsonb"),
                  nullable=False),
        sa.Column('dtype', sa.Text(), nullable=True),
        sa.Column('tensor_parallel_size', sa.Integer(), server_default=sa.text('1'), nullable=False),
        sa.Column('max_batch_size', sa.Integer(), nullable=True),
        sa.Column('kv_cache_tokens', sa.BigInteger(), nullable=True),
        sa.Column('queue', sa.Text(), nullable=False),
        sa.Column('host', sa.Text(), nullable=False),
        sa.Column('pid', sa.Integer(), nullable=False),
        sa.Column('version', sa.Text(), nullable=True),
        sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('heartbeat_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('stopped_at', sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_workers')),
    )
    op.create_index(op.f('ix_workers_queue'), 'workers', ['queue'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_workers_queue'), table_name='workers')
    op.drop_table('workers')
