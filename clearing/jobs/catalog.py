"""The jobs `clearing run JOB` knows, each a pure decision wired to what it reads."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from datetime import datetime
from decimal import Decimal

from clearing.app import Ledger
from clearing.collector import collector_paused
from clearing.domain.events import MarkPublished
from clearing.domain.instruments import UNDERLYINGS
from clearing.domain.expiry import decide_settlements
from clearing.domain.funding import decide_funding
from clearing.domain.liquidation import decide_liquidations
from clearing.domain.mark_to_market import decide_mark_to_market
from clearing.domain.margin_sweep import sweep
from clearing.domain.risk_changes import decide_dynamic_ranges
from clearing.domain.stress_record import decide_stress_record
from clearing.jobs.batches import CarriedState, JobFunction, JobRun, run_batch
from clearing.store.eventstore import LogFilter


def index_history(ledger: Ledger, until: datetime) -> dict[str, list[tuple[datetime, Decimal]]]:
    """Every index mark of every underlying up to `until`, oldest first."""
    history: dict[str, list[tuple[datetime, Decimal]]] = defaultdict(list)
    for underlying in UNDERLYINGS:
        bounds = LogFilter(stream_id=f"marks-{underlying}", effective_until=until)
        for fact in ledger.store.read_all(bounds=bounds, page_size=10_000):
            event = fact.event
            assert isinstance(event, MarkPublished)
            history[underlying].append((event.marked_at, event.price))
        history[underlying].sort()
    return history


JobFactory = Callable[[Ledger, datetime, CarriedState], JobFunction]
"""What a job decides with, given the ledger, the batch's time and what the run carries."""


def _risk(ledger: Ledger, at: datetime, carried: CarriedState) -> JobFunction:
    history = index_history(ledger, at)
    return lambda state, when, batch_id: decide_dynamic_ranges(state, when, batch_id, history)


def _liquidate(ledger: Ledger, at: datetime, carried: CarriedState) -> JobFunction:
    settled = frozenset(ledger.settled_instruments())
    return lambda state, when, batch_id: decide_liquidations(
        state, when, batch_id, carried.margins,
        frozenset(settled - state.settlements.keys()))


def _margin(ledger: Ledger, at: datetime, carried: CarriedState) -> JobFunction:
    return lambda state, when, batch_id: sweep(state, when, batch_id, carried.margins)


def _settle(ledger: Ledger, at: datetime, carried: CarriedState) -> JobFunction:
    history = index_history(ledger, at)
    return lambda state, when, batch_id: decide_settlements(state, when, batch_id, history)


JOBS: dict[str, JobFactory] = {
    "settle": _settle,
    "mtm": lambda ledger, at, carried: decide_mark_to_market,
    "funding": lambda ledger, at, carried: decide_funding,
    "risk": _risk,
    "liquidate": _liquidate,
    "margin": _margin,
    "stress": lambda ledger, at, carried: decide_stress_record,
}
EOD_ORDER: tuple[str, ...] = ("settle", "mtm", "funding", "risk", "liquidate", "margin")
"""`eod` runs these in this order: expired instruments settle first, the rest is marked to
market and funded, the day's risk parameters are set, accounts below maintenance are
liquidated, and the margin sweep records every account's resulting state (and margin
calls).

`stress` (the daily stress test, one `StressTestRecorded` fact) is not part of `eod`: it
changes no balance, so nothing in the day's close waits for it, and at scale it costs
seconds (about 5 s for 10,000 accounts and the seven shipped scenarios); the scheduler or
`clearing run stress` runs it on its own, after `eod`."""


class UnknownJob(ValueError):
    def __init__(self, job: str):
        super().__init__(f"unknown job {job!r} (known: {', '.join([*JOBS, 'eod'])})")
        self.job = job


def run_job(ledger: Ledger, job: str, at: datetime) -> list[JobRun]:
    """Run one job (or `eod`: every job in order) as of `at`."""
    return run_jobs(ledger, EOD_ORDER if job == "eod" else (job,), at)


def run_jobs(ledger: Ledger, names: Sequence[str], at: datetime) -> list[JobRun]:
    """Run jobs one after another as of `at`, each a batch of its own; the book is loaded
    once and carried from batch to batch, and so are the account margins `liquidate`
    computes: `margin` recomputes only the accounts whose books changed since."""
    carried = CarriedState()
    runs = []
    with collector_paused(collect_after=True):
        try:
            for name in names:
                if name not in JOBS:
                    raise UnknownJob(name)
                runs.append(run_batch(ledger, name, at, JOBS[name](ledger, at, carried),
                                      carried=carried))
        finally:
            # The book is let go before the closing collection, which then walks what is
            # left rather than a million positions (0.6 s at end of day, freeing nothing).
            carried.reset()
    return runs
