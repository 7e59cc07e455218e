"""`clearing scheduler`: the jobs on their schedule, each batch exactly once, missed ones too.

A *tick* (`tick`) runs every batch that is due and not yet done, oldest first: for each job
of the schedule (`clearing.jobs.schedule`), every scheduled time after the job's latest
completed batch (the newest `BatchCompleted` in its stream) up to now, at most
`catch_up_max` back. The due batches are grouped by time and run time by time, and within one
time in `clearing run eod`'s order. A batch is `run_batch`: deterministic id (job and time),
the job's lock, done once, resumed after a crash.

So a scheduler that was down catches up on restart by running *each* missed batch once, in
order, rather than APScheduler's coalescing of missed runs into one: it runs a tick before
it hands over to APScheduler, and every scheduled tick catches up the same way (a tick that
fires late, within the misfire grace time, still runs everything due since the last one).
A job that fails at some time is not run at later times in the same tick (its batches stay in
order); the others go on, and the next tick retries it from the failed time.

APScheduler 3 runs the ticks: a `BlockingScheduler` with one job on the union of the
schedule's cron triggers (UTC), coalescing, one instance at a time, kept in the ledger's own
database by APScheduler's `SQLAlchemyJobStore` (table `apscheduler_jobs`, which APScheduler
creates and owns: it is not part of the ledger's migrated schema). The stored job names this
module's `tick` by reference; its arguments are plain data: the database URL with any
password masked (a scheduler always connects with its own `--db`, never with a stored
secret) and the schedule.

Two schedulers on one database may both tick at the same time (APScheduler does not share a
job store between processes); they never run the same batch twice or at once, because each
batch holds its job's lock (a PostgreSQL advisory lock, or a file lock beside a SQLite
database) while it checks for its completion and runs.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from apscheduler.triggers.cron import CronTrigger
from sqlalchemy import func, select
from sqlalchemy.engine import make_url

from clearing.app import Ledger
from clearing.store.database import WRITE_OPTION, create_engine_for
from clearing.config import database_url
from clearing.domain.clock import format_time, parse_time
from clearing.domain.events import BatchCompleted
from clearing.jobs.batches import JobRun, completion_stream, job_lock
from clearing.jobs.catalog import EOD_ORDER, JOBS, run_job
from clearing.jobs.schedule import Schedule, from_data
from clearing.store.eventstore import utc_now
from clearing.store.tables import events

logger = logging.getLogger("clearing.scheduler")

JOB_ID = "clearing-jobs"
"""The one APScheduler job (the tick) in the job store."""
JOBSTORE_TABLE = "apscheduler_jobs"
ONE_MICROSECOND = timedelta(microseconds=1)


@dataclass(frozen=True)
class Slot:
    """One scheduled time and the jobs due at it, in the order they run."""

    at: datetime
    jobs: tuple[str, ...]


@dataclass(frozen=True)
class Failure:
    job: str
    at: datetime
    error: str


@dataclass
class CatchUp:
    """What a tick did: the batches it ran (or found done), and the jobs that failed."""

    runs: list[JobRun] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)


def job_order() -> list[str]:
    """Jobs due at one time run in `eod`'s order; any other job after them."""
    return [*EOD_ORDER, *(j for j in JOBS if j not in EOD_ORDER)]


def last_completed(ledger: Ledger, job: str) -> datetime | None:
    """The business time of the job's latest completed batch (scheduled or run by hand)."""
    with ledger.engine.connect() as conn:
        return conn.execute(select(func.max(events.c.effective_at)).where(
            events.c.type == BatchCompleted.type_name,
            events.c.stream_id == completion_stream(job))).scalar_one_or_none()


def fire_times(trigger: CronTrigger, start: datetime, end: datetime) -> Iterator[datetime]:
    """The trigger's times from `start` (inclusive) to `end` (inclusive)."""
    when = trigger.get_next_fire_time(None, start)
    while when is not None and when <= end:
        yield when
        when = trigger.get_next_fire_time(when, when + ONE_MICROSECOND)


def due_slots(schedule: Schedule, last: Mapping[str, datetime | None], now: datetime,
              since: datetime | None = None) -> list[Slot]:
    """Every scheduled time, job by job, after the job's last completed batch (or from
    `since` for a job that never completed one; without it, such a job has nothing due) up
    to `now`, no further back than `catch_up_max`; grouped by time, oldest first."""
    triggers: dict[str, list[CronTrigger]] = defaultdict(list)
    for entry in schedule.entries:
        for job in (entry.job, *entry.then):
            triggers[job].append(entry.trigger())
    floor = now - schedule.catch_up_max
    due: dict[datetime, set[str]] = defaultdict(set)
    for job, job_triggers in triggers.items():
        done = last.get(job)
        if done is not None:
            start = done + ONE_MICROSECOND
        elif since is not None:
            start = since
        else:
            continue
        if start < floor:
            skipped = sum(1 for t in job_triggers for _ in fire_times(t, start, floor))
            if skipped:
                logger.warning("%s: %d scheduled batch(es) before %s are older than the "
                               "catch-up limit (%s) and are not caught up", job, skipped,
                               format_time(floor), schedule.catch_up_max)
            start = floor
        for trigger in job_triggers:
            for when in fire_times(trigger, start, now):
                due[when].add(job)
    order = job_order()
    return [Slot(at, tuple(sorted(jobs, key=order.index))) for at, jobs in sorted(due.items())]


