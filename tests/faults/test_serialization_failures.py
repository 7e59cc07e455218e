"""Serialization failures (40001) and deadlocks (40P01) inside an append: the append is run
again, bounded, and its facts are written once; when they persist past the bound the command
ends in one clear line and writes nothing.

Genuine failures, from PostgreSQL itself (PostgreSQL):
- a deadlock: a transaction holds the stream head's row lock while the append waits for it,
  then asks for the append's stream lock; the server's deadlock detector aborts the append;
- a serialization failure: with `default_transaction_isolation = serializable` (a setting a
  DBA may choose), a transaction updates a stream head after the append took its snapshot
  and while the append waited for the stream's lock; the append's write of that head is then
  refused with "could not serialize access due to concurrent update".
Injected ones (both backends), raised by a wrapper of `EventStore._append_in` after the
append's rows are written and before COMMIT, as the driver raises them: a whole ledger
import meeting one, and meeting one on every attempt. SQLite serialises writers at
`BEGIN IMMEDIATE` and knows neither failure; its transient failure is "database is locked"
(a writer that waited out the busy timeout), injected there instead.
"""

from __future__ import annotations

import sqlite3
import threading
import time
import zlib
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import psycopg.errors
import pytest
from sqlalchemy import Connection, Engine, event, text
from typer.testing import CliRunner

import clearing.store.eventstore as eventstore_module
from clearing.cli import app
from clearing.store.database import create_engine_for, upgrade
from clearing.store.eventstore import (
    APPEND_RETRIES_MAX,
    LOCK_BUCKETS,
    LOCK_NAMESPACE,
    EventStore,
    PendingEvent,
)
from clearing.store.hashchain import verify_chain
from tests.conftest import Backend, make_backend
from tests.faults.scenario import (
    FAULT_TRADES,
    Twin,
    assert_same_as,
    cli,
    outcome,
    trades,
    twin,
    with_options,
)
from tests.store.events_for_tests import Noted, test_catalogue

WAIT_S = 30.0
DEADLOCK_TIMEOUT_MS = 200
"""The append's sessions check for deadlocks after this long (the server default is 1 s)."""


def injected(kind: str, sqlstate: str) -> Exception:
    if kind == "sqlite":
        return sqlite3.OperationalError("database is locked")
    return {"40001": psycopg.errors.SerializationFailure(
                "could not serialize access due to read/write dependencies among "
                "transactions"),
            "40P01": psycopg.errors.DeadlockDetected("deadlock detected")}[sqlstate]


@pytest.fixture
def twins(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Twin, Twin, Path]]:
    kind = request.param
    reference, victim = twin(kind, tmp_path, "reference"), twin(kind, tmp_path, "victim")
    try:
        path = reference.harness.write_file("trades", trades())
        cli("import", "trades", str(path), "--db", reference.url)
        yield reference, victim, path
    finally:
        reference.backend.close()
        victim.backend.close()


CASES = [("sqlite", "busy"), ("postgresql", "40001"), ("postgresql", "40P01")]


@pytest.mark.parametrize(("twins", "sqlstate"), CASES, indirect=["twins"],
                         ids=[f"{k}-{s}" for k, s in CASES])
