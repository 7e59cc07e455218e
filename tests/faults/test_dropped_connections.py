"""Dropped database connections (PostgreSQL): the backend is terminated with
`pg_terminate_backend` from another connection at a chosen moment, as a server restart, a
failover or an operator's kill would. The operation is retried, bounded, and never applied
twice; a connection that cannot be had within the bound ends in a clear one-line error with
nothing half-written. Every scenario ends where the fault-free run ends.

The moments: inside an append's transaction after its rows are written (before COMMIT);
right after an append's COMMIT, the acknowledgement lost; inside a projection page's
transaction after the page is applied (before the checkpoint moves); between two pages of a
read; idle in the connection pool between two commands; and on every attempt of an append.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import Connection, Engine, event, text
from typer.testing import CliRunner

import clearing.store.eventstore as eventstore_module
from clearing.app import Ledger
from clearing.cli import app
from clearing.projections.ledger import LedgerProjection
from clearing.store.database import create_engine_for, reading_engine
from clearing.store.eventstore import APPEND_RETRIES_MAX, EventStore
from clearing.store.failures import RETRY_ATTEMPTS_MAX
from tests.conftest import _postgres_admin
from tests.faults.scenario import (
    FAULT_TRADES,
    Twin,
    assert_same_as,
    cli,
    event_count,
    outcome,
    trades,
    twin,
)

KILL_WAIT_S = 10.0


@pytest.fixture
def admin() -> Iterator[Engine]:
    engine = _postgres_admin()
    yield engine
    engine.dispose()


@pytest.fixture
def twins(tmp_path: Path) -> Iterator[tuple[Twin, Twin, Path]]:
    """A fault-free PostgreSQL ledger that imported the trades file, a twin that has not,
    and the file."""
    reference, victim = (twin("postgresql", tmp_path, "reference"),
                         twin("postgresql", tmp_path, "victim"))
    try:
        path = reference.harness.write_file("trades", trades())
        cli("import", "trades", str(path), "--db", reference.url)
        yield reference, victim, path
    finally:
        reference.backend.close()
        victim.backend.close()


def backend_pid(conn: Connection) -> int:
    return int(conn.connection.driver_connection.info.backend_pid)


def terminate(admin: Engine, pid: int) -> None:
    """Kill backend `pid` and wait until it is gone."""
    with admin.connect() as conn:
        assert conn.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid}).scalar()
        deadline = time.monotonic() + KILL_WAIT_S
        while conn.execute(text("SELECT count(*) FROM pg_stat_activity WHERE pid = :p"),
                           {"p": pid}).scalar():
            assert time.monotonic() < deadline, f"backend {pid} survived its termination"
            time.sleep(0.01)
            conn.rollback()


def import_json(url: str, path: Path) -> dict[str, Any]:
    return json.loads(cli("import", "trades", str(path), "--db", url, "--json"))


def test_connection_killed_inside_an_append_is_retried_and_written_once(
    twins: tuple[Twin, Twin, Path], admin: Engine, monkeypatch: pytest.MonkeyPatch,
) -> None:
    reference, victim, path = twins
    real = EventStore._append_in
    attempts: list[int] = []

    def killed_before_commit(self: EventStore, conn: Connection, *args: Any) -> Any:
        result = real(self, conn, *args)
        attempts.append(result.written)
        if len(attempts) == 1:  # everything written, not committed: the backend dies
            terminate(admin, backend_pid(conn))
        return result

    monkeypatch.setattr(EventStore, "_append_in", killed_before_commit)
    report = import_json(victim.url, path)

    assert attempts == [FAULT_TRADES, FAULT_TRADES]  # the retry wrote them, once
    assert report["written"] == FAULT_TRADES
    assert_same_as(victim.url, outcome(reference.url))


def test_an_append_whose_commit_acknowledgement_is_lost_is_recognised_not_written_twice(
    twins: tuple[Twin, Twin, Path], admin: Engine, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The worst moment: COMMIT reached the server and succeeded, and the connection died
    before the client heard so. The retry finds every key stored at the positions its first
    attempt took: it writes nothing and reports them as its own."""
    reference, victim, path = twins
    real = eventstore_module.write_transaction
    commits: list[int] = []

    @contextmanager
    def acknowledgement_lost(engine: Engine) -> Iterator[Connection]:
        with real(engine) as conn:
            pid = backend_pid(conn)
            yield conn
        commits.append(pid)
        if len(commits) == 1:
            terminate(admin, pid)
            raise psycopg.OperationalError(
                "consuming input failed: server closed the connection unexpectedly")

    monkeypatch.setattr(eventstore_module, "write_transaction", acknowledgement_lost)
    before = event_count(victim.url)
    report = import_json(victim.url, path)

    assert len(commits) == 2
    assert report["written"] == FAULT_TRADES
    assert event_count(victim.url) == before + FAULT_TRADES
    assert_same_as(victim.url, outcome(reference.url))


