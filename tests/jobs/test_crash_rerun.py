"""Exactly once under crashes: `clearing run eod` killed with SIGKILL at random moments, then
rerun, ends byte for byte where an uninterrupted run ends.

The scenario (400 accounts long and short two perpetuals and a dated future, a few of them
thinly funded, then a 4% fall in bitcoin) makes end-of-day write many facts: variation margin
and funding in two events per instrument (300 positions per event), residual sweeps,
liquidations, insurance-fund and auto-deleveraging facts, margin transitions and calls. With
`CLEARING_CHUNK_EVENTS=1` every fact is its own transaction, and
`CLEARING_TEST_PAUSE_AFTER_CHUNK` holds the job for a moment after each commit, so that a
kill at a random moment lands between two chunks of a batch in most runs (the test counts how
many and requires most).

For each of 20 seeds: a copy of the imported scenario (SQLite: the file, through the backup
API; PostgreSQL: a fresh schema at the newest migration with every table's rows copied), a
job process started on it and killed with SIGKILL once a seeded random number of its facts
are in the log, a seeded random delay later (0 to 3 pauses), then `clearing run eod` again
to completion. Its `clearing balances --json` and `clearing positions --json` must equal the
uninterrupted run's (which used the default chunk size) byte for byte, `clearing verify` must
pass, every batch must be closed, and the log must hold exactly the uninterrupted run's
number of facts (none twice, none lost).

The job process is the command line's entry point (`clearing run eod ... --db URL`): for the
first seed a genuine `python -m clearing.cli` subprocess, for the others a forked child of the
test process calling the same entry point, so that each run does not pay the interpreter's
and the libraries' start-up again. Four run side by side, each on its own copy.
"""

from __future__ import annotations

import gc
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, func, inspect, select, text
from sqlalchemy.engine import make_url
from typer.testing import CliRunner

from clearing.app import Ledger
from clearing.backoffice.verify import verify
from clearing.cli import app
from clearing.domain.events import BatchCompleted
from clearing.jobs.batches import (
    CHUNK_EVENTS_ENV,
    PAUSE_AFTER_CHUNK_ENV,
    batch_id_for,
    is_completed,
    written_so_far,
)
from clearing.jobs.catalog import EOD_ORDER
from clearing.store.database import create_engine_for, upgrade
from clearing.store.tables import events
from tests.conftest import POSTGRES_URL, Backend, schema_url
from tests.ledger.harness import T0, LedgerHarness, iso, leg, trade_rows

ACCOUNTS = 400
RUNS = 20
AT = T0 + timedelta(hours=1)
"""When end-of-day runs: an hour after the trades, at the fallen marks."""
PAUSE_S = 0.02
"""Held after each chunk's commit in the killed runs (the kill window)."""
SIDE_BY_SIDE = 4
"""Killed runs going on at once, each on its own copy."""
FUTURE = "BTC-27DEC26"
PERPS = ("BTC-PERP", "ETH-PERP")


# ------------------------------------------------------------------ the scenario


WEAK = {0: "0.015", 100: "0.006", 200: "-0.01", 300: "0.015"}
"""Thinly funded longs: after the fall their equity is about this fraction of their book's
notional (restricted at 1.5%, liquidating below 1%, bankrupt below zero)."""
ENTRY = {"BTC-PERP": Decimal("100000"), "ETH-PERP": Decimal("3000"), FUTURE: Decimal("101000")}
FALLEN = {"BTC": "96012.37", "ETH": "2961.55", "BTC-PERP": "96100.13", "ETH-PERP": "2963.07",
          FUTURE: "96950.71"}


