"""Mark-to-market (`mtm`): variation margin for futures and perpetuals (SPEC section 4).

Each position is paid q × multiplier × (mark − last settlement price) in cash, i.e.
(q × mark − settlement basis) × multiplier, and its basis becomes q × mark. A future whose
expiry has passed is left to the expiry settlement.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Set
from datetime import datetime
from operator import itemgetter

from clearing.domain.batch_payments import BatchFacts
from clearing.domain.commands import NewFact
from clearing.domain.events import PositionMovement, VariationMarginSettled
from clearing.domain.ledger import LedgerState, Position


def open_positions_by_instrument(state: LedgerState, symbols: Set[str] | None = None
                                 ) -> dict[str, list[tuple[str, Position]]]:
    """Holders of each instrument (quantity or unsettled basis), sorted by account; only of
    the instruments in `symbols` when given (a job that pays futures need not sort the
    holders of every option)."""
    holders: dict[str, list[tuple[str, Position]]] = defaultdict(list)
    for (account_id, symbol), position in state.positions.items():
        # The symbol first: a set lookup turns most of a book away before any Decimal test.
        if ((symbols is None or symbol in symbols)
                and (position.quantity != 0 or position.settlement_basis != 0)):
            holders[symbol].append((account_id, position))
    for rows in holders.values():
        rows.sort(key=itemgetter(0))
    return holders


def decide_mark_to_market(state: LedgerState, at: datetime, batch_id: str) -> list[NewFact]:
    batch = BatchFacts(batch_id, "mtm", at)
    payable = {symbol for symbol, instrument in state.instruments.items()
               if instrument.is_linear_delta_one and not instrument.is_expired_at(at)
               and symbol not in state.settlements and symbol in state.marks}
    for symbol, holders in sorted(open_positions_by_instrument(state, payable).items()):
        instrument = state.instruments[symbol]
        mark = state.marks[symbol]
        price = mark.price
        movements = []
        for account_id, position in holders:
            change = position.quantity * price - position.settlement_basis
            if change != 0:
                movements.append(PositionMovement(
                    account_id=account_id, instrument=symbol, basis_change=change,
                    price=price, amount=change * instrument.multiplier))

        def event(chunk, postings, index, symbol=symbol, price=price):  # type: ignore[no-untyped-def]
            return VariationMarginSettled(batch_id=batch_id, instrument=symbol,
                                          mark_price=price, chunk=index, movements=chunk,
                                          postings=postings)

        batch.pay(event, movements, instrument.settlement_asset, f"vm:{symbol}")
    return batch.close()


