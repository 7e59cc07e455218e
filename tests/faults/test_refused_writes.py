"""A database that refuses writes (read-only, disk full): the command fails with one clear
line on stderr and exit code 2 (SPEC section 2: a refused command; no traceback), nothing is
half-written, and once the fault is cleared the same command completes, ending where the
fault-free run ends.

- SQLite read-only, two ways: a read-only URL (`sqlite:///file:PATH?mode=ro&uri=true`), and
  the file's filesystem mounted read-only (a read-only bind mount of its directory; needs
  root, which the test runner is here, else skipped: as root `chmod 444` would not stop
  anything). Reads keep working while the -wal and -shm files exist (another process has
  the database open); with none, SQLite cannot open a WAL database on a read-only medium
  at all, which is said too.
- SQLite disk full: the database on a small tmpfs, filled up to its last 64 KiB, then a file
  of 300 trades imported (needs root to mount; without it, the same error is injected by a
  failing write, as SQLite raises it).
- PostgreSQL read-only: a dedicated database with `ALTER DATABASE ... SET
  default_transaction_read_only = on` (what a standby or an operator's freeze looks like to
  a client), and the same set for the session only through the URL's `options`.
- PostgreSQL disk full cannot be produced here without filling the shared server's disk; the
  server's error (53100) is injected at the moment the append writes, to check what the
  operator is told.
"""

from __future__ import annotations

import gc
import os
import sqlite3
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg.errors
import pytest
from sqlalchemy import Connection, text
from sqlalchemy.engine import make_url
from typer.testing import CliRunner, Result

from clearing.cli import app
from clearing.store.database import create_engine_for
from clearing.store.eventstore import EventStore
from tests.conftest import POSTGRES_URL, _postgres_admin, postgres_problem
from tests.faults.scenario import (
    FAULT_TRADES,
    Outcome,
    Twin,
    assert_same_as,
    build_base,
    cli,
    outcome,
    trades,
    twin,
    with_options,
)
from tests.ledger.harness import LedgerHarness

TMPFS_BYTES = 8 * 1024 * 1024
HEADROOM_BYTES = 64 * 1024
CLEAR_TAIL = "nothing was half-written (each transaction is all or nothing)"


def deposits_rows() -> list[dict[str, str]]:
    return [{"ref": f"RO-{n}", "account_id": f"m{n % 12:02d}", "asset": "USDC",
             "amount": f"{1000 + n}.25", "time": "2026-11-02T12:00:00Z"} for n in range(40)]


def run(*args: str) -> Result:
    return CliRunner().invoke(app, list(args), catch_exceptions=False)


def assert_refused(result: Result, reason: str) -> None:
    """Exit 2, nothing on stdout, one line on stderr naming `reason`."""
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: database error: {reason}"), lines[0]
    assert CLEAR_TAIL in lines[0]


@pytest.fixture
def sqlite_reference(tmp_path: Path) -> Iterator[tuple[Twin, Path, Path]]:
    """A fault-free SQLite ledger that imported a deposits file and a trades file."""
    reference = twin("sqlite", tmp_path, "reference")
    deposits = reference.harness.write_file("deposits", deposits_rows())
    trades_file = reference.harness.write_file("trades", trades())
    cli("import", "deposits", str(deposits), "--db", reference.url)
    cli("import", "trades", str(trades_file), "--db", reference.url)
    yield reference, deposits, trades_file
    reference.backend.close()


def closed(victim: Twin) -> None:
    """Close every connection this process holds to the victim (pools of earlier commands
    too), so that the filesystem can be remounted."""
    victim.harness.engine.dispose()
    gc.collect()


# ------------------------------------------------------------------ SQLite, read-only


def test_sqlite_read_only_url_refuses_the_import_cleanly(
    sqlite_reference: tuple[Twin, Path, Path], tmp_path: Path,
) -> None:
    reference, deposits, trades_file = sqlite_reference
    victim = twin("sqlite", tmp_path, "victim")
    path = make_url(victim.url).database
    read_only = f"sqlite:///file:{path}?mode=ro&uri=true"
    before = outcome(victim.url)

    assert_refused(run("import", "deposits", str(deposits), "--db", read_only),
                   "the database is read-only (attempt to write a readonly database)")
    assert run("balances", "--db", read_only, "--json").stdout == before.balances
    assert outcome(victim.url) == before

    cli("import", "deposits", str(deposits), "--db", victim.url)
    cli("import", "trades", str(trades_file), "--db", victim.url)
    assert_same_as(victim.url, outcome(reference.url))
    victim.backend.close()


