"""The ledger's state and `evolve`: how each fact changes balances, positions and marks.

`evolve` is the only place that knows how a fact changes state. The stored projections, the
in-memory replay behind `--as-of` and audits, and the verification of one against the other
all run it, so they cannot drift apart. It mutates the state it is given (a fold over
millions of events cannot afford a copy per event) and never fails on a recorded fact.

A position carries its settlement basis: the sum of quantity × price of its fills since the
last settlement, which is quantity × last settlement price after a mark-to-market. Keeping the
basis rather than a price keeps variation margin exact: averaging prices would need division.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import NamedTuple, Protocol

from clearing.domain.event import Event
from clearing.domain.events import (
    AccountOpened,
    AutoDeleveraged,
    CollateralDeposited,
    CollateralWithdrawn,
    ExpirySettled,
    FundingPaid,
    InstrumentListed,
    InstrumentSettled,
    InsuranceFundPaid,
    MarginModelChanged,
    MarginStatusChanged,
    MarkPublished,
    MoneyMovement,
    PositionLiquidated,
    PositionsMoved,
    RiskParametersSet,
    SettlementResidualSwept,
    TradeBusted,
    TradeCleared,
    TradeLeg,
    UncoveredLoss,
    VariationMarginSettled,
)
from clearing.domain.instruments import Instrument
from clearing.domain.money import informational
from clearing.domain.risk_parameters import ParameterChange

ZERO = Decimal(0)


class Fact(Protocol):
    """What `evolve` needs of a recorded event: the event and where and when it sits."""

    @property
    def position(self) -> int: ...

    @property
    def effective_at(self) -> datetime: ...

    @property
    def event(self) -> Event: ...


@dataclass(frozen=True)
class Account:
    account_id: str
    owner: str
    margin_model: str


@dataclass(slots=True)
class Position:
    """One account's holding of one instrument (a book holds a million: slots keep it
    small)."""

    quantity: Decimal = ZERO
    average_entry_price: Decimal = ZERO
    settlement_basis: Decimal = ZERO
    realised_pnl: Decimal = ZERO

    @property
    def last_settlement_price(self) -> Decimal | None:
        if self.quantity == 0:
            return None
        return informational(self.settlement_basis / self.quantity)


@dataclass(frozen=True)
class Mark:
    price: Decimal
    iv: Decimal | None
    marked_at: datetime
    position: int


@dataclass
class TradeRecord:
    legs: tuple[TradeLeg, ...]
    traded_at: datetime
    busted: bool = False


class StatementLine(NamedTuple):
    """One posting as the statement shows it. A named tuple (immutable like a frozen
    dataclass, a tenth of the cost to make): a trades file writes several per trade, and its
    fields are the statement table's columns, in order."""

    position: int
    account_id: str
    asset: str
    effective_at: datetime
    type: str
    reference: str
    amount: Decimal
    balance: Decimal


@dataclass(frozen=True)
class MarginState:
    """An account's margin status as last recorded, and the figures behind it."""

    status: str
    equity: Decimal
    initial: Decimal
    maintenance: Decimal
    since: datetime
    position: int


@dataclass
class LedgerState:  # noqa: D101 - documented below
    """Everything the ledger's projections hold. A projection runner may load only the part a
    batch of facts touches (see `touched`); `evolve` reads nothing else."""

    accounts: dict[str, Account] = field(default_factory=dict)
    instruments: dict[str, Instrument] = field(default_factory=dict)
    balances: dict[tuple[str, str], Decimal] = field(default_factory=dict)
    positions: dict[tuple[str, str], Position] = field(default_factory=dict)
    marks: dict[str, Mark] = field(default_factory=dict)
    trades: dict[str, TradeRecord] = field(default_factory=dict)
    statement: list[StatementLine] = field(default_factory=list)
    risk_changes: dict[int, ParameterChange] = field(default_factory=dict)
    """Every risk parameter change, by position (the history margin needs at any time)."""
    margin_states: dict[str, MarginState] = field(default_factory=dict)
    settlements: dict[str, Decimal] = field(default_factory=dict)
    """Settlement price of every instrument that has expired and settled."""
    keeps_statement: bool = True
    """False for a working state that needs balances but not their history (a job's state
    carried from batch to batch, liquidation's working copy): `post` then writes no
    statement lines."""