def test_connection_killed_inside_a_projection_page_is_retried_and_applied_once(
    twins: tuple[Twin, Twin, Path], admin: Engine, monkeypatch: pytest.MonkeyPatch,
) -> None:
    reference, victim, path = twins
    real = LedgerProjection.apply
    pages: list[int] = []

    def killed_before_checkpoint(self: LedgerProjection, conn: Connection, facts: Any,
                                 tables: Any, *known: Any) -> Any:
        folded = real(self, conn, facts, tables, *known)
        pages.append(len(facts))
        if len(pages) == 1:  # the page is applied, the checkpoint not moved: the backend dies
            terminate(admin, backend_pid(conn))
        return folded

    monkeypatch.setattr(LedgerProjection, "apply", killed_before_checkpoint)
    report = import_json(victim.url, path)

    assert report["written"] == FAULT_TRADES
    assert pages == [FAULT_TRADES, FAULT_TRADES]  # rolled back once, applied once
    assert_same_as(victim.url, outcome(reference.url))


def test_connection_killed_between_pages_of_a_read_resumes_without_skip_or_repeat(
    twins: tuple[Twin, Twin, Path], admin: Engine, monkeypatch: pytest.MonkeyPatch,
) -> None:
    reference, _, _ = twins
    engine = create_engine_for(reference.url)
    try:
        store = EventStore(engine)
        undisturbed = [(r.position, r.hash) for r in store.read_all(page_size=40)]
        assert len(undisturbed) > 5 * 40

        real = EventStore._read_page
        calls: list[int] = []

        def killed_before_third_page(self: EventStore, after: Any, bounds: Any, size: int,
                                     visible_below: Any, conn: Connection, **options: Any) -> Any:
            calls.append(backend_pid(conn))
            if len(calls) == 3:
                terminate(admin, calls[-1])
            return real(self, after, bounds, size, visible_below, conn, **options)

        monkeypatch.setattr(EventStore, "_read_page", killed_before_third_page)
        disturbed = [(r.position, r.hash) for r in store.read_all(page_size=40)]

        assert disturbed == undisturbed
        assert calls[2] != calls[3]  # the fourth page came over a new connection
    finally:
        engine.dispose()


def test_idle_pooled_connections_killed_between_commands_are_replaced(
    twins: tuple[Twin, Twin, Path], admin: Engine,
) -> None:
    """`pool_pre_ping`: a connection the server dropped while it sat in the pool is noticed
    at checkout and replaced, so the next command never sees it."""
    reference, _, _ = twins
    engine = create_engine_for(reference.url)
    pids: list[int] = []
    for pool in {engine, reading_engine(engine)}:  # the reads' pool is checked the same way
        event.listen(pool, "connect", lambda dbapi, _record: pids.append(
            dbapi.info.backend_pid))
    try:
        ledger = Ledger(engine)
        balances = ledger.balance("m00", "USDC")
        ledger.refresh()
        assert pids
        for pid in list(pids):
            terminate(admin, pid)
        assert ledger.balance("m00", "USDC") == balances
        ledger.refresh()
        assert len(pids) > 1
    finally:
        engine.dispose()


def test_a_connection_lost_on_every_attempt_ends_in_one_clear_line_and_writes_nothing(
    twins: tuple[Twin, Twin, Path], admin: Engine, monkeypatch: pytest.MonkeyPatch,
) -> None:
    reference, victim, path = twins
    real = EventStore._append_in
    attempts: list[int] = []

    def always_killed(self: EventStore, conn: Connection, *args: Any) -> Any:
        result = real(self, conn, *args)
        attempts.append(result.written)
        terminate(admin, backend_pid(conn))
        return result

    before = outcome(victim.url)
    monkeypatch.setattr(EventStore, "_append_in", always_killed)
    result = CliRunner().invoke(app, ["import", "trades", str(path), "--db", victim.url],
                                catch_exceptions=False)
    monkeypatch.undo()

    assert APPEND_RETRIES_MAX == RETRY_ATTEMPTS_MAX == 5
    assert len(attempts) == APPEND_RETRIES_MAX  # bounded
    assert result.exit_code == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("error: database error: the connection to the database was "
                               "lost (terminating connection due to administrator command "
                               "[57P01]); nothing was half-written"), lines[0]
    assert result.stdout == ""
    assert outcome(victim.url) == before

    assert import_json(victim.url, path)["written"] == FAULT_TRADES
    assert_same_as(victim.url, outcome(reference.url))
