"""audit seals: the hash chain links one seal per INSERT statement, not one hash per row under a global lock

Revision ID: 0007
Revises: 0006

Each statement that inserts into audit_events (a batch INSERT ... SELECT, an INSERT inside a
data-modifying CTE, a COPY, a single ORM row) gets one row in audit_seals: how many events it wrote,
a digest over them in id order, and a hash linking it to the previous seal. audit_chain_head holds the
last seal's position and hash; its row lock serialises sealers once per statement, held from the seal
to commit (the old advisory lock was taken for every row, from the first one to commit), so every
seal's predecessor is committed first.

How rows learn their seal without a row trigger: a BEFORE STATEMENT trigger draws the seal number
(nextval), the column default of audit_events.seal_id reads it back (currval), and an AFTER STATEMENT
trigger with a transition table digests exactly the rows of the statement.
"""
from alembic import op
import sqlalchemy as sa

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None

# Legacy rows are sealed in chunks of this many, so no digest has to hold an unbounded table in memory.
GENESIS_SEAL_ROWS = 10_000

# An event as text: every column, its id and seal included, in Postgres's composite (ROW) syntax,
# which quotes a value holding a separator, quote or parenthesis and spells NULL as nothing and '' as "",
# so no two different rows read the same (a bare separator would: worker 'a,b' + detail 'c' against
# worker 'a' + detail 'b,c'). The time is epoch microseconds: the text of a timestamptz depends on the
# session's TimeZone. STABLE, as its body is, so Postgres inlines it into the trigger's query (declared
# IMMUTABLE it was called once per row, and sealing 256 rows took several times longer, measured).
DIGEST_FUNCTIONS = r"""
CREATE FUNCTION audit_event_text(
    id bigint, seal_id bigint, job_id text, request_id bigint, event text, from_state text, to_state text,
    attempt integer, worker text, detail text, created_at timestamptz
) RETURNS text LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT ROW(id, seal_id, job_id, request_id, event, from_state, to_state, attempt, worker, detail,
               (extract(epoch FROM created_at) * 1000000)::bigint)::text
$$;
-- Every field is hex or an integer, so the separator cannot occur inside one.
CREATE FUNCTION audit_seal_hash(
    prev_hash text, chain_seq bigint, seal_id bigint, row_count integer, first_event_id bigint,
    last_event_id bigint, digest text, created_at timestamptz
) RETURNS text LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT encode(sha256(convert_to(concat_ws(chr(31),
        prev_hash, chain_seq::text, seal_id::text, row_count::text, first_event_id::text, last_event_id::text,
        digest, (extract(epoch FROM created_at) * 1000000)::bigint::text
    ), 'UTF8')), 'hex')
$$;
"""

# A seal's digest: sha256 over its events' texts (or a statement's transition table's), in id order.
# One hash over the whole text is cheaper than one per row; it holds the text in memory, which limits
# one statement to some millions of events (Postgres's 1 GB per value), and genesis seals to 10,000.
SEAL_DIGEST = """encode(sha256(convert_to(string_agg(audit_event_text(id, seal_id, job_id, request_id, event,
    from_state, to_state, attempt, worker, detail, created_at), '' ORDER BY id), 'UTF8')), 'hex')"""

# The one place that extends the chain: the statement trigger and the genesis below both call it.
# FOR UPDATE on the head waits for the previous sealer's commit and then reads its seal (READ COMMITTED).
SEAL_FUNCTION = r"""
CREATE FUNCTION audit_seal(
    seal_id bigint, row_count integer, first_event_id bigint, last_event_id bigint, digest text,
    sealed_at timestamptz DEFAULT now()
) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    head record;
    seal_hash text;
BEGIN
    SELECT chain_seq, hash INTO head FROM audit_chain_head FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'audit_chain_head has no row: the audit chain cannot be extended';
    END IF;
    seal_hash := audit_seal_hash(head.hash, head.chain_seq + 1, seal_id, row_count, first_event_id,
                                 last_event_id, digest, sealed_at);
    INSERT INTO audit_seals (id, chain_seq, row_count, first_event_id, last_event_id, digest, prev_hash, hash,
                             created_at)
    VALUES (seal_id, head.chain_seq + 1, row_count, first_event_id, last_event_id, digest, head.hash, seal_hash,
            sealed_at);
    UPDATE audit_chain_head SET chain_seq = head.chain_seq + 1, hash = seal_hash;
END
$$;
"""