def catch_up(ledger: Ledger, schedule: Schedule, now: datetime, since: datetime | None = None,
             on_run: Callable[[JobRun], None] | None = None) -> CatchUp:
    """Run every due batch (`due_slots`), in order; see the module docstring."""
    last = {job: last_completed(ledger, job) for job in schedule.jobs()}
    result = CatchUp()
    blocked: set[str] = set()
    for slot in due_slots(schedule, last, now, since):
        for job in slot.jobs:
            if job in blocked:
                continue
            try:
                run = run_job(ledger, job, slot.at)[0]
            except Exception as exc:  # noqa: BLE001 - one job failing must not stop the rest
                logger.exception("%s at %s failed; its later batches wait for the next tick",
                                 job, format_time(slot.at))
                blocked.add(job)
                result.failures.append(Failure(job, slot.at, f"{type(exc).__name__}: {exc}"))
                continue
            result.runs.append(run)
            if on_run is not None:
                on_run(run)
    return result


def _log_run(run: JobRun) -> None:
    state = "already done" if run.already_done else f"{run.events_written} events"
    logger.info("%s at %s: %s", run.job, format_time(run.at), state)


class JobsFailed(RuntimeError):
    def __init__(self, failures: list[Failure]):
        super().__init__("; ".join(f"{f.job} at {format_time(f.at)}: {f.error}"
                                   for f in failures))
        self.failures = failures


# ------------------------------------------------------------------ what APScheduler runs

_serving_url: str | None = None
"""The URL this process's scheduler serves (with its password): ticks connect with it."""


def masked(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)


def tick(db: str, schedule: dict[str, Any], since: str | None = None) -> None:
    """One scheduled tick: catch up every due batch. Module-level so that APScheduler's
    SQLAlchemyJobStore can store it by reference; `db` is the (masked) URL it was stored
    with, `schedule` the schedule as plain data, `since` where never-run jobs start."""
    ledger = Ledger.open(_serving_url or db)
    try:
        result = catch_up(ledger, from_data(schedule), ledger.clock(),
                          parse_time(since) if since else None, _log_run)
    finally:
        ledger.engine.dispose()
    if result.failures:
        raise JobsFailed(result.failures)


def run_once(db: str | None, schedule: Schedule, until: datetime | None = None,
             since: datetime | None = None,
             on_run: Callable[[JobRun], None] | None = None) -> CatchUp:
    """`clearing scheduler --once`: one tick as of `until` (default now), then return."""
    ledger = Ledger.open(db)
    try:
        return catch_up(ledger, schedule, until or ledger.clock(), since, on_run)
    finally:
        ledger.engine.dispose()


def serve(db: str | None, schedule: Schedule, since: datetime | None = None,
          until: datetime | None = None, clock: Callable[[], datetime] = utc_now) -> CatchUp:
    """`clearing scheduler`: catch up, then tick on the schedule until `until` (or until
    interrupted). Returns what the first catch-up did."""
    from apscheduler.executors.pool import ThreadPoolExecutor
    from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
    from apscheduler.triggers.combining import OrTrigger

    global _serving_url
    url = database_url(db)
    _serving_url = url
    ledger = Ledger.open(url)
    started = clock()
    since = since or started
    first = catch_up(ledger, schedule, started, since, _log_run)
    if until is not None and until <= clock():
        ledger.engine.dispose()
        return first
    # APScheduler creates and owns its table: its store connects as the login's own role,
    # not the application role, which may not create tables.
    # Its writes take SQLite's write lock up front (like the ledger's own writers), so two
    # schedulers starting together queue instead of failing on a lock upgrade; the table is
    # created once, under a lock, so they do not race to create it either.
    jobstore_engine = create_engine_for(url).execution_options(**{WRITE_OPTION: True})
    jobstore = SQLAlchemyJobStore(engine=jobstore_engine, tablename=JOBSTORE_TABLE)
    with job_lock(ledger, "scheduler-table"):
        jobstore.jobs_t.create(jobstore_engine, checkfirst=True)
    scheduler = _stoppable_scheduler(
        timezone=UTC,
        jobstores={"default": jobstore},
        executors={"default": ThreadPoolExecutor(max_workers=2)},
        job_defaults={"coalesce": True, "max_instances": 1,
                      "misfire_grace_time": schedule.misfire_grace_s})
    scheduler.add_job(tick, OrTrigger([e.trigger() for e in schedule.entries]),
                      args=[masked(url), schedule.to_data(), format_time(since)], id=JOB_ID,
                      name="clearing jobs (catch up every due batch)", replace_existing=True)
    stopper = None
    if until is not None:  # a timer, not a job: it lets a tick in progress finish first
        stopper = threading.Timer((until - clock()).total_seconds(), scheduler.stop)
        stopper.daemon = True
        stopper.start()
    logger.info("scheduler started (%s schedule)%s", schedule.source,
                f"; stops at {format_time(until)}" if until is not None else "")
    try:
        scheduler.start()
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        if stopper is not None:
            stopper.cancel()
        if scheduler.running:
            scheduler.shutdown()
        ledger.engine.dispose()
    return first



def _stoppable_scheduler(**options: Any) -> Any:
    """A blocking scheduler that another thread may stop at any moment (`stop`).

    APScheduler's own `shutdown` from another thread can land while the scheduler's loop is
    handing a due tick to the executors it has just shut down ("cannot schedule new futures
    after shutdown", a traceback in the log); here the loop's pass over the due jobs and the
    stop exclude each other, and a pass after the stop does nothing."""
    from apscheduler.schedulers.base import STATE_STOPPED
    from apscheduler.schedulers.blocking import BlockingScheduler

    class StoppableScheduler(BlockingScheduler):  # type: ignore[misc]
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self._stopping = threading.Lock()

        def _process_jobs(self) -> float | None:
            with self._stopping:
                if self.state == STATE_STOPPED:
                    return None
                return super()._process_jobs()  # type: ignore[no-any-return]

        def stop(self) -> None:
            with self._stopping:
                if self.running:
                    self.shutdown()

    return StoppableScheduler(**options)
