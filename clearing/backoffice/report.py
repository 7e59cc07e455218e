"""What `clearing report` shows, gathered from the log: headline figures, time series, open
interest and the default-management tables (issue 6 point 5). Rendering is `report_html`'s.

Everything comes from one fold of the log, read in pages; nothing is written, not even the
read models (the report never calls `Ledger.refresh`).

How the series are sampled. The margin series (equity, requirements, utilisation, accounts
under pressure) need the whole ledger's state at each sample time T, i.e. what
`clearing replay --as-of T` rebuilds. Rather than replay from scratch per sample, the log is
folded once and the state is snapshotted as the fold passes each T. That is exact when the
log is in effective-time order, as it usually is. A fact recorded late, effective before a
snapshot already taken, is detected; the samples are then folded again in a second pass
that holds such late facts back and applies each at the first sample it belongs to. This
relies on what margin reads from the state (balances, quantities, settlement bases, the
latest mark by marked time, the risk parameter changes) being sums or maxima, which do not
depend on the order facts are applied in. Listings and account openings count whatever their
effective time (as in replay) and are applied first.

The price paths, the insurance fund and the tables do not depend on order: they are
collected in the first pass and sorted by time. Long histories stay bounded: price paths keep
the first, last, lowest and highest point of each of `PATH_BUCKETS` time buckets, and each
table keeps at most `TABLE_ROWS_MAX` rows (the counts stay exact).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Generic, Protocol, TypeVar

from sqlalchemy import func, select

from clearing.app import Ledger
from clearing.backoffice.replay import REFERENCE_TYPES
from clearing.domain.accounts import INSURANCE, is_house
from clearing.domain.events import (
    AutoDeleveraged,
    InstrumentListed,
    InsuranceFundPaid,
    MarginCallIssued,
    MarkPublished,
    MoneyMovement,
    PositionLiquidated,
    ReconciliationRun,
    TradeBusted,
    TradeCleared,
    UncoveredLoss,
)
from clearing.domain.ledger import LedgerState, evolve
from clearing.domain.margin import (
    BANKRUPT,
    HEALTHY,
    LIQUIDATING,
    RESTRICTED,
    AccountMargin,
    MissingIndexPrice,
    MissingRiskParameter,
)
from clearing.domain.margin_sweep import all_margins
from clearing.domain.money import ASSETS, SETTLEMENT_ASSET
from clearing.store.eventstore import START, EventStore, LogFilter, LogPosition, RecordedEvent
from clearing.store.tables import events

ZERO = Decimal(0)
SAMPLES_MAX = 240
"""At most this many margin samples over the ledger's history (each values every book)."""
SAMPLE_STEPS = tuple(timedelta(hours=h) for h in (1, 2, 3, 4, 6, 8, 12, 24, 48, 168, 336, 720))
"""Sampling intervals to choose from: the finest that keeps within `SAMPLES_MAX`."""
PATH_BUCKETS = 720
"""Price paths and the insurance fund keep a handful of points per bucket of the history."""
TABLE_ROWS_MAX = 2_000
"""Rows kept per table (liquidations, margin calls, ...); the counts stay exact."""
LATE_FACTS_MAX = 1_000_000
"""Facts effective before an already taken sample that the second pass holds in memory."""
READ_PAGE_SIZE = 5_000
NOT_ACTIVITY = (*REFERENCE_TYPES, ReconciliationRun.type_name)
"""Facts that do not place the ledger's business history in time: reference data counts
whatever its time, and a reconciliation is an audit of the ledger, effective when it ran."""
PRESSURE_STATUSES = (RESTRICTED, LIQUIDATING, BANKRUPT)
RATIO_WITHOUT_EQUITY = Decimal(10)
"""The margin ratio an account with a requirement and no equity counts as (1000%)."""


class TooManyLateFacts(RuntimeError):
    """More facts arrived out of time order than the report's second pass may hold."""

    def __init__(self, count: int):
        super().__init__(f"more than {count} facts are recorded out of effective-time order; "
                         "use `clearing replay --as-of` for individual moments")


# ------------------------------------------------------------------ what the page shows


