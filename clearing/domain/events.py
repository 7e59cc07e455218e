"""The ledger's facts, in the back office's words. Each is small, frozen and past tense.

Every event that moves money carries its postings, and refuses to exist unless they sum to
zero per asset (double entry, SPEC invariant 3).
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from clearing.domain.accounts import MarginModel
from clearing.domain.event import Event, catalogue, from_the_log
from clearing.domain.instruments import Instrument
from clearing.domain.money import ExactDecimal
from clearing.domain.postings import Posting, check_balanced
from clearing.domain.clock import ensure_utc


class MoneyMovement(Event):
    """Base of events that move money."""

    postings: tuple[Posting, ...]

    @model_validator(mode="after")
    def _balanced(self, info: ValidationInfo) -> MoneyMovement:
        if not from_the_log(info):
            check_balanced(self.postings)
        return self


@catalogue.register
class AccountOpened(Event):
    type_name = "AccountOpened"
    account_id: str
    owner: str
    margin_model: MarginModel


@catalogue.register
class InstrumentListed(Event):
    type_name = "InstrumentListed"
    instrument: Instrument


@catalogue.register
class CollateralDeposited(MoneyMovement):
    type_name = "CollateralDeposited"
    account_id: str
    asset: str
    amount: ExactDecimal = Field(gt=0)
    reference: str


@catalogue.register
class CollateralWithdrawn(MoneyMovement):
    type_name = "CollateralWithdrawn"
    account_id: str
    asset: str
    amount: ExactDecimal = Field(gt=0)
    reference: str


class TradeLeg(Event):
    """One leg of a cleared trade, as the venue reported it (not itself an event type)."""

    leg: int = Field(ge=1)
    instrument: str
    buyer: str
    seller: str
    quantity: ExactDecimal = Field(gt=0)
    price: ExactDecimal = Field(gt=0)
    buyer_fee: ExactDecimal = Field(ge=0)
    seller_fee: ExactDecimal = Field(ge=0)


@catalogue.register
class TradeCleared(MoneyMovement):
    """The clearing house became buyer to the seller and seller to the buyer of every leg;
    the postings move option premiums buyer to seller and fees to `ccp:fees`."""

    type_name = "TradeCleared"
    trade_id: str
    legs: tuple[TradeLeg, ...] = Field(min_length=1)
    traded_at: datetime

    @field_validator("traded_at")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        return ensure_utc(value)

    @model_validator(mode="after")
    def _legs_numbered(self, info: ValidationInfo) -> TradeCleared:
        if from_the_log(info):
            return self
        if [leg.leg for leg in self.legs] != list(range(1, len(self.legs) + 1)):
            raise ValueError("legs must be numbered 1..n")
        return self


class RestoredPosition(Event):
    """A position's average entry price and realised P&L as if the busted trade had never
    been cleared (not itself an event type)."""

    account_id: str
    instrument: str
    average_entry_price: ExactDecimal
    realised_pnl: ExactDecimal


@catalogue.register
class TradeBusted(MoneyMovement):
    """A cleared trade reversed by compensating postings and positions; the original
    `TradeCleared` stays in the log, untouched."""

    type_name = "TradeBusted"
    trade_id: str
    reason: str
    legs: tuple[TradeLeg, ...] = Field(min_length=1)
    """The legs being reversed: each buyer's position falls and each seller's rises by the
    leg's quantity at the leg's price, so variation margin already paid on the trade flows
    back at the next mark-to-market, exactly."""
    restored: tuple[RestoredPosition, ...] = ()
    """Each affected position's entry price and realised P&L recomputed from its history
    without this trade, so the bust undoes the trade in every field, not only in money."""


@catalogue.register
class MarkPublished(Event):
    """A price observation: an asset's index price in USD (`BTC`) or an instrument's mark
    price, with an option's implied volatility when known."""

    type_name = "MarkPublished"
    symbol: str
    price: ExactDecimal = Field(gt=0)
    iv: ExactDecimal | None = Field(default=None, ge=0)
    marked_at: datetime

    @field_validator("marked_at")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        return ensure_utc(value)


@catalogue.register
class MarginModelChanged(Event):
    """An account moves between the standard and the portfolio margin model."""

    type_name = "MarginModelChanged"
    account_id: str
    margin_model: MarginModel
    previous: MarginModel


