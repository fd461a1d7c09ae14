"""audit signatures: heads of the chain signed outside the database, and signed retention purges

Revision ID: 0012
Revises: 0011

The seals are hashed by triggers, so a database superuser can recompute them. `deepbatch audit anchor`
signs the chain's head with an HMAC key the database never sees and records the signature here; a seal
rewritten after it was signed no longer matches it (schema/audit_signing.py says why it is signed after
the fact). `deepbatch audit purge` signs the anchor it leaves, in the new column of audit_anchors.
Signatures are append-only like the rest of the log; the retention purge deletes those of the seals it
deletes.
"""
import sqlalchemy as sa
from alembic import op

revision = '0012'
down_revision = '0011'
branch_labels = None
depends_on = None

GUARD = r"""
CREATE FUNCTION audit_signatures_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_LEVEL = 'ROW' AND TG_OP = 'DELETE' AND current_setting('deepbatch.audit_purge', true) = 'on' THEN
        RETURN OLD;
    END IF;
    RAISE EXCEPTION '% is append-only (% refused); use `deepbatch audit purge` for retention', TG_TABLE_NAME, TG_OP;
END
$$;
CREATE TRIGGER audit_signatures_append_only BEFORE UPDATE OR DELETE ON audit_signatures
    FOR EACH ROW EXECUTE FUNCTION audit_signatures_guard();
CREATE TRIGGER audit_signatures_no_truncate BEFORE TRUNCATE ON audit_signatures
    FOR EACH STATEMENT EXECUTE FUNCTION audit_signatures_guard();
"""


def upgrade() -> None:
    op.create_table('audit_signatures',
    sa.Column('id', sa.BigInteger(), autoincrement=True, nullable=False),
    sa.Column('chain_seq', sa.BigInteger(), nullable=False),
    sa.Column('hash', sa.String(length=64), nullable=False),
    sa.Column('sealed_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('signed_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('hmac', sa.String(length=64), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_audit_signatures'))
    )
    op.create_index(op.f('ix_audit_signatures_chain_seq'), 'audit_signatures', ['chain_seq'], unique=False)
    op.add_column('audit_anchors', sa.Column('hmac', sa.String(length=64), nullable=True))
    op.execute(GUARD)


def downgrade() -> None:
    op.drop_column('audit_anchors', 'hmac')
    op.drop_table('audit_signatures')  # its triggers go with it
    op.execute("DROP FUNCTION audit_signatures_guard()")
