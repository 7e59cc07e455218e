"""Liquidation (`liquidate`), the insurance fund and auto-deleveraging (SPEC section 5).

An account below maintenance has its positions moved, one by one, largest requirement first
(each position's standard-model initial requirement, whatever the account's model), to
`ccp:liquidation` at the mark price. The move realises the position's unsettled variation
margin in cash between the account and `ccp:liquidation`, which takes the position over with
its settlement basis (so the next mark-to-market pays `ccp:liquidation`, exactly); a fee of
0.5% of the moved notional, capped by the equity left, goes to `ccp:insurance`. It stops as
soon as equity is back at or above the initial requirement.

With nothing left to move and equity below zero, the account is bankrupt: `ccp:insurance`
covers the deficit as far as its USDC balance goes, never below zero. The rest is recovered
by auto-deleveraging: futures and perpetual positions opposite to what `ccp:liquidation` took
over are closed against it at the bankrupt account's bankruptcy price (the price at which its
equity would have been zero), best-ranked first, profit% × effective leverage (a loss ranks by
profit% / leverage), taking the smallest quantity that covers what is left. The bankrupt
account ends at zero equity (to the cent, the precision equity is reported in). Option
positions are not auto-deleveraged; what they cannot recover is recorded as an uncovered loss
borne by `ccp:liquidation`.

Decisions are made one after another on a working copy of the state, through the same
`evolve` the projections use, so each step sees the effect of the previous ones.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from datetime import datetime
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal

from clearing.domain.accounts import INSURANCE, LIQUIDATION, is_house
from clearing.domain.batch_payments import BatchFacts
from clearing.domain.commands import NewFact, account_stream
from clearing.domain.event import Event
from clearing.domain.events import (
    AutoDeleveraged,
    InsuranceFundPaid,
    MoneyMovement,
    PositionLiquidated,
    PositionMovement,
    PositionsMoved,
    UncoveredLoss,
)
from clearing.domain.ledger import LedgerState, evolve
from clearing.domain.margin import (
    BANKRUPT,
    LIQUIDATING,
    AccountMargin,
    HeldPosition,
    account_margin,
    position_price,
    standard_requirement,
)
from clearing.domain.margin_sweep import MarginMemo, all_margins, market_at, params_at
from clearing.domain.money import (
    PRICE_SCALE,
    QUANTITY_SCALE,
    SETTLEMENT_ASSET,
    charge_rounded,
    credit_rounded,
)
from clearing.domain.postings import net_postings

CENT = Decimal("0.01")
QUANTITY_QUANTUM = Decimal(1).scaleb(-QUANTITY_SCALE)
PRICE_QUANTUM = Decimal(1).scaleb(-PRICE_SCALE)
LEVERAGE_EQUITY_FLOOR = CENT
"""Effective leverage divides by equity; an account at or below zero counts as one cent."""


@dataclass(frozen=True)
class _Fact:
    position: int
    effective_at: datetime
    event: Event


class _Work:
    """A working copy of the state that the batch's own decisions are applied to, indexed
    by account so that one account's margin costs its own positions, not the whole book."""

    def __init__(self, state: LedgerState, at: datetime) -> None:
        self.state = copy.copy(state)
        self.state.balances = dict(state.balances)
        self.state.positions = dict(state.positions)
        self.state.statement = []
        self.state.keeps_statement = False
        self.at = at
        self.market = market_at(state, at)
        self.params = params_at(state, at)
        self._copied: set[tuple[str, str]] = set()
        # An account's positions and balances are found by key, listed symbol by symbol and
        # asset by asset: few accounts are looked at, and indexing a million positions by
        # account would cost more than all of them.
        self._assets = {asset: None for _, asset in state.balances}

    def apply(self, event: Event) -> None:
        if isinstance(event, PositionsMoved):
            for m in event.movements:
                key = (m.account_id, m.instrument)
                if key not in self._copied and key in self.state.positions:
                    self.state.positions[key] = replace(self.state.positions[key])
                self._copied.add(key)
        if isinstance(event, MoneyMovement):
            for p in event.postings:
                self._assets.setdefault(p.asset, None)
        evolve(self.state, _Fact(0, self.at, event))
        self.state.statement.clear()

    def held(self, account_id: str) -> list[HeldPosition]:
        """The account's positions as margin sees them (closed futures with basis left)."""
        found = []
        positions = self.state.positions
        for symbol in sorted(s for s in self.state.instruments
                             if (account_id, s) in positions):
            position = self.state.positions[(account_id, symbol)]
            instrument = self.state.instruments[symbol]
            if position.quantity == 0 and not (instrument.is_linear_delta_one
                                               and position.settlement_basis != 0):
                continue
            found.append(HeldPosition(instrument, position.quantity,
                                      position.settlement_basis, position.average_entry_price))
        return found

    def margin(self, account_id: str) -> AccountMargin:
        every = self.state.balances
        balances = {a: every[(account_id, a)] for a in self._assets
                    if (account_id, a) in every}
        model = self.state.accounts[account_id].margin_model
        return account_margin(model, balances, self.held(account_id), self.market, self.params)

    def book(self, account_id: str) -> list[HeldPosition]:
        return [h for h in self.held(account_id) if h.quantity != 0]