def build_scenario(ledger: LedgerHarness) -> None:
    """400 members in pairs, each pair long and short each instrument in seeded sizes (eight
    decimals, so variation margin and funding leave rounding residuals); a few longs are
    thinly funded (`WEAK`) and every 7th account is on the portfolio model. Then bitcoin
    falls 4%."""
    rng = random.Random(20261102)
    members = [f"m{i:04d}" for i in range(ACCOUNTS)]
    ledger.import_rows("accounts", [
        {"account_id": a, "owner": a.upper(),
         "margin_model": "portfolio" if i % 7 == 3 else "standard"}
        for i, a in enumerate(members)])
    ledger.list_instruments(*PERPS, FUTURE)
    ledger.import_rows("marks", [{"time": iso(T0), "symbol": s, "price": p, "iv": ""}
                                 for s, p in (("BTC", "100000"), ("ETH", "3000"),
                                              *((k, str(v)) for k, v in ENTRY.items()))])
    rows: list[dict[str, str]] = []
    deposits: dict[str, Decimal] = {a: Decimal(2_000_000) for a in members}
    for pair in range(ACCOUNTS // 2):
        buyer, seller = members[2 * pair], members[2 * pair + 1]
        loss = notional = Decimal(0)
        for symbol, top in (("BTC-PERP", 2), ("ETH-PERP", 40), (FUTURE, 2)):
            qty = Decimal(f"{rng.uniform(0.01, top):.8f}")
            loss += qty * (ENTRY[symbol] - Decimal(FALLEN[symbol]))
            notional += qty * Decimal(FALLEN[symbol])
            rows += trade_rows(f"T-{pair}-{symbol}",
                               [leg(symbol, buyer=buyer, seller=seller, qty=str(qty),
                                    price=str(ENTRY[symbol]))], T0 + timedelta(minutes=1))
        if 2 * pair in WEAK:
            deposits[buyer] = max(loss + notional * Decimal(WEAK[2 * pair]),
                                  Decimal(100)).quantize(Decimal(1))
    ledger.import_rows("deposits", [
        {"ref": f"D-{a}", "account_id": a, "asset": "USDC", "amount": str(amount),
         "time": iso(T0)} for a, amount in deposits.items()])
    ledger.import_rows("trades", rows)
    ledger.import_rows("marks", [{"time": iso(AT), "symbol": s, "price": p, "iv": ""}
                                 for s, p in FALLEN.items()])


# ------------------------------------------------------------------ copies of the template


class Copies:
    """Fresh copies of the template database, and their cleanup."""

    WORKERS = 4
    """PostgreSQL copies are made by this many forked processes at once."""

    def __init__(self, backend: Backend, workdir: Path) -> None:
        self.backend = backend
        self.workdir = workdir
        self.schemas: list[str] = []

    def make(self, *names: str) -> list[str]:
        """One copy per name; their URLs."""
        if self.backend.kind == "sqlite":
            return [self._sqlite(name) for name in names]
        schemas = [f"t_{uuid.uuid4().hex[:12]}" for _ in names]
        self.schemas += schemas
        workers = []
        for part in (schemas[k::self.WORKERS] for k in range(self.WORKERS)):
            if not part:
                continue
            pid = os.fork()
            if pid == 0:  # a worker: its own connections only, and never back into pytest
                code = 1
                try:
                    for schema in part:
                        self._postgresql(schema)
                    code = 0
                finally:
                    os._exit(code)
            workers.append(pid)
        for pid in workers:
            assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0, "copy failed"
        return [schema_url(schema) for schema in schemas]

    def _sqlite(self, name: str) -> str:
        source = make_url(self.backend.url).database
        target = self.workdir / f"{name}.db"
        src, dst = sqlite3.connect(source), sqlite3.connect(target)
        try:
            src.backup(dst)
        finally:
            src.close()
            dst.close()
        return f"sqlite:///{target}"

    def _postgresql(self, schema: str) -> None:
        """A schema at the newest migration, then every table's rows copied from the
        template's schema and every identity sequence moved past the copied values."""
        template = make_url(self.backend.url).query["options"].split("=", 1)[1]
        admin = _admin()
        try:
            with admin.begin() as conn:
                conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        finally:
            admin.dispose()
        engine = create_engine_for(schema_url(schema))
        try:
            upgrade(engine)
            with engine.begin() as conn:
                inspector = inspect(conn)
                for table in inspector.get_table_names(schema=template):
                    if table == "alembic_version":
                        continue
                    columns = ", ".join(f'"{c["name"]}"' for c in
                                        inspector.get_columns(table, schema=template))
                    conn.execute(text(f'INSERT INTO "{schema}"."{table}" ({columns}) '
                                      f'SELECT {columns} FROM "{template}"."{table}"'))
                sequences = conn.execute(text(
                    "SELECT table_name, column_name FROM information_schema.columns "
                    "WHERE table_schema = :s AND (is_identity = 'YES' "
                    "OR column_default LIKE 'nextval(%')"), {"s": schema}).all()
                for table, column in sequences:
                    conn.execute(text(
                        f"SELECT setval(pg_get_serial_sequence('\"{schema}\".\"{table}\"', "
                        f"'{column}'), coalesce((SELECT max(\"{column}\") FROM "
                        f'"{schema}"."{table}"), 0) + 1, false)'))
        finally:
            engine.dispose()

    def close(self) -> None:
        if not self.schemas:
            return
        admin = _admin()
        try:
            with admin.begin() as conn:
                for schema in self.schemas:
                    conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        finally:
            admin.dispose()


def _admin() -> Engine:
    return create_engine(make_url(POSTGRES_URL).set(drivername="postgresql+psycopg"))


# ------------------------------------------------------------------ the job process


def _cli(*args: str) -> str:
    result = CliRunner().invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout


def eod_args(url: str) -> list[str]:
    return ["run", "eod", "--at", iso(AT), "--db", url, "--json"]


def fork_job(url: str) -> int:
    """`clearing run eod` in a forked child, one fact per transaction, pausing after each."""
    pid = os.fork()
    if pid:
        return pid
    code = 70
    try:  # the child: never returns into pytest
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        os.environ[CHUNK_EVENTS_ENV] = "1"
        os.environ[PAUSE_AFTER_CHUNK_ENV] = str(PAUSE_S)
        try:
            app(eod_args(url), standalone_mode=False)
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    finally:
        os._exit(code)


def spawn_job(url: str) -> subprocess.Popen[bytes]:
    """`python -m clearing.cli run eod ...`: a genuine process of its own."""
    env = {**os.environ, CHUNK_EVENTS_ENV: "1", PAUSE_AFTER_CHUNK_ENV: str(PAUSE_S)}
    return subprocess.Popen([sys.executable, "-m", "clearing.cli", *eod_args(url)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def event_count(url: str) -> int:
    engine = create_engine_for(url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(events)).scalar_one())
    finally:
        engine.dispose()


@dataclass
class Landing:
    """Where a kill left the ledger: which batches were complete, which one half-written."""

    completed: list[str]
    partial: str | None
    chunks_written: int

    def __str__(self) -> str:
        if self.partial:
            return f"mid-batch: {self.partial} after {self.chunks_written} chunk(s)"
        return f"between batches, after {self.completed[-1] if self.completed else 'none'}"


def landing(url: str) -> Landing:
    ledger = Ledger.open(url)
    try:
        completed, partial, written = [], None, 0
        for job in EOD_ORDER:
            batch_id = batch_id_for(job, AT)
            if is_completed(ledger, batch_id):
                completed.append(job)
                continue
            found = written_so_far(ledger, batch_id, AT)
            if found:
                partial, written = job, len(found)
            break
        return Landing(completed, partial, written)
    finally:
        ledger.engine.dispose()


def outcome(url: str) -> tuple[str, str]:
    """What `clearing balances --json` and `clearing positions --json` print."""
    return _cli("balances", "--db", url, "--json"), _cli("positions", "--db", url, "--json")


def check_closed_once(url: str) -> None:
    """`clearing verify` passes, and each of the eod batches has exactly one completion."""
    ledger = Ledger.open(url)
    try:
        failed = [f"{c.name}: {c.detail}" for c in verify(ledger) if not c.ok]
        assert not failed, failed
        closings = [r.event for r in ledger.store.read_all()
                    if r.type == BatchCompleted.type_name]
        assert sorted(e.batch_id for e in closings) == sorted(
            batch_id_for(job, AT) for job in EOD_ORDER)
    finally:
        ledger.engine.dispose()


# ------------------------------------------------------------------ the test


@pytest.fixture
def template(backend: Backend, tmp_path: Path) -> Iterator[Copies]:
    harness = LedgerHarness(backend.url, backend.engine(), tmp_path / "files")
    build_scenario(harness)
    harness.engine.dispose()
    copies = Copies(backend, tmp_path)
    try:
        yield copies
    finally:
        copies.close()


@dataclass
class Victim:
    """One job process and when it dies: once `after` facts of its run are in the log, a
    seeded random `delay` later."""

    seed: int
    url: str
    before: int
    after: int
    delay: float
    kill: Callable[[], None] = field(repr=False, default=lambda: None)
    killed_at: float | None = None
    engine: Engine | None = field(repr=False, default=None)

    def written(self) -> int:
        assert self.engine is not None
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(events)).scalar_one()
                       ) - self.before


