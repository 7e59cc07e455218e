"""The ledger as the command line and the jobs use it: one database, its log, its read models.

This is the imperative shell around the pure domain: it reads what a decision needs from the
read models (after bringing them up to date), lets the domain decide, and records the facts.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, bindparam, func, select

from clearing.backoffice.csvinput import InputProblem, InputRejected
from clearing.backoffice.imports import DecidedRow, ImportKind, decide_file
from clearing.backoffice.replay import REFERENCE_TYPES
from clearing.collector import collector_paused
from clearing.config import database_url
from clearing.domain.commands import BustTrade, NewFact, decide_bust
from clearing.domain.events import TradeCleared
from clearing.domain.instruments import Instrument
from clearing.domain.ledger import Account, TradeRecord
from clearing.domain.money import SETTLEMENT_ASSET
from clearing.domain.risk_parameters import RiskParameters
from clearing.projections import tables as t
from clearing.projections.ledger import _load_trades, instrument_from_row
from clearing.domain.ledger import LedgerState
from clearing.projections.runner import ProjectionRunner
from clearing.store.database import open_database, read_connection
from clearing.store.errors import IdempotencyConflict
from clearing.store.eventstore import (
    AppendResult,
    EventStore,
    LogPosition,
    PendingEvent,
    utc_now,
)
from clearing.store.tables import events

if TYPE_CHECKING:
    from clearing.projections.kept import _NoHash


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


VISIBILITY_WAIT_S = 60
"""How long a command waits for an older concurrent writer before giving up."""

# What decisions read, built once: building and keying a statement costs more than running
# it on a few rows, and every command runs several.
_ACCOUNT = select(t.accounts).where(t.accounts.c.account_id == bindparam("account_id"))
_ACCOUNT_IDS = select(t.accounts.c.account_id)
_INSTRUMENTS = select(t.instruments)
_BALANCE = select(t.balances.c.balance).where(t.balances.c.account_id == bindparam("account_id"),
                                              t.balances.c.asset == bindparam("asset"))
_SETTLED = select(t.settlements.c.symbol)
_TRADE_LEGS = select(t.trade_legs).where(t.trade_legs.c.trade_id == bindparam("trade_id"))
_LATEST_EFFECTIVE = select(func.max(events.c.effective_at)).where(
    events.c.type.not_in(REFERENCE_TYPES))
"""The latest effective time of anything but reference data (see `state_at`)."""


class Ledger:
    def __init__(self, engine: Engine, clock: Callable[[], datetime] = utc_now,
                 actor: str = "cli") -> None:
        self.engine = engine
        self.clock = clock
        self.actor = actor
        self.store = EventStore(engine, clock=clock)
        self.runner = ProjectionRunner(self.store)
        self._decision_state: LedgerState | None = None
        """State loaded once for all rows of one import's decisions."""

    @classmethod
    def open(cls, url: str | None = None, clock: Callable[[], datetime] = utc_now,
             as_application: bool = True) -> Ledger:
        """The ledger at `url`; on PostgreSQL working as the least-privilege application
        role unless `as_application` is False (rebuilds, the scheduler's own table)."""
        return cls(open_database(database_url(url), as_application=as_application),
                   clock=clock)

    def refresh(self) -> int:
        """Bring every read model up to date with the log."""
        return self.runner.catch_up()

    # ------------------------------------------------------------ what decisions read

    def account(self, account_id: str) -> Account | None:
        with read_connection(self.engine) as conn:
            row = conn.execute(_ACCOUNT, {"account_id": account_id}).first()
        return None if row is None else Account(row.account_id, row.owner, row.margin_model)

    def account_ids(self) -> set[str]:
        if (known := self._kept_reference()) is not None:
            return known[0]
        with read_connection(self.engine) as conn:
            return set(conn.execute(_ACCOUNT_IDS).scalars())

    def instruments(self) -> dict[str, Instrument]:
        if (known := self._kept_reference()) is not None:
            return known[1]
        with read_connection(self.engine) as conn:
            return {row.symbol: instrument_from_row(row)
                    for row in conn.execute(_INSTRUMENTS)}

    def _kept_reference(self) -> tuple[set[str], dict[str, Instrument], set[str]] | None:
        """Accounts, instruments and settled symbols from the book this process keeps, when
        it stands where this ledger's last catch-up found the read models (a long-running
        process: the scheduler, a simulation); None otherwise (read them)."""
        from clearing.projections.kept import NO_HASH, reference_at

        at, at_hash = self._checkpoint_seen()
        if at_hash is NO_HASH:
            return None
        return reference_at(self.engine, at, at_hash)

    def _checkpoint_seen(self) -> tuple[LogPosition, str | None | _NoHash]:
        """Where this ledger's last catch-up left the read models, with the hash of the fact
        there when the runner saw that fact itself (NO_HASH otherwise: another process moved
        the checkpoint, and only reading the fact again says which log it belongs to)."""
        from clearing.projections.kept import LEDGER_CHECKPOINT, NO_HASH

        reached = self.runner.reached(LEDGER_CHECKPOINT)
        seen = self.runner.last_seen(LEDGER_CHECKPOINT)
        return reached, seen[1] if seen is not None and seen[0] == reached else NO_HASH

    def balance(self, account_id: str, asset: str) -> Decimal:
        with read_connection(self.engine) as conn:
            value = conn.execute(_BALANCE, {"account_id": account_id, "asset": asset}
                                 ).scalar_one_or_none()
        return Decimal(0) if value is None else value

    def check_withdrawal(self, account_id: str, withdrawn: dict[str, Decimal],
                         at: datetime) -> None:
        """Refuse a withdrawal after which equity would fall below the initial requirement
        (SPEC section 4). `withdrawn` is everything this request takes from the account, per
        asset, so several rows of one file are judged together."""
        from clearing.domain.margin_sweep import margin_of
        from clearing.domain.rejections import InsufficientMargin

        when = max(at, self.clock())
        if self._decision_state is None:
            self._decision_state = self.state_at(when)
        state = self._decision_state
        if account_id not in state.accounts:
            return
        after = {a: b for (acct, a), b in state.balances.items() if acct == account_id}
        for asset, amount in withdrawn.items():
            after[asset] = after.get(asset, Decimal(0)) - amount
        # Collateral without an index price yet can only add value: count it as worth nothing
        # (a lower bound) rather than refuse; a debt in an unpriced asset is still refused.
        priced = {s for s in state.marks if s not in state.instruments} | {SETTLEMENT_ASSET}
        after = {a: b for a, b in after.items() if a in priced or b < 0}
        margin = margin_of(state, account_id, when, balances_override=after)
        if margin.equity < margin.initial:
            asset, amount = next(reversed(withdrawn.items()))
            raise InsufficientMargin(account_id, asset, amount, margin.equity, margin.initial)

    def recorded_keys(self, keys: list[str]) -> set[str]:
        """Which of these idempotency keys the log already holds."""
        from clearing.store.tables import events

        found: set[str] = set()
        with read_connection(self.engine) as conn:
            for start in range(0, len(keys), 900):
                chunk = keys[start:start + 900]
                found.update(conn.execute(select(events.c.idempotency_key).where(
                    events.c.idempotency_key.in_(chunk))).scalars())
        return found

    def state_at(self, at: datetime) -> LedgerState:
        """The ledger's state as of `at`: the read models when nothing recorded is effective
        later, else a replay of the log up to `at` (a job run for a past moment)."""
        from clearing.backoffice.replay import ReplayBounds, replay
        from clearing.projections.kept import current_state

        self.refresh()
        with read_connection(self.engine) as conn:
            latest = conn.execute(_LATEST_EFFECTIVE).scalar_one_or_none()
        if latest is not None and latest > at:
            return replay(self.store, ReplayBounds(as_of=at))
        return current_state(self.store, *self._checkpoint_seen())

    def settled_instruments(self) -> set[str]:
        if (known := self._kept_reference()) is not None:
            return known[2]
        with read_connection(self.engine) as conn:
            return set(conn.execute(_SETTLED).scalars())

    def trade(self, trade_id: str) -> TradeRecord | None:
        state = LedgerState()
        with read_connection(self.engine) as conn:
            _load_trades(state, conn.execute(_TRADE_LEGS, {"trade_id": trade_id}))
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
        self._await_read_models(result)
        return result

    def _await_read_models(self, result: AppendResult) -> None:
        """Bring the read models up to what was just recorded, so the next decision sees
        it. On PostgreSQL an older writer still in flight keeps newer facts invisible until
        it commits (that is what keeps readers from skipping it); wait for it, bounded."""
        self.refresh()
        if not self.store.is_postgresql or not result.positions:
            return
        target = result.log_end or self.store.log_position_of(max(result.positions))
        deadline = time.monotonic() + VISIBILITY_WAIT_S
        while self.runner.reached("ledger") < target:
            if time.monotonic() > deadline:
                raise TimeoutError(f"facts up to position {target.position} were recorded but "
                                   f"are not yet readable after {VISIBILITY_WAIT_S} s: an older "
                                   "transaction of another writer is still open")
            time.sleep(0.01)
            self.refresh()

    def import_file(self, kind: ImportKind, path: Path) -> ImportReport:
        """Parse, decide and record a whole file as one atomic append."""
        with collector_paused():
            return self._import_file(kind, path)

    def _import_file(self, kind: ImportKind, path: Path) -> ImportReport:
        self.refresh()
        self._decision_state = None
        try:
            decided, rows = decide_file(kind, path, self, self.clock())
        finally:
            self._decision_state = None
        if not decided:
            return ImportReport(str(kind), str(path), rows, 0, 0)
        metadata = [{"source": {"file": path.name, "line": d.line},
                     "correlation_id": f"import:{kind}:{path.name}"} for d in decided]
        try:
            result = self.record([d.fact for d in decided], metadata)
        except IdempotencyConflict as exc:
            raise _conflict_problem(path, decided, exc) from None
        return ImportReport(str(kind), str(path), rows, len(decided), result.written)

    def risk_parameters(self, at: datetime) -> RiskParameters:
        from clearing.domain.margin_sweep import params_at

        return params_at(self.state_at(at), at)

    def set_risk_parameter(self, name: str, underlying: str | None, value: Decimal,
                           at: datetime | None = None) -> AppendResult:
        from clearing.domain.risk_changes import decide_set_parameter

        at = at or self.clock()
        state = self.state_at(at)
        facts = decide_set_parameter(list(state.risk_changes.values()), name, underlying,
                                     value, at, self.actor)
        return self.record(facts)

    def change_margin_model(self, account_id: str, model: str) -> AppendResult:
        from clearing.domain.commands import decide_change_margin_model

        self.refresh()
        stream = f"account-{account_id}"
        facts = decide_change_margin_model(self.account(account_id), account_id, model,
                                           self.clock())
        if not facts:
            return AppendResult((), 0)
        return self.record(facts, expected_versions={stream: self.store.stream_version(stream)})

    def bust(self, trade_id: str, reason: str, at: datetime | None = None) -> AppendResult:
        self.refresh()
        at = at or self.clock()
        stream = self.store.read_stream(f"trade-{trade_id}")
        cleared = next((r.event for r in stream if isinstance(r.event, TradeCleared)), None)
        restored = None
        if cleared is not None:
            from clearing.domain.ledger import HISTORY_TYPES, position_history
            from clearing.store.eventstore import LogFilter

            keys = {(a, leg.instrument) for leg in cleared.legs for a in (leg.buyer, leg.seller)}
            history = self.store.read_all(bounds=LogFilter(types=HISTORY_TYPES),
                                          page_size=10_000)
            restored = position_history(history, keys, self.instruments(), trade_id)
        facts = decide_bust(BustTrade(trade_id, reason, at), self.trade(trade_id), cleared,
                            self.settled_instruments(), restored)
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
