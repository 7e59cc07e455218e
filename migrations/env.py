"""Alembic environment: runs on a connection handed over by `clearing`, or on the URL from
CLEARING_DATABASE_URL when Alembic is run by hand."""

from __future__ import annotations

from alembic import context

from clearing.config import database_url
from clearing.store.database import create_engine_for

config = context.config


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        context.configure(connection=connection, transaction_per_migration=True)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = create_engine_for(config.get_main_option("sqlalchemy.url") or database_url())
    with engine.connect() as conn:
        context.configure(connection=conn, transaction_per_migration=True)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


run_migrations_online()