STATEMENT_TRIGGERS = rf"""
CREATE FUNCTION audit_events_open_seal() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM nextval('audit_seal_ids');  -- the rows' seal_id default reads it back with currval
    RETURN NULL;
END
$$;
CREATE FUNCTION audit_events_seal() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    sealed record;
BEGIN
    SELECT count(*)::integer AS row_count, min(seal_id) AS seal_id, max(seal_id) AS other_seal_id,
           min(id) AS first_event_id, max(id) AS last_event_id,
           {SEAL_DIGEST} AS digest
    INTO sealed FROM inserted_events;
    IF sealed.row_count = 0 THEN
        RETURN NULL;
    END IF;
    -- Not the number this statement drew: an explicit seal_id (which could take a later statement's
    -- number), or an audit INSERT nested inside this one that drew a number of its own mid-statement.
    IF sealed.seal_id <> sealed.other_seal_id OR sealed.seal_id <> currval('audit_seal_ids') THEN
        RAISE EXCEPTION 'an INSERT into audit_events wrote rows of seals % to % while sealing %', sealed.seal_id,
            sealed.other_seal_id, currval('audit_seal_ids')
            USING HINT = 'leave seal_id to its default; one audit INSERT per statement level';
    END IF;
    PERFORM audit_seal(sealed.seal_id, sealed.row_count, sealed.first_event_id, sealed.last_event_id,
                       sealed.digest);
    RETURN NULL;
END
$$;
CREATE TRIGGER audit_events_open_seal BEFORE INSERT ON audit_events
    FOR EACH STATEMENT EXECUTE FUNCTION audit_events_open_seal();
CREATE TRIGGER audit_events_seal AFTER INSERT ON audit_events REFERENCING NEW TABLE AS inserted_events
    FOR EACH STATEMENT EXECUTE FUNCTION audit_events_seal();
"""

# Seals and anchors are append-only like the events (seals may go in the retention purge); the head may
# only move forward by one, onto the seal just written after it.
GUARD_TRIGGERS = r"""
CREATE FUNCTION audit_chain_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_LEVEL = 'ROW' AND TG_OP = 'UPDATE' AND TG_TABLE_NAME = 'audit_chain_head' THEN
        IF NEW.id = OLD.id AND NEW.chain_seq = OLD.chain_seq + 1 AND EXISTS (
            SELECT 1 FROM audit_seals s WHERE s.chain_seq = NEW.chain_seq AND s.prev_hash = OLD.hash
                                          AND s.hash = NEW.hash) THEN
            RETURN NEW;
        END IF;
    ELSIF TG_LEVEL = 'ROW' AND TG_OP = 'DELETE' AND TG_TABLE_NAME = 'audit_seals'
          AND current_setting('deepbatch.audit_purge', true) = 'on' THEN
        RETURN OLD;
    END IF;
    RAISE EXCEPTION '% is append-only (% refused); use `deepbatch audit purge` for retention', TG_TABLE_NAME, TG_OP;
END
$$;
"""
GUARDED_TABLES = ('audit_seals', 'audit_chain_head', 'audit_anchors')


