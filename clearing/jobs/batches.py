"""Running a job exactly once per batch, even across crashes and concurrent schedulers.

A batch is (job, at); its id is deterministic, so the same batch run twice is recognised.
The job decides its facts from the ledger as of `at`; they are written in chunks whose
idempotency keys derive from the batch id and the subject of each fact (an account, an
instrument), and a `BatchCompleted` fact closes the batch. A rerun after a crash between
chunks decides again from a state that already holds the written chunks, so it produces
only the facts still missing, and the store's keys refuse any fact twice.

Only one runner works on a given job at a time: a PostgreSQL advisory lock held for the
batch, or on SQLite an exclusive lock on a file beside the database.
"""

from __future__ import annotations

import fcntl
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy import text

from clearing.app import Ledger
from clearing.domain.clock import storage_time
from clearing.domain.commands import NewFact
from clearing.domain.events import BatchCompleted
from clearing.domain.ledger import LedgerState

CHUNK_EVENTS = 1_000
"""Facts per transaction when a batch is written in chunks."""
JOB_LOCK_NAMESPACE = 0x4A42  # "JB"
LOCK_TIMEOUT_S = 600

JobFunction = Callable[[LedgerState, datetime, str], list[NewFact]]


@dataclass(frozen=True)
class JobRun:
    job: str
    batch_id: str
    at: datetime
    events_written: int
    already_done: bool


def batch_id_for(job: str, at: datetime) -> str:
    return f"{job}:{storage_time(at)}"


def completion_key(batch_id: str) -> str:
    return f"{batch_id}:completed"


@contextmanager
def job_lock(ledger: Ledger, job: str) -> Iterator[None]:
    """Hold the job's lock for the whole batch."""
    if ledger.engine.dialect.name == "postgresql":
        key = zlib.crc32(job.encode()) & 0x7FFFFFFF
        with ledger.engine.connect() as conn:
            conn.execute(text(f"SET lock_timeout = '{LOCK_TIMEOUT_S}s'"))
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
    from sqlalchemy import select

    from clearing.store.tables import events

    with ledger.engine.connect() as conn:
        return conn.execute(select(events.c.position).where(
            events.c.idempotency_key == completion_key(batch_id))).first() is not None


def run_batch(ledger: Ledger, job: str, at: datetime, decide: JobFunction,
              chunk_events: int = CHUNK_EVENTS,
              after_chunk: Callable[[int], None] | None = None) -> JobRun:
    """Decide and record one batch of `job` as of `at`, exactly once."""
    batch_id = batch_id_for(job, at)
    with job_lock(ledger, job):
        if is_completed(ledger, batch_id):
            return JobRun(job, batch_id, at, 0, True)
        state = ledger.state_at(at)
        facts = decide(state, at, batch_id)
        written = 0
        for start in range(0, len(facts), chunk_events):
            chunk = facts[start:start + chunk_events]
            written += ledger.record(chunk, [{"batch_id": batch_id}] * len(chunk)).written
            if after_chunk is not None:
                after_chunk(start // chunk_events)
        total = ledger.batch_event_count(batch_id) if written != len(facts) else len(facts)
        closing = NewFact(f"batches-{job}", BatchCompleted(job=job, batch_id=batch_id, at=at,
                                                           events=total),
                          completion_key(batch_id), at)
        written += ledger.record([closing], [{"batch_id": batch_id}]).written
        return JobRun(job, batch_id, at, written, False)