def _transfer_cash(held: HeldPosition, price: Decimal) -> Decimal:
    """What taking over a position at `price` is worth to its holder, exactly."""
    m = held.instrument.multiplier
    if held.instrument.is_linear_delta_one:
        return (held.quantity * price - held.settlement_basis) * m
    return held.quantity * price * m


def decide_liquidations(state: LedgerState, at: datetime, batch_id: str,
                        memo: MarginMemo | None = None,
                        settled_since: frozenset[str] = frozenset()) -> list[NewFact]:
    """The liquidate job (`memo`: see `all_margins`; it learns the margins of `state`, not
    of the working copy the decisions move). `settled_since`: instruments whose expiry
    settlement the log already holds although `state` (the ledger as of an earlier `at`, a
    batch run late) does not: their positions were closed and paid by that settlement, so
    a liquidation decided for before it leaves them where they are rather than hand the
    house a position in an instrument that no longer settles (found by simulation seed 165,
    step 510)."""
    work = _Work(state, at)

    def book(account_id: str) -> list[HeldPosition]:
        held = work.book(account_id)
        if not settled_since:
            return held
        return [h for h in held if h.instrument.symbol not in settled_since]
    params = work.params
    market = work.market
    batch = BatchFacts(batch_id, "liquidate", at)

    def record(event: MoneyMovement, account_id: str, subject: str) -> None:
        work.apply(event)
        batch.add(event, subject, stream=account_stream(account_id))

    below = [a for a, m in all_margins(state, at, memo).items()
             if m.status in (LIQUIDATING, BANKRUPT) or m.equity < m.maintenance]
    for account_id in below:
        margin = work.margin(account_id)
        held = book(account_id)
        if not held or margin.equity >= margin.maintenance:
            continue
        taken: list[tuple[HeldPosition, Decimal]] = []
        step = 0
        while held and margin.equity < margin.initial:
            contributions = {c.symbol: c.initial for c in
                             standard_requirement(held, market, params).contributions}
            target = max(held, key=lambda h: (contributions.get(h.instrument.symbol,
                                                                Decimal(0)),
                                              h.instrument.symbol))
            price = position_price(target, market.marks)
            notional = abs(target.quantity) * target.instrument.multiplier * price
            fee = min(charge_rounded(notional * params.liquidation_fee_rate, SETTLEMENT_ASSET),
                      max(margin.equity, Decimal(0)))
            cash = _transfer_cash(target, price)
            credit = credit_rounded(cash, target.instrument.settlement_asset)
            symbol = target.instrument.symbol
            event = PositionLiquidated(
                batch_id=batch_id, account_id=account_id, instrument=symbol,
                quantity=target.quantity, mark_price=price, notional=notional, fee=fee,
                equity_before=margin.equity, initial_before=margin.initial,
                maintenance_before=margin.maintenance,
                position_requirement=contributions.get(symbol, Decimal(0)),
                movements=(
                    PositionMovement(account_id=account_id, instrument=symbol,
                                     quantity_change=-target.quantity,
                                     basis_change=-target.settlement_basis, price=price,
                                     amount=cash),
                    PositionMovement(account_id=LIQUIDATION, instrument=symbol,
                                     quantity_change=target.quantity,
                                     basis_change=target.settlement_basis, price=price,
                                     amount=-cash),
                ),
                postings=net_postings([
                    (account_id, target.instrument.settlement_asset, credit - fee),
                    (LIQUIDATION, target.instrument.settlement_asset, -credit),
                    (INSURANCE, SETTLEMENT_ASSET, fee),
                ]),
            )
            record(event, account_id, f"{account_id}:move:{step:03d}")
            taken.append((target, price))
            step += 1
            held = book(account_id)
            margin = work.margin(account_id)
        if held or margin.equity >= 0:
            continue
        _cover_bankruptcy(work, batch, record, batch_id, account_id, margin, taken)
    return batch.close()