@dataclass
class Touched:
    """The keys of state a set of facts reads or writes."""

    accounts: set[str] = field(default_factory=set)
    instruments: set[str] = field(default_factory=set)
    balances: set[tuple[str, str]] = field(default_factory=set)
    positions: set[tuple[str, str]] = field(default_factory=set)
    marks: set[str] = field(default_factory=set)
    trades: set[str] = field(default_factory=set)
    margin_states: set[str] = field(default_factory=set)


def touched(events: list[Event]) -> Touched:
    """What state `evolve` reads for these events: a projection loads exactly this."""
    keys = Touched()
    balances, instruments, positions = keys.balances, keys.instruments, keys.positions
    for event in events:
        if type(event) is TradeCleared:  # the common case, first: what a trades file holds
            balances.update([(p.account_id, p.asset) for p in event.postings])
            for leg in event.legs:
                instruments.add(leg.instrument)
                positions.add((leg.buyer, leg.instrument))
                positions.add((leg.seller, leg.instrument))
            continue
        extra = TOUCHES.get(type(event))
        if extra is not None:
            extra(event, keys)
            continue
        if isinstance(event, PositionsMoved):  # a batch payment: hundreds of movements
            balances.update([(p.account_id, p.asset) for p in event.postings])
            movements = event.movements
            instruments.update([m.instrument for m in movements])
            positions.update([(m.account_id, m.instrument) for m in movements])
            continue
        if isinstance(event, MoneyMovement):
            keys.balances.update((p.account_id, p.asset) for p in event.postings)
        if isinstance(event, AccountOpened | MarginModelChanged):
            keys.accounts.add(event.account_id)
        elif isinstance(event, MarginStatusChanged):
            keys.margin_states.add(event.account_id)
        elif isinstance(event, InstrumentListed):
            keys.instruments.add(event.instrument.symbol)
        elif isinstance(event, TradeCleared | TradeBusted):
            if isinstance(event, TradeBusted):
                keys.trades.add(event.trade_id)  # a new trade is written, never read
            for leg in event.legs:
                keys.instruments.add(leg.instrument)
                keys.positions.add((leg.buyer, leg.instrument))
                keys.positions.add((leg.seller, leg.instrument))
        elif isinstance(event, MarkPublished):
            keys.marks.add(event.symbol)
        elif isinstance(event, InstrumentSettled):
            keys.instruments.add(event.symbol)
    return keys


REFERENCE_FIELDS = ("reference", "trade_id", "batch_id")
_reference_fields: dict[type[Event], tuple[str, ...]] = {}


def reference_of(event: Event) -> str:
    """The back office's reference for a movement: the custodian's or the venue's id."""
    names = _reference_fields.get(type(event))
    if names is None:
        # Looking a missing attribute up on a pydantic model is slow (it raises inside
        # pydantic's __getattr__): find once per event type which of the names it has.
        names = _reference_fields[type(event)] = tuple(
            name for name in REFERENCE_FIELDS if hasattr(event, name))
    for name in names:
        value = getattr(event, name)
        if value is not None:
            return str(value)
    return ""


def post(state: LedgerState, fact: Fact, event: MoneyMovement) -> None:
    """Apply postings to balances and write one statement line per posting."""
    balances = state.balances
    if not state.keeps_statement:
        for p in event.postings:
            key = (p.account_id, p.asset)
            balances[key] = balances.get(key, ZERO) + p.amount
        return
    reference = reference_of(event)
    position, effective_at, type_name = fact.position, fact.effective_at, event.type_name
    balances, statement = state.balances, state.statement
    for p in event.postings:
        key = (p.account_id, p.asset)
        balance = balances.get(key, ZERO) + p.amount
        balances[key] = balance
        statement.append(StatementLine(position, p.account_id, p.asset, effective_at,
                                       type_name, reference, p.amount, balance))


def apply_fill(position: Position, quantity: Decimal, price: Decimal,
               multiplier: Decimal) -> None:
    """A fill of signed `quantity` at `price`: average-cost entry price and realised P&L
    (informational), and the settlement basis (exact, drives variation margin)."""
    move_position(position, quantity, price, multiplier, quantity * price)


