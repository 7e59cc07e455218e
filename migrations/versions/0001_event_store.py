"""The event store: events (append-only, enforced by triggers), streams and checkpoints.

On PostgreSQL it also creates the least-privilege role `clearing_app`, which may only INSERT
and SELECT the events table (never UPDATE, DELETE or TRUNCATE it) and may read and write the
other tables. The role has no login; grant it to the login the application uses
(`GRANT clearing_app TO app_user`) or run `SET ROLE clearing_app`.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# The least-privilege application role is `clearing_app`, written out in each statement
# below: statements are constant text, never assembled from strings.


def _timestamp() -> sa.types.TypeEngine:
    return sa.DateTime(timezone=True).with_variant(sa.String(27), "sqlite")


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    position = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
    op.create_table(
        "events",
        sa.Column("position", position, sa.Identity(always=False), primary_key=True),
        sa.Column(
            "txid",
            sa.BigInteger(),
            nullable=False,
            server_default=(
                sa.text("(pg_current_xact_id()::text)::bigint") if dialect == "postgresql"
                else None
            ),
        ),
        sa.Column("stream_id", sa.Text(), nullable=False),
        sa.Column("stream_version", sa.Integer(), nullable=False),
        sa.Column("event_id", sa.String(36), nullable=False),
        sa.Column("type", sa.Text(), nullable=False),
        sa.Column("schema_version", sa.Integer(), nullable=False),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("metadata", sa.Text(), nullable=False),
        sa.Column("effective_at", _timestamp(), nullable=False),
        sa.Column("recorded_at", _timestamp(), nullable=False),
        sa.Column("idempotency_key", sa.Text(), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.UniqueConstraint("stream_id", "stream_version", name="uq_events_stream_version"),
        sa.UniqueConstraint("event_id", name="uq_events_event_id"),
        sa.UniqueConstraint("idempotency_key", name="uq_events_idempotency_key"),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_events_log_order", "events", ["txid", "position"])
    op.create_index("ix_events_type", "events", ["type", "txid", "position"])
    op.create_index("ix_events_effective_at", "events", ["effective_at"])
    op.create_table(
        "streams",
        sa.Column("stream_id", sa.Text(), primary_key=True),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("last_hash", sa.String(64), nullable=False),
    )
    op.create_table(
        "checkpoints",
        sa.Column("name", sa.Text(), primary_key=True),
        sa.Column("txid", sa.BigInteger(), nullable=False),
        sa.Column("position", sa.BigInteger(), nullable=False),
    )
    if dialect == "postgresql":
        _postgresql_guards()
    else:
        _sqlite_guards()


def _sqlite_guards() -> None:
    op.execute("CREATE TRIGGER events_refuse_update BEFORE UPDATE ON events "
               "BEGIN SELECT RAISE(ABORT, 'events are append-only: UPDATE refused'); END")
    op.execute("CREATE TRIGGER events_refuse_delete BEFORE DELETE ON events "
               "BEGIN SELECT RAISE(ABORT, 'events are append-only: DELETE refused'); END")


def _postgresql_guards() -> None:
    op.execute(
        """
        CREATE FUNCTION events_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            RAISE EXCEPTION 'events are append-only: % refused', TG_OP
                USING ERRCODE = 'insufficient_privilege';
        END $$
        """
    )
    op.execute(
        "CREATE TRIGGER events_refuse_update_delete BEFORE UPDATE OR DELETE ON events "
        "FOR EACH ROW EXECUTE FUNCTION events_refuse_change()"
    )
    op.execute(
        "CREATE TRIGGER events_refuse_truncate BEFORE TRUNCATE ON events "
        "FOR EACH STATEMENT EXECUTE FUNCTION events_refuse_change()"
    )
    op.execute(
        """
        DO $$
        BEGIN
            IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'clearing_app') THEN
                CREATE ROLE clearing_app NOLOGIN;
            END IF;
            EXECUTE format('GRANT USAGE ON SCHEMA %I TO clearing_app', current_schema());
            EXECUTE format(
                'ALTER DEFAULT PRIVILEGES IN SCHEMA %I '
                'GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO clearing_app',
                current_schema());
            EXECUTE format(
                'ALTER DEFAULT PRIVILEGES IN SCHEMA %I GRANT USAGE, SELECT ON SEQUENCES TO clearing_app',
                current_schema());
        EXCEPTION WHEN unique_violation OR duplicate_object THEN
            NULL;  -- another schema's migration created the role at the same moment
        END $$
        """
    )
    op.execute("REVOKE ALL ON events FROM clearing_app")
    op.execute("GRANT SELECT, INSERT ON events TO clearing_app")
    op.execute("GRANT SELECT, INSERT, UPDATE, DELETE ON streams, checkpoints TO clearing_app")
    op.execute(
        "DO $$ BEGIN EXECUTE format('GRANT USAGE, SELECT ON SEQUENCE %s TO "
        "clearing_app', pg_get_serial_sequence('events', 'position')); END $$"
    )


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    if dialect == "postgresql":
        op.execute(
            """
            DO $$
            BEGIN
                IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'clearing_app') THEN
                    EXECUTE format(
                        'ALTER DEFAULT PRIVILEGES IN SCHEMA %I '
                        'REVOKE ALL ON TABLES FROM clearing_app', current_schema());
                    EXECUTE format(
                        'ALTER DEFAULT PRIVILEGES IN SCHEMA %I '
                        'REVOKE ALL ON SEQUENCES FROM clearing_app', current_schema());
                    EXECUTE format('REVOKE ALL ON SCHEMA %I FROM clearing_app', current_schema());
                END IF;
            END $$
            """
        )
    op.drop_table("checkpoints")
    op.drop_table("streams")
    op.drop_table("events")
    if dialect == "postgresql":
        op.execute("DROP FUNCTION IF EXISTS events_refuse_change()")
        # The role is cluster-wide and may serve other schemas; it is dropped only when
        # nothing else depends on it.
        op.execute(
            """
            DO $$
            BEGIN
                DROP ROLE IF EXISTS clearing_app;
            EXCEPTION WHEN dependent_objects_still_exist THEN
                NULL;
            END $$
            """
        )
