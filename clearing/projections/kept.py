"""The ledger's whole state kept in memory by a process from one command to the next.

A job, a withdrawal check or a risk parameter change decides from the whole book
(`Ledger.state_at`). Reading every read-model row again for each of them cost a long-running
process (the scheduler, a simulation) more than the decisions themselves. So the first read
is kept, labelled with the log position its rows stand at, and each later read moves it
forward by folding the facts recorded since with the projection's own `evolve`: it cannot
drift from the read models, which are that same fold stored.

What a caller gets is a copy it may change. A book of more than `KEPT_ROWS_MAX` rows (an
end of day over a million positions) is not kept: a second copy of it would cost more memory
than reading it costs time, so it is read afresh each time, as before.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from weakref import WeakKeyDictionary

from sqlalchemy import Engine, func, select

from clearing.domain.instruments import Instrument
from clearing.domain.ledger import LedgerState, Position, TradeRecord, Touched, evolve
from clearing.projections import tables as t
from clearing.projections.ledger import LedgerProjection, load_full_state
from clearing.store.eventstore import START, EventStore, LogFilter, LogPosition, RecordedEvent
from clearing.store.tables import checkpoints, events

KEPT_ROWS_MAX = 100_000
"""Balance, position and trade-leg rows above which the state is not kept (see the module)."""
LEDGER_CHECKPOINT = LedgerProjection.name

_CHECKPOINT = select(
    checkpoints.c.txid, checkpoints.c.position,
    select(events.c.hash).where(events.c.position == checkpoints.c.position)
    .scalar_subquery().label("hash"),
).where(checkpoints.c.name == LEDGER_CHECKPOINT)
_TABLES = {x.name: x for x in t.LEDGER_TABLES}


@dataclass
class _Kept:
    state: LedgerState
    at: LogPosition
    last_hash: str | None
    """The hash of the fact at `at` (None at the start of the log): a log that no longer
    holds that fact there (a database recreated under the same engine) is not this state's."""


class _NoHash:
    """No hash given (None is one: the start of the log)."""


NO_HASH = _NoHash()
_KEPT: WeakKeyDictionary[Engine, _Kept] = WeakKeyDictionary()
_GUARD = threading.Lock()
"""Held while a kept state is read or moved: threads of one process (the scheduler's) may
share an engine."""


def current_state(store: EventStore, at: LogPosition,
                  at_hash: str | None | _NoHash = NO_HASH) -> LedgerState:
    """The read models' state as of log position `at` (every fact up to it applied), as a
    new object the caller may change; statement lines and trades left out, as
    `load_full_state(with_statement=False, with_trades=False)` leaves them. `at_hash`, the
    hash of the fact at `at` as the caller just read it, spares reading that fact again to
    check that the kept state is this log's."""
    with _GUARD:
        return _current_state(store, at, at_hash)


def _current_state(store: EventStore, at: LogPosition,
                   at_hash: str | None | _NoHash = NO_HASH) -> LedgerState:
    kept = _KEPT.get(store.engine)
    if kept is not None and kept.at == at and kept.last_hash == at_hash:
        return _copy(kept.state)
    if kept is not None and not _move_to(store, kept, at):
        kept = None
        _KEPT.pop(store.engine, None)
    if kept is None:
        loaded = _load(store)
        if isinstance(loaded, LedgerState):
            return loaded  # too big to keep: the caller has the only copy
        kept = loaded
        if not _move_to(store, kept, at):  # the log moved on before the load: as they stand
            return _copy(kept.state)
        _KEPT[store.engine] = kept
    return _copy(kept.state)


def reference_at(engine: Engine, at: LogPosition, at_hash: str | None
                 ) -> tuple[set[str], dict[str, Instrument], set[str]] | None:
    """The account ids, the instruments and the settled symbols of the kept state, when it
    stands at `at`, the fact whose hash is `at_hash` (it is then the read models' state):
    what an import decides from, without a query; else None (read them)."""
    with _GUARD:
        kept = _standing_at(engine, at, at_hash)
        if kept is None:
            return None
        state = kept.state
        return set(state.accounts), dict(state.instruments), set(state.settlements)


def rows_known_at(engine: Engine, at: LogPosition, at_hash: str | None
                  ) -> Callable[[Touched], LedgerState | None]:
    """For the ledger projection applying facts after `at` (its checkpoint, locked; `at_hash`
    the hash of the fact there): the rows it would read for a set of keys, taken from the
    kept state when that stands exactly there (it is then the read models' state), else
    None (read them)."""
    def known(keys: Touched) -> LedgerState | None:
        with _GUARD:
            kept = _standing_at(engine, at, at_hash)
            return None if kept is None else _subset(kept.state, keys)
    return known


