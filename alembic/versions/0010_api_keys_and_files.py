"""the HTTP API: API keys with their rate-limit buckets, uploaded files, and who owns a job

Revision ID: 0010
Revises: 0009

A key is stored as the sha256 of its secret (shown once, at creation). Its token bucket for API requests
lives in its row, so several `deepbatch serve` processes share one limit. Files are stored on disk
(DEEPBATCH_FILES_DIR); the row holds what the API reports about them. A job made from an uploaded file
remembers that file, the endpoint the batch was created for and the key that created it.
"""
import sqlalchemy as sa
from alembic import op

revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'api_keys',
        sa.Column('id', sa.String(length=64), nullable=False),
        sa.Column('name', sa.Text(), nullable=False),
        sa.Column('secret_sha256', sa.String(length=64), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
        sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('bucket_tokens', sa.Float(), nullable=True),
        sa.Column('bucket_refilled_at', sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_api_keys')),
        sa.UniqueConstraint('secret_sha256', name=op.f('uq_api_keys_secret_sha256')),
    )
    op.create_table(
        'files',
        sa.Column('id', sa.String(length=64), nullable=False),
        sa.Column('owner_key_id', sa.String(length=64), nullable=True),
        sa.Column('filename', sa.Text(), nullable=False),
        sa.Column('purpose', sa.Text(), nullable=False),
        sa.Column('bytes', sa.BigInteger(), nullable=False),
        sa.Column('lines', sa.Integer(), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
        sa.Column('deleted_at', sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_files')),
    )
    op.create_index(op.f('ix_files_owner_key_id'), 'files', ['owner_key_id'], unique=False)
    op.add_column('jobs', sa.Column('owner_key_id', sa.String(length=64), nullable=True))
    op.add_column('jobs', sa.Column('input_file_id', sa.String(length=64), nullable=True))
    op.add_column('jobs', sa.Column('endpoint', sa.Text(), nullable=True))
    op.create_index(op.f('ix_jobs_owner_key_id'), 'jobs', ['owner_key_id'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_jobs_owner_key_id'), table_name='jobs')
    op.drop_column('jobs', 'endpoint')
    op.drop_column('jobs', 'input_file_id')
    op.drop_column('jobs', 'owner_key_id')
    op.drop_index(op.f('ix_files_owner_key_id'), table_name='files')
    op.drop_table('files')
    op.drop_table('api_keys')
