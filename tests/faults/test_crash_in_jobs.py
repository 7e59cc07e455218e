"""SIGKILL inside the jobs the end-of-day crash test leaves without facts: `settle` and `risk`.

tests/jobs/test_crash_rerun.py kills `clearing run eod` (settle, mtm, funding, risk,
liquidate, margin in order) at 20 random moments on both backends; in its scenario mtm,
funding, liquidate and margin write many facts, but nothing expires (settle writes none) and
there is too little index history for the risk job to move a parameter. Here a book with a
dated future, a call and a put expiring on 27 November 2026 and a month of daily index marks
makes `clearing run settle` write 4 facts (three instruments settled, the netted postings) and
`clearing run risk` 2 (the portfolio range of BTC and ETH).

Each job runs as a genuine `python -m clearing.cli run JOB --at TIME` process, one fact per
transaction (`CLEARING_CHUNK_EVENTS=1`), pausing after each commit
(`CLEARING_TEST_PAUSE_AFTER_CHUNK`), and is killed with SIGKILL once exactly k of its facts are
in the log, for every k from 1 to all of them (the last kill lands between the batch's last
fact and its completion). The rerun must end byte for byte where an uninterrupted run ends.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Engine, func, select

from clearing.app import Ledger
from clearing.jobs.batches import (
    CHUNK_EVENTS_ENV,
    PAUSE_AFTER_CHUNK_ENV,
    batch_id_for,
    is_completed,
    written_so_far,
)
from clearing.store.database import create_engine_for
from clearing.store.tables import events
from tests.conftest import Backend, make_backend
from tests.faults.scenario import assert_same_as, cli, event_count, outcome
from tests.jobs.test_crash_rerun import Copies
from tests.ledger.harness import T0, LedgerHarness, iso, leg, trade_rows

MEMBERS = tuple(f"x{i:02d}" for i in range(40))
EXPIRY = datetime(2026, 11, 27, 8, tzinfo=UTC)
FUTURE, CALL, PUT, PERP = ("BTC-27NOV26", "BTC-27NOV26-100000-C", "BTC-27NOV26-95000-P",
                           "ETH-PERP")
SETTLE_AT = EXPIRY
RISK_AT = EXPIRY + timedelta(hours=1)
"""After expiry, when every option is settled: what `clearing positions` shows then does not
depend on the wall clock (open options' greeks would)."""
PAUSE_S = 0.4
"""Held after each fact's commit: the window in which the watcher kills at exactly k facts."""
FACTS = {"settle": 4, "risk": 2}


def build_book(ledger: LedgerHarness) -> None:
    """Pairs of members long and short the expiring future, call and put and the ether
    perpetual; a month of daily, volatile BTC and ETH index marks, and six in the half hour
    before expiry (the settlement price's window)."""
    rng = random.Random(11)
    ledger.import_rows("accounts", [{"account_id": a, "owner": a.upper(),
                                     "margin_model": "standard"} for a in MEMBERS])
    ledger.list_instruments(FUTURE, CALL, PUT, PERP)
    marks, btc, eth, day = [], 100_000.0, 3_000.0, T0
    while day < EXPIRY:
        marks += [{"time": iso(day), "symbol": "BTC", "price": f"{btc:.2f}", "iv": ""},
                  {"time": iso(day), "symbol": "ETH", "price": f"{eth:.2f}", "iv": ""}]
        btc *= 1 + rng.gauss(0, 0.04)
        eth *= 1 + rng.gauss(0, 0.05)
        day += timedelta(days=1)
    marks += [{"time": iso(EXPIRY - timedelta(minutes=m)), "symbol": "BTC",
               "price": f"{btc + 7 * m:.2f}", "iv": ""} for m in range(30, 0, -5)]
    marks += [{"time": iso(T0), "symbol": s, "price": p, "iv": iv} for s, p, iv in (
        (FUTURE, "101000", ""), (CALL, "3000", "0.6"), (PUT, "1500", "0.6"),
        (PERP, "3000", ""))]
    ledger.import_rows("marks", marks)
    ledger.import_rows("deposits", [{"ref": f"D-{a}", "account_id": a, "asset": "USDC",
                                     "amount": "10000000", "time": iso(T0)} for a in MEMBERS])
    rows = []
    for i in range(0, len(MEMBERS), 2):
        buyer, seller = MEMBERS[i], MEMBERS[i + 1]
        for symbol, price in ((FUTURE, "101000"), (CALL, "3000"), (PUT, "1500"),
                              (PERP, "3000")):
            rows += trade_rows(f"T{i}-{symbol}", [leg(
                symbol, buyer=buyer, seller=seller, qty=f"{rng.randrange(1, 300) / 100:.2f}",
                price=price)], T0 + timedelta(minutes=1))
    ledger.import_rows("trades", rows)


def run_args(job: str, at: datetime, url: str) -> list[str]:
    return ["run", job, "--at", iso(at), "--db", url, "--json"]


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def template(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[Copies]:
    """The book, imported once per backend; the tests run on copies of it."""
    workdir = tmp_path_factory.mktemp(f"jobs-{request.param}")
    backend: Backend = make_backend(request.param, workdir)
    harness = LedgerHarness(backend.url, backend.engine(), workdir / "files")
    build_book(harness)
    harness.engine.dispose()
    copies = Copies(backend, workdir)
    try:
        yield copies
    finally:
        copies.close()
        backend.close()


@dataclass
class Victim:
    url: str
    kill_after: int
    before: int = 0
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    engine: Engine | None = field(default=None, repr=False)

    def written(self) -> int:
        assert self.engine is not None
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(events)).scalar_one()
                       ) - self.before


