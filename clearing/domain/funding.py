"""Funding (`funding`): every 8 hours, perpetual longs pay shorts (or shorts pay longs).

SPEC section 4: payment = q × multiplier × mark × rate, where rate = premium index +
clamp(0.01% − premium index, −0.05%, +0.05%), premium index = (perp mark − index) / index,
and the rate is clamped to ±0.75% per period. The premium index is a quotient, so it is
rounded half-even to 12 decimals before anything is paid on it; every payment is then
rounded in the clearing house's favour like all batch payments.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import ROUND_HALF_EVEN, Decimal

from clearing.domain.batch_payments import BatchFacts
from clearing.domain.commands import NewFact
from clearing.domain.events import FundingPaid, PositionMovement
from clearing.domain.instruments import InstrumentKind
from clearing.domain.ledger import LedgerState
from clearing.domain.mark_to_market import open_positions_by_instrument

INTEREST_RATE = Decimal("0.0001")
PREMIUM_CLAMP = Decimal("0.0005")
RATE_CAP = Decimal("0.0075")
PREMIUM_INDEX_QUANTUM = Decimal("1e-12")
FUNDING_INTERVAL_HOURS = 8


@dataclass(frozen=True)
class FundingRate:
    premium_index: Decimal
    rate: Decimal


def clamp(value: Decimal, low: Decimal, high: Decimal) -> Decimal:
    return max(low, min(high, value))


def funding_rate(mark: Decimal, index: Decimal) -> FundingRate:
    premium = ((mark - index) / index).quantize(PREMIUM_INDEX_QUANTUM, ROUND_HALF_EVEN)
    rate = premium + clamp(INTEREST_RATE - premium, -PREMIUM_CLAMP, PREMIUM_CLAMP)
    return FundingRate(premium, clamp(rate, -RATE_CAP, RATE_CAP))


def decide_funding(state: LedgerState, at: datetime, batch_id: str) -> list[NewFact]:
    batch = BatchFacts(batch_id, "funding", at)
    perpetuals = {symbol for symbol, instrument in state.instruments.items()
                  if instrument.kind is InstrumentKind.PERPETUAL}
    for symbol, holders in sorted(open_positions_by_instrument(state, perpetuals).items()):
        instrument = state.instruments[symbol]
        mark = state.marks.get(symbol)
        index = state.marks.get(instrument.underlying)
        if mark is None or index is None:
            continue
        funding = funding_rate(mark.price, index.price)
        if funding.rate == 0:
            continue
        payments = [
            PositionMovement(account_id=account_id, instrument=symbol, price=mark.price,
                             amount=-position.quantity * instrument.multiplier * mark.price
                             * funding.rate)
            for account_id, position in holders if position.quantity != 0
        ]

        def event(chunk, postings, index_, symbol=symbol, mark=mark, index=index,  # type: ignore[no-untyped-def]
                  funding=funding):
            return FundingPaid(batch_id=batch_id, instrument=symbol, mark_price=mark.price,
                               index_price=index.price, premium_index=funding.premium_index,
                               rate=funding.rate, chunk=index_, payments=chunk,
                               postings=postings)

        batch.pay(event, payments, instrument.settlement_asset, f"funding:{symbol}")
    return batch.close()
