"""Migrations are the only source of schema: up from empty, down to nothing, up again."""

from __future__ import annotations

import pytest
from sqlalchemy import inspect

from clearing.store.database import (
    current_revision,
    downgrade,
    ensure_schema,
    head_revision,
    upgrade,
)
from clearing.store.errors import SchemaOutOfDate

STORE_TABLES = {"events", "streams", "checkpoints"}


def table_names(engine) -> set[str]:  # type: ignore[no-untyped-def]
    return set(inspect(engine).get_table_names()) - {"alembic_version", "sqlite_sequence"}


def test_migrations_go_up_from_empty_and_down_again(backend) -> None:  # type: ignore[no-untyped-def]
    engine = backend.engine()
    assert table_names(engine) == set()
    upgrade(engine)
    assert current_revision(engine) == head_revision()
    assert STORE_TABLES <= table_names(engine)
    downgrade(engine, "base")
    assert current_revision(engine) is None
    assert table_names(engine) == set()
    upgrade(engine)
    assert STORE_TABLES <= table_names(engine)


def test_each_revision_downgrades_one_step(backend) -> None:  # type: ignore[no-untyped-def]
    engine = backend.engine()
    upgrade(engine)
    while current_revision(engine) is not None:
        before = current_revision(engine)
        downgrade(engine, "-1")
        assert current_revision(engine) != before


def test_empty_database_is_created_on_first_use(backend) -> None:  # type: ignore[no-untyped-def]
    engine = backend.engine()
    ensure_schema(engine)
    assert current_revision(engine) == head_revision()


def test_older_schema_is_refused_with_advice(backend) -> None:  # type: ignore[no-untyped-def]
    engine = backend.engine()
    upgrade(engine, "0001")
    if head_revision() == "0001":
        pytest.skip("only one revision exists so far")
    with pytest.raises(SchemaOutOfDate, match="clearing db upgrade"):
        ensure_schema(engine)
