"""Running a job exactly once per batch, even across crashes and concurrent schedulers.

A batch is (job, at); its id is deterministic, so the same batch run twice is recognised.
The job decides its facts from the ledger as of `at`; they are written in chunks (one
transaction each) whose idempotency keys derive from the batch id and the subject of each
fact (an account, an instrument), and a `BatchCompleted` fact closes the batch.

A rerun after a crash between chunks must decide exactly what the interrupted run decided,
so that the chunks already written are recognised (same key, same content) and only the
missing ones are written. It cannot decide from the ledger as it now stands: the written
chunks have already moved it (a settled position's basis is the mark, a paid account's
balance has changed), so a second decision would differ, key by key. So when facts of the
batch are already in the log but no `BatchCompleted`, the job decides from a replay of the
log strictly *before* the batch's first fact (`LogFilter.before`), as of `at`: the state the
first run decided from. Every fact of a batch is effective at `at` and keyed under the batch
id (`run_batch` checks both), which is how its first fact is found: the events effective at
`at` (an index lookup) whose keys start with `batch_id:`.

Only one runner works on a given job at a time: a PostgreSQL advisory lock held for the
batch, or on SQLite an exclusive lock on a file beside the database.

Two environment variables exist for tests and operations (both read on every batch):
`CLEARING_CHUNK_EVENTS` overrides `CHUNK_EVENTS` (facts per transaction; 1 makes every fact
its own transaction), and `CLEARING_TEST_PAUSE_AFTER_CHUNK` (seconds, a test hook) sleeps
after each chunk commits, so a crash test can kill a job between chunks. Neither changes
what a batch writes, only how many transactions it takes and how long.
"""

from __future__ import annotations

import fcntl
import os
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from psycopg import sql as pg_sql
from sqlalchemy import select, text

from clearing.app import Ledger
from clearing.domain.clock import storage_time
from clearing.domain.commands import NewFact
from clearing.domain.events import BatchCompleted
from clearing.domain.event import Event
from clearing.domain.ledger import LedgerState, evolve, touched
from clearing.domain.margin_sweep import MarginMemo
from clearing.store.database import read_connection
from clearing.store.eventstore import READ_BOUND_SQL, WRITER_NAMESPACE, LogPosition
from clearing.store.tables import events

CHUNK_EVENTS = 500
"""Facts per transaction when a batch is written in chunks (`CLEARING_CHUNK_EVENTS`
overrides it). A batch payment fact moves up to 300 positions, and each chunk is then folded
into the read models at once: 500 such facts keep that under a few hundred MB."""
CHUNK_EVENTS_ENV = "CLEARING_CHUNK_EVENTS"
PAUSE_AFTER_CHUNK_ENV = "CLEARING_TEST_PAUSE_AFTER_CHUNK"
JOB_LOCK_NAMESPACE = 0x4A42  # "JB"
LOCK_TIMEOUT_S = 600
VISIBILITY_TIMEOUT_S = 600
"""Longest wait, before deciding, for older appends still in flight (PostgreSQL)."""

JobFunction = Callable[[LedgerState, datetime, str], list[NewFact]]


@dataclass(frozen=True)
class JobRun:
    job: str
    batch_id: str
    at: datetime
    events_written: int
    already_done: bool


@dataclass
class CarriedState:
    """The ledger's state carried from one batch of a run to the next (see `run_batch`), and
    the margins computed from it that are still valid (see `MarginMemo`)."""

    state: LedgerState | None = None
    margins: MarginMemo = field(default_factory=MarginMemo)

    def reset(self) -> None:
        self.state = None
        self.margins.clear()

    def moved_by(self, recorded: list[Event]) -> None:
        """Forget the margins of the accounts whose balances or positions these facts moved
        (new marks and risk parameters are caught by `MarginMemo` itself). Nothing to forget
        before a job has computed margins: the payments that come first (settle, mtm,
        funding) move a million positions, not worth collecting then."""
        if not self.margins.margins:
            return
        keys = touched(recorded)
        self.margins.forget(keys.accounts)
        self.margins.forget(a for a, _ in keys.balances)
        self.margins.forget(a for a, _ in keys.positions)


@dataclass(frozen=True)
class _Recorded:
    position: int
    effective_at: datetime
    event: Event