def kill_all(victims: list[Victim]) -> None:
    """Watch the victims' logs and kill each at its moment (they run side by side)."""
    for victim in victims:
        victim.engine = create_engine_for(victim.url)
    try:
        waiting = list(victims)
        while waiting:
            now = time.monotonic()
            for victim in list(waiting):
                if victim.killed_at is None and victim.written() >= victim.after:
                    victim.killed_at = now + victim.delay
                if victim.killed_at is not None and now >= victim.killed_at:
                    victim.kill()
                    waiting.remove(victim)
            time.sleep(0.002)
    finally:
        for victim in victims:
            assert victim.engine is not None
            victim.engine.dispose()


def test_eod_killed_at_random_moments_then_rerun_ends_byte_for_byte_as_an_uninterrupted_run(
    template: Copies, capsys: pytest.CaptureFixture[str],
) -> None:
    started = time.monotonic()
    reference_url, *urls = template.make("reference", *(f"run{n:02d}" for n in range(RUNS)))
    reference_run = json.loads(_cli(*eod_args(reference_url)))
    expected = outcome(reference_url)
    check_closed_once(reference_url)
    written = {r["job"]: r["events_written"] for r in reference_run}
    # The scenario is the one described: several multi-chunk batches, liquidations included.
    assert written["mtm"] >= 7 and written["funding"] >= 5 and written["liquidate"] > 1, written
    assert written["margin"] > 1, written
    facts = sum(written.values())

    rng = random.Random(5)
    victims = []
    for seed, url in enumerate(urls):
        victims.append(Victim(seed, url, event_count(url), after=rng.randrange(facts),
                              delay=rng.uniform(0, 3 * PAUSE_S)))
    report: list[str] = []
    mid_batch = 0
    for group in (victims[i:i + SIDE_BY_SIDE] for i in range(0, RUNS, SIDE_BY_SIDE)):
        for victim in group:
            if victim.seed == 0:
                process = spawn_job(victim.url)
                victim.kill = lambda p=process: (p.send_signal(signal.SIGKILL), p.wait())
            else:
                pid = fork_job(victim.url)
                victim.kill = lambda p=pid: (os.kill(p, signal.SIGKILL), os.waitpid(p, 0))
        kill_all(group)
        for victim in group:
            where = landing(victim.url)
            mid_batch += where.partial is not None
            kept = event_count(victim.url) - victim.before
            rerun = json.loads(_cli(*eod_args(victim.url)))
            assert [r["job"] for r in rerun] == list(EOD_ORDER)
            assert outcome(victim.url) == expected, f"seed {victim.seed}, killed {where}"
            check_closed_once(victim.url)
            assert event_count(victim.url) - victim.before == facts, (
                f"seed {victim.seed}: facts written twice or lost")
            report.append(f"run {victim.seed:2d}: killed {victim.delay * 1000:3.0f} ms after "
                          f"fact {victim.after:2d}: {where}; {kept} of {facts} facts were in, "
                          f"the rerun wrote {sum(r['events_written'] for r in rerun)}")
            gc.collect()

    with capsys.disabled():
        print(f"\n[{template.backend.kind}] eod of {facts} facts; {mid_batch}/{RUNS} kills "
              f"landed mid-batch; {time.monotonic() - started:.1f}s in all")
        print("\n".join(report))
    assert mid_batch >= RUNS // 2, report