@contextmanager
def read_only_view(directory: Path) -> Iterator[Path]:
    """`directory` seen through a read-only bind mount (root only)."""
    if os.geteuid() != 0:
        pytest.skip("a read-only mount needs root (and chmod does not bind root)")
    view = Path(tempfile.mkdtemp(prefix="clearing-ro-"))
    mounted = subprocess.run(["mount", "--bind", str(directory), str(view)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        view.rmdir()
        pytest.skip(f"cannot bind-mount here: {mounted.stderr.strip()}")
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(view)], check=True)
        yield view
    finally:
        gc.collect()  # the pools of the commands run through the view
        if subprocess.run(["umount", str(view)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(view)], check=True)
        view.rmdir()


def test_sqlite_on_a_read_only_filesystem_refuses_the_import_cleanly(
    sqlite_reference: tuple[Twin, Path, Path], tmp_path: Path,
) -> None:
    reference, deposits, trades_file = sqlite_reference
    victim = twin("sqlite", tmp_path, "victim")
    before = outcome(victim.url)
    closed(victim)
    database = Path(make_url(victim.url).database)
    with read_only_view(database.parent) as view:
        url = f"sqlite:///{view / database.name}"
        # Another process (here: a connection) has the database open: its -wal and -shm
        # files exist, readers can read, the writer is refused.
        keeper = sqlite3.connect(database)
        keeper.execute("SELECT count(*) FROM events").fetchone()
        try:
            assert_refused(run("import", "deposits", str(deposits), "--db", url),
                           "the database is read-only (attempt to write a readonly database)")
            assert run("balances", "--db", url, "--json").stdout == before.balances
        finally:
            gc.collect()  # the commands' connections through the view first,
            keeper.close()  # then the last one, which removes the -wal and -shm files
        # Nobody has it open: SQLite cannot open a WAL database on a read-only medium.
        assert_refused(run("import", "deposits", str(deposits), "--db", url),
                       "the database file cannot be opened")
    assert outcome(victim.url) == before

    cli("import", "deposits", str(deposits), "--db", victim.url)
    cli("import", "trades", str(trades_file), "--db", victim.url)
    assert_same_as(victim.url, outcome(reference.url))
    victim.backend.close()


# ------------------------------------------------------------------ SQLite, disk full


@contextmanager
def small_tmpfs(size_bytes: int) -> Iterator[Path | None]:
    """A tmpfs of `size_bytes`, or None where mounting is not allowed."""
    mountpoint = Path(tempfile.mkdtemp(prefix="clearing-tmpfs-"))
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs",
                              str(mountpoint)], capture_output=True, text=True)
    if mounted.returncode != 0:
        mountpoint.rmdir()
        yield None
        return
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=True)
        mountpoint.rmdir()


def fill(mountpoint: Path, leave_bytes: int) -> Path:
    stats = os.statvfs(mountpoint)
    free = stats.f_bavail * stats.f_frsize
    filler = mountpoint / "filler"
    with filler.open("wb") as handle:
        handle.write(b"\0" * max(free - leave_bytes, 0))
    return filler


def test_sqlite_disk_full_refuses_the_import_cleanly_and_the_rerun_completes_once(
    sqlite_reference: tuple[Twin, Path, Path], monkeypatch: pytest.MonkeyPatch,
) -> None:
    reference, deposits, trades_file = sqlite_reference
    expected = outcome(reference.url)
    with small_tmpfs(TMPFS_BYTES) as mountpoint:
        workdir = mountpoint if mountpoint is not None else Path(tempfile.mkdtemp())
        victim = twin("sqlite", workdir, "victim")
        cli("import", "deposits", str(deposits), "--db", victim.url)
        before = outcome(victim.url)
        if mountpoint is not None:
            filler = fill(mountpoint, HEADROOM_BYTES)
        else:  # no mount allowed: the write fails as SQLite fails it on a full disk
            import clearing.store.eventstore as eventstore_module

            def full(*_: Any) -> None:
                raise sqlite3.OperationalError("database or disk is full")
            monkeypatch.setattr(eventstore_module, "_insert_sqlite_events", full)

        assert_refused(run("import", "trades", str(trades_file), "--db", victim.url),
                       "the disk holding the database is full (database or disk is full)")

        if mountpoint is not None:
            filler.unlink()
        monkeypatch.undo()
        assert outcome(victim.url) == before
        assert f"{FAULT_TRADES} trades recorded" in cli("import", "trades", str(trades_file),
                                                        "--db", victim.url)
        assert_same_as(victim.url, expected)
        closed(victim)
        victim.backend.close()