@dataclass(frozen=True)
class MarginSample:
    """Every member book valued at one moment (SPEC section 5), summed."""

    at: datetime
    equity_usd: Decimal
    initial_usd: Decimal
    maintenance_usd: Decimal
    accounts_with_positions: int
    statuses: dict[str, int]
    """Accounts per margin status, among those with positions or a negative equity."""
    margin_ratio_p90: Decimal | None
    """The 90th percentile of accounts' margin ratio (maintenance / equity, SPEC section 2)
    among accounts with a requirement; an account with no equity counts as the highest."""

    @property
    def initial_utilisation(self) -> Decimal | None:
        """Σ initial requirement / Σ equity of member accounts: how much of the members'
        equity the clearing house holds as initial margin (1 = all of it)."""
        return None if self.equity_usd <= 0 else self.initial_usd / self.equity_usd

    @property
    def maintenance_utilisation(self) -> Decimal | None:
        """Σ maintenance / Σ equity: SPEC's margin ratio of the whole membership; at 1 the
        members taken together would be at their liquidation threshold."""
        return None if self.equity_usd <= 0 else self.maintenance_usd / self.equity_usd

    @property
    def under_pressure(self) -> int:
        return sum(self.statuses.get(s, 0) for s in PRESSURE_STATUSES)


@dataclass(frozen=True)
class PricePoint:
    at: datetime
    value: Decimal


@dataclass(frozen=True)
class Liquidation:
    at: datetime
    position: int
    account_id: str
    instrument: str
    underlying: str
    quantity: Decimal
    mark_price: Decimal
    notional: Decimal
    fee: Decimal
    equity_before: Decimal
    maintenance_before: Decimal


@dataclass(frozen=True)
class AdlClose:
    at: datetime
    position: int
    bankrupt_account: str
    counterparty: str
    instrument: str
    underlying: str
    quantity: Decimal
    bankruptcy_price: Decimal
    mark_price: Decimal
    amount: Decimal
    score: Decimal


@dataclass(frozen=True)
class InsurancePayment:
    at: datetime
    position: int
    account_id: str
    deficit: Decimal
    amount: Decimal
    fund_before: Decimal


@dataclass(frozen=True)
class Loss:
    """A deficit neither the insurance fund nor auto-deleveraging recovered."""

    at: datetime
    position: int
    account_id: str
    amount: Decimal


@dataclass(frozen=True)
class MarginCall:
    at: datetime
    position: int
    account_id: str
    equity: Decimal
    initial: Decimal
    shortfall: Decimal


@dataclass(frozen=True)
class Reconciliation:
    at: datetime
    recorded_at: datetime
    position: int
    kind: str
    file_name: str
    file_sha256: str
    rows: int
    matched: int
    breaks: int
    tolerance: Decimal
    ledger_position: int


@dataclass(frozen=True)
class OpenInterest:
    """One instrument's open interest: the sum of its long positions (shorts net to it)."""

    symbol: str
    underlying: str
    kind: str
    quantity: Decimal
    notional_usd: Decimal | None
    """quantity × multiplier × the underlying's index price (its mark without an index)."""
    holders: int


class Timed(Protocol):
    """A table row: a fact's time and place in the log."""

    @property
    def at(self) -> datetime: ...

    @property
    def position(self) -> int: ...


Row = TypeVar("Row", bound=Timed)


@dataclass
class Table(Generic[Row]):
    """A table's rows in time order (at most `TABLE_ROWS_MAX` kept) and their exact count."""

    rows: list[Row] = field(default_factory=list)
    total: int = 0

    def add(self, row: Row) -> None:
        self.total += 1
        if len(self.rows) < TABLE_ROWS_MAX:
            self.rows.append(row)

    def sort(self) -> None:
        self.rows.sort(key=lambda r: (r.at, r.position))


@dataclass
class ReportData:
    """Everything the page shows. `state` is the ledger as of `at`, for sections that value
    the book themselves (a stress test joins the page this way)."""

    at: datetime
    as_of: datetime | None
    generated_at: datetime
    start: datetime | None
    """First and last business time of the history (listings, account openings and
    reconciliation runs left out); None on a ledger with no history."""
    end: datetime | None
    head_position: int
    head_hash: str | None
    facts: int
    counts: Counter[str]
    members: int
    sample_step: timedelta
    samples: list[MarginSample]
    current: MarginSample | None
    index_paths: dict[str, list[PricePoint]]
    insurance_fund: list[PricePoint]
    insurance_fund_now: Decimal
    open_interest: list[OpenInterest]
    liquidations: Table[Liquidation]
    adl_closes: Table[AdlClose]
    insurance_payments: Table[InsurancePayment]
    losses: Table[Loss]
    margin_calls: Table[MarginCall]
    reconciliations: Table[Reconciliation]
    late_facts: int
    state: LedgerState

    @property
    def trades(self) -> int:
        return self.counts[TradeCleared.type_name]

    @property
    def busted(self) -> int:
        return self.counts[TradeBusted.type_name]


# ------------------------------------------------------------------ reading the store