def kill_when_written(victims: list[Victim], timeout_s: float = 60.0) -> None:
    """Watch each victim's log; SIGKILL it as soon as `kill_after` of its facts are in
    (it is then pausing after that fact's commit)."""
    deadline = time.monotonic() + timeout_s
    waiting = list(victims)
    try:
        while waiting:
            assert time.monotonic() < deadline, f"victims never got far enough: {waiting}"
            for victim in list(waiting):
                assert victim.process is not None
                if victim.written() >= victim.kill_after:
                    victim.process.send_signal(signal.SIGKILL)
                    victim.process.wait()
                    waiting.remove(victim)
                elif victim.process.poll() is not None:
                    raise AssertionError(f"victim ended before its kill: {victim}")
            time.sleep(0.005)
    finally:
        for victim in victims:
            if victim.process is not None and victim.process.poll() is None:
                victim.process.kill()
                victim.process.wait()
            if victim.engine is not None:
                victim.engine.dispose()


@pytest.mark.parametrize("job", ["settle", "risk"])
def test_job_killed_after_each_of_its_facts_then_rerun_ends_as_an_uninterrupted_run(
    template: Copies, job: str,
) -> None:
    at = SETTLE_AT if job == "settle" else RISK_AT
    facts = FACTS[job]
    reference, *urls = template.make(f"{job}-ref", *(f"{job}-k{k}" for k in range(1, facts + 1)))
    if job == "risk":  # the book after expiry: settle first, uninterrupted, everywhere
        for url in (reference, *urls):
            cli(*run_args("settle", SETTLE_AT, url))
    first = json.loads(cli(*run_args(job, at, reference)))
    assert first["events_written"] == facts + 1  # the facts and the batch's completion
    expected = outcome(reference)

    env = {**os.environ, CHUNK_EVENTS_ENV: "1", PAUSE_AFTER_CHUNK_ENV: str(PAUSE_S)}
    victims = [Victim(url, kill_after=k) for k, url in enumerate(urls, start=1)]
    for victim in victims:
        victim.before = event_count(victim.url)
        victim.engine = create_engine_for(victim.url)
        victim.process = subprocess.Popen(
            [sys.executable, "-m", "clearing.cli", *run_args(job, at, victim.url)], env=env,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_when_written(victims)

    batch_id = batch_id_for(job, at)
    for victim in victims:
        ledger = Ledger.open(victim.url)
        try:  # where the kill landed: exactly k facts of the batch, no completion
            assert len(written_so_far(ledger, batch_id, at)) == victim.kill_after
            assert not is_completed(ledger, batch_id)
        finally:
            ledger.engine.dispose()
        rerun = json.loads(cli(*run_args(job, at, victim.url)))
        assert rerun["already_done"] is False
        assert rerun["events_written"] == facts + 1 - victim.kill_after
        assert_same_as(victim.url, expected)
        again = json.loads(cli(*run_args(job, at, victim.url)))
        assert again["already_done"] is True and again["events_written"] == 0
