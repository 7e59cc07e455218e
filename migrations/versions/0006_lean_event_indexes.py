"""Drop the unique index on event ids, which every append paid for and no reader uses.

An event id is made from its position (the first 60 bits of the UUID are the position, see
`clearing.store.event_ids`), so ids are unique because positions are, and `clearing verify`
checks every stored id against its position and key. The index cost every append about a
seventh of its database time on PostgreSQL. On SQLite the constraint stays: dropping it there
means rebuilding the table (and its append-only triggers), for an embedded store that is not
the one tuned for volume.

(The index on `effective_at` stays: a job finds its batch's facts by effective time,
`Ledger.state_at` asks for the latest business time and the scheduler for each job's latest
batch, each a scan of the whole log without it.)

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06
"""

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.drop_constraint("uq_events_event_id", "events", type_="unique")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.create_unique_constraint("uq_events_event_id", "events", ["event_id"])