def test_a_failure_inside_an_append_is_retried_and_the_import_written_once(
    twins: tuple[Twin, Twin, Path], sqlstate: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    reference, victim, path = twins
    kind = victim.backend.kind
    real = EventStore._append_in
    attempts: list[int] = []

    def fails_once(self: EventStore, conn: Connection, *args: Any) -> Any:
        result = real(self, conn, *args)
        attempts.append(result.written)
        if len(attempts) == 1:
            raise injected(kind, sqlstate)
        return result

    monkeypatch.setattr(EventStore, "_append_in", fails_once)
    result = CliRunner().invoke(app, ["import", "trades", str(path), "--db", victim.url],
                                catch_exceptions=False)

    assert result.exit_code == 0, result.output
    assert attempts == [FAULT_TRADES, FAULT_TRADES]
    assert f"{FAULT_TRADES} trades recorded" in result.stdout
    assert_same_as(victim.url, outcome(reference.url))


@pytest.mark.parametrize(("twins", "sqlstate"), CASES, indirect=["twins"],
                         ids=[f"{k}-{s}" for k, s in CASES])
def test_failures_on_every_attempt_end_in_one_clear_line_and_write_nothing(
    twins: tuple[Twin, Twin, Path], sqlstate: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    reference, victim, path = twins
    kind = victim.backend.kind
    real = EventStore._append_in
    attempts: list[int] = []

    def always_fails(self: EventStore, conn: Connection, *args: Any) -> Any:
        attempts.append(real(self, conn, *args).written)
        raise injected(kind, sqlstate)

    before = outcome(victim.url)
    monkeypatch.setattr(EventStore, "_append_in", always_fails)
    result = CliRunner().invoke(app, ["import", "trades", str(path), "--db", victim.url],
                                catch_exceptions=False)
    monkeypatch.undo()

    assert len(attempts) == APPEND_RETRIES_MAX
    assert result.exit_code == 2 and result.stdout == ""
    (line,) = result.stderr.splitlines()
    reason = {"busy": "the database stayed locked by another writer",
              "40001": "serialization failures persisted",
              "40P01": "deadlocks persisted"}[sqlstate]
    assert line.startswith(f"error: database error: {reason} ("), line
    assert "nothing was half-written" in line
    assert outcome(victim.url) == before

    assert f"{FAULT_TRADES} trades recorded" in cli("import", "trades", str(path),
                                                    "--db", victim.url)
    assert_same_as(victim.url, outcome(reference.url))


# ------------------------------------------------------------------ genuine, PostgreSQL


@pytest.fixture
def postgresql(tmp_path: Path) -> Iterator[Backend]:
    backend = make_backend("postgresql", tmp_path)
    upgrade(backend.engine())
    yield backend
    backend.close()


def noted(stream: str, key: str) -> list[PendingEvent]:
    return [PendingEvent(stream, Noted(text=key), key, datetime(2026, 12, 1, tzinfo=UTC))]


class Spy:
    """Records each attempt's outcome of `EventStore.append` as the retry loop sees it."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.failures: list[str | None] = []
        real = eventstore_module.is_transient

        def spy(exc: BaseException) -> bool:
            self.failures.append(getattr(getattr(exc, "orig", exc), "sqlstate", None))
            return real(exc)

        monkeypatch.setattr(eventstore_module, "is_transient", spy)


def tracked(url: str) -> tuple[Engine, list[int]]:
    """An engine, and the server process ids of every connection it opens."""
    engine = create_engine_for(url)
    pids: list[int] = []
    event.listen(engine, "connect", lambda dbapi, _record: pids.append(
        dbapi.info.backend_pid))
    return engine, pids


def wait_for_lock(engine: Engine, pids: list[int], locktype: str,
                  timeout_s: float = WAIT_S) -> None:
    """Until one of `pids` waits for a lock of `locktype`."""
    deadline = time.monotonic() + timeout_s
    with engine.connect() as conn:
        while not conn.execute(text(
                "SELECT count(*) FROM pg_locks WHERE NOT granted AND locktype = :t "
                "AND pid = ANY(:pids)"), {"t": locktype, "pids": pids}).scalar():
            assert time.monotonic() < deadline, f"no {locktype} lock wait in {pids}"
            conn.rollback()
            time.sleep(0.01)


def run_in_thread(target: Any) -> tuple[threading.Thread, dict[str, Any]]:
    outcome_: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome_["result"] = target()
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            outcome_["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome_


def test_a_genuine_deadlock_aborts_the_append_which_is_retried_and_written_once(
    postgresql: Backend, monkeypatch: pytest.MonkeyPatch,
) -> None:
    engine, pids = tracked(with_options(postgresql.url,
                                        f"deadlock_timeout={DEADLOCK_TIMEOUT_MS}"))
    other = postgresql.engine()
    try:
        store = EventStore(engine, event_catalogue=test_catalogue)
        store.append(noted("acct-1", "first"))
        spy = Spy(monkeypatch)
        bucket = zlib.crc32(b"acct-1") % LOCK_BUCKETS
        with other.connect() as blocker:
            # The other transaction holds the stream head's row; it would check for a
            # deadlock only after 30 s, so the append is the one the server aborts.
            blocker.execute(text("SET LOCAL deadlock_timeout = '30s'"))
            blocker.execute(text("SELECT version FROM streams WHERE stream_id = 'acct-1' "
                                 "FOR UPDATE"))
            thread, result = run_in_thread(lambda: store.append(noted("acct-1", "second")))
            # The append has its stream lock and waits for the head's row ...
            wait_for_lock(other, pids, "transactionid")
            # ... and the other transaction now waits for the append's stream lock.
            blocker.execute(text("SELECT pg_advisory_xact_lock(:ns, :b)"),
                            {"ns": LOCK_NAMESPACE, "b": bucket})
            blocker.rollback()
            thread.join(WAIT_S)
        assert "error" not in result, result
        assert result["result"].written == 1
        assert spy.failures == ["40P01"]
        assert [(r.stream_version, r.idempotency_key) for r in store.read_all()] == [
            (1, "first"), (2, "second")]
        assert verify_chain(engine).ok
    finally:
        engine.dispose()


def test_a_genuine_serialization_failure_is_retried_and_written_once(
    postgresql: Backend, monkeypatch: pytest.MonkeyPatch,
) -> None:
    engine, pids = tracked(with_options(postgresql.url,
                                        "default_transaction_isolation=serializable"))
    other = postgresql.engine()
    try:
        store = EventStore(engine, event_catalogue=test_catalogue)
        store.append(noted("acct-1", "first"))
        spy = Spy(monkeypatch)
        bucket = zlib.crc32(b"acct-1") % LOCK_BUCKETS
        with other.connect() as maintenance:
            # Another transaction takes the stream's lock and touches its head ...
            maintenance.execute(text("SELECT pg_advisory_xact_lock(:ns, :b)"),
                                {"ns": LOCK_NAMESPACE, "b": bucket})
            maintenance.execute(text("UPDATE streams SET version = version "
                                     "WHERE stream_id = 'acct-1'"))
            # ... while the append, its snapshot taken, waits for that lock.
            thread, result = run_in_thread(lambda: store.append(noted("acct-1", "second")))
            wait_for_lock(other, pids, "advisory")
            maintenance.commit()
            thread.join(WAIT_S)
        assert "error" not in result, result
        assert result["result"].written == 1
        assert spy.failures == ["40001"]
        assert [(r.stream_version, r.idempotency_key) for r in store.read_all()] == [
            (1, "first"), (2, "second")]
        assert verify_chain(engine).ok
    finally:
        engine.dispose()
