"""Run a workload through the real ledger, step by step, checking the invariants after each.

Every step goes through the code the command line runs: imports are CSV files handed to
`Ledger.import_file` (as `clearing import`), busts go through `Ledger.bust`, jobs through
`run_job` (as `clearing run`), risk parameters through `Ledger.set_risk_parameter`, margin
models through `Ledger.change_margin_model`. Each step gets a fresh `Ledger`, as each command
does, on one engine for the run. The ledger's clock is the step's business time, so
`recorded_at`, and with it every event's hash, is a function of the seed alone.

A failure raises `SimulationFailure`, which names the seed, the backend, the step and what
it did, and the command that replays the run to that step.

Two things keep a step cheap without changing what the ledger does: the SQLite file lives in
memory-backed `/dev/shm` (a real file, WAL and all) and PostgreSQL sessions commit without
waiting for the WAL flush (`simulation_url`); and the objects alive before a step are frozen
out of the cyclic garbage collector, whose full collection at the end of every job run would
otherwise scan the whole process (`Simulation.run`).
"""

from __future__ import annotations

import csv
import gc
import shutil
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from pathlib import Path

from sqlalchemy import Engine
from sqlalchemy.engine import make_url

from clearing.app import Ledger
from clearing.backoffice.csvinput import InputRejected
from clearing.backoffice.imports import ImportKind
from clearing.domain.rejections import Rejected
from clearing.jobs.catalog import run_job
from clearing.store.database import create_engine_for, ensure_schema
from clearing.store.errors import IdempotencyConflict

from tests.ledger.harness import COLUMNS
from tests.simulation.invariants import Checker
from tests.simulation.workload import T0, Outcome, Step, Workload

VERIFY_EVERY = 500
"""Steps between full `clearing verify` runs (and after the last step)."""
REFUSALS = (InputRejected, Rejected, IdempotencyConflict)
"""What a refused command raises (exit code 2 at the command line); anything else is a bug."""


class StepClock:
    """The ledger's clock: the business time of the step being run."""

    def __init__(self) -> None:
        self.now: datetime = T0

    def __call__(self) -> datetime:
        return self.now


class SimulationFailure(AssertionError):
    def __init__(self, seed: int, backend: str, step: Step | None, steps: int,
                 cause: BaseException, url: str | None = None) -> None:
        self.seed = seed
        self.backend = backend
        self.step = step
        self.cause = cause
        where = f"step {step.index}" if step is not None else "the closing verify"
        stop = step.index + 1 if step is not None else steps
        lines = [
            f"simulation failed: seed {seed}, {where}, backend {backend}",
            f"  {step}" if step is not None else "",
            f"  {type(cause).__name__}: {cause}",
            f"  replay: python -m tests.simulation --seed {seed} --steps {stop} "
            f"--backend {backend}",
            f"  inspect the ledger just before it: python -m tests.simulation --seed {seed} "
            f"--steps {stop} --backend {backend} --stop-at {stop - 1} --keep"
            if step is not None else "",
        ]
        if url:
            lines.append(f"  database: {url}")
        if not isinstance(cause, AssertionError):
            lines.append("".join(traceback.format_exception(cause)).rstrip())
        super().__init__("\n".join(line for line in lines if line))


@dataclass
class RunReport:
    seed: int
    backend: str
    steps: int
    events: int = 0
    seconds: float = 0.0
    accepted: int = 0
    refused: int = 0
    by_action: dict[str, int] = field(default_factory=dict)
    seconds_by_action: dict[str, float] = field(default_factory=dict)
    check_seconds: float = 0.0
    """Time spent in the invariant checks after every step."""
    full_check_seconds: float = 0.0
    """Time spent in the full checks (`clearing verify` and every read model)."""

    @property
    def ms_per_step(self) -> float:
        return 1000 * self.seconds / max(self.steps, 1)

    def __str__(self) -> str:
        return (f"seed {self.seed} on {self.backend}: {self.steps} steps, {self.events} events, "
                f"{self.accepted} accepted, {self.refused} refused, {self.seconds:.1f} s "
                f"({self.ms_per_step:.1f} ms/step; checks {self.check_seconds:.1f} s after "
                f"steps, {self.full_check_seconds:.1f} s full)")


