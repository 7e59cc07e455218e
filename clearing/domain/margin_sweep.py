"""The margin sweep: every account's margin state at a moment, and the facts it changes.

Pure: given the ledger's state as of `at` and the parameters then in force, it returns the
status transitions (and a margin call for each account entering `restricted`). Keys name the
batch and the account, so a rerun after a crash writes only what is missing.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from operator import attrgetter

from clearing.domain.accounts import is_house
from clearing.domain.commands import NewFact, account_stream
from clearing.domain.events import MarginCallIssued, MarginStatusChanged
from clearing.domain.ledger import LedgerState, Position
from clearing.domain.margin import (
    AccountMargin,
    HeldPosition,
    Market,
    account_margin,
    account_margins_many,
)
from clearing.domain.risk_parameters import RiskParameters, parameters_in_force

HEALTHY = "healthy"
RESTRICTED = "restricted"
LIQUIDATING = "liquidating"
BANKRUPT = "bankrupt"


def market_at(state: LedgerState, at: datetime) -> Market:
    """Index prices and instrument marks as the state knows them."""
    index_prices = {s: m.price for s, m in state.marks.items() if s not in state.instruments}
    marks = {s: m for s, m in state.marks.items() if s in state.instruments}
    return Market(at=at, index_prices=index_prices, marks=marks)


def params_at(state: LedgerState, at: datetime) -> RiskParameters:
    return parameters_in_force(state.risk_changes.values(), at)


@dataclass(frozen=True)
class Book:
    """One account's collateral and open positions."""

    balances: dict[str, Decimal]
    positions: list[HeldPosition]


def books(state: LedgerState, only: set[str] | None = None) -> dict[str, Book]:
    """Every member account's book (house accounts are not margined), or only those of the
    accounts in `only`."""
    result: dict[str, Book] = {
        a: Book({}, []) for a in (state.accounts if only is None else only)
        if not is_house(a) and a in state.accounts
    }
    for (account_id, asset), balance in state.balances.items():
        book = result.get(account_id)
        if book is not None:
            book.balances[asset] = balance
    # The whole book is walked (a million positions at end of day): each instrument's
    # linearity is looked up once, not once per position.
    instruments = state.instruments
    linear = {symbol: i.is_linear_delta_one for symbol, i in instruments.items()}
    by_account: dict[str, list[HeldPosition]] = defaultdict(list)
    positions: Iterable[tuple[tuple[str, str], Position]] = state.positions.items()
    if only is not None and len(result) * len(instruments) < len(state.positions):
        # A few accounts (the margin job after liquidation): their positions are looked up
        # by key rather than the whole book walked; each book is sorted by symbol below.
        every = state.positions
        positions = [(key, every[key]) for account_id in result for symbol in instruments
                     if (key := (account_id, symbol)) in every]
    for (account_id, symbol), position in positions:
        if account_id not in result:
            continue
        quantity = position.quantity
        # A closed future still owes or is owed its variation margin until the next
        # mark-to-market pays it: it stays in the book (quantity 0, basis not yet settled).
        if quantity == 0 and not (linear[symbol] and position.settlement_basis != 0):
            continue
        by_account[account_id].append(HeldPosition(
            instruments[symbol], quantity, position.settlement_basis,
            position.average_entry_price))
    for account_id, held in by_account.items():
        result[account_id].positions.extend(sorted(held, key=_held_symbol))
    return result


_held_symbol = attrgetter("instrument.symbol")


def margin_of(state: LedgerState, account_id: str, at: datetime,
              balances_override: dict[str, Decimal] | None = None) -> AccountMargin:
    """One account's margin at `at`, optionally with its balances replaced (what-if)."""
    book = books(state).get(account_id, Book({}, []))
    balances = balances_override if balances_override is not None else book.balances
    model = state.accounts[account_id].margin_model if account_id in state.accounts \
        else "standard"
    return account_margin(model, balances, book.positions, market_at(state, at),
                          params_at(state, at))


def all_margins(state: LedgerState, at: datetime,
                memo: MarginMemo | None = None) -> dict[str, AccountMargin]:
    """Every member account's margin at `at`, the portfolio model batched across accounts.

    With a `memo`, the margins it holds for this state and moment are reused and only the
    accounts it does not hold are computed (then remembered)."""
    market = market_at(state, at)
    params = params_at(state, at)
    known = memo.usable(state, at, market, params) if memo is not None else {}
    wanted = None if not known else {a for a in state.accounts
                                     if not is_house(a) and a not in known}
    every = sorted(books(state, wanted).items())
    margins = account_margins_many(
        [state.accounts[a].margin_model for a, _ in every], [b.balances for _, b in every],
        [b.positions for _, b in every], market, params)
    computed = {a: m for (a, _), m in zip(every, margins, strict=True)}
    result = computed if not known else {
        a: computed[a] if a in computed else known[a]
        for a in sorted(known.keys() | computed.keys())}
    if memo is not None:
        memo.margins.update(computed)
    return result


class MarginMemo:
    """Margins computed from one state at one moment, kept so that the next job of the same
    run (`margin` after `liquidate`) computes only the accounts whose books changed since.

    The caller that moves the state forward says which accounts a fact changed (`forget`);
    the market and the risk parameters are compared on every use, so a new mark or
    parameter change (or another state, or moment) starts afresh."""

    def __init__(self) -> None:
        self.margins: dict[str, AccountMargin] = {}
        self._state: LedgerState | None = None
        self._key: tuple[datetime, Market, RiskParameters] | None = None

    def usable(self, state: LedgerState, at: datetime, market: Market,
               params: RiskParameters) -> dict[str, AccountMargin]:
        """The remembered margins valid for `state` at `at` (after this call, the memo is
        bound to them: what it learns next is for this state and moment)."""
        key = (at, market, params)
        if self._state is not state or self._key != key:
            self.margins = {}
            self._state, self._key = state, key
        return self.margins

    def forget(self, accounts: Iterable[str]) -> None:
        for account_id in accounts:
            self.margins.pop(account_id, None)

    def clear(self) -> None:
        self.margins = {}
        self._state = self._key = None


def sweep(state: LedgerState, at: datetime, batch_id: str,
          memo: MarginMemo | None = None) -> list[NewFact]:
    """The margin job: transitions of every account whose state changed since last recorded
    (`memo`: see `all_margins`)."""
    facts: list[NewFact] = []
    for account_id, margin in all_margins(state, at, memo).items():
        recorded = state.margin_states.get(account_id)
        previous = recorded.status if recorded is not None else HEALTHY
        if margin.status == previous:
            continue
        stream = account_stream(account_id)
        key = f"{batch_id}:{account_id}"
        facts.append(NewFact(stream, MarginStatusChanged(
            account_id=account_id, previous=previous, status=margin.status,
            equity=margin.equity, initial=margin.initial, maintenance=margin.maintenance,
            batch_id=batch_id), f"{key}:status", at))
        if margin.status == RESTRICTED:
            facts.append(NewFact(stream, MarginCallIssued(
                account_id=account_id, equity=margin.equity, initial=margin.initial,
                maintenance=margin.maintenance, shortfall=margin.initial - margin.equity,
                batch_id=batch_id), f"{key}:call", at))
    return facts