def gather(ledger: Ledger, as_of: datetime | None = None) -> ReportData:
    """The report's data as of `as_of` (default: everything, valued now)."""
    store = ledger.store
    generated_at = ledger.clock()
    at = as_of or generated_at
    head = store.head()
    start, end = activity_range(store, head, as_of)
    bounds = LogFilter(until=head, effective_until=as_of, timeless_types=REFERENCE_TYPES)
    reference = LogFilter(until=head, types=REFERENCE_TYPES)
    step = sample_step(start, end)
    times = sample_times(start, end, step)
    collector = Collector(start, end)

    def read(filter_: LogFilter) -> Iterator[RecordedEvent]:
        if head == START:
            return iter(())
        return store.read_all(bounds=filter_, page_size=READ_PAGE_SIZE)

    def observed() -> Iterator[RecordedEvent]:
        for fact in read(bounds):
            collector.observe(fact)
            yield fact

    fold = fold_samples(read(reference), observed(), times)
    late = fold.late
    if late:
        fold = fold_samples(read(reference), read(bounds), times, held_back=late)
    collector.finish()
    current = value_books(fold.state, at) if head != START else None
    return ReportData(
        at=at, as_of=as_of, generated_at=generated_at, start=start, end=end,
        head_position=head.position, head_hash=hash_at(store, head), facts=collector.facts,
        counts=collector.counts,
        members=sum(1 for a in fold.state.accounts if not is_house(a)),
        sample_step=step, samples=fold.samples, current=current,
        index_paths={asset: path.points() for asset, path in sorted(collector.paths.items())},
        insurance_fund=collector.insurance_path(),
        insurance_fund_now=fold.state.balances.get((INSURANCE, SETTLEMENT_ASSET), ZERO),
        open_interest=open_interest(fold.state),
        liquidations=collector.liquidations, adl_closes=collector.adl_closes,
        insurance_payments=collector.insurance_payments, losses=collector.losses,
        margin_calls=collector.margin_calls, reconciliations=collector.reconciliations,
        late_facts=len(late), state=fold.state)


def activity_range(store: EventStore, head: LogPosition,
                   as_of: datetime | None) -> tuple[datetime | None, datetime | None]:
    """The first and last business time of the history up to `head` and `as_of`."""
    if head == START:
        return None, None
    query = select(func.min(events.c.effective_at), func.max(events.c.effective_at)).where(
        events.c.type.not_in(NOT_ACTIVITY), events.c.position <= head.position)
    if as_of is not None:
        query = query.where(events.c.effective_at <= as_of)
    with store.engine.connect() as conn:
        first, last = conn.execute(query).one()
    return first, last


def hash_at(store: EventStore, head: LogPosition) -> str | None:
    """The chain hash of the last fact read: the page names exactly the log it shows."""
    if head == START:
        return None
    with store.engine.connect() as conn:
        return conn.execute(select(events.c.hash).where(events.c.position == head.position)
                            ).scalar_one_or_none()


# ------------------------------------------------------------------ sampling (pure)


def sample_step(start: datetime | None, end: datetime | None) -> timedelta:
    """The finest of `SAMPLE_STEPS` that keeps the history within `SAMPLES_MAX` samples."""
    if start is None or end is None:
        return SAMPLE_STEPS[0]
    span = end - start
    return next((s for s in SAMPLE_STEPS if span / s <= SAMPLES_MAX - 2), SAMPLE_STEPS[-1])


def sample_times(start: datetime | None, end: datetime | None,
                 step: timedelta) -> list[datetime]:
    """The start, every whole multiple of `step` (UTC) after it and before the end, the end."""
    if start is None or end is None:
        return []
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    first = epoch + step * math.floor((start - epoch) / step + 1)
    times = [start]
    moment = first
    while moment < end:
        times.append(moment)
        moment += step
    if end > start:
        times.append(end)
    return times


def value_books(state: LedgerState, at: datetime) -> MarginSample | None:
    """Every member book valued at `at`; None when a price it needs is not known yet (a
    collateral asset before its first index mark)."""
    try:
        margins = all_margins(state, at)
    except (MissingIndexPrice, MissingRiskParameter):
        return None
    return summarise(at, margins)