def move_position(position: Position, quantity: Decimal, price: Decimal, multiplier: Decimal,
                  basis_change: Decimal) -> None:
    """Change a position by signed `quantity` at `price` and its basis by `basis_change`
    (a fill moves the basis by quantity × price; a settlement or a transfer says its own)."""
    position.settlement_basis += basis_change
    if quantity == 0:
        return
    old = position.quantity
    new = old + quantity
    if old == 0 or (old > 0) == (quantity > 0):
        position.average_entry_price = informational(
            (abs(old) * position.average_entry_price + abs(quantity) * price) / abs(new)
        )
    else:
        closed = min(abs(quantity), abs(old))
        direction = 1 if old > 0 else -1
        position.realised_pnl += closed * (price - position.average_entry_price) * direction \
            * multiplier
        if new == 0:
            position.average_entry_price = ZERO
        elif (new > 0) != (old > 0):
            position.average_entry_price = price
    position.quantity = new


def _account_opened(state: LedgerState, fact: Fact, e: AccountOpened) -> None:
    state.accounts[e.account_id] = Account(e.account_id, e.owner, str(e.margin_model))


def _instrument_listed(state: LedgerState, fact: Fact, e: InstrumentListed) -> None:
    state.instruments[e.instrument.symbol] = e.instrument


def _collateral_moved(state: LedgerState, fact: Fact,
                      e: CollateralDeposited | CollateralWithdrawn) -> None:
    post(state, fact, e)


def _fill_legs(state: LedgerState, legs: tuple[TradeLeg, ...], sign: int) -> None:
    positions = state.positions
    for leg in legs:
        instrument, quantity, price = leg.instrument, leg.quantity, leg.price
        multiplier = state.instruments[instrument].multiplier
        for account_id, direction in ((leg.buyer, sign), (leg.seller, -sign)):
            key = (account_id, instrument)
            position = positions.get(key)
            if position is None:
                position = positions[key] = Position()
            apply_fill(position, quantity * direction, price, multiplier)


def _trade_cleared(state: LedgerState, fact: Fact, e: TradeCleared) -> None:
    post(state, fact, e)
    _fill_legs(state, e.legs, 1)
    state.trades[e.trade_id] = TradeRecord(e.legs, e.traded_at)


def _trade_busted(state: LedgerState, fact: Fact, e: TradeBusted) -> None:
    post(state, fact, e)
    _fill_legs(state, e.legs, -1)
    for restored in e.restored:
        position = state.positions.get((restored.account_id, restored.instrument))
        if position is not None:
            position.average_entry_price = restored.average_entry_price
            position.realised_pnl = restored.realised_pnl
    record = state.trades.get(e.trade_id)
    if record is not None:
        record.busted = True


HISTORY_TYPES = ("TradeCleared", "TradeBusted", "ExpirySettled", "PositionLiquidated",
                 "AutoDeleveraged")
"""The facts that change a position's quantity: what `position_history` folds."""


def position_history(facts: Iterable[Fact], keys: set[tuple[str, str]],
                     instruments: dict[str, Instrument], without_trade: str
                     ) -> dict[tuple[str, str], Position]:
    """The given positions rebuilt from their fills as if `without_trade` (and every trade
    busted before it) had never been cleared: what a bust restores."""
    busted = {without_trade}
    facts = list(facts)
    for fact in facts:
        if isinstance(fact.event, TradeBusted):
            busted.add(fact.event.trade_id)
    positions = {key: Position() for key in keys}
    for fact in facts:
        event = fact.event
        if isinstance(event, TradeCleared):
            if event.trade_id in busted:
                continue
            for leg in event.legs:
                for account_id, sign in ((leg.buyer, 1), (leg.seller, -1)):
                    position = positions.get((account_id, leg.instrument))
                    if position is not None:
                        apply_fill(position, leg.quantity * sign, leg.price,
                                   instruments[leg.instrument].multiplier)
        elif isinstance(event, PositionsMoved):
            for m in event.movements:
                position = positions.get((m.account_id, m.instrument))
                if position is not None:
                    move_position(position, m.quantity_change, m.price,
                                  instruments[m.instrument].multiplier, m.basis_change)
    return positions


