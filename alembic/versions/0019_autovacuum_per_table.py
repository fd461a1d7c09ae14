"""Autovacuum per table, sized for tables of millions of rows that one job changes wholesale

Revision ID: 0019
Revises: 0018

With PostgreSQL's defaults a table is vacuumed after 20 % of its rows are dead and analyzed after 10 %
changed: at 10M requests, two million dead tuples. Every request is updated twice (claimed, recorded), and
each claim leaves its row's entry in the queued index (ix_requests_queued_by_priority) behind as a dead
entry at the front of the index, where the next claim's scan starts: on a 200,000-request job the claim's
pick read 40 index pages at the start and 995 after 300,000 dead tuples (0.3 → 8 ms a claim), and a
3M-line job ran at 3,642 requests/s in its first tenth and 2,700 in its last. Vacuuming `requests` after
1 % of dead rows (and always cleaning its indexes: PostgreSQL otherwise skips index cleanup when few heap
pages hold dead rows, which leaves exactly these entries) keeps the claim's scan short; analyzing after
0.5 % keeps a big job's statistics current while it is submitted (submit's duplicate custom_id lookup
depends on them). `results` and `audit_events` only grow: their inserts trigger vacuum (the visibility map)
and analyze at 1 %. `job_counts` is updated by every statement that moves requests: a fixed threshold.
"""
from alembic import op

revision = '0019'
down_revision = '0018'
branch_labels = None
depends_on = None

SETTINGS = {
    'requests': "autovacuum_vacuum_scale_factor = 0.01, autovacuum_analyze_scale_factor = 0.005, "
                "autovacuum_vacuum_insert_scale_factor = 0.01, autovacuum_vacuum_cost_limit = 2000, "
                "vacuum_index_cleanup = on",
    'results': "autovacuum_vacuum_insert_scale_factor = 0.01, autovacuum_analyze_scale_factor = 0.01",
    'audit_events': "autovacuum_vacuum_insert_scale_factor = 0.01, autovacuum_analyze_scale_factor = 0.01",
    'job_counts': "autovacuum_vacuum_scale_factor = 0.0, autovacuum_vacuum_threshold = 10000",
}


def upgrade() -> None:
    for table, settings in SETTINGS.items():
        op.execute(f"ALTER TABLE {table} SET ({settings})")


def downgrade() -> None:
    for table, settings in SETTINGS.items():
        names = ", ".join(setting.split("=")[0].strip() for setting in settings.split(", "))
        op.execute(f"ALTER TABLE {table} RESET ({names})")