def summarise(at: datetime, margins: dict[str, AccountMargin]) -> MarginSample:
    statuses: Counter[str] = Counter()
    ratios: list[Decimal] = []
    for margin in margins.values():
        held = margin.initial > 0 or margin.maintenance > 0
        if held:
            ratios.append(margin.margin_ratio if margin.margin_ratio is not None
                          and margin.equity > 0 else RATIO_WITHOUT_EQUITY)
        if held or margin.status != HEALTHY:
            statuses[margin.status] += 1
    ratios.sort()
    return MarginSample(
        at=at,
        equity_usd=sum((m.equity for m in margins.values()), ZERO),
        initial_usd=sum((m.initial for m in margins.values()), ZERO),
        maintenance_usd=sum((m.maintenance for m in margins.values()), ZERO),
        accounts_with_positions=len(ratios), statuses=dict(statuses),
        margin_ratio_p90=percentile(ratios, Decimal("0.9")))


def percentile(ordered: Sequence[Decimal], fraction: Decimal) -> Decimal | None:
    """The nearest-rank percentile of an ascending list (None when empty)."""
    if not ordered:
        return None
    rank = math.ceil(fraction * len(ordered))
    return ordered[max(0, rank - 1)]


@dataclass
class Fold:
    samples: list[MarginSample]
    state: LedgerState
    late: list[RecordedEvent]
    """Facts met after a sample they belong to had been taken (empty when exact)."""


def fold_samples(reference: Iterable[RecordedEvent], facts: Iterable[RecordedEvent],
                 times: Sequence[datetime],
                 held_back: Sequence[RecordedEvent] = ()) -> Fold:
    """Fold the log once, taking a margin sample as the fold passes each of `times`.

    `reference` (listings, account openings) is applied first. `held_back` are facts that a
    first pass found late: they are skipped where the log has them and applied instead just
    before the first sample at or after their effective time.
    """
    state = LedgerState()
    for fact in reference:
        evolve(state, fact)
    skipped = {f.position for f in held_back}
    pending = sorted(held_back, key=lambda f: (f.effective_at, f.position))
    samples: list[MarginSample] = []
    late: list[RecordedEvent] = []
    taken = 0

    def take_until(moment: datetime | None) -> None:
        """Take every sample strictly before `moment` (all of them when None)."""
        nonlocal taken
        while taken < len(times) and (moment is None or times[taken] < moment):
            while pending and pending[0].effective_at <= times[taken]:
                apply(pending.pop(0))
            sample = value_books(state, times[taken])
            if sample is not None:
                samples.append(sample)
            taken += 1

    def apply(fact: RecordedEvent) -> None:
        evolve(state, fact)
        state.statement.clear()  # statement lines are not shown: keep memory flat

    for fact in facts:
        if fact.type in REFERENCE_TYPES or fact.position in skipped:
            continue
        if taken and fact.effective_at <= times[taken - 1]:
            if len(late) >= LATE_FACTS_MAX:
                raise TooManyLateFacts(LATE_FACTS_MAX)
            late.append(fact)
        else:
            take_until(fact.effective_at)
        apply(fact)
    take_until(None)
    for fact in pending:
        apply(fact)
    return Fold(samples, state, late)


# ------------------------------------------------------------------ collecting (pure)


class PricePath:
    """A price series bounded in memory: per time bucket, its first, last, lowest and highest
    points, so a plot keeps every spike however long the history."""

    def __init__(self, start: datetime, width: timedelta) -> None:
        self.start = start
        self.width = width
        self.buckets: dict[int, dict[str, PricePoint]] = {}

    def add(self, at: datetime, value: Decimal) -> None:
        key = max(0, int((at - self.start) / self.width)) if self.width else 0
        bucket = self.buckets.setdefault(key, {})
        point = PricePoint(at, value)
        for name, better in (("first", lambda p: p.at > at), ("last", lambda p: p.at <= at),
                             ("low", lambda p: p.value > value),
                             ("high", lambda p: p.value < value)):
            kept = bucket.get(name)
            if kept is None or better(kept):
                bucket[name] = point

    def points(self) -> list[PricePoint]:
        found = {(p.at, p.value) for b in self.buckets.values() for p in b.values()}
        return [PricePoint(at, value) for at, value in sorted(found)]


