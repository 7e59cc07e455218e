"""SPEC section 6, checked after every step of a simulation, and in full every K steps.

`Checker.after_step` reads only the events the step appended (one query) and checks, exactly:

* what the step was expected to write: a refused command or a duplicate delivery wrote no
  event at all; an accepted one wrote exactly the facts it should (invariant 6's "replaying
  any command or job changes nothing" included: a re-imported file, a batch run again);
* no idempotency key appears twice (every key of the run is kept in memory; invariant 6);
* the hash chain, incrementally: each new event's stream version follows the last one seen
  and its hash recomputes from its stream's previous hash and its envelope (invariant 2);
  its `recorded_at` is the step's time (the deterministic clock);
* projections equal a replay (invariant 5), incrementally: the checker keeps its own
  `LedgerState`, folded with the domain's `evolve` from the events appended so far, whose
  dictionaries record every key `evolve` reads or writes. After a step, the stored rows of
  exactly those keys (accounts, instruments, settlements, marks, positions, trades, margin
  states, risk parameter changes) and the statement lines of the new events are loaded and
  compared field by field with the fold; every balance is compared, every step (they are
  read in full anyway for the next check);
* every asset's stored balances sum to exactly zero (invariant 3);
* every instrument's positions net to exactly zero (invariant 4): in the fold, whose rows
  touched by the step were just compared with the stored ones (every stored row at each
  full check).

`Checker.full_check` runs `clearing verify` (`verify()`: the append-only guard tried for real,
the whole hash chain, both zero sums, read models against a full replay, unique keys) and
compares every read model, row for row, with the checker's own fold; the simulation calls it
every `VERIFY_EVERY` steps and after the last. Invariant 7 (both backends agree) is a test of
its own, which runs one seed on each backend and compares what the command line shows.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

from psycopg.rows import namedtuple_row
from sqlalchemy import Connection, Engine, bindparam, func, select

from clearing.app import Ledger
from clearing.backoffice.replay import Difference, differences
from clearing.backoffice.verify import verify
from clearing.domain.clock import storage_time
from clearing.domain.event import catalogue
from clearing.domain.ledger import LedgerState, StatementLine, Touched, evolve
from clearing.projections import tables as t
from clearing.projections.kept import current_state
from clearing.projections.ledger import change_from_row, load_full_state, load_state
from clearing.store.database import read_connection
from clearing.store.eventstore import RecordedEvent
from clearing.store.hashchain import GENESIS_HASH, chain_hash, envelope_bytes
from clearing.store.tables import events

from tests.simulation.workload import Expect, Outcome, Step

DIFFERENCES_SHOWN = 5
_EVENT_COLUMNS = ("position, txid, stream_id, stream_version, event_id, type, schema_version, "
                  "payload, metadata, effective_at, recorded_at, idempotency_key, hash")


_RISK_CHANGES_AT = select(t.risk_parameter_changes).where(
    t.risk_parameter_changes.c.position.in_(bindparam("positions", expanding=True)))
_STATEMENT_LINES = select(t.statement).where(t.statement.c.position >= bindparam("first"),
                                             t.statement.c.position <= bindparam("last"))
_TABLES = {x.name: x for x in t.LEDGER_TABLES}
_NEW_EVENTS = f"SELECT {_EVENT_COLUMNS} FROM events WHERE position > %s"
"""A range of the primary key, put in log order here: ordered by (txid, position) in SQL,
SQLite walks the whole log-order index to find the few rows, a cost that grows every step."""
_NEW_STATEMENT_LINES = ("SELECT position, account_id, asset, effective_at, type, reference, "
                        "amount, balance FROM statement WHERE position > %s")
"""The statement lines of every event after the last step's (PostgreSQL), read with the
events: any line there that the fold does not have is a difference too."""
def _log_order(row: tuple[Any, ...]) -> tuple[int, int]:
    return row[1], row[0]  # (txid, position)


_ALL_BALANCES = "SELECT account_id, asset, balance FROM balances"


class InvariantBroken(AssertionError):
    """A SPEC invariant (or a step's expected effect) does not hold."""


class RecordingDict(dict):  # type: ignore[type-arg]
    """A dict that remembers every key read or written through it since the last `take`."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[Any] = set()

    def __getitem__(self, key: Any) -> Any:
        self.seen.add(key)
        return super().__getitem__(key)

    def get(self, key: Any, default: Any = None) -> Any:
        self.seen.add(key)
        return super().get(key, default)

    def setdefault(self, key: Any, default: Any = None) -> Any:
        self.seen.add(key)
        return super().setdefault(key, default)

    def __setitem__(self, key: Any, value: Any) -> None:
        self.seen.add(key)
        super().__setitem__(key, value)

    def take(self) -> set[Any]:
        seen, self.seen = self.seen, set()
        return seen


MODELS = ("accounts", "instruments", "balances", "positions", "marks", "trades",
          "risk_changes", "margin_states", "settlements")


def recording_state() -> LedgerState:
    return LedgerState(**{name: RecordingDict() for name in MODELS})  # type: ignore[arg-type]


@dataclass(frozen=True)
class _Fact:
    position: int
    effective_at: datetime
    event: Any


@dataclass
class Checker:
    """The simulation's own view of the log and its checks; see the module docstring."""

    engine: Engine
    state: LedgerState = field(default_factory=recording_state)
    last_position: int = 0
    events: int = 0
    keys: set[str] = field(default_factory=set)
    heads: dict[str, tuple[int, str]] = field(default_factory=dict)
    open_interest: defaultdict[str, Decimal] = field(
        default_factory=lambda: defaultdict(Decimal))
    """Each instrument's net position in the fold, moved by the positions a step touched."""
    quantities: dict[tuple[str, str], Decimal] = field(default_factory=dict)
    holders: defaultdict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    """The accounts with an open position in each instrument, in the fold."""

    @property
    def is_postgresql(self) -> bool:
        return self.engine.dialect.name == "postgresql"

    # ------------------------------------------------------------ after every step

    def after_step(self, step: Step, outcome: Outcome) -> int:
        """Every cheap check; returns the number of events the step appended. The reads
        share one connection (one checkout, not three, per step), in autocommit on
        PostgreSQL: each is one query, and no step runs meanwhile."""
        with read_connection(self.engine) as conn:
            new, lines, balances = self._read_step(conn)
            self._expected_effect(step, outcome, len(new))
            for recorded in new:
                self._check_envelope(recorded, step)
            if new:
                for recorded in new:
                    evolve(self.state, _Fact(recorded.position, recorded.effective_at,
                                             recorded.event))
                self.last_position = new[-1].position
                self.events += len(new)
            seen = self._compare_touched(new, lines, conn)
            self._compare_balances(balances)
        self._check_open_interest(seen["positions"])
        self._check_house_rules(seen["positions"], seen["settlements"])
        return len(new)

    def _read_step(self, conn: Connection) -> tuple[list[RecordedEvent],
                                                    list[StatementLine] | None,
                                                    list[tuple[Any, ...]]]:
        """The events appended since the last step, every stored balance and, on
        PostgreSQL, the statement lines after the last step's events (None: read them with
        the touched rows): on PostgreSQL in one pipeline, one round trip."""
        after = (self.last_position,)
        if not self.is_postgresql:
            new = sorted(self._rows(conn, _NEW_EVENTS.replace("%s", "?"), after),
                         key=_log_order)
            balances = self._rows(conn, _ALL_BALANCES)
            return [RecordedEvent(tuple(row), catalogue, True) for row in new], None, balances
        db = conn.connection.driver_connection
        with db.cursor() as events_cur, db.cursor(row_factory=namedtuple_row) as lines_cur, \
                db.cursor() as balances_cur:
            with db.pipeline():  # closing it is the one sync: results are read after
                events_cur.execute(_NEW_EVENTS, after)
                lines_cur.execute(_NEW_STATEMENT_LINES, after)
                balances_cur.execute(_ALL_BALANCES)
            new = [RecordedEvent(tuple(row), catalogue, False)
                   for row in sorted(events_cur.fetchall(), key=_log_order)]
            lines = [StatementLine(row.position, row.account_id, row.asset, row.effective_at,
                                   row.type, row.reference, row.amount, row.balance)
                     for row in lines_cur.fetchall()]
            balances = balances_cur.fetchall()
        return new, lines, balances

    def _expected_effect(self, step: Step, outcome: Outcome, appended: int) -> None:
        def broken(reason: str) -> InvariantBroken:
            refusal = f", refused with {outcome.refusal}" if outcome.refusal else ""
            return InvariantBroken(f"{reason} (accepted={outcome.accepted}, "
                                   f"reported written={outcome.written}, events appended="
                                   f"{appended}{refusal})")

        if appended != outcome.written:
            raise broken("the events appended differ from what the command reported")
        if not outcome.accepted and appended:
            raise broken("a refused command wrote events")
        if step.expect is Expect.REFUSED and outcome.accepted:
            raise broken("a command that must be refused was accepted")
        if step.expect in (Expect.WRITTEN, Expect.NOTHING) and not outcome.accepted:
            raise broken("a command that must be accepted was refused")
        if step.expect is Expect.NOTHING and appended:
            raise broken("a repeated command or delivery wrote events")
        if outcome.accepted and step.expect in (Expect.WRITTEN, Expect.ANY):
            if step.events is not None and appended != step.events:
                raise broken(f"expected exactly {step.events} new facts")
            if step.events is None and step.expect is Expect.WRITTEN and appended < 1:
                raise broken("an accepted command wrote nothing")

    def _check_envelope(self, recorded: RecordedEvent, step: Step) -> None:
        key = recorded.idempotency_key
        if key in self.keys:
            raise InvariantBroken(f"idempotency key {key!r} recorded twice (again at "
                                  f"position {recorded.position})")
        self.keys.add(key)
        version, previous = self.heads.get(recorded.stream_id, (0, GENESIS_HASH))
        if recorded.stream_version != version + 1:
            raise InvariantBroken(f"stream {recorded.stream_id!r} jumps from version "
                                  f"{version} to {recorded.stream_version} at position "
                                  f"{recorded.position}")
        raw = recorded._row  # the stored envelope, exactly as hashed
        digest = chain_hash(previous, envelope_bytes(
            recorded.stream_id, recorded.stream_version, recorded.event_id, recorded.type,
            recorded.schema_version, recorded.payload, raw[8],
            storage_time(recorded.effective_at), storage_time(recorded.recorded_at), key))
        if digest != recorded.hash:
            raise InvariantBroken(f"hash chain broken at position {recorded.position} "
                                  f"(stream {recorded.stream_id!r} v{recorded.stream_version})")
        self.heads[recorded.stream_id] = (recorded.stream_version, recorded.hash)
        if recorded.recorded_at != step.now:
            raise InvariantBroken(f"event at position {recorded.position} recorded at "
                                  f"{recorded.recorded_at}, not at the step's time {step.now}")

    def _compare_touched(self, new: list[RecordedEvent], lines_read: list[StatementLine] | None,
                         conn: Connection) -> dict[str, set[Any]]:
        """The stored rows of every key the fold read or wrote this step, and the statement
        lines of the new events, against the fold; returns those keys, by read model."""
        seen = {name: getattr(self.state, name).take() for name in MODELS}
        lines, self.state.statement = self.state.statement, []
        if not new and not any(seen.values()):
            return seen
        # Settlements are stored by symbol and loaded with the instruments.
        symbols = seen["instruments"] = seen["settlements"] = \
            seen["instruments"] | seen["settlements"]
        keys = Touched(accounts=seen["accounts"], instruments=symbols,
                       balances=set(), positions=seen["positions"], marks=seen["marks"],
                       trades=seen["trades"], margin_states=seen["margin_states"])
        stored = load_state(conn, _TABLES, keys)
        if seen["risk_changes"]:
            for row in conn.execute(_RISK_CHANGES_AT,
                                    {"positions": list(seen["risk_changes"])}):
                stored.risk_changes[row.position] = change_from_row(row)
        if lines_read is not None:
            stored.statement.extend(lines_read)
        elif new:
            for row in conn.execute(_STATEMENT_LINES, {"first": new[0].position,
                                                       "last": new[-1].position}):
                stored.statement.append(StatementLine(
                    row.position, row.account_id, row.asset, row.effective_at, row.type,
                    row.reference, row.amount, row.balance))
        conn.rollback()
        folded = LedgerState(statement=lines)
        for name in ("accounts", "instruments", "positions", "marks", "trades",
                     "risk_changes", "margin_states", "settlements"):
            mine = getattr(self.state, name)
            target = getattr(folded, name)
            for key in seen[name]:
                if dict.__contains__(mine, key):
                    target[key] = dict.__getitem__(mine, key)
        self._raise_differences("rows touched by the step", differences(stored, folded))
        return seen

    def _compare_balances(self, rows: list[tuple[Any, ...]]) -> None:
        """Every stored balance against the fold, and their sum per asset."""
        totals: dict[str, Decimal] = defaultdict(Decimal)
        stored = {}
        for account_id, asset, balance in rows:
            stored[(account_id, asset)] = amount = Decimal(balance)
            totals[asset] += amount
        bad = {a: v for a, v in sorted(totals.items()) if v != 0}
        if bad:
            raise InvariantBroken(f"balances do not sum to zero: {bad} (SPEC invariant 3)")
        mine = dict(self.state.balances.items())
        if stored != mine:
            self._raise_differences("balances", [
                Difference("balances", f"{a}/{s}", "balance", stored.get((a, s)),
                           mine.get((a, s)))
                for a, s in sorted(set(stored) | set(mine))
                if stored.get((a, s)) != mine.get((a, s))])

    def _check_open_interest(self, keys: set[tuple[str, str]]) -> None:
        """Every instrument's positions net to zero, in the fold (whose rows touched by the
        step were just compared with the stored ones; the rest are compared in full by
        `full_check`). Only the positions in `keys` can have moved (the fold records every
        key `evolve` writes), so the totals and holders are moved by exactly those."""
        positions = self.state.positions
        for key in keys:
            if not dict.__contains__(positions, key):
                continue
            quantity = dict.__getitem__(positions, key).quantity
            account_id, symbol = key
            self.open_interest[symbol] += quantity - self.quantities.get(key, Decimal(0))
            self.quantities[key] = quantity
            holders = self.holders[symbol]
            if quantity:
                holders.add(account_id)
            else:
                holders.discard(account_id)
        bad = {s: v for s in sorted({symbol for _, symbol in keys})
               if (v := self.open_interest[s]) != 0}
        if bad:
            raise InvariantBroken(f"positions do not net to zero: {bad} (SPEC invariant 4)")

    def _check_house_rules(self, positions: set[tuple[str, str]], symbols: set[str]) -> None:
        """Two rules of SPEC sections 4 and 5 that hold after any step: settled positions
        are closed, and the insurance fund never goes below zero. Only a position or a
        settlement the step touched (`positions`, `symbols`) can break the first."""
        settlements = self.state.settlements
        for symbol in symbols | {symbol for _, symbol in positions}:
            holders = self.holders.get(symbol)
            if holders and dict.__contains__(settlements, symbol):
                account_id = min(holders)
                quantity = self.quantities[(account_id, symbol)]
                raise InvariantBroken(f"{account_id} holds {quantity} {symbol}, which "
                                      "has settled (SPEC section 4: settled positions close)")
        self._check_insurance_fund()

    def _check_all_positions(self) -> None:
        """Both position rules over every position of the fold, and the running totals
        `_check_open_interest` keeps against a fresh count (at every full check)."""
        totals: dict[str, Decimal] = defaultdict(Decimal)
        for (account_id, symbol), position in self.state.positions.items():
            totals[symbol] += position.quantity
            if position.quantity != 0 and dict.__contains__(self.state.settlements, symbol):
                raise InvariantBroken(f"{account_id} holds {position.quantity} {symbol}, which "
                                      "has settled (SPEC section 4: settled positions close)")
        bad = {s: v for s, v in sorted(totals.items()) if v != 0}
        if bad:
            raise InvariantBroken(f"positions do not net to zero: {bad} (SPEC invariant 4)")
        kept = {s: v for s, v in self.open_interest.items() if v != 0}
        if kept:
            raise InvariantBroken(f"the checker's running open interest is off: {kept}")

    def _check_insurance_fund(self) -> None:
        fund = dict.get(self.state.balances, ("ccp:insurance", "USDC"), Decimal(0))
        if fund < 0:
            raise InvariantBroken(f"the insurance fund is at {fund} USDC (SPEC section 5: "
                                  "it covers deficits as far as its balance goes)")

    @staticmethod
    def _rows(conn: Connection, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        cur = conn.connection.driver_connection.cursor()
        try:
            cur.execute(sql, params)
            rows = cur.fetchall()
        finally:
            cur.close()
        conn.rollback()
        return rows

    @staticmethod
    def _raise_differences(what: str, found: Iterable[Difference]) -> None:
        found = list(found)
        if found:
            shown = "; ".join(str(d) for d in found[:DIFFERENCES_SHOWN])
            more = f" (and {len(found) - DIFFERENCES_SHOWN} more)" \
                if len(found) > DIFFERENCES_SHOWN else ""
            raise InvariantBroken(f"read models differ from the fold of the log in {what} "
                                  f"(SPEC invariant 5), stored vs replayed: {shown}{more}")

    # ------------------------------------------------------------ every K steps

    @staticmethod
    def _check_kept_book(ledger: Ledger, stored: LedgerState) -> None:
        """The book the process keeps between commands (what jobs and withdrawals decide
        from) against the read models, value and representation alike (1.5 is not 1.50)."""
        ledger.refresh()
        kept = current_state(ledger.store, ledger.runner.reached("ledger"))
        for name in ("accounts", "instruments", "balances", "positions", "marks",
                     "risk_changes", "margin_states", "settlements"):
            mine = sorted((repr(k), repr(v)) for k, v in getattr(kept, name).items())
            theirs = sorted((repr(k), repr(v)) for k, v in getattr(stored, name).items())
            if mine != theirs:
                wrong = sorted(set(mine) ^ set(theirs))[:DIFFERENCES_SHOWN]
                raise InvariantBroken(f"the kept book differs from the read models in "
                                      f"{name}: {wrong}")

    def full_check(self, ledger: Ledger) -> None:
        """`clearing verify` in full, and every read model against the checker's fold."""
        failed = [c for c in verify(ledger) if not c.ok]
        if failed:
            raise InvariantBroken("clearing verify failed: " + "; ".join(
                f"{c.name}: {c.detail}" for c in failed))
        tables = {x.name: x for x in t.LEDGER_TABLES}
        with self.engine.connect() as conn:
            stored = load_full_state(conn, tables, with_statement=False)
            stored_events = conn.execute(select(func.count()).select_from(events)).scalar_one()
        mine = LedgerState(**{name: dict(getattr(self.state, name).items())
                              for name in MODELS})
        self._raise_differences("the whole of every read model", differences(stored, mine))
        if stored_events != self.events:
            raise InvariantBroken(f"the log holds {stored_events} events; the checker read "
                                  f"{self.events}")
        self._check_kept_book(ledger, stored)
        self._check_all_positions()
        for name in MODELS:
            getattr(self.state, name).take()