def _margin_model_changed(state: LedgerState, fact: Fact, e: MarginModelChanged) -> None:
    account = state.accounts.get(e.account_id)
    if account is not None:
        state.accounts[e.account_id] = Account(account.account_id, account.owner,
                                               str(e.margin_model))


def _risk_parameters_set(state: LedgerState, fact: Fact, e: RiskParametersSet) -> None:
    state.risk_changes[fact.position] = ParameterChange(e.name, e.underlying, e.value,
                                                        fact.effective_at, fact.position)


def _margin_status_changed(state: LedgerState, fact: Fact, e: MarginStatusChanged) -> None:
    state.margin_states[e.account_id] = MarginState(e.status, e.equity, e.initial,
                                                    e.maintenance, fact.effective_at,
                                                    fact.position)


def _positions_moved(state: LedgerState, fact: Fact, e: PositionsMoved) -> None:
    # An end of day folds a million movements twice (the job's own state, the read
    # models): no Position is built unless missing, and a movement that leaves the quantity
    # alone (mark-to-market) only moves the basis, as `move_position` would.
    post(state, fact, e)
    positions, instruments = state.positions, state.instruments
    for m in e.movements:
        key = (m.account_id, m.instrument)
        position = positions.get(key)
        if position is None:
            position = positions[key] = Position()
        quantity = m.quantity_change
        if quantity == 0:
            position.settlement_basis += m.basis_change
            continue
        move_position(position, quantity, m.price, instruments[m.instrument].multiplier,
                      m.basis_change)


def _instrument_settled(state: LedgerState, fact: Fact, e: InstrumentSettled) -> None:
    state.settlements[e.symbol] = e.settlement_price


def _money_moved(state: LedgerState, fact: Fact, e: MoneyMovement) -> None:
    post(state, fact, e)


def _mark_published(state: LedgerState, fact: Fact, e: MarkPublished) -> None:
    current = state.marks.get(e.symbol)
    if current is None or (e.marked_at, fact.position) >= (current.marked_at, current.position):
        state.marks[e.symbol] = Mark(e.price, e.iv, e.marked_at, fact.position)


Handler = Callable[[LedgerState, Fact, Event], None]
HANDLERS: dict[type[Event], Handler] = {
    AccountOpened: _account_opened,  # type: ignore[dict-item]
    InstrumentListed: _instrument_listed,  # type: ignore[dict-item]
    CollateralDeposited: _collateral_moved,  # type: ignore[dict-item]
    CollateralWithdrawn: _collateral_moved,  # type: ignore[dict-item]
    TradeCleared: _trade_cleared,  # type: ignore[dict-item]
    TradeBusted: _trade_busted,  # type: ignore[dict-item]
    MarkPublished: _mark_published,  # type: ignore[dict-item]
    MarginModelChanged: _margin_model_changed,  # type: ignore[dict-item]
    RiskParametersSet: _risk_parameters_set,  # type: ignore[dict-item]
    MarginStatusChanged: _margin_status_changed,  # type: ignore[dict-item]
    InstrumentSettled: _instrument_settled,  # type: ignore[dict-item]
}
for _moved in (VariationMarginSettled, ExpirySettled, PositionLiquidated, AutoDeleveraged):
    HANDLERS[_moved] = _positions_moved  # type: ignore[assignment]
for _paid in (FundingPaid, InsuranceFundPaid, SettlementResidualSwept, UncoveredLoss):
    HANDLERS[_paid] = _money_moved  # type: ignore[assignment]


TouchRule = Callable[[Event, Touched], None]
TOUCHES: dict[type[Event], TouchRule] = {}


def register_handler(event_type: type[Event], handler: Handler, touches: TouchRule) -> None:
    """Later parts of the ledger (jobs, risk) add how their facts change this state and
    which state they read."""
    HANDLERS[event_type] = handler
    TOUCHES[event_type] = touches


def evolve(state: LedgerState, fact: Fact) -> None:
    """Apply one recorded fact. Facts this state does not track leave it unchanged."""
    handler = HANDLERS.get(type(fact.event))
    if handler is not None:
        handler(state, fact, fact.event)