@catalogue.register
class RiskParametersSet(Event):
    """One risk parameter takes a new value from this event's effective time on. `inputs`
    records what produced it (the risk job's volatility estimate, or who set it by hand)."""

    type_name = "RiskParametersSet"
    name: str
    underlying: str | None = None
    value: ExactDecimal
    previous: ExactDecimal | None = None
    reason: str
    inputs: dict[str, str] = Field(default_factory=dict)


@catalogue.register
class MarginStatusChanged(Event):
    """An account's margin state moved (healthy, restricted, liquidating, bankrupt), with
    the figures that moved it."""

    type_name = "MarginStatusChanged"
    account_id: str
    previous: str
    status: str
    equity: ExactDecimal
    initial: ExactDecimal
    maintenance: ExactDecimal
    batch_id: str


@catalogue.register
class MarginCallIssued(Event):
    """Equity fell below the initial requirement: the member must restore it."""

    type_name = "MarginCallIssued"
    account_id: str
    equity: ExactDecimal
    initial: ExactDecimal
    maintenance: ExactDecimal
    shortfall: ExactDecimal
    batch_id: str


@catalogue.register
class BatchCompleted(Event):
    """A job's batch finished: every fact it decided is in the log. A rerun of the same
    batch id finds this and does nothing."""

    type_name = "BatchCompleted"
    job: str
    batch_id: str
    at: datetime
    events: int = Field(ge=0)


class PositionMovement(Event):
    """How one account's position in one instrument changes in a settlement or transfer
    (not itself an event type): `amount` is the exact cash it earns or owes for it, before
    the event nets and rounds its postings."""

    account_id: str
    instrument: str
    quantity_change: ExactDecimal = Decimal(0)
    basis_change: ExactDecimal = Decimal(0)
    price: ExactDecimal
    amount: ExactDecimal = Decimal(0)


class PositionsMoved(MoneyMovement):
    """Base of the jobs' events that change positions and pay for them."""

    batch_id: str
    movements: tuple[PositionMovement, ...]


@catalogue.register
class VariationMarginSettled(PositionsMoved):
    """Mark-to-market of one instrument (one chunk of its holders): each position is paid
    q × multiplier × (mark − last settlement price) and its last settlement price becomes the
    mark. The other side of every posting is `ccp:settlement`, which the batch's closing
    `SettlementResidualSwept` brings back to zero."""

    type_name = "VariationMarginSettled"
    instrument: str
    mark_price: ExactDecimal
    chunk: int = Field(ge=0)


@catalogue.register
class FundingPaid(MoneyMovement):
    """One 8-hour funding period of a perpetual: longs pay shorts when the rate is positive."""

    type_name = "FundingPaid"
    batch_id: str
    instrument: str
    mark_price: ExactDecimal
    index_price: ExactDecimal
    premium_index: ExactDecimal
    rate: ExactDecimal
    chunk: int = Field(ge=0)
    payments: tuple[PositionMovement, ...]


@catalogue.register
class InstrumentSettled(Event):
    """An expired instrument's settlement price: the time-weighted average of the index in
    the 30 minutes before expiry (SPEC section 4), with how it was found."""

    type_name = "InstrumentSettled"
    batch_id: str
    symbol: str
    expiry: datetime
    settlement_price: ExactDecimal
    method: str
    marks_used: int = Field(ge=0)


@catalogue.register
class ExpirySettled(PositionsMoved):
    """Expiring positions closed, leg by leg, with each account's cash netted per asset into
    one posting (futures: a final variation margin; options: intrinsic value)."""

    type_name = "ExpirySettled"
    expiry: datetime
    chunk: int = Field(ge=0)


@catalogue.register
class SettlementResidualSwept(MoneyMovement):
    """What a batch left in `ccp:settlement` after rounding each payment in the clearing
    house's favour goes to `ccp:rounding`."""

    type_name = "SettlementResidualSwept"
    batch_id: str


@catalogue.register
class PositionLiquidated(PositionsMoved):
    """A position of an account below maintenance moved to `ccp:liquidation` at the mark
    price, with the fee to `ccp:insurance` and the figures that drove it."""

    type_name = "PositionLiquidated"
    account_id: str
    instrument: str
    quantity: ExactDecimal
    mark_price: ExactDecimal
    notional: ExactDecimal
    fee: ExactDecimal
    equity_before: ExactDecimal
    initial_before: ExactDecimal
    maintenance_before: ExactDecimal
    position_requirement: ExactDecimal


