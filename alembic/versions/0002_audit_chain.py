"""audit chain: hash-chained, append-only audit events and the anchors a retention purge leaves

Revision ID: 0002
Revises: 0001
"""
from alembic import op
import sqlalchemy as sa

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None

# Every field of the row, NULLs spelled out so that a NULL and an empty string hash differently.
AUDIT_EVENT_HASH = r"""
CREATE FUNCTION audit_event_hash(
    prev_hash text, chain_seq bigint, job_id text, request_id bigint, event text, from_state text,
    to_state text, attempt integer, worker text, detail text, created_at timestamptz
) RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT encode(sha256(convert_to(concat_ws(chr(31),
        prev_hash, chain_seq::text, job_id, coalesce(request_id::text, '\N'), event,
        coalesce(from_state, '\N'), coalesce(to_state, '\N'), coalesce(attempt::text, '\N'),
        coalesce(worker, '\N'), coalesce(detail, '\N'),
        (extract(epoch FROM created_at) * 1000000)::bigint::text
    ), 'UTF8')), 'hex')
$$
"""

# One writer extends the chain at a time (a transaction-scoped advisory lock), so every row's
# predecessor is committed and visible when its hash is computed.
CHAIN_TRIGGER = r"""
CREATE FUNCTION audit_events_chain() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    last_seq bigint;
    last_hash text;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('deepbatch.audit_chain'));
    SELECT chain_seq, hash INTO last_seq, last_hash FROM audit_events ORDER BY chain_seq DESC LIMIT 1;
    IF last_seq IS NULL THEN
        SELECT chain_seq, hash INTO last_seq, last_hash FROM audit_anchors ORDER BY chain_seq DESC LIMIT 1;
    END IF;
    NEW.created_at := coalesce(NEW.created_at, now());
    NEW.chain_seq := coalesce(last_seq, 0) + 1;
    NEW.prev_hash := coalesce(last_hash, '');
    NEW.hash := audit_event_hash(NEW.prev_hash, NEW.chain_seq, NEW.job_id, NEW.request_id, NEW.event,
        NEW.from_state, NEW.to_state, NEW.attempt, NEW.worker, NEW.detail, NEW.created_at);
    RETURN NEW;
END
$$;
CREATE TRIGGER audit_events_chain BEFORE INSERT ON audit_events FOR EACH ROW EXECUTE FUNCTION audit_events_chain();
"""

APPEND_ONLY_TRIGGER = r"""
CREATE FUNCTION audit_events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' AND current_setting('deepbatch.audit_purge', true) = 'on' THEN
        RETURN OLD;
    END IF;
    RAISE EXCEPTION 'audit_events is append-only (% refused); use `deepbatch audit purge` for retention', TG_OP;
END
$$;
CREATE TRIGGER audit_events_append_only BEFORE UPDATE OR DELETE ON audit_events
    FOR EACH ROW EXECUTE FUNCTION audit_events_append_only();
"""


def upgrade() -> None:
    op.create_table('audit_anchors',
    sa.Column('id', sa.BigInteger(), autoincrement=True, nullable=False),
    sa.Column('chain_seq', sa.BigInteger(), nullable=False),
    sa.Column('hash', sa.String(length=64), nullable=False),
    sa.Column('purged_before', sa.DateTime(timezone=True), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_audit_anchors')),
    sa.UniqueConstraint('chain_seq', name=op.f('uq_audit_anchors_chain_seq'))
    )
    op.add_column('audit_events', sa.Column('chain_seq', sa.BigInteger(), nullable=True))
    op.add_column('audit_events', sa.Column('prev_hash', sa.String(length=64), nullable=True))
    op.add_column('audit_events', sa.Column('hash', sa.String(length=64), nullable=True))
    op.execute(AUDIT_EVENT_HASH)
    # Chain the events written before this migration, in id order.
    op.execute("""
        DO $$
        DECLARE
            event record;
            last_hash text := '';
            seq bigint := 0;
        BEGIN
            FOR event IN SELECT * FROM audit_events ORDER BY id LOOP
                seq := seq + 1;
                UPDATE audit_events SET chain_seq = seq, prev_hash = last_hash,
                    hash = audit_event_hash(last_hash, seq, event.job_id, event.request_id, event.event,
                        event.from_state, event.to_state, event.attempt, event.worker, event.detail,
                        event.created_at)
                WHERE id = event.id RETURNING hash INTO last_hash;
            END LOOP;
        END $$
    """)
    for column in ('chain_seq', 'prev_hash', 'hash'):
        op.alter_column('audit_events', column, nullable=False)
    op.create_unique_constraint(op.f('uq_audit_events_chain_seq'), 'audit_events', ['chain_seq'])
    op.execute(CHAIN_TRIGGER)
    op.execute(APPEND_ONLY_TRIGGER)


def downgrade() -> None:
    op.execute("DROP TRIGGER audit_events_append_only ON audit_events")
    op.execute("DROP FUNCTION audit_events_append_only()")
    op.execute("DROP TRIGGER audit_events_chain ON audit_events")
    op.execute("DROP FUNCTION audit_events_chain()")
    op.drop_constraint(op.f('uq_audit_events_chain_seq'), 'audit_events', type_='unique')
    op.drop_column('audit_events', 'hash')
    op.drop_column('audit_events', 'prev_hash')
    op.drop_column('audit_events', 'chain_seq')
    op.execute("DROP FUNCTION audit_event_hash(text, bigint, text, bigint, text, text, text, integer, text, text, timestamptz)")
    op.drop_table('audit_anchors')