def create_seal_tables() -> None:
    op.execute("CREATE SEQUENCE audit_seal_ids")
    op.create_table('audit_seals',
    sa.Column('id', sa.BigInteger(), autoincrement=False, nullable=False),
    sa.Column('chain_seq', sa.BigInteger(), nullable=False),
    sa.Column('row_count', sa.Integer(), nullable=False),
    sa.Column('first_event_id', sa.BigInteger(), nullable=False),
    sa.Column('last_event_id', sa.BigInteger(), nullable=False),
    sa.Column('digest', sa.String(length=64), nullable=False),
    sa.Column('prev_hash', sa.String(length=64), nullable=False),
    sa.Column('hash', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_audit_seals')),
    sa.UniqueConstraint('chain_seq', name=op.f('uq_audit_seals_chain_seq'))
    )
    op.create_table('audit_chain_head',
    sa.Column('id', sa.Integer(), server_default=sa.text('1'), autoincrement=False, nullable=False),
    sa.Column('chain_seq', sa.BigInteger(), nullable=False),
    sa.Column('hash', sa.String(length=64), nullable=False),
    sa.CheckConstraint('id = 1', name=op.f('ck_audit_chain_head_one_row')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_audit_chain_head'))
    )
    # The chain resumes where the last retention purge left it (an anchor of 0002), or starts empty.
    op.execute("""
        INSERT INTO audit_chain_head (chain_seq, hash)
        SELECT coalesce(max(chain_seq), 0),
               coalesce((SELECT hash FROM audit_anchors ORDER BY chain_seq DESC LIMIT 1), '')
        FROM audit_anchors
    """)


def seal_existing_events() -> None:
    """Genesis: the rows written before this migration, in id order, in seals of GENESIS_SEAL_ROWS.

    A genesis seal is dated by its newest event, so the retention purge treats old rows by their age.
    """
    op.add_column('audit_events', sa.Column('seal_id', sa.BigInteger(), nullable=True))
    op.execute("ALTER TABLE audit_events DISABLE TRIGGER audit_events_append_only")
    op.execute(f"""
        UPDATE audit_events e SET seal_id = numbered.seal_id
        FROM (SELECT id, (row_number() OVER (ORDER BY id) - 1) / {GENESIS_SEAL_ROWS} + 1 AS seal_id
              FROM audit_events) numbered
        WHERE e.id = numbered.id
    """)
    op.execute("ALTER TABLE audit_events ENABLE TRIGGER audit_events_append_only")
    op.execute(f"""
        DO $$
        DECLARE
            chunk record;
        BEGIN
            FOR chunk IN
                SELECT seal_id, count(*)::integer AS row_count, min(id) AS first_event_id, max(id) AS last_event_id,
                       {SEAL_DIGEST} AS digest,
                       max(created_at) AS sealed_at
                FROM audit_events GROUP BY seal_id ORDER BY seal_id
            LOOP
                PERFORM audit_seal(chunk.seal_id, chunk.row_count, chunk.first_event_id, chunk.last_event_id,
                                   chunk.digest, chunk.sealed_at);
            END LOOP;
        END $$
    """)
    op.execute("SELECT setval('audit_seal_ids', max(id)) FROM audit_seals HAVING count(*) > 0")
    op.alter_column('audit_events', 'seal_id', nullable=False,
                    server_default=sa.text("currval('audit_seal_ids'::regclass)"))


def upgrade() -> None:
    op.execute("DROP TRIGGER audit_events_chain ON audit_events")
    op.execute("DROP FUNCTION audit_events_chain()")
    op.execute(DIGEST_FUNCTIONS)
    create_seal_tables()
    op.execute(SEAL_FUNCTION)
    seal_existing_events()
    op.drop_constraint(op.f('uq_audit_events_chain_seq'), 'audit_events', type_='unique')
    op.drop_column('audit_events', 'hash')
    op.drop_column('audit_events', 'prev_hash')
    op.drop_column('audit_events', 'chain_seq')
    op.execute("DROP FUNCTION audit_event_hash(text, bigint, text, bigint, text, text, text, integer, text, text, "
               "timestamptz)")
    op.execute(STATEMENT_TRIGGERS)
    op.execute(GUARD_TRIGGERS)
    for table in GUARDED_TABLES:
        op.execute(f"CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE ON {table} "
                   f"FOR EACH ROW EXECUTE FUNCTION audit_chain_guard()")
        op.execute(f"CREATE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {table} "
                   f"FOR EACH STATEMENT EXECUTE FUNCTION audit_chain_guard()")


# Downgrade: the per-row chain of 0002, as 0002 wrote it (a migration is a snapshot; it imports no other).
AUDIT_EVENT_HASH_0002 = r"""
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

CHAIN_TRIGGER_0002 = r"""
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


def rechain_rows() -> None:
    """Give every event its 0002 row hash again, in chain order, resuming after the last anchor."""
    op.add_column('audit_events', sa.Column('chain_seq', sa.BigInteger(), nullable=True))
    op.add_column('audit_events', sa.Column('prev_hash', sa.String(length=64), nullable=True))
    op.add_column('audit_events', sa.Column('hash', sa.String(length=64), nullable=True))
    op.execute(AUDIT_EVENT_HASH_0002)
    op.execute("ALTER TABLE audit_events DISABLE TRIGGER audit_events_append_only")
    op.execute("""
        DO $$
        DECLARE
            event record;
            last_hash text := coalesce((SELECT hash FROM audit_anchors ORDER BY chain_seq DESC LIMIT 1), '');
            seq bigint := coalesce((SELECT max(chain_seq) FROM audit_anchors), 0);
        BEGIN
            FOR event IN SELECT e.* FROM audit_events e LEFT JOIN audit_seals s ON s.id = e.seal_id
                         ORDER BY s.chain_seq, e.id LOOP
                seq := seq + 1;
                UPDATE audit_events SET chain_seq = seq, prev_hash = last_hash,
                    hash = audit_event_hash(last_hash, seq, event.job_id, event.request_id, event.event,
                        event.from_state, event.to_state, event.attempt, event.worker, event.detail,
                        event.created_at)
                WHERE id = event.id RETURNING hash INTO last_hash;
            END LOOP;
        END $$
    """)
    op.execute("ALTER TABLE audit_events ENABLE TRIGGER audit_events_append_only")
    for column in ('chain_seq', 'prev_hash', 'hash'):
        op.alter_column('audit_events', column, nullable=False)
    op.create_unique_constraint(op.f('uq_audit_events_chain_seq'), 'audit_events', ['chain_seq'])


def downgrade() -> None:
    for table in GUARDED_TABLES:
        op.execute(f"DROP TRIGGER {table}_no_truncate ON {table}")
        op.execute(f"DROP TRIGGER {table}_append_only ON {table}")
    op.execute("DROP FUNCTION audit_chain_guard()")
    op.execute("DROP TRIGGER audit_events_seal ON audit_events")
    op.execute("DROP TRIGGER audit_events_open_seal ON audit_events")
    op.execute("DROP FUNCTION audit_events_seal()")
    op.execute("DROP FUNCTION audit_events_open_seal()")
    rechain_rows()
    op.execute(CHAIN_TRIGGER_0002)
    op.drop_column('audit_events', 'seal_id')
    op.execute("DROP FUNCTION audit_seal(bigint, integer, bigint, bigint, text, timestamptz)")
    op.drop_table('audit_chain_head')
    op.drop_table('audit_seals')
    op.execute("DROP SEQUENCE audit_seal_ids")
    op.execute("DROP FUNCTION audit_seal_hash(text, bigint, bigint, integer, bigint, bigint, text, timestamptz)")
    op.execute("DROP FUNCTION audit_event_text(bigint, bigint, text, bigint, text, text, text, integer, text, "
               "text, timestamptz)")
