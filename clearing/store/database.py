"""Engines for both backends, and the schema's state (`clearing db upgrade`).

SQLite runs in WAL mode with writers taking the write lock at BEGIN (`BEGIN IMMEDIATE`), so
two writers queue instead of failing half-way. PostgreSQL runs at READ COMMITTED; the store's
own locking makes appends safe there.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from weakref import WeakKeyDictionary

import logging
import os

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url
from psycopg import sql

from clearing.store.errors import SchemaOutOfDate

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent.parent / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 30_000


class _PipelineAbortNoise(logging.Filter):
    """Drops psycopg's "error ignored terminating <Pipeline>" warning. psycopg logs it when a
    statement in a pipeline failed and the pipeline, closing, finds itself aborted; the
    statement's own error is raised all the same, and the store handles it (a key already
    recorded: a redelivery, looked up and answered). Printed, it would only tell a user
    re-importing a file about an error that was not one."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("error ignored terminating")


logging.getLogger("psycopg").addFilter(_PipelineAbortNoise())

APP_ROLE_ENV = "CLEARING_APP_ROLE"
DEFAULT_APP_ROLE = "clearing_app"


def application_role() -> str | None:
    """The role the application works as on PostgreSQL: `clearing_app` (created by the first
    migration; it may only INSERT and SELECT the events table), or what CLEARING_APP_ROLE
    names; an empty CLEARING_APP_ROLE keeps the login's own role."""
    value = os.environ.get(APP_ROLE_ENV, DEFAULT_APP_ROLE).strip()
    return value or None


def create_engine_for(url: str, *, role: str | None = None, pre_ping: bool = True) -> Engine:
    """An engine for `url`; psycopg 3 is the PostgreSQL driver whatever the URL's scheme says.
    With `role` (PostgreSQL), every connection switches to it (`SET ROLE`) when it opens.
    `pre_ping` (PostgreSQL) tries each pooled connection before handing it out, so one the
    server dropped meanwhile is replaced instead of failing the first statement; it costs a
    round trip per checkout."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
        engine = create_engine(parsed, pool_pre_ping=pre_ping)
        _configure_postgresql(engine, role)
        # Reads in autocommit get a pool of their own, whose connections stay in autocommit:
        # switching a shared connection in and out of it on every checkout (and rolling back
        # on every return) cost more than most of the reads themselves.
        reads = create_engine(parsed, pool_pre_ping=pre_ping, isolation_level="AUTOCOMMIT",
                              pool_reset_on_return=None)
        _configure_postgresql(reads, role)
        _READS[engine] = reads
        event.listen(engine, "engine_disposed", lambda _engine: reads.dispose())
        return engine
    if parsed.get_backend_name() != "sqlite":
        raise ValueError(f"unsupported database {parsed.get_backend_name()!r}: use sqlite or "
                         "postgresql")
    engine = create_engine(parsed, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})
    _configure_sqlite(engine)
    return engine


def _configure_postgresql(engine: Engine, role: str | None) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
        with dbapi_connection.cursor() as cursor:
            # Times come back in UTC whatever the server's default zone.
            cursor.execute("SET TIME ZONE 'UTC'")
            if role is not None:
                cursor.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(role)))
        dbapi_connection.commit()


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
        # Take transaction control away from the driver so BEGIN IMMEDIATE can be issued.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        # The busy timeout is the driver's `timeout` (create_engine_for), set on connect.
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # Writers take the write lock up front, so they queue on busy_timeout instead of
        # failing when a read lock cannot be upgraded; readers never block anyone (WAL).
        if conn.get_execution_options().get(WRITE_OPTION):
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            conn.exec_driver_sql("BEGIN")


WRITE_OPTION = "clearing_write"


@contextmanager
def write_transaction(engine: Engine) -> Iterator[Connection]:
    """One writing transaction, committed on success and rolled back on any error."""
    with engine.connect().execution_options(**{WRITE_OPTION: True}) as conn:
        with conn.begin():
            yield conn


def read_connection(engine: Engine) -> Connection:
    """A connection for reads whose statements need no snapshot in common (each is one
    query, or its queries are bounded by log positions). On PostgreSQL it runs in autocommit:
    at READ COMMITTED a read-only transaction shares no snapshot between its statements
    anyway, and skipping BEGIN and ROLLBACK saves two round trips a use, and keeps the
    connection's prepared statements, which every ROLLBACK makes psycopg deallocate. Reads
    that need one snapshot (server-side cursors, several tables at one moment) keep
    `engine.connect()`."""
    reads = _READS.get(engine)
    if reads is not None:
        return reads.connect()
    conn = engine.connect()
    if engine.dialect.name == "postgresql":
        conn.execution_options(isolation_level="AUTOCOMMIT")
    return conn


def reading_engine(engine: Engine) -> Engine:
    """The engine `read_connection` draws from: on PostgreSQL engines of `create_engine_for`,
    a second pool of the same database and role whose connections stay in autocommit."""
    return _READS.get(engine, engine)


_READS: WeakKeyDictionary[Engine, Engine] = WeakKeyDictionary()


def alembic_config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


@cache
def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None, "migrations have no head revision"
    return head


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Migrate the database to `revision` (newest by default)."""
    with engine.connect() as conn:
        command.upgrade(alembic_config(conn), revision)
        conn.commit()


def downgrade(engine: Engine, revision: str) -> None:
    with engine.connect() as conn:
        command.downgrade(alembic_config(conn), revision)
        conn.commit()


def ensure_schema(engine: Engine) -> None:
    """Create the schema on an empty database; refuse to run on an older revision.

    A newcomer's first command must work on an empty database, but silently migrating a
    production database someone else owns is not this function's call.
    """
    current = current_revision(engine)
    head = head_revision()
    if current == head:
        return
    if current is None:
        upgrade(engine)
        return
    raise SchemaOutOfDate(current, head)


def open_database(url: str, *, as_application: bool = True) -> Engine:
    """An engine for the ledger at `url`, its schema created if the database is empty.

    On PostgreSQL the application works as the least-privilege role (see
    `application_role`): the database then refuses it any change to the log, whatever the
    code asks. Migrations, rebuilds of the read models (which create and swap tables) and the
    scheduler's job table run as the login's own role (`as_application=False`)."""
    owner = create_engine_for(url)
    ensure_schema(owner)
    role = application_role()
    if not as_application or role is None or owner.dialect.name != "postgresql":
        return owner
    owner.dispose()
    return create_engine_for(url, role=role)