def batch_id_for(job: str, at: datetime) -> str:
    return f"{job}:{storage_time(at)}"


def completion_key(batch_id: str) -> str:
    return f"{batch_id}:completed"


def completion_stream(job: str) -> str:
    """The stream of a job's `BatchCompleted` facts, one per batch, in the order they closed."""
    return f"batches-{job}"


@contextmanager
def job_lock(ledger: Ledger, job: str) -> Iterator[None]:
    """Hold the job's lock for the whole batch. On PostgreSQL the advisory lock is
    database-wide, so its key names the ledger's schema too: ledgers in two schemas of one
    database do not wait for each other."""
    if ledger.engine.dialect.name == "postgresql":
        with read_connection(ledger.engine) as conn:
            schema = conn.execute(text("SELECT current_schema(), "
                                       "set_config('lock_timeout', :timeout, false)"),
                                  {"timeout": f"{LOCK_TIMEOUT_S}s"}).first()[0]
            key = zlib.crc32(f"{schema}/{job}".encode()) & 0x7FFFFFFF
            conn.execute(text("SELECT pg_advisory_lock(:ns, :k)"),
                         {"ns": JOB_LOCK_NAMESPACE, "k": key})
            conn.commit()
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:ns, :k)"),
                             {"ns": JOB_LOCK_NAMESPACE, "k": key})
                conn.commit()
        return
    database = ledger.engine.url.database or "clearing.db"
    lock_path = Path(f"{database}.{job}.lock")
    with lock_path.open("a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def is_completed(ledger: Ledger, batch_id: str) -> bool:
    with read_connection(ledger.engine) as conn:
        return conn.execute(select(events.c.position).where(
            events.c.idempotency_key == completion_key(batch_id))).first() is not None


def written_so_far(ledger: Ledger, batch_id: str, at: datetime) -> list[LogPosition]:
    """Where the facts of the batch already in the log are, in log order (the completion
    excluded)."""
    return batch_progress(ledger, batch_id, at)[1]


def batch_progress(ledger: Ledger, batch_id: str, at: datetime
                   ) -> tuple[bool, list[LogPosition]]:
    """Whether the batch is completed, and where its facts already in the log are, in log
    order (the completion excluded). Every fact of a batch, its completion included, is
    effective at `at`, so this reads the few events effective at that moment (an index
    lookup) and keeps those keyed under the batch id: a prefix test in Python, exact
    whatever the database's collation."""
    prefix = batch_id + ":"
    closing = completion_key(batch_id)
    with read_connection(ledger.engine) as conn:
        rows = conn.execute(
            select(events.c.txid, events.c.position, events.c.idempotency_key)
            .where(events.c.effective_at == at)).all()
    completed = any(r.idempotency_key == closing for r in rows)
    return completed, sorted(LogPosition(int(r.txid), int(r.position)) for r in rows
                             if r.idempotency_key.startswith(prefix)
                             and r.idempotency_key != closing)


def await_committed_log(ledger: Ledger, timeout_s: float = VISIBILITY_TIMEOUT_S) -> None:
    """Wait until readers see every event already committed (PostgreSQL).

    Readers stop below the oldest append still in flight (see the event store), so right
    after a commit of ours, an older append still running elsewhere in this ledger (an
    import; a job process just killed, until the server notices) hides our own facts from
    the read models. A decision taken then would miss, say, the previous batch's payments;
    so a batch first waits for such appends to finish (they take milliseconds to seconds)."""
    store = ledger.store
    if not store.is_postgresql:
        return
    with read_connection(ledger.engine) as conn:
        with conn.connection.driver_connection.cursor() as cur:
            cur.execute(_NEWEST_AND_BOUND_PG, (WRITER_NAMESPACE,))
            newest, bound = cur.fetchone()
    if newest is None:
        return
    deadline = time.monotonic() + timeout_s
    while bound is not None and bound <= newest:
        if time.monotonic() > deadline:
            raise TimeoutError(f"an append older than transaction {newest} has been in "
                               f"flight for over {timeout_s:.0f}s; the job did not decide")
        time.sleep(0.01)
        bound = store.visible_bound()


_NEWEST_AND_BOUND_PG = pg_sql.SQL("SELECT (SELECT max(txid) FROM events), ({})").format(
    pg_sql.SQL(READ_BOUND_SQL)).as_string(None)
"""The newest transaction whose events are committed and the read bound, in one statement
(the bound's snapshot is the statement's: an append in flight then, older than the newest,
holds it down; one finished since is visible to every later read)."""


def decision_state(ledger: Ledger, at: datetime, written: list[LogPosition]) -> LedgerState:
    """The state the batch decides from: the ledger as of `at`, or, when chunks of the batch
    were written by an interrupted run, the log replayed as of `at` up to (excluding) the
    batch's first fact, which is what that run decided from. Either reads the whole log as
    committed when the batch starts."""
    await_committed_log(ledger)
    if not written:
        return ledger.state_at(at)
    from clearing.backoffice.replay import ReplayBounds, replay

    ledger.refresh()
    return replay(ledger.store, ReplayBounds(as_of=at), before=written[0])


def chunk_size(default: int = CHUNK_EVENTS) -> int:
    """`CLEARING_CHUNK_EVENTS` when set (a positive integer), else `default`."""
    raw = os.environ.get(CHUNK_EVENTS_ENV, "").strip()
    if not raw:
        return default
    value = int(raw)
    if value < 1:
        raise ValueError(f"{CHUNK_EVENTS_ENV} must be a positive integer, not {raw!r}")
    return value


def _pause_after_chunk() -> None:
    """Test hook: `CLEARING_TEST_PAUSE_AFTER_CHUNK` seconds of sleep after each chunk."""
    raw = os.environ.get(PAUSE_AFTER_CHUNK_ENV, "").strip()
    if raw:
        time.sleep(float(raw))


def _check_fact(fact: NewFact, batch_id: str, at: datetime) -> None:
    if not fact.idempotency_key.startswith(batch_id + ":") or fact.effective_at != at:
        raise ValueError(f"a fact of batch {batch_id} must be effective at its time and keyed "
                         f"under its id: got {fact.idempotency_key!r} effective at "
                         f"{fact.effective_at.isoformat()}")


def run_batch(ledger: Ledger, job: str, at: datetime, decide: JobFunction,
              chunk_events: int | None = None,
              after_chunk: Callable[[int], None] | None = None,
              carried: CarriedState | None = None) -> JobRun:
    """Decide and record one batch of `job` as of `at`, exactly once.

    `carried`, when given, is the state a previous batch of the same run (`eod`) decided
    from, moved forward by the facts it recorded: the next batch decides from it instead of
    loading the whole book again, which is what the read models would give (the same
    `evolve`). After this batch it holds this batch's facts too."""
    batch_id = batch_id_for(job, at)
    size = chunk_events if chunk_events is not None else chunk_size()
    with job_lock(ledger, job):
        completed, already = batch_progress(ledger, batch_id, at)
        if completed:
            if carried is not None:
                carried.reset()  # another runner moved the ledger: load it afresh
            return JobRun(job, batch_id, at, 0, True)
        if carried is not None and carried.state is not None and not already:
            await_committed_log(ledger)
            state = carried.state
        else:
            state = decision_state(ledger, at, already)
        if carried is not None:
            state.keeps_statement = False  # moved forward below, its statement unread
        facts = decide(state, at, batch_id)
        for fact in facts:
            _check_fact(fact, batch_id, at)
        written = 0
        number = 0
        while facts:
            # What is recorded is let go: a batch's facts can be as large as the book.
            chunk = facts[:size]
            del facts[:size]
            result = ledger.record(chunk, [{"batch_id": batch_id}] * len(chunk))
            written += result.written
            if carried is not None:
                for fact, position in zip(chunk, result.positions, strict=True):
                    evolve(state, _Recorded(position, at, fact.event))
                state.statement.clear()
                carried.moved_by([fact.event for fact in chunk])
            _pause_after_chunk()
            if after_chunk is not None:
                after_chunk(number)
            number += 1
        if carried is not None:
            if already:
                carried.reset()
            else:
                carried.state = state
        total = len(already) + written
        closing = NewFact(completion_stream(job),
                          BatchCompleted(job=job, batch_id=batch_id, at=at, events=total),
                          completion_key(batch_id), at)
        written += ledger.record([closing], [{"batch_id": batch_id}]).written
        return JobRun(job, batch_id, at, written, False)
