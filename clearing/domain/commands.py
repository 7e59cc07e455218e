"""What the venue and the back office ask of the ledger, and `decide`: which facts follow.

Each `decide_*` is pure: it is given the state it needs, raises a typed rejection, or returns
the facts to record with their streams and idempotency keys. The keys are the venue's and
custodians' own ids (a deposit reference, a trade id), so a command delivered twice is
recorded once.
"""

from __future__ import annotations

from collections.abc import Container, Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from clearing.domain.accounts import (
    EXTERNAL,
    FEES,
    INSURANCE,
    LIQUIDATION,
    ROUNDING,
    MarginModel,
)
from clearing.domain.clock import storage_time
from clearing.domain.event import Event
from clearing.domain.events import (
    AccountOpened,
    CollateralDeposited,
    CollateralWithdrawn,
    InstrumentListed,
    MarginModelChanged,
    MarkPublished,
    RestoredPosition,
    TradeBusted,
    TradeCleared,
    TradeLeg,
)
from clearing.domain.instruments import UNDERLYINGS, Instrument
from clearing.domain.ledger import Account, Position, TradeRecord
from clearing.domain.money import ASSETS, asset_spec, charge_rounded, payout_rounded
from clearing.domain.postings import net_postings
from clearing.domain.rejections import (
    AlreadyExists,
    InstrumentExpired,
    InstrumentSettled,
    InsufficientBalance,
    Rejected,
    SameAccountBothSides,
    TradeAlreadyBusted,
    TradeNotFound,
    UnknownAccount,
    UnknownInstrument,
)

TRADING_HOUSE_ACCOUNTS = frozenset({LIQUIDATION})
"""House accounts that may be a side of an imported trade (closing liquidated positions)."""
FUNDABLE_HOUSE_ACCOUNTS = frozenset({INSURANCE})
"""House accounts that may receive deposits and make withdrawals (seeding the fund)."""


@dataclass(frozen=True)
class NewFact:
    """A fact decided, ready to be recorded in its stream under its idempotency key."""

    stream_id: str
    event: Event
    idempotency_key: str
    effective_at: datetime


def account_stream(account_id: str) -> str:
    return f"account-{account_id}"


def trade_stream(trade_id: str) -> str:
    return f"trade-{trade_id}"


@dataclass(frozen=True)
class OpenAccount:
    account_id: str
    owner: str
    margin_model: MarginModel


def decide_open_account(cmd: OpenAccount, existing: Account | None,
                        at: datetime) -> list[NewFact]:
    if existing is not None:
        if (existing.owner, existing.margin_model) == (cmd.owner, str(cmd.margin_model)):
            return []
        if existing.owner != cmd.owner:
            raise AlreadyExists("account_id", f"account {cmd.account_id!r} already exists "
                                              "with other details", cmd.account_id)
        # Same owner, another margin model than the account has now: the account may have
        # moved models since it was opened, so only its opening can tell a redelivery from
        # other details. The opening is decided again; the store, which holds the first one
        # under the same key, records nothing for the same content and refuses other content.
    event = AccountOpened(account_id=cmd.account_id, owner=cmd.owner,
                          margin_model=cmd.margin_model)
    return [NewFact(account_stream(cmd.account_id), event, f"account:{cmd.account_id}", at)]


def decide_list_instrument(instrument: Instrument, existing: Instrument | None,
                           at: datetime) -> list[NewFact]:
    if existing is not None:
        if existing == instrument:
            return []
        raise AlreadyExists("symbol", f"{instrument.symbol} is already listed with other "
                                      "terms", instrument.symbol)
    return [NewFact(f"instrument-{instrument.symbol}", InstrumentListed(instrument=instrument),
                    f"instrument:{instrument.symbol}", at)]


@dataclass(frozen=True)
class MoveCollateral:
    reference: str
    account_id: str
    asset: str
    amount: Decimal
    at: datetime