def _cover_bankruptcy(work: _Work, batch: BatchFacts, record, batch_id: str,  # type: ignore[no-untyped-def]
                      account_id: str, margin: AccountMargin,
                      taken: list[tuple[HeldPosition, Decimal]]) -> None:
    deficit = -margin.equity
    fund = work.state.balances.get((INSURANCE, SETTLEMENT_ASSET), Decimal(0))
    paid = min(deficit, max(fund, Decimal(0)))
    if paid > 0:
        record(InsuranceFundPaid(
            batch_id=batch_id, account_id=account_id, deficit=deficit, amount=paid,
            fund_before=fund, postings=net_postings([(INSURANCE, SETTLEMENT_ASSET, -paid),
                                                     (account_id, SETTLEMENT_ASSET, paid)])),
            account_id, f"{account_id}:insurance")
    remaining = deficit - paid
    step = 0
    futures = sorted(((t, p) for t, p in taken if t.instrument.is_linear_delta_one),
                     key=lambda tp: (-_notional(*tp), tp[0].instrument.symbol))
    total_notional = sum((_notional(t, p) for t, p in futures), Decimal(0))
    for target, price in futures:
        if remaining <= 0:
            break
        # The whole deficit, shared over the positions taken by notional, sets each one's
        # bankruptcy price; the insurance fund's payment only shortens what ADL must close.
        share = deficit * _notional(target, price) / total_notional
        remaining, step = _deleverage(work, record, batch_id, account_id, target, price,
                                      share, remaining, step)
    if remaining > 0:
        record(UncoveredLoss(
            batch_id=batch_id, account_id=account_id, amount=remaining,
            postings=net_postings([(LIQUIDATION, SETTLEMENT_ASSET, -remaining),
                                   (account_id, SETTLEMENT_ASSET, remaining)])),
            account_id, f"{account_id}:uncovered")


@dataclass(frozen=True)
class Candidate:
    account_id: str
    quantity: Decimal
    profit_pct: Decimal
    leverage: Decimal
    score: Decimal


