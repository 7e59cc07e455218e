"""The ledger as the command line and the jobs use it: one database, its log, its read models.

This is the imperative shell around the pure domain: it reads what a decision needs from the
read models (after bringing them up to date), lets the domain decide, and records the facts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, select

from clearing.backoffice.csvinput import InputProblem, InputRejected
from clearing.backoffice.imports import DecidedRow, ImportKind, decide_file
from clearing.config import database_url
from clearing.domain.commands import BustTrade, NewFact, decide_bust
from clearing.domain.events import TradeCleared
from clearing.domain.instruments import Instrument
from clearing.domain.ledger import Account, TradeRecord
from clearing.projections import tables as t
from clearing.projections.ledger import _load_trades, instrument_from_row
from clearing.domain.ledger import LedgerState
from clearing.projections.runner import ProjectionRunner
from clearing.store.database import open_database
from clearing.store.errors import IdempotencyConflict
from clearing.store.eventstore import AppendResult, EventStore, PendingEvent, utc_now


@dataclass(frozen=True)
class ImportReport:
    kind: str
    file: str
    rows: int
    facts: int
    written: int

    @property
    def already_imported(self) -> bool:
        return self.written == 0


class Ledger:
    def __init__(self, engine: Engine, clock: Callable[[], datetime] = utc_now,
                 actor: str = "cli") -> None:
        self.engine = engine
        self.clock = clock
        self.actor = actor
        self.store = EventStore(engine, clock=clock)
        self.runner = ProjectionRunner(self.store)

    @classmethod
    def open(cls, url: str | None = None, clock: Callable[[], datetime] = utc_now) -> Ledger:
        return cls(open_database(database_url(url)), clock=clock)

    def refresh(self) -> int:
        """Bring every read model up to date with the log."""
        return self.runner.catch_up()

    # ------------------------------------------------------------ what decisions read

    def account(self, account_id: str) -> Account | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(t.accounts).where(t.accounts.c.account_id == account_id)
                               ).first()
        return None if row is None else Account(row.account_id, row.owner, row.margin_model)

    def account_ids(self) -> set[str]:
        with self.engine.connect() as conn:
            return set(conn.execute(select(t.accounts.c.account_id)).scalars())

    def instruments(self) -> dict[str, Instrument]:
        with self.engine.connect() as conn:
            return {row.symbol: instrument_from_row(row)
                    for row in conn.execute(select(t.instruments))}

    def balance(self, account_id: str, asset: str) -> Decimal:
        with self.engine.connect() as conn:
            value = conn.execute(select(t.balances.c.balance).where(
                t.balances.c.account_id == account_id, t.balances.c.asset == asset)
            ).scalar_one_or_none()
        return Decimal(0) if value is None else value

    def check_withdrawal(self, account_id: str, asset: str, amount: Decimal,
                         at: datetime) -> None:
        """Margin rules on withdrawals hook in here (see the risk part of the ledger)."""

    def settled_instruments(self) -> set[str]:
        return set()

    def trade(self, trade_id: str) -> TradeRecord | None:
        state = LedgerState()
        with self.engine.connect() as conn:
            _load_trades(state, conn.execute(select(t.trade_legs).where(
                t.trade_legs.c.trade_id == trade_id)))
        return state.trades.get(trade_id)

    # ------------------------------------------------------------ recording

    def record(self, facts: Sequence[NewFact], metadata: Sequence[dict[str, Any]] | None = None,
               expected_versions: dict[str, int] | None = None) -> AppendResult:
        pending = [
            PendingEvent(f.stream_id, f.event, f.idempotency_key, f.effective_at,
                         {"actor": self.actor, **(metadata[i] if metadata else {})})
            for i, f in enumerate(facts)
        ]
        result = self.store.append(pending, expected_versions)
        self.refresh()
        return result

    def import_file(self, kind: ImportKind, path: Path) -> ImportReport:
        """Parse, decide and record a whole file as one atomic append."""
        self.refresh()
        decided = decide_file(kind, path, self, self.clock())
        rows = len({d.line for d in decided})
        if not decided:
            return ImportReport(str(kind), str(path), rows, 0, 0)
        metadata = [{"source": {"file": path.name, "line": d.line},
                     "correlation_id": f"import:{kind}:{path.name}"} for d in decided]
        try:
            result = self.record([d.fact for d in decided], metadata)
        except IdempotencyConflict as exc:
            raise _conflict_problem(path, decided, exc) from None
        return ImportReport(str(kind), str(path), rows, len(decided), result.written)

    def bust(self, trade_id: str, reason: str, at: datetime | None = None) -> AppendResult:
        self.refresh()
        at = at or self.clock()
        stream = self.store.read_stream(f"trade-{trade_id}")
        cleared = next((r.event for r in stream if isinstance(r.event, TradeCleared)), None)
        facts = decide_bust(BustTrade(trade_id, reason, at), self.trade(trade_id), cleared,
                            self.settled_instruments())
        return self.record(facts, [{"reason": reason}],
                           expected_versions={f"trade-{trade_id}": len(stream)})


def _conflict_problem(path: Path, decided: list[DecidedRow],
                      exc: IdempotencyConflict) -> InputRejected:
    row = decided[exc.index]
    key = exc.key.split(":", 1)
    field = {"trade": "trade_id", "deposit": "ref", "withdrawal": "ref", "account": "account_id",
             "instrument": "symbol", "mark": "time"}.get(key[0], "row")
    return InputRejected([InputProblem(
        str(path), row.line, field,
        f"{key[-1]!r} was already recorded with different content (position {exc.position}); "
        "a correction must be a new fact (e.g. a bust), not an edit")])