class Simulation:
    """One seed's run against one fresh database (`url`), files written under `workdir`."""

    def __init__(self, seed: int, backend: str, url: str, engine: Engine, workdir: Path,
                 verify_every: int = VERIFY_EVERY) -> None:
        self.seed = seed
        self.backend = backend
        self.url = url
        self.engine = engine
        self.files = workdir / "files"
        self.files.mkdir(parents=True, exist_ok=True)
        self.verify_every = verify_every
        self.clock = StepClock()
        self.workload = Workload(seed)
        self.checker = Checker(engine)

    def ledger(self) -> Ledger:
        return Ledger(self.engine, clock=self.clock, actor="simulation")

    def run(self, steps: int, stop_at: int | None = None) -> RunReport:
        """Run `steps` steps (or those before `stop_at`), checking after each; raise
        `SimulationFailure` on the first problem."""
        ensure_schema(self.engine)
        report = RunReport(self.seed, self.backend, 0)
        started = time.perf_counter()
        last = steps if stop_at is None else min(steps, stop_at)
        step: Step | None = None
        try:
            for _ in range(last):
                step = self.workload.next_step()
                # Every job run ends with a full collection of the cyclic garbage collector
                # (`run_jobs`), which scans every object of the process: ~50 ms for the
                # imported modules alone, most of a step. What exists before a step is
                # long-lived: frozen, the collection scans only what the step made.
                gc.freeze()
                began = time.perf_counter()
                outcome = self.execute(step)
                executed = time.perf_counter()
                report.events += self.checker.after_step(step, outcome)
                checked = time.perf_counter()
                report.check_seconds += checked - executed
                if (report.steps + 1) % self.verify_every == 0:
                    self.checker.full_check(self.ledger())
                    report.full_check_seconds += time.perf_counter() - checked
                self.workload.observe(outcome)
                report.steps += 1
                report.accepted += outcome.accepted
                report.refused += not outcome.accepted
                action = step.job if step.action == "job" else step.kind or step.action
                action = f"{step.action}:{action}" if action != step.action else action
                report.by_action[action] = report.by_action.get(action, 0) + 1
                report.seconds_by_action[action] = report.seconds_by_action.get(action, 0) \
                    + executed - began
            step = None
            if report.steps % self.verify_every:
                began = time.perf_counter()
                self.checker.full_check(self.ledger())
                report.full_check_seconds += time.perf_counter() - began
        except Exception as exc:  # noqa: BLE001 - every failure names its seed and step
            raise SimulationFailure(self.seed, self.backend, step, steps, exc) from exc
        finally:
            gc.unfreeze()
        report.seconds = time.perf_counter() - started
        return report

    def next_step(self) -> Step:
        """The step `run(stop_at=N)` stopped before (for inspecting it by hand)."""
        return self.workload.next_step()

    def execute(self, step: Step) -> Outcome:
        self.clock.now = step.now
        ledger = self.ledger()
        try:
            written = self._execute(ledger, step)
        except REFUSALS as exc:
            return Outcome(False, 0, f"{type(exc).__name__}: {exc}")
        return Outcome(True, written)

    def _execute(self, ledger: Ledger, step: Step) -> int:
        if step.action == "import":
            assert step.kind is not None and step.file is not None
            path = self.write_file(step.kind, step.file, step.rows)
            return ledger.import_file(ImportKind(step.kind), path).written
        if step.action == "reimport":
            assert step.kind is not None and step.file is not None
            return ledger.import_file(ImportKind(step.kind), self.files / step.file).written
        if step.action == "bust":
            assert step.trade_id is not None
            return ledger.bust(step.trade_id, f"simulated venue error at step {step.index}",
                               at=step.now).written
        if step.action == "job":
            assert step.job is not None and step.at is not None
            return sum(run.events_written for run in run_job(ledger, step.job, step.at))
        if step.action == "risk":
            assert step.name is not None and step.value is not None
            return ledger.set_risk_parameter(step.name, step.underlying, Decimal(step.value),
                                             step.at or step.now).written
        if step.action == "margin_model":
            assert step.account_id is not None and step.value is not None
            return ledger.change_margin_model(step.account_id, step.value).written
        raise ValueError(f"unknown action {step.action!r}")

    def write_file(self, kind: str, name: str, rows: tuple[dict[str, str], ...]) -> Path:
        path = self.files / name
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=COLUMNS[kind], lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
        return path


