"""Expiry settlement (`settle`): every instrument expired by `at` is settled and closed.

Settlement price (SPEC section 4): the time-weighted average of the underlying's index in the
30 minutes before expiry; the last index mark before expiry if there is none in that window;
refused if there is none in the last 24 hours. The index is a step function (each mark holds
until the next), so a mark from before the window sets the price for the window's first
minutes; the average is rounded half-even to 8 decimals.

Futures pay a final variation margin at that price; options pay intrinsic value,
`max(S − K, 0)` for a call and `max(K − S, 0)` for a put, per unit of underlying, holder
receiving and writer paying. Everything expiring at one moment settles together, leg by leg,
and each account's cash is netted per asset into one posting.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal

from clearing.domain.batch_payments import POSITIONS_PER_EVENT, BatchFacts, settlement_postings
from clearing.domain.clock import format_time
from clearing.domain.commands import NewFact
from clearing.domain.events import ExpirySettled, InstrumentSettled, PositionMovement
from clearing.domain.instruments import Instrument, OptionType
from clearing.domain.ledger import LedgerState
from clearing.domain.money import PRICE_SCALE
from clearing.domain.rejections import Rejected

TWAP_WINDOW = timedelta(minutes=30)
STALE_AFTER = timedelta(hours=24)
PRICE_QUANTUM = Decimal(1).scaleb(-PRICE_SCALE)
IndexHistory = Mapping[str, Sequence[tuple[datetime, Decimal]]]


class NoSettlementPrice(Rejected):
    def __init__(self, symbol: str, expiry: datetime):
        super().__init__("settle", f"{symbol}: no {symbol.split('-')[0]} index mark in the 24 "
                                   f"hours before expiry {format_time(expiry)}", symbol)
        self.symbol = symbol
        self.expiry = expiry


@dataclass(frozen=True)
class SettlementPrice:
    price: Decimal
    method: str
    marks_used: int


def settlement_price(symbol: str, marks: Sequence[tuple[datetime, Decimal]],
                     expiry: datetime) -> SettlementPrice:
    start = expiry - TWAP_WINDOW
    before = [(t, p) for t, p in marks if t <= expiry]
    if not before or before[-1][0] < expiry - STALE_AFTER:
        raise NoSettlementPrice(symbol, expiry)
    inside = [(t, p) for t, p in before if t > start]
    if not inside:
        return SettlementPrice(before[-1][1], "last_mark", 1)
    leading = [(t, p) for t, p in before if t <= start]
    steps = ([(start, leading[-1][1])] if leading else []) + inside
    weighted = Decimal(0)
    span = Decimal(0)
    for (t, price), (t_next, _) in zip(steps, [*steps[1:], (expiry, Decimal(0))], strict=True):
        seconds = Decimal((t_next - t).total_seconds())
        weighted += price * seconds
        span += seconds
    if span == 0:  # a single mark exactly at expiry
        return SettlementPrice(steps[-1][1], "twap", len(inside))
    return SettlementPrice((weighted / span).quantize(PRICE_QUANTUM, ROUND_HALF_EVEN), "twap",
                           len(inside))


def payoff(instrument: Instrument, settlement: Decimal) -> Decimal:
    """Per unit of underlying: the option's intrinsic value, or the future's price."""
    if not instrument.is_option:
        return settlement
    assert instrument.strike is not None
    if instrument.option_type is OptionType.CALL:
        return max(settlement - instrument.strike, Decimal(0))
    return max(instrument.strike - settlement, Decimal(0))


def decide_settlements(state: LedgerState, at: datetime, batch_id: str,
                       index_history: IndexHistory) -> list[NewFact]:
    due = sorted((i for s, i in state.instruments.items()
                  if i.expiry is not None and i.expiry <= at and s not in state.settlements),
                 key=lambda i: (i.expiry, i.symbol))
    batch = BatchFacts(batch_id, "settle", at)
    prices: dict[str, Decimal] = {}
    for instrument in due:
        assert instrument.expiry is not None
        found = settlement_price(instrument.symbol,
                                 index_history.get(instrument.underlying, ()),
                                 instrument.expiry)
        prices[instrument.symbol] = found.price
        batch.add(InstrumentSettled(batch_id=batch_id, symbol=instrument.symbol,
                                    expiry=instrument.expiry, settlement_price=found.price,
                                    method=found.method, marks_used=found.marks_used),
                  f"price:{instrument.symbol}", stream=f"instrument-{instrument.symbol}")
    by_expiry: dict[datetime, dict[str, list[PositionMovement]]] = defaultdict(
        lambda: defaultdict(list))
    # Only the expiring positions are visited (not the book sorted: a million keys); each
    # account's legs are put in symbol order below, and accounts are paid in order. An
    # instrument's payoff is the same for every holder: found once.
    payoffs = {symbol: (state.instruments[symbol], payoff(state.instruments[symbol], price))
               for symbol, price in prices.items()}
    for (account_id, symbol), position in state.positions.items():
        settling = payoffs.get(symbol)
        if settling is None or (position.quantity == 0 and position.settlement_basis == 0):
            continue
        instrument, value = settling
        assert instrument.expiry is not None
        if instrument.is_option:
            amount = position.quantity * instrument.multiplier * value
        else:
            amount = (position.quantity * value - position.settlement_basis) \
                * instrument.multiplier
        by_expiry[instrument.expiry][account_id].append(PositionMovement(
            account_id=account_id, instrument=symbol, quantity_change=-position.quantity,
            basis_change=-position.settlement_basis, price=value, amount=amount))
    for expiry, accounts in sorted(by_expiry.items()):
        for legs in accounts.values():
            legs.sort(key=lambda m: m.instrument)
        _pay_by_account(batch, batch_id, expiry, accounts, state)
    return batch.close()


def _pay_by_account(batch: BatchFacts, batch_id: str, expiry: datetime,
                    accounts: dict[str, list[PositionMovement]], state: LedgerState) -> None:
    """Chunks of whole accounts, so each account's legs net into one posting per asset."""
    chunk: list[PositionMovement] = []
    index = 0

    def flush() -> None:
        nonlocal chunk, index
        if not chunk:
            return
        assets = {state.instruments[m.instrument].settlement_asset for m in chunk}
        postings = []
        for asset in sorted(assets):
            legs = [m for m in chunk
                    if state.instruments[m.instrument].settlement_asset == asset]
            asset_postings, left = settlement_postings(legs, asset)
            batch.residual[asset] += left
            postings.extend(asset_postings)
        batch.add(ExpirySettled(batch_id=batch_id, expiry=expiry, chunk=index,
                                movements=tuple(chunk), postings=tuple(postings)),
                  f"expiry:{expiry.isoformat()}:{index:05d}")
        chunk = []
        index += 1

    for account_id in sorted(accounts):
        legs = accounts[account_id]
        if chunk and len(chunk) + len(legs) > POSITIONS_PER_EVENT:
            flush()
        chunk.extend(legs)
    flush()