def rank_opposites(work: _Work, symbol: str, bankrupt_quantity: Decimal, price: Decimal,
                   exclude: str) -> list[Candidate]:
    """Opposite positions ranked for auto-deleveraging, highest score first: profit% ×
    effective leverage, or profit% / leverage for a loss (SPEC section 5)."""
    instrument = work.state.instruments[symbol]
    m = instrument.multiplier
    found = []
    for (account_id, held_symbol), position in sorted(work.state.positions.items()):
        if (held_symbol != symbol or account_id == exclude or is_house(account_id)
                or position.quantity == 0 or (position.quantity > 0) == (bankrupt_quantity > 0)):
            continue
        entry_value = abs(position.quantity * m * position.average_entry_price)
        pnl = position.quantity * m * (price - position.average_entry_price)
        profit_pct = pnl / entry_value if entry_value else Decimal(0)
        equity = max(work.margin(account_id).equity, LEVERAGE_EQUITY_FLOOR)
        leverage = abs(position.quantity * m * price) / equity
        score = profit_pct * leverage if profit_pct >= 0 else profit_pct / leverage
        found.append(Candidate(account_id, position.quantity, profit_pct, leverage, score))
    return sorted(found, key=lambda c: (-c.score, c.account_id))


def _notional(held: HeldPosition, price: Decimal) -> Decimal:
    return abs(held.quantity) * held.instrument.multiplier * price


def _deleverage(work: _Work, record, batch_id: str, bankrupt: str,  # type: ignore[no-untyped-def]
                target: HeldPosition, price: Decimal, deficit_share: Decimal,
                remaining: Decimal, step: int) -> tuple[Decimal, int]:
    symbol = target.instrument.symbol
    m = target.instrument.multiplier
    q = target.quantity
    direction = Decimal(1) if q > 0 else Decimal(-1)
    # The bankruptcy price: where the bankrupt position would have left equity at zero,
    # rounded away from the mark (the side that recovers at least the deficit).
    bankruptcy_price = (price + deficit_share / (q * m)).quantize(
        PRICE_QUANTUM, ROUND_CEILING if q > 0 else ROUND_FLOOR)
    per_unit = abs(bankruptcy_price - price) * m
    if per_unit == 0:
        return remaining, step
    held_by_house = abs(work.state.positions.get((LIQUIDATION, symbol)).quantity)  # type: ignore[union-attr]
    available_from_house = min(abs(q), held_by_house)
    for candidate in rank_opposites(work, symbol, q, price, bankrupt):
        if remaining <= 0 or available_from_house <= 0:
            break
        needed = (remaining / per_unit).quantize(QUANTITY_QUANTUM, ROUND_CEILING)
        closing = min(abs(candidate.quantity), available_from_house, needed)
        # Rounded up: the last close covers what is left to the micro-dollar, so the
        # bankrupt account ends at zero rather than a rounding step below it.
        recovered = min(charge_rounded(closing * per_unit, SETTLEMENT_ASSET), remaining)
        event = AutoDeleveraged(
            batch_id=batch_id, bankrupt_account=bankrupt, counterparty=candidate.account_id,
            instrument=symbol, quantity=closing, bankruptcy_price=bankruptcy_price,
            mark_price=price, profit_pct=_ratio(candidate.profit_pct),
            leverage=_ratio(candidate.leverage), score=_ratio(candidate.score),
            deficit_before=remaining, amount=recovered,
            movements=(
                PositionMovement(account_id=candidate.account_id, instrument=symbol,
                                 quantity_change=closing * direction,
                                 basis_change=closing * direction * bankruptcy_price,
                                 price=bankruptcy_price),
                PositionMovement(account_id=LIQUIDATION, instrument=symbol,
                                 quantity_change=-closing * direction,
                                 basis_change=-closing * direction * bankruptcy_price,
                                 price=bankruptcy_price),
            ),
            postings=net_postings([(LIQUIDATION, SETTLEMENT_ASSET, -recovered),
                                   (bankrupt, SETTLEMENT_ASSET, recovered)]),
        )
        record(event, candidate.account_id, f"{bankrupt}:adl:{step:03d}")
        remaining -= recovered
        available_from_house -= closing
        step += 1
    return remaining, step


def _ratio(value: Decimal) -> Decimal:
    return value.quantize(Decimal("1e-8"))


