"""Drop two indexes of the log that no reader uses and every append paid for.

* `uq_events_event_id`: an event id is made from its position (the first 60 bits of the
  UUID are the position, see `clearing.store.event_ids`), so ids are unique because
  positions are, and `clearing verify` checks every stored id against its position. The
  index cost every append a seventh of its database time on PostgreSQL. On SQLite the
  constraint stays: dropping it there means rebuilding the table (and its append-only
  triggers), for an embedded store that is not the one tuned for volume.
* `ix_events_effective_at`: reads bounded by business time walk the log in (txid,
  position) order and filter; no query is served by an index on the time alone.

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
    op.drop_index("ix_events_effective_at", table_name="events")


def downgrade() -> None:
    op.create_index("ix_events_effective_at", "events", ["effective_at"])
    if op.get_bind().dialect.name == "postgresql":
        op.create_unique_constraint("uq_events_event_id", "events", ["event_id"])
