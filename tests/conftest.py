"""Shared fixtures: every store contract runs once per backend from one parametrised fixture.

PostgreSQL comes from CLEARING_TEST_POSTGRES_URL (default: the local server); each test gets
its own schema, so runs never collide. Under CI (CI=true) an unreachable PostgreSQL fails the
run instead of skipping it.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url

from clearing.store.database import create_engine_for, upgrade

POSTGRES_URL = os.environ.get(
    "CLEARING_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
UNDER_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
BACKENDS = ["sqlite", "postgresql"]


def _postgres_admin() -> Engine:
    return create_engine(make_url(POSTGRES_URL).set(drivername="postgresql+psycopg"))


def _postgres_available() -> str | None:
    try:
        with _postgres_admin().connect() as conn:
            conn.execute(text("SELECT 1"))
        return None
    except Exception as exc:  # noqa: BLE001 - any failure to connect means "unavailable"
        return str(exc).splitlines()[0]


_PG_PROBLEM: str | None | bool = False


def postgres_problem() -> str | None:
    global _PG_PROBLEM
    if _PG_PROBLEM is False:
        _PG_PROBLEM = _postgres_available()
    return _PG_PROBLEM  # type: ignore[return-value]


def schema_url(schema: str) -> str:
    url = make_url(POSTGRES_URL).set(drivername="postgresql+psycopg")
    query = dict(url.query)
    query["options"] = f"-csearch_path={schema}"
    return url.set(query=query).render_as_string(hide_password=False)


class Backend:
    """A fresh, empty database of one kind, and its URL for commands and subprocesses."""

    def __init__(self, kind: str, url: str, cleanup):  # type: ignore[no-untyped-def]
        self.kind = kind
        self.url = url
        self._cleanup = cleanup
        self._engines: list[Engine] = []

    def engine(self) -> Engine:
        engine = create_engine_for(self.url)
        self._engines.append(engine)
        return engine

    def close(self) -> None:
        for engine in self._engines:
            engine.dispose()
        self._cleanup()


def make_backend(kind: str, tmp_path: Path) -> Backend:
    if kind == "sqlite":
        return Backend(kind, f"sqlite:///{tmp_path / 'ledger.db'}", lambda: None)
    problem = postgres_problem()
    if problem is not None:
        message = f"PostgreSQL unavailable at {POSTGRES_URL}: {problem}"
        if UNDER_CI:
            pytest.fail(message)
        pytest.skip(message)
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = _postgres_admin()
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))

    def drop() -> None:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()

    return Backend(kind, schema_url(schema), drop)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """An empty database, once per backend."""
    db = make_backend(request.param, tmp_path)
    try:
        yield db
    finally:
        db.close()


@pytest.fixture
def engine(backend: Backend) -> Engine:
    """A migrated database, once per backend."""
    eng = backend.engine()
    upgrade(eng)
    return eng