def simulation_url(url: str) -> str:
    """The database URL the simulation runs on: the test database's, and on PostgreSQL with
    `synchronous_commit` off for its own sessions. Commits then return before the WAL
    reaches the disk: a crash could lose the last few, which nothing here simulates (faults
    are tested on their own); what every other session sees, and when, is unchanged. It is
    PostgreSQL's counterpart of the SQLite file kept in memory, and saves a fifth of a step."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "postgresql":
        return url
    query = dict(parsed.query)
    query["options"] = " ".join(x for x in ("-csynchronous_commit=off",
                                             query.get("options", "")) if x)
    return parsed.set(query=query).render_as_string(hide_password=False)


def simulation_engine(url: str) -> Engine:
    """The engine a simulation runs on: the product's, without PostgreSQL's pre-ping of
    every pooled connection. Nothing in a simulation drops a connection (lost connections
    are tested on their own, in tests/faults); the ping would be a round trip to the server
    on every one of a step's dozens of connection checkouts."""
    return create_engine_for(url, pre_ping=False)


SCRATCH = Path("/dev/shm") if Path("/dev/shm").is_dir() else None
"""Where SQLite files and input files go: memory-backed when the machine has it (a real
database file all the same, not SQLite's `:memory:`)."""


@dataclass
class SeedResult:
    """What `run_seed` hands back (across processes, so plain data)."""

    seed: int
    backend: str
    steps: int
    summary: str
    failure: str | None = None
    next_step: str | None = None
    kept: str | None = None
    report: RunReport | None = None


def run_seed(seed: int, backend: str, steps: int, stop_at: int | None = None,
             verify_every: int = VERIFY_EVERY, keep: bool = False) -> SeedResult:
    """One seed on a fresh database of `backend`; never raises for a failing run."""
    from tests.conftest import make_backend, postgres_problem

    if backend == "postgresql" and (problem := postgres_problem()) is not None:
        return SeedResult(seed, backend, 0, "", f"seed {seed}: PostgreSQL unavailable: "
                                                 f"{problem}")
    workdir = Path(tempfile.mkdtemp(prefix=f"simulation-{seed}-", dir=SCRATCH))
    db = make_backend(backend, workdir)
    if keep:
        db._cleanup = lambda: None  # the schema stays for inspection
    url = simulation_url(db.url)
    engine = simulation_engine(url)
    simulation = Simulation(seed, backend, url, engine, workdir, verify_every)
    result = SeedResult(seed, backend, 0, "")
    try:
        report = simulation.run(steps, stop_at)
        result.steps, result.summary, result.report = report.steps, str(report), report
        if stop_at is not None and stop_at < steps:
            step = simulation.next_step()
            if step.action == "import" and step.kind and step.file:
                simulation.write_file(step.kind, step.file, step.rows)
            result.next_step = f"{step}; its file: {simulation.files / (step.file or '-')}"
    except SimulationFailure as failure:
        result.failure = str(failure)
        result.steps = failure.step.index if failure.step is not None else steps
    finally:
        engine.dispose()
        db.close()
        if keep:
            result.kept = f"kept: database {db.url}, files {simulation.files}"
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return result