def _check_collateral_account(cmd: MoveCollateral, accounts: Container[str]) -> None:
    if cmd.account_id not in accounts and cmd.account_id not in FUNDABLE_HOUSE_ACCOUNTS:
        raise UnknownAccount(cmd.account_id)
    if cmd.asset not in ASSETS:
        raise Rejected("asset", f"unknown asset {cmd.asset!r}", cmd.asset)
    asset_spec(cmd.asset)


def decide_deposit(cmd: MoveCollateral, accounts: Container[str]) -> list[NewFact]:
    """Collateral arrives from outside: `ccp:external` pays, the account receives."""
    _check_collateral_account(cmd, accounts)
    event = CollateralDeposited(
        account_id=cmd.account_id, asset=cmd.asset, amount=cmd.amount,
        reference=cmd.reference,
        postings=net_postings([(EXTERNAL, cmd.asset, -cmd.amount),
                               (cmd.account_id, cmd.asset, cmd.amount)]),
    )
    return [NewFact(account_stream(cmd.account_id), event, f"deposit:{cmd.reference}", cmd.at)]


def decide_withdrawal(cmd: MoveCollateral, accounts: Container[str],
                      balance: Decimal) -> list[NewFact]:
    """Collateral leaves to the outside world; never more than the account holds. (Margin
    rules add their own limit on top, see the margin service.)"""
    _check_collateral_account(cmd, accounts)
    if cmd.amount > balance:
        raise InsufficientBalance(cmd.account_id, cmd.asset, balance, cmd.amount)
    event = CollateralWithdrawn(
        account_id=cmd.account_id, asset=cmd.asset, amount=cmd.amount,
        reference=cmd.reference,
        postings=net_postings([(cmd.account_id, cmd.asset, -cmd.amount),
                               (EXTERNAL, cmd.asset, cmd.amount)]),
    )
    return [NewFact(account_stream(cmd.account_id), event, f"withdrawal:{cmd.reference}",
                    cmd.at)]


@dataclass(frozen=True)
class ClearTrade:
    trade_id: str
    legs: tuple[TradeLeg, ...]
    at: datetime


def decide_clear_trade(cmd: ClearTrade, accounts: Container[str],
                       instruments: Mapping[str, Instrument],
                       settled: Container[str] = ()) -> list[NewFact]:
    """Novate every leg or none: the buyer's position rises, the seller's falls; an option's
    premium `price × quantity × multiplier` moves buyer to seller (the buyer's charge rounded
    up, the seller's payout rounded down, the difference to `ccp:rounding`); fees go to
    `ccp:fees`."""
    movements: list[tuple[str, str, Decimal]] = []
    for leg in cmd.legs:
        buyer, seller = leg.buyer, leg.seller
        if buyer not in accounts and buyer not in TRADING_HOUSE_ACCOUNTS:
            raise UnknownAccount(buyer, field="buyer")
        if seller not in accounts and seller not in TRADING_HOUSE_ACCOUNTS:
            raise UnknownAccount(seller, field="seller")
        if buyer == seller:
            raise SameAccountBothSides(buyer)
        instrument = instruments.get(leg.instrument)
        if instrument is None:
            raise UnknownInstrument(leg.instrument)
        if instrument.is_expired_at(cmd.at):
            assert instrument.expiry is not None
            raise InstrumentExpired(instrument.symbol, instrument.expiry, cmd.at)
        if instrument.symbol in settled:
            # A late trade, effective before expiry but arriving after the settlement: its
            # position could never settle. It is refused; the venue must correct it.
            raise Rejected("instrument", f"{instrument.symbol} has already settled; a trade "
                                         "reported after its settlement cannot be cleared",
                           instrument.symbol)
        asset = instrument.settlement_asset
        spec = asset_spec(asset)
        buyer_fee, seller_fee = leg.buyer_fee, leg.seller_fee
        for field, fee in (("buyer_fee", buyer_fee), ("seller_fee", seller_fee)):
            if fee != fee.quantize(spec.quantum):
                raise Rejected(field, f"has more than {spec.scale} decimals for {asset}", fee)
        if instrument.is_option:
            premium = leg.price * leg.quantity * instrument.multiplier
            paid = charge_rounded(premium, asset)
            received = payout_rounded(premium, asset)
            movements += [(buyer, asset, -paid), (seller, asset, received),
                          (ROUNDING, asset, paid - received)]
        movements += [(buyer, asset, -buyer_fee), (seller, asset, -seller_fee),
                      (FEES, asset, buyer_fee + seller_fee)]
    event = TradeCleared(trade_id=cmd.trade_id, legs=cmd.legs, traded_at=cmd.at,
                         postings=net_postings(movements))
    return [NewFact(trade_stream(cmd.trade_id), event, f"trade:{cmd.trade_id}", cmd.at)]