@catalogue.register
class InsuranceFundPaid(MoneyMovement):
    """The insurance fund covers (part of) a bankrupt account's negative equity."""

    type_name = "InsuranceFundPaid"
    batch_id: str
    account_id: str
    deficit: ExactDecimal
    amount: ExactDecimal
    fund_before: ExactDecimal


@catalogue.register
class AutoDeleveraged(PositionsMoved):
    """What the insurance fund could not cover: an opposite position closed against
    `ccp:liquidation` at the bankrupt account's bankruptcy price, by ranking score."""

    type_name = "AutoDeleveraged"
    bankrupt_account: str
    counterparty: str
    instrument: str
    quantity: ExactDecimal
    bankruptcy_price: ExactDecimal
    mark_price: ExactDecimal
    profit_pct: ExactDecimal
    leverage: ExactDecimal
    score: ExactDecimal
    deficit_before: ExactDecimal
    amount: ExactDecimal


@catalogue.register
class ReconciliationRun(Event):
    """The ledger was compared with an external statement (`clearing reconcile`), for the
    audit trail: which file (by name and SHA-256), against which ledger position (the last
    fact, other than reconciliation runs, in the read models compared), with what tolerance,
    and the outcome. It changes no balance, position or read model."""

    type_name = "ReconciliationRun"
    kind: str = Field(pattern=r"^(balances|trades)$")
    file_name: str
    file_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    rows: int = Field(ge=0)
    matched: int = Field(ge=0)
    breaks: int = Field(ge=0)
    tolerance: ExactDecimal = Field(ge=0)
    ledger_position: int = Field(ge=0)


@catalogue.register
class UncoveredLoss(MoneyMovement):
    """What neither the insurance fund nor auto-deleveraging recovered of a bankrupt
    account's deficit: borne by the clearing house (`ccp:liquidation`)."""

    type_name = "UncoveredLoss"
    batch_id: str
    account_id: str
    amount: ExactDecimal


class StressScenarioFigures(Event):
    """One scenario's headline figures in a `StressTestRecorded` (not itself an event type):
    the moves applied, what the cascade did and what the default waterfall must absorb."""

    scenario: str
    moves: dict[str, ExactDecimal]
    vol_factor: ExactDecimal
    vol_factors: dict[str, ExactDecimal] = Field(default_factory=dict)
    final_prices: dict[str, ExactDecimal]
    loss: ExactDecimal = Field(ge=0)
    accounts_below_maintenance: int = Field(ge=0)
    accounts_liquidated: int = Field(ge=0)
    accounts_bankrupt: int = Field(ge=0)
    cascade_rounds: int = Field(ge=0)
    converged: bool
    deficit: ExactDecimal = Field(ge=0)
    insurance_covered: ExactDecimal = Field(ge=0)
    auto_deleveraged: ExactDecimal = Field(ge=0)
    uncovered: ExactDecimal = Field(ge=0)
    cover_1: ExactDecimal = Field(ge=0)
    cover_2: ExactDecimal = Field(ge=0)
    cover_2_accounts: tuple[str, ...] = ()
    verdict: str = Field(pattern=r"^(sufficient|insufficient)$")
    shortfall: ExactDecimal = Field(ge=0)


@catalogue.register
class StressTestRecorded(Event):
    """The daily stress test's headline figures (the `stress` job), so that the risk
    committee's history is in the audit trail: per scenario the losses, the accounts
    breached, the deficit and who covers it, Cover-1 and Cover-2 against the insurance fund.
    It changes no balance, position or read model."""

    type_name = "StressTestRecorded"
    batch_id: str
    insurance_fund: ExactDecimal
    depth_usd: dict[str, ExactDecimal]
    impact_coefficient: ExactDecimal = Field(ge=0)
    accounts: int = Field(ge=0)
    scenarios: tuple[StressScenarioFigures, ...]
    worst_scenario: str | None
    cover_2: ExactDecimal = Field(ge=0)
    verdict: str = Field(pattern=r"^(sufficient|insufficient)$")
    shortfall: ExactDecimal = Field(ge=0)