# ------------------------------------------------------------------ PostgreSQL


@pytest.fixture
def pg_reference(tmp_path: Path) -> Iterator[tuple[Outcome, Path, Path]]:
    reference = twin("postgresql", tmp_path, "reference")
    deposits = reference.harness.write_file("deposits", deposits_rows())
    trades_file = reference.harness.write_file("trades", trades())
    cli("import", "deposits", str(deposits), "--db", reference.url)
    cli("import", "trades", str(trades_file), "--db", reference.url)
    yield outcome(reference.url), deposits, trades_file
    reference.backend.close()


@contextmanager
def dedicated_database(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """A database of its own on the test server (its settings touch nobody else): its
    name and URL, with the base book imported."""
    problem = postgres_problem()
    if problem is not None:
        pytest.skip(f"PostgreSQL unavailable: {problem}")
    name = f"clearing_ro_{uuid.uuid4().hex[:10]}"
    admin = _postgres_admin().execution_options(isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(POSTGRES_URL).set(drivername="postgresql+psycopg", database=name
                                     ).render_as_string(hide_password=False)
    try:
        harness = LedgerHarness(url, create_engine_for(url), tmp_path / "files")
        build_base(harness)
        harness.engine.dispose()
        yield name, url
    finally:
        gc.collect()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.engine.dispose()


def test_postgresql_read_only_database_refuses_the_import_cleanly(
    pg_reference: tuple[Outcome, Path, Path], tmp_path: Path,
) -> None:
    expected, deposits, trades_file = pg_reference
    with dedicated_database(tmp_path / "victim") as (name, url):
        before = outcome(url)
        admin = _postgres_admin().execution_options(isolation_level="AUTOCOMMIT")
        try:
            with admin.connect() as conn:
                conn.execute(text(f'ALTER DATABASE "{name}" SET '
                                  "default_transaction_read_only = on"))
            gc.collect()  # earlier commands' pooled connections predate the setting
            assert_refused(run("import", "deposits", str(deposits), "--db", url),
                           "the database is read-only (cannot execute")
            assert "[25006]" in run("import", "deposits", str(deposits), "--db",
                                    url).stderr
            assert run("balances", "--db", url, "--json").stdout == before.balances
            with admin.connect() as conn:
                conn.execute(text(f'ALTER DATABASE "{name}" RESET '
                                  "default_transaction_read_only"))
        finally:
            admin.engine.dispose()
        gc.collect()
        assert outcome(url) == before
        cli("import", "deposits", str(deposits), "--db", url)
        cli("import", "trades", str(trades_file), "--db", url)
        assert_same_as(url, expected)


def test_postgresql_read_only_session_refuses_the_import_cleanly(
    pg_reference: tuple[Outcome, Path, Path], tmp_path: Path,
) -> None:
    expected, deposits, trades_file = pg_reference
    victim = twin("postgresql", tmp_path, "victim")
    try:
        read_only = with_options(victim.url, "default_transaction_read_only=on")
        before = outcome(victim.url)
        assert_refused(run("import", "trades", str(trades_file), "--db", read_only),
                       "the database is read-only (cannot execute")
        assert outcome(victim.url) == before
        cli("import", "deposits", str(deposits), "--db", victim.url)
        cli("import", "trades", str(trades_file), "--db", victim.url)
        assert_same_as(victim.url, expected)
    finally:
        victim.backend.close()


def test_postgresql_disk_full_is_reported_in_one_line_and_writes_nothing(
    pg_reference: tuple[Outcome, Path, Path], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    expected, deposits, trades_file = pg_reference
    victim = twin("postgresql", tmp_path, "victim")
    try:
        real = EventStore._append_in

        def server_disk_full(self: EventStore, conn: Connection, *args: Any) -> Any:
            real(self, conn, *args)
            raise psycopg.errors.DiskFull(
                'could not extend file "base/16384/16385": No space left on device')

        cli("import", "deposits", str(deposits), "--db", victim.url)
        before = outcome(victim.url)
        monkeypatch.setattr(EventStore, "_append_in", server_disk_full)
        assert_refused(run("import", "trades", str(trades_file), "--db", victim.url),
                       "the database server's disk is full (could not extend file")
        monkeypatch.undo()
        assert outcome(victim.url) == before
        cli("import", "trades", str(trades_file), "--db", victim.url)
        assert_same_as(victim.url, expected)
    finally:
        victim.backend.close()