def applied(engine: Engine, at: LogPosition, at_hash: str | None,
            facts: Sequence[RecordedEvent], folded: LedgerState) -> None:
    """The ledger projection committed `facts` (after `at`), leaving the rows they touch as
    `folded`: a kept state standing at `at` takes those rows and moves to the last fact.
    (`evolve` reads and writes only the touched rows, so this is the fold of `facts`.)"""
    with _GUARD:
        kept = _standing_at(engine, at, at_hash)
        if kept is None or not facts:
            return
        state = kept.state
        for name in _MODELS:
            getattr(state, name).update(getattr(folded, name))
        state.trades.update(folded.trades)
        kept.at, kept.last_hash = facts[-1].log_position, facts[-1].hash


def _standing_at(engine: Engine, at: LogPosition, at_hash: str | None) -> _Kept | None:
    """The kept state if it stands at `at`, the fact whose hash is `at_hash`; a kept state
    at the same position of another log (a database recreated under one engine) is
    dropped."""
    kept = _KEPT.get(engine)
    if kept is None or kept.at != at:
        return None
    if kept.last_hash != at_hash:
        _KEPT.pop(engine, None)
        return None
    return kept


def _load(store: EventStore) -> _Kept | LedgerState:
    """The read models and the checkpoint they stand at, read in one snapshot, to keep; or,
    when the book is too big to keep (counted first, so it is read once), the read models
    as `current_state` hands them out."""
    with store.engine.connect() as conn:
        if store.is_postgresql:
            conn.execution_options(isolation_level="REPEATABLE READ")
        row = conn.execute(_CHECKPOINT).first()
        rows = sum(conn.execute(select(func.count()).select_from(table)).scalar_one()
                   for table in (t.balances, t.positions, t.trade_legs))
        if rows > KEPT_ROWS_MAX:
            return load_full_state(conn, _TABLES, with_statement=False, with_trades=False)
        state = load_full_state(conn, _TABLES, with_statement=False, with_trades=True)
    state.keeps_statement = False
    if row is None:
        return _Kept(state, START, None)
    return _Kept(state, LogPosition(int(row.txid), int(row.position)), row.hash)


def _move_to(store: EventStore, kept: _Kept, at: LogPosition) -> bool:
    """Fold the facts after `kept.at` up to `at` into the kept state; False when it cannot
    be this log's state (the log does not hold its last fact, or `at` is behind it)."""
    if at < kept.at:
        return False
    if at == kept.at and kept.at == START:
        return True
    # Read from the kept fact itself, to check it is still there.
    after = START if kept.at == START else LogPosition(kept.at.txid, kept.at.position - 1)
    first = kept.at != START
    for recorded in store.read_all(after, bounds=LogFilter(until=at)):
        if first:
            if recorded.position != kept.at.position or recorded.hash != kept.last_hash:
                return False
            first = False
            continue
        evolve(kept.state, recorded)
        kept.at, kept.last_hash = recorded.log_position, recorded.hash
    return not first


_MODELS = ("accounts", "instruments", "balances", "positions", "marks", "risk_changes",
           "margin_states", "settlements")


def _subset(state: LedgerState, keys: Touched) -> LedgerState:
    """What `load_state(keys)` reads, from `state`; mutable values copied."""
    subset = LedgerState()
    for name, wanted in (("accounts", keys.accounts), ("margin_states", keys.margin_states),
                         ("instruments", keys.instruments), ("settlements", keys.instruments),
                         ("balances", keys.balances), ("marks", keys.marks)):
        have, into = getattr(state, name), getattr(subset, name)
        for key in wanted:
            value = have.get(key)
            if value is not None:
                into[key] = value
    positions = state.positions
    for key in keys.positions:
        p = positions.get(key)
        if p is not None:
            subset.positions[key] = _copied(p)
    trades = state.trades
    for trade_id in keys.trades:
        record = trades.get(trade_id)
        if record is not None:
            subset.trades[trade_id] = TradeRecord(record.legs, record.traded_at,
                                                  record.busted)
    return subset


def _copy(state: LedgerState) -> LedgerState:
    return LedgerState(
        accounts=dict(state.accounts),
        instruments=dict(state.instruments),
        balances=dict(state.balances),
        positions={key: _copied(p) for key, p in state.positions.items()},
        marks=dict(state.marks),
        risk_changes=dict(state.risk_changes),
        margin_states=dict(state.margin_states),
        settlements=dict(state.settlements),
    )


def _copied(p: Position) -> Position:
    return Position(p.quantity, p.average_entry_price, p.settlement_basis, p.realised_pnl)
