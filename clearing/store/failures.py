"""What a failed database call means: retry it, or stop with a clear one-line reason.

Three kinds of failure reach the store from either driver (raw psycopg / sqlite3 errors on the
hot paths, the same wrapped in SQLAlchemy's `DBAPIError` elsewhere):

- transient conflicts: a serialization failure (40001), a deadlock (40P01), SQLite's
  "database is locked"; and, for an append only, a racing duplicate (23505: another writer
  stored the same idempotency key first). The transaction was rolled back whole; running it
  again resolves it.
- a lost connection: the server terminated the backend (57P01 `pg_terminate_backend`, 57P02,
  57P03), the network dropped (class 08, or psycopg's "the connection is lost" with no
  SQLSTATE). The transaction in progress was rolled back, unless the loss came while its
  COMMIT was in flight, when it may have committed: only a caller whose retry is idempotent
  may retry (an append, whose idempotency keys recognise what a lost COMMIT wrote; a
  projection page, whose checkpoint says whether it was applied; a read).
- everything else, among it a database that refuses writes (read-only, disk full, no
  privilege): retrying cannot help; `describe` turns it into one line for the operator.

Retries are bounded (`RETRY_ATTEMPTS_MAX`) with a short, jittered, doubling backoff, so a
server restart or a storm of deadlocks ends in a clear error, not a loop.
"""

from __future__ import annotations

import random
import sqlite3
import time
from collections.abc import Callable
from typing import TypeVar

import psycopg
from sqlalchemy.exc import DBAPIError

RETRY_ATTEMPTS_MAX = 5
"""Attempts in all (the first one included) before a transient failure is raised."""
RETRY_BACKOFF_S = 0.05
"""Sleep before the second attempt; it doubles for each further one (with jitter), so five
attempts wait about 0.75 s in all: enough for a terminated backend or a deadlock victim,
short enough that a database that is really gone is reported at once."""
RETRY_BACKOFF_MAX_S = 1.0
_JITTER = random.Random()
"""A generator of its own: backoff never draws from (and so never shifts) the global one a
seeded simulation may use."""

DATABASE_ERRORS = (DBAPIError, psycopg.Error, sqlite3.Error)
"""Every error the drivers raise, wrapped by SQLAlchemy or not."""

CONFLICT_SQLSTATES = frozenset({"40001", "40P01"})
DUPLICATE_SQLSTATE = "23505"
CONNECTION_SQLSTATES = frozenset({"57P01", "57P02", "57P03"})

T = TypeVar("T")


def driver_error(exc: BaseException) -> BaseException:
    """The driver's own exception under a SQLAlchemy wrapper (or `exc` itself)."""
    return getattr(exc, "orig", None) or exc


def sqlstate(exc: BaseException) -> str | None:
    return getattr(driver_error(exc), "sqlstate", None)


def is_conflict(exc: BaseException) -> bool:
    """A serialization failure, a deadlock or SQLite's busy lock."""
    orig = driver_error(exc)
    return sqlstate(exc) in CONFLICT_SQLSTATES or (
        isinstance(orig, sqlite3.OperationalError) and "database is locked" in str(orig))


def is_racing_duplicate(exc: BaseException) -> bool:
    """A unique index refused a row another writer committed first (for an append: the same
    idempotency key, which its retry then finds and recognises)."""
    orig = driver_error(exc)
    return sqlstate(exc) == DUPLICATE_SQLSTATE or (
        isinstance(orig, sqlite3.IntegrityError) and "unique" in str(orig).lower())


def is_connection_lost(exc: BaseException) -> bool:
    """The connection to PostgreSQL broke (terminated backend, server restart, network)."""
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    orig = driver_error(exc)
    if not isinstance(orig, psycopg.OperationalError):
        return False
    state = getattr(orig, "sqlstate", None)
    # psycopg raises OperationalError without a SQLSTATE only for client-side connection
    # failures ("the connection is lost", "consuming input failed", "connection refused").
    return state is None or state.startswith("08") or state in CONNECTION_SQLSTATES


def is_retryable(exc: BaseException) -> bool:
    """What any idempotent transaction may run again: a conflict or a lost connection."""
    return is_conflict(exc) or is_connection_lost(exc)


def is_transient(exc: BaseException) -> bool:
    """What an append runs again: also a racing duplicate (its retry checks every key)."""
    return is_retryable(exc) or is_racing_duplicate(exc)


def backoff(attempt: int) -> None:
    """Sleep before attempt `attempt + 1` (attempt counts from 1): jittered so that two
    deadlock victims do not collide again in step."""
    delay = min(RETRY_BACKOFF_S * 2 ** (attempt - 1), RETRY_BACKOFF_MAX_S)
    time.sleep(delay * _JITTER.uniform(0.5, 1.0))


def retrying(operation: Callable[[], T], *, attempts_max: int = RETRY_ATTEMPTS_MAX,
             retry_on: Callable[[BaseException], bool] = is_retryable) -> T:
    """`operation()`, run again after a failure `retry_on` accepts, at most `attempts_max`
    times in all. Only for operations that are safe to repeat (see the module docstring)."""
    attempt = 0
    while True:
        attempt += 1
        try:
            return operation()
        except DATABASE_ERRORS as exc:
            if attempt >= attempts_max or not retry_on(exc):
                raise
            backoff(attempt)


# ---------------------------------------------------------------------- for the operator

_SQLITE_REASONS = (
    ("readonly", "the database is read-only"),
    ("read-only", "the database is read-only"),
    ("disk is full", "the disk holding the database is full"),
    ("disk i/o error", "the disk holding the database failed (I/O error)"),
    ("unable to open database file", "the database file cannot be opened: a wrong path, or a "
     "directory where SQLite may not create the -wal and -shm files WAL mode needs"),
    ("database is locked", "the database stayed locked by another writer"),
)
_SQLSTATE_REASONS = {
    "25006": "the database is read-only",
    "53100": "the database server's disk is full",
    "53200": "the database server is out of memory",
    "42501": "the database role lacks the privilege",
    "40001": "serialization failures persisted",
    "40P01": "deadlocks persisted",
    "57014": "the statement was cancelled or timed out",
    "55P03": "a lock could not be obtained in time",
}


def operator_reason(exc: BaseException) -> str | None:
    """What the operator must know about a database failure the command cannot get past,
    or None when the error is not an operational one (a bug: let it show its traceback)."""
    orig = driver_error(exc)
    if is_connection_lost(exc):
        if "connection failed" in str(orig):  # psycopg's words when none could be opened
            return "the database server cannot be reached"
        return "the connection to the database was lost"
    state = getattr(orig, "sqlstate", None)
    if state in _SQLSTATE_REASONS:
        return _SQLSTATE_REASONS[state]
    if isinstance(orig, sqlite3.DatabaseError):
        message = str(orig).lower()
        for needle, reason in _SQLITE_REASONS:
            if needle in message:
                return reason
        return None
    if isinstance(orig, psycopg.OperationalError):
        return "the database failed"
    return None


def describe(exc: BaseException) -> str | None:
    """One line for stderr: the reason, the driver's own first line, and what became of the
    work. None when the error is not operational (see `operator_reason`)."""
    reason = operator_reason(exc)
    if reason is None:
        return None
    detail = (str(driver_error(exc)).strip().splitlines() or [type(exc).__name__])[0]
    state = sqlstate(exc)
    code = f" [{state}]" if state else ""
    return (f"database error: {reason} ({detail}{code}); nothing was half-written (each "
            "transaction is all or nothing); once the fault is cleared, run the command "
            "again: what was already recorded is recognised, not written twice")