class Collector:
    """What the page lists and plots besides the margin samples; indifferent to the order
    facts come in (each table is sorted by time at the end)."""

    def __init__(self, start: datetime | None, end: datetime | None) -> None:
        self.start = start or datetime(1970, 1, 1, tzinfo=UTC)
        span = (end - start) if start is not None and end is not None else timedelta(0)
        self.width = span / PATH_BUCKETS if span else timedelta(hours=1)
        self.facts = 0
        self.counts: Counter[str] = Counter()
        self.paths: dict[str, PricePath] = {}
        self.insurance: dict[int, tuple[Decimal, datetime]] = {}
        """Per bucket: the fund's net movement and the time of its last movement."""
        self.liquidations: Table[Liquidation] = Table()
        self.adl_closes: Table[AdlClose] = Table()
        self.insurance_payments: Table[InsurancePayment] = Table()
        self.losses: Table[Loss] = Table()
        self.margin_calls: Table[MarginCall] = Table()
        self.reconciliations: Table[Reconciliation] = Table()
        self._underlyings: dict[str, str] = {}

    def observe(self, fact: RecordedEvent) -> None:
        self.facts += 1
        self.counts[fact.type] += 1
        event = fact.event
        if isinstance(event, InstrumentListed):
            self._underlyings[event.instrument.symbol] = event.instrument.underlying
        if fact.type in REFERENCE_TYPES:
            return
        at = fact.effective_at
        if isinstance(event, MoneyMovement):
            for p in event.postings:
                if p.account_id == INSURANCE and p.asset == SETTLEMENT_ASSET:
                    key = self._bucket(at)
                    moved, last = self.insurance.get(key, (ZERO, at))
                    self.insurance[key] = (moved + p.amount, max(last, at))
        if isinstance(event, MarkPublished):
            if event.symbol in ASSETS:  # an index price; an instrument's mark names its symbol
                self._path(event.symbol).add(event.marked_at, event.price)
        elif isinstance(event, PositionLiquidated):
            self.liquidations.add(Liquidation(
                at, fact.position, event.account_id, event.instrument,
                self._underlying(event.instrument),
                event.quantity, event.mark_price, event.notional, event.fee,
                event.equity_before, event.maintenance_before))
        elif isinstance(event, AutoDeleveraged):
            self.adl_closes.add(AdlClose(
                at, fact.position, event.bankrupt_account, event.counterparty,
                event.instrument,
                self._underlying(event.instrument),
                event.quantity, event.bankruptcy_price, event.mark_price, event.amount,
                event.score))
        elif isinstance(event, InsuranceFundPaid):
            self.insurance_payments.add(InsurancePayment(
                at, fact.position, event.account_id, event.deficit, event.amount,
                event.fund_before))
        elif isinstance(event, UncoveredLoss):
            self.losses.add(Loss(at, fact.position, event.account_id, event.amount))
        elif isinstance(event, MarginCallIssued):
            self.margin_calls.add(MarginCall(at, fact.position, event.account_id,
                                             event.equity, event.initial, event.shortfall))
        elif isinstance(event, ReconciliationRun):
            self.reconciliations.add(Reconciliation(
                at, fact.recorded_at, fact.position, event.kind, event.file_name,
                event.file_sha256, event.rows, event.matched, event.breaks, event.tolerance,
                event.ledger_position))

    def finish(self) -> None:
        self.liquidations.sort()
        self.adl_closes.sort()
        self.insurance_payments.sort()
        self.losses.sort()
        self.margin_calls.sort()
        self.reconciliations.sort()

    def insurance_path(self) -> list[PricePoint]:
        """The fund's USDC balance after each bucket in which it moved, placed at the
        bucket's last movement (exact whenever a bucket holds one)."""
        points = []
        balance = ZERO
        for key in sorted(self.insurance):
            moved, last = self.insurance[key]
            balance += moved
            points.append(PricePoint(last, balance))
        return points

    def _underlying(self, symbol: str) -> str:
        return self._underlyings.get(symbol) or symbol.split("-", 1)[0]

    def _bucket(self, at: datetime) -> int:
        return max(0, int((at - self.start) / self.width))

    def _path(self, asset: str) -> PricePath:
        path = self.paths.get(asset)
        if path is None:
            path = self.paths[asset] = PricePath(self.start, self.width)
        return path


def open_interest(state: LedgerState) -> list[OpenInterest]:
    """Open interest per instrument, largest notional first."""
    longs: dict[str, Decimal] = {}
    holders: Counter[str] = Counter()
    for (account_id, symbol), position in state.positions.items():
        if position.quantity != 0:
            holders[symbol] += 1
        if position.quantity > 0:
            longs[symbol] = longs.get(symbol, ZERO) + position.quantity
    rows = []
    for symbol, quantity in longs.items():
        instrument = state.instruments[symbol]
        price = state.marks.get(instrument.underlying) or state.marks.get(symbol)
        notional = None if price is None else quantity * instrument.multiplier * price.price
        rows.append(OpenInterest(symbol, instrument.underlying, str(instrument.kind),
                                 quantity, notional, holders[symbol]))
    rows.sort(key=lambda r: (-(r.notional_usd or ZERO), r.symbol))
    return rows