@dataclass(frozen=True)
class BustTrade:
    trade_id: str
    reason: str
    at: datetime


def decide_bust(cmd: BustTrade, trade: TradeRecord | None, cleared: TradeCleared | None,
                settled_instruments: Container[str],
                restored: Mapping[tuple[str, str], Position] | None = None) -> list[NewFact]:
    """Reverse a cleared trade with compensating facts: every posting negated, every leg's
    fill undone at its price. Refused once any leg's instrument has settled: money paid out
    at expiry cannot be called back by an edit."""
    if trade is None or cleared is None:
        raise TradeNotFound(cmd.trade_id)
    if trade.busted:
        raise TradeAlreadyBusted(cmd.trade_id)
    for leg in cleared.legs:
        if leg.instrument in settled_instruments:
            raise InstrumentSettled(cmd.trade_id, leg.instrument)
    reason = cmd.reason.strip()
    if not reason:
        raise Rejected("reason", "a bust needs a reason", cmd.reason)
    # A reversal cannot take effect before the trade it reverses.
    effective_at = max(cmd.at, cleared.traded_at)
    event = TradeBusted(
        trade_id=cmd.trade_id, reason=reason, legs=cleared.legs,
        postings=net_postings((p.account_id, p.asset, -p.amount) for p in cleared.postings),
        restored=tuple(
            RestoredPosition(account_id=a, instrument=i,
                             average_entry_price=p.average_entry_price,
                             realised_pnl=p.realised_pnl)
            for (a, i), p in sorted((restored or {}).items())),
    )
    return [NewFact(trade_stream(cmd.trade_id), event, f"bust:{cmd.trade_id}", effective_at)]


@dataclass(frozen=True)
class PublishMark:
    symbol: str
    price: Decimal
    iv: Decimal | None
    at: datetime


def decide_mark(cmd: PublishMark, instruments: Mapping[str, Instrument]) -> list[NewFact]:
    """An index price (symbol an underlying asset) or an instrument's mark price."""
    instrument = instruments.get(cmd.symbol)
    if cmd.symbol not in UNDERLYINGS and instrument is None:
        raise Rejected("symbol", f"{cmd.symbol!r} is neither an underlying "
                                 f"({', '.join(UNDERLYINGS)}) nor a listed instrument",
                       cmd.symbol)
    if cmd.iv is not None and (instrument is None or not instrument.is_option):
        raise Rejected("iv", "implied volatility applies to options only", cmd.iv)
    event = MarkPublished(symbol=cmd.symbol, price=cmd.price, iv=cmd.iv, marked_at=cmd.at)
    key = f"mark:{cmd.symbol}:{storage_time(cmd.at)}"
    return [NewFact(f"marks-{cmd.symbol}", event, key, cmd.at)]


def decide_change_margin_model(account: Account | None, account_id: str, model: str,
                               at: datetime) -> list[NewFact]:
    """Move an account between margin models; the same model again changes nothing."""
    if account is None:
        raise UnknownAccount(account_id, field="account")
    if model not in {m.value for m in MarginModel}:
        raise Rejected("margin_model", f"{model!r} is not one of standard, portfolio", model)
    if account.margin_model == model:
        return []
    event = MarginModelChanged(account_id=account_id, margin_model=MarginModel(model),
                               previous=MarginModel(account.margin_model))
    key = f"margin-model:{account_id}:{storage_time(at)}"
    return [NewFact(account_stream(account_id), event, key, at)]
