"""A venue's working life, generated step by step from a seed.

`Workload(seed)` yields one `Step` at a time: files the venue and custodians send (accounts,
listings, deposits, withdrawals, single- and multi-leg trades, marks with jumps), busts, every
job at increasing business times, risk parameter changes, margin model changes, late
deliveries (effective in the past), duplicate deliveries, conflicting redeliveries and
re-imports of the very same file. Some of each are meant to be refused: unknown or expired
instruments, the same account on both sides, unknown accounts, fees finer than USDC, absurd
withdrawals, a second bust, a bust of a trade that does not exist.

Every decision comes from `random.Random(seed)` and from this module's own model of what it
has sent; nothing reads the wall clock. Each step says what it expects (`Expect`): written
(with the exact number of facts when the model knows it), nothing (a duplicate), refused, or
any (a withdrawal the margin rules may refuse, a bust of a trade whose instrument may have
settled). After a step runs, the simulation tells the workload whether it was accepted
(`observe`), so that later steps build on what the ledger really holds (a trade accepted can
be busted; a withdrawal refused is not re-imported as a duplicate). The ledger is
deterministic, so a seed always yields the same steps: step N of a run of any length is the
same step, which is what lets a failure be replayed from its seed and step.

Business time starts at `T0` and moves forward a few minutes per step (about two weeks in
2,000 steps, so daily options and three-day futures expire and settle); the ledger's clock
(`recorded_at`) reads the step's time too, so a run is reproducible to the byte.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import ROUND_DOWN, Decimal
from enum import StrEnum

T0 = datetime(2026, 11, 2, 0, 0, tzinfo=UTC)
EXPIRY_HOUR = 8
"""Dated instruments expire at 08:00 UTC."""
MONTHS = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")

MEMBERS_AT_START = (6, 10)
MEMBERS_MAX = 24
LISTING_HORIZON_DAYS = 2
"""Expiries are listed this many days ahead of the current business day."""
START_PRICE = {"BTC": 95_000.0, "ETH": 3_400.0}
MINUTES_A_YEAR = 365 * 24 * 60
VOL_PER_SQRT_MINUTE = {"BTC": 0.6 / math.sqrt(MINUTES_A_YEAR),
                       "ETH": 0.8 / math.sqrt(MINUTES_A_YEAR)}
JUMP_PROBABILITY = 0.006
"""Chance per step of a jump of 8-30% in an index: margin calls, liquidations, ADL."""
LATE_PROBABILITY = 0.1
"""Chance that a delivery is effective in the past (a late file)."""
LATE_MINUTES_MAX = 6 * 60
PAST_JOB_PROBABILITY = 0.003
"""Chance per step of a job run for a moment earlier than facts already recorded, which
decides from a replay of the log as of that moment (costly: kept rare)."""
KNOWN_BUG_TRADES_AGAIN_AFTER_SETTLEMENT = True
"""Leave out trades files sent again after one of their instruments settled: the ledger
refuses them (open bug, `test_found_bugs.py`); set False once fixed."""
ABSURD_AMOUNT = "1000000000000"
UNKNOWN_ACCOUNT = "zz-nobody"
UNKNOWN_SYMBOL = "DOGE-PERP"
JOBS = ("settle", "mtm", "funding", "risk", "liquidate", "margin")
EOD_ORDER = JOBS
RISK_CHANGES: tuple[tuple[str, str | None, float, float], ...] = (
    ("haircut", "BTC", 0.05, 0.30),
    ("haircut", "ETH", 0.05, 0.35),
    ("portfolio_range", "BTC", 0.10, 0.30),
    ("portfolio_range", "ETH", 0.12, 0.35),
    ("futures_initial_rate", None, 0.02, 0.05),
    ("futures_maintenance_rate", None, 0.008, 0.015),
    ("liquidation_fee_rate", None, 0.002, 0.01),
    ("maintenance_factor", None, 0.6, 0.9),
)

Row = dict[str, str]


class Expect(StrEnum):
    WRITTEN = "written"
    """Accepted; `Step.events` facts exactly (None: at least one)."""
    NOTHING = "nothing"
    """Accepted as already recorded: writes nothing."""
    REFUSED = "refused"
    """Refused with a typed rejection; writes nothing."""
    ANY = "any"
    """Either accepted (then `Step.events` facts when known) or refused (then nothing)."""


@dataclass(frozen=True)
class Step:
    index: int
    now: datetime
    """The business time of the step; the ledger's clock reads it too."""
    action: str
    """import | reimport | bust | job | risk | margin_model"""
    description: str
    expect: Expect
    events: int | None = None
    kind: str | None = None
    rows: tuple[Row, ...] = ()
    file: str | None = None
    """The file to write and import (import) or the earlier file to import again (reimport)."""
    job: str | None = None
    at: datetime | None = None
    trade_id: str | None = None
    account_id: str | None = None
    name: str | None = None
    underlying: str | None = None
    value: str | None = None

    def __str__(self) -> str:
        return f"step {self.index} at {iso(self.now)}: {self.description} " \
               f"(expect {self.expect}{'' if self.events is None else f' {self.events}'})"


@dataclass(frozen=True)
class Outcome:
    accepted: bool
    written: int
    refusal: str = ""
    """Why it was refused: the rejection's type and message."""


def iso(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def symbol_date(day: date) -> str:
    return f"{day.day}{MONTHS[day.month - 1]}{day.year % 100:02d}"


def decimal_text(value: float, places: int) -> str:
    quantum = Decimal(1).scaleb(-places)
    text = format(Decimal(repr(value)).quantize(quantum, rounding=ROUND_DOWN), "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def positive_text(low: float, high: float, places: int, rng: random.Random) -> str:
    """A random amount in [low, high) with `places` decimals, never zero."""
    text = decimal_text(rng.uniform(low, high), places)
    return text if Decimal(text) > 0 else format(Decimal(1).scaleb(-places), "f")


def black76(call: bool, forward: float, strike: float, vol: float, years: float) -> float:
    """The option's value for marks and trade prices (the workload's own, not the product's)."""
    if years <= 0 or vol <= 0:
        return max(forward - strike, 0.0) if call else max(strike - forward, 0.0)
    s = vol * math.sqrt(years)
    d1 = (math.log(forward / strike) + s * s / 2) / s
    d2 = d1 - s

    def n(x: float) -> float:
        return 0.5 * (1 + math.erf(x / math.sqrt(2)))

    if call:
        return forward * n(d1) - strike * n(d2)
    return strike * n(-d2) - forward * n(-d1)


@dataclass
class Listed:
    symbol: str
    kind: str
    underlying: str
    expiry: datetime | None
    strike: int | None = None
    call: bool | None = None
    multiplier: str = "1"

    def row(self) -> Row:
        return {"symbol": self.symbol, "kind": self.kind, "underlying": self.underlying,
                "settlement_asset": "USDC", "expiry": iso(self.expiry) if self.expiry else "",
                "strike": str(self.strike) if self.strike else "",
                "option_type": "" if self.call is None else ("call" if self.call else "put"),
                "multiplier": self.multiplier}

    def live_at(self, at: datetime) -> bool:
        return self.expiry is None or at < self.expiry


@dataclass
class Leg:
    instrument: str
    buyer: str
    seller: str
    quantity: str
    price: str
    buyer_fee: str = "0"
    seller_fee: str = "0"


@dataclass
class SentFile:
    name: str
    kind: str
    rows: tuple[Row, ...]
    accepted: bool
    refusal_is_certain: bool
    """A refused file whose refusal cannot change later (an unknown symbol stays unknown)."""


@dataclass
class TradeSent:
    rows: tuple[Row, ...]
    status: str
    """cleared | busted"""


@dataclass
class _Pending:
    """What the model learns once the step it belongs to is accepted."""

    on_accept: list[Callable[[], None]] = field(default_factory=list)


class Workload:
    """Steps of one simulated venue; see the module docstring."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.index = 0
        self.now = T0
        self.prices = dict(START_PRICE)
        self.accounts: dict[str, tuple[str, str]] = {}
        """account id -> (owner, margin model)"""
        self.instruments: dict[str, Listed] = {}
        self.listed_days: set[date] = set()
        self.marks: dict[tuple[str, str], tuple[str, str]] = {}
        """(symbol, time) -> (price, iv)"""
        self.deposits: dict[str, Row] = {}
        self.withdrawals: dict[str, Row] = {}
        self.net_deposits: dict[tuple[str, str], Decimal] = {}
        self.trades: dict[str, TradeSent] = {}
        self.files: list[SentFile] = []
        self.job_times: dict[str, datetime] = {}
        self.risk_commands: list[tuple[str, str | None, str, datetime]] = []
        self.counters: dict[str, int] = {}
        self._pending: _Pending | None = None
        self._setup = ["accounts", "instruments", "marks", "deposits"]
        self._queued_marks: list[str] = []
        """Listed but not yet marked: marked by the next marks step."""
        self._queued_deposits: list[Row] = []
        """New members' first collateral: deposited by the next deposits step."""

    # ------------------------------------------------------------ the stream of steps

    def next_step(self) -> Step:
        if self._pending is not None:
            raise RuntimeError("observe() the previous step's outcome first")
        self._pending = _Pending()
        if self._setup:
            step = self._setup_step(self._setup.pop(0))
        else:
            self._advance_time()
            step = self._choose()
        self.index += 1
        return step

    def observe(self, outcome: Outcome) -> None:
        pending, self._pending = self._pending, None
        assert pending is not None, "no step to observe"
        if outcome.accepted:
            for effect in pending.on_accept:
                effect()

    def _step(self, action: str, description: str, expect: Expect, **fields: object) -> Step:
        return Step(self.index, self.now, action, description, expect,
                    **fields)  # type: ignore[arg-type]

    def _next(self, prefix: str) -> str:
        self.counters[prefix] = self.counters.get(prefix, 0) + 1
        return f"{prefix}{self.counters[prefix]:05d}"

    def _file_name(self, kind: str) -> str:
        return f"{self.index:05d}-{kind}.csv"

    def _accept(self, effect: Callable[[], None]) -> None:
        assert self._pending is not None
        self._pending.on_accept.append(effect)

    def _advance_time(self) -> None:
        minutes = self.rng.choices([0, 1, 5, 10, 20, 40], weights=[8, 10, 30, 30, 15, 7])[0]
        self.now += timedelta(minutes=minutes)
        for underlying, price in self.prices.items():
            shock = self.rng.gauss(0.0, VOL_PER_SQRT_MINUTE[underlying] * math.sqrt(minutes))
            if self.rng.random() < JUMP_PROBABILITY:
                shock += self.rng.choice([-1, 1]) * self.rng.uniform(0.08, 0.30)
            self.prices[underlying] = min(max(price * math.exp(shock), START_PRICE[underlying]
                                              * 0.2), START_PRICE[underlying] * 5)

    def _choose(self) -> Step:
        day = self.now.date()
        if any(day + timedelta(days=d) not in self.listed_days
               for d in range(LISTING_HORIZON_DAYS + 1)):
            return self._listings_step()
        if self.rng.random() < PAST_JOB_PROBABILITY:
            past = self._past_job_step()
            if past is not None:
                return past
        actions: list[tuple[Callable[[], Step | None], int]] = [
            (self._marks_step, 20),
            (self._trades_step, 22),
            (self._deposits_step, 7),
            (self._withdrawals_step, 7),
            (self._job_step, 20),
            (self._bust_step, 4),
            (self._risk_step, 2),
            (self._accounts_step, 2),
            (self._margin_model_step, 1),
            (self._reimport_step, 5),
            (self._redelivery_step, 5),
        ]
        while True:
            chosen = self.rng.choices([a for a, _ in actions], weights=[w for _, w in actions])[0]
            step = chosen()
            if step is not None:
                return step

    # ------------------------------------------------------------ imports

    def _import(self, kind: str, rows: list[Row], description: str, expect: Expect,
                events: int | None, refusal_is_certain: bool = True) -> Step:
        name = self._file_name(kind)
        sent = SentFile(name, kind, tuple(rows), False, refusal_is_certain)
        self.files.append(sent)

        def accepted() -> None:
            sent.accepted = True

        self._accept(accepted)
        return self._step("import", f"import {kind} {name}: {description}", expect,
                          events=events, kind=kind, rows=tuple(rows), file=name)

    def _setup_step(self, kind: str) -> Step:
        if kind == "accounts":
            count = self.rng.randint(*MEMBERS_AT_START)
            rows = [self._new_account_row() for _ in range(count)]
            return self._accounts_import(rows, f"{count} members")
        if kind == "instruments":
            return self._listings_step()
        if kind == "marks":
            rows = self._mark_rows(self.now, every_instrument=True)
            return self._marks_import(rows, "opening marks of every index and instrument")
        rows = [self._deposit_row("ccp:insurance", "USDC", "250000")]
        for account_id in sorted(self.accounts):
            rows.append(self._deposit_row(account_id, "USDC",
                                          str(self.rng.randrange(20_000, 600_000))))
            if self.rng.random() < 0.4:
                asset = self.rng.choice(["BTC", "ETH"])
                rows.append(self._deposit_row(account_id, asset, self._collateral(asset)))
        return self._deposits_import(rows, "opening collateral")

    def _new_account_row(self) -> Row:
        account_id = self._next("m")
        model = "portfolio" if self.rng.random() < 0.35 else "standard"
        return {"account_id": account_id, "owner": f"Member {account_id[1:]}",
                "margin_model": model}

    def _accounts_import(self, rows: list[Row], description: str) -> Step:
        def opened() -> None:
            for row in rows:
                self.accounts[row["account_id"]] = (row["owner"], row["margin_model"])

        self._accept(opened)
        return self._import("accounts", rows, description, Expect.WRITTEN, len(rows))

    def _accounts_step(self) -> Step | None:
        if self.rng.random() < 0.3 and self.accounts:
            account_id = self.rng.choice(sorted(self.accounts))
            owner, model = self.accounts[account_id]
            row = {"account_id": account_id, "owner": owner + " Ltd", "margin_model": model}
            return self._import("accounts", [row], f"{account_id} again with another owner",
                                Expect.REFUSED, None)
        if len(self.accounts) >= MEMBERS_MAX:
            return None
        rows = [self._new_account_row() for _ in range(self.rng.randint(1, 2))]
        funding = [self._deposit_row(r["account_id"], "USDC",
                                     str(self.rng.randrange(20_000, 300_000))) for r in rows]
        step = self._accounts_import(rows, ", ".join(r["account_id"] for r in rows) + " join")
        self._accept(lambda: self._queued_deposits.extend(funding))
        return step

    # ------------------------------------------------------------ listings

    def _listings_step(self) -> Step:
        rows: list[Row] = []
        new: list[Listed] = []
        if not self.instruments:
            new += [Listed("BTC-PERP", "perpetual", "BTC", None),
                    Listed("ETH-PERP", "perpetual", "ETH", None, multiplier="0.1")]
        today = self.now.date()
        for offset in range(LISTING_HORIZON_DAYS + 1):
            day = today + timedelta(days=offset)
            if day in self.listed_days:
                continue
            self.listed_days.add(day)
            expiry = datetime(day.year, day.month, day.day, EXPIRY_HOUR, tzinfo=UTC)
            if expiry <= self.now:
                continue
            text = symbol_date(day)
            btc = round(self.prices["BTC"] / 1000) * 1000
            for strike in (btc - 3000, btc + 3000):
                for call in (True, False):
                    new.append(Listed(f"BTC-{text}-{strike}-{'C' if call else 'P'}", "option",
                                      "BTC", expiry, strike, call))
            if day.toordinal() % 3 == 1:
                eth = round(self.prices["ETH"] / 50) * 50
                for strike in (eth - 150, eth + 150):
                    new.append(Listed(f"ETH-{text}-{strike}-{'C' if strike > eth else 'P'}",
                                      "option", "ETH", expiry, strike, strike > eth,
                                      multiplier="0.1"))
            if day.toordinal() % 3 == 0:
                new.append(Listed(f"BTC-{text}", "future", "BTC", expiry))
                new.append(Listed(f"ETH-{text}", "future", "ETH", expiry))
        new = [x for x in new if x.symbol not in self.instruments]
        rows = [x.row() for x in new]
        if not rows:
            # Every expiry due is listed already: re-send yesterday's listing (nothing new).
            earlier = [f for f in self.files if f.kind == "instruments" and f.accepted]
            if earlier:
                return self._reimport(earlier[-1])
            rows = [self.instruments["BTC-PERP"].row()]
            return self._import("instruments", rows, "BTC-PERP listed again", Expect.NOTHING,
                                0)

        def listed() -> None:
            for x in new:
                self.instruments[x.symbol] = x
            self._queued_marks = [x.symbol for x in new]

        self._accept(listed)
        return self._import("instruments", rows, f"{len(rows)} listings "
                            f"({', '.join(x.symbol for x in new[:3])}"
                            f"{', ...' if len(new) > 3 else ''})", Expect.WRITTEN, len(rows))

    def live(self, at: datetime) -> list[Listed]:
        return [x for _, x in sorted(self.instruments.items()) if x.live_at(at)]

    def expired(self, at: datetime) -> list[Listed]:
        return [x for _, x in sorted(self.instruments.items()) if not x.live_at(at)]

    # ------------------------------------------------------------ marks

    def _instrument_price(self, x: Listed, at: datetime, iv: float | None = None) -> str:
        spot = self.prices[x.underlying]
        if x.kind != "option":
            return decimal_text(spot * (1 + self.rng.uniform(-0.002, 0.002)), 2)
        assert x.expiry is not None and x.strike is not None and x.call is not None
        years = max((x.expiry - at).total_seconds(), 60.0) / (365 * 24 * 3600)
        vol = iv if iv is not None else self._iv(x)
        return decimal_text(max(black76(x.call, spot, float(x.strike), vol, years), 0.5), 2)

    def _iv(self, x: Listed) -> float:
        assert x.strike is not None
        moneyness = math.log(x.strike / self.prices[x.underlying])
        return 0.55 + 0.8 * moneyness * moneyness

    def _mark_rows(self, at: datetime, every_instrument: bool = False,
                   symbols: list[str] | None = None) -> list[Row]:
        time = iso(at)
        rows = [{"time": time, "symbol": u, "price": decimal_text(self.prices[u], 2), "iv": ""}
                for u in ("BTC", "ETH")]
        live = self.live(at)
        if symbols is not None:
            chosen = [self.instruments[s] for s in symbols if self.instruments[s].live_at(at)]
        elif every_instrument:
            chosen = live
        else:
            delta_one = [x for x in live if x.kind != "option"]
            options = [x for x in live if x.kind == "option"]
            chosen = delta_one + self.rng.sample(options, min(len(options),
                                                              self.rng.randint(0, 6)))
        for x in chosen:
            iv = self._iv(x) if x.kind == "option" else None
            rows.append({"time": time, "symbol": x.symbol,
                         "price": self._instrument_price(x, at, iv),
                         "iv": "" if iv is None else decimal_text(iv, 4)})
        return [r for r in rows if (r["symbol"], r["time"]) not in self.marks]

    def _marks_import(self, rows: list[Row], description: str,
                      expect: Expect = Expect.WRITTEN) -> Step:
        new = [r for r in rows if (r["symbol"], r["time"]) not in self.marks]

        def published() -> None:
            for r in rows:
                self.marks[(r["symbol"], r["time"])] = (r["price"], r["iv"])

        self._accept(published)
        return self._import("marks", rows, description, expect,
                            len(new) if expect is Expect.WRITTEN else None)

    def _marks_step(self) -> Step | None:
        queued = self._queued_marks
        if queued:
            self._queued_marks = []
            rows = self._mark_rows(self.now, symbols=queued)
            if rows:
                return self._marks_import(rows, f"first marks of {len(queued)} new listings")
        late = self.rng.random() < LATE_PROBABILITY
        at = self.now - timedelta(minutes=self.rng.randint(1, LATE_MINUTES_MAX)) if late \
            else self.now
        rows = self._mark_rows(at)
        spoil = self.rng.random()
        if spoil < 0.04:
            rows.append({"time": iso(at), "symbol": UNKNOWN_SYMBOL, "price": "1", "iv": ""})
            return self._import("marks", rows, f"{len(rows)} marks, one of {UNKNOWN_SYMBOL}",
                                Expect.REFUSED, None)
        if spoil < 0.07:
            delta_one = [r for r in rows if r["symbol"] not in ("BTC", "ETH")
                         and self.instruments[r["symbol"]].kind != "option"]
            if delta_one:
                delta_one[0]["iv"] = "0.5"
                return self._import("marks", rows, f"{len(rows)} marks, an iv on "
                                    f"{delta_one[0]['symbol']}", Expect.REFUSED, None)
        if not rows:
            return None
        return self._marks_import(rows, f"{len(rows)} marks at {iso(at)}"
                                  f"{' (late)' if late else ''}")

    # ------------------------------------------------------------ collateral

    def _collateral(self, asset: str) -> str:
        if asset == "USDC":
            return positive_text(100, 100_000, self.rng.randint(0, 6), self.rng)
        scale = 1 if asset == "BTC" else 25
        return positive_text(0.01 * scale, 3 * scale, self.rng.randint(1, 8), self.rng)

    def _deposit_row(self, account_id: str, asset: str, amount: str,
                     at: datetime | None = None, ref: str | None = None) -> Row:
        return {"ref": ref or self._next("D"), "account_id": account_id, "asset": asset,
                "amount": amount, "time": iso(at or self.now)}

    def _deposits_import(self, rows: list[Row], description: str,
                         expect: Expect = Expect.WRITTEN, events: int | None = None) -> Step:
        def deposited() -> None:
            for r in rows:
                if r["ref"] not in self.deposits:
                    self.deposits[r["ref"]] = r
                    key = (r["account_id"], r["asset"])
                    self.net_deposits[key] = self.net_deposits.get(key, Decimal(0)) \
                        + Decimal(r["amount"])

        if expect is not Expect.REFUSED:
            self._accept(deposited)
        return self._import("deposits", rows, description, expect,
                            len(rows) if events is None and expect is Expect.WRITTEN
                            else events)

    def _late_time(self) -> datetime:
        if self.rng.random() < LATE_PROBABILITY:
            return self.now - timedelta(minutes=self.rng.randint(1, LATE_MINUTES_MAX))
        return self.now

    def _deposits_step(self) -> Step:
        queued = self._queued_deposits
        if queued:
            self._queued_deposits = []
            rows = [{**r, "time": iso(self.now)} for r in queued]
            return self._deposits_import(rows, "first collateral of new members")
        at = self._late_time()
        rows = []
        for _ in range(self.rng.choices([1, 2, 3], weights=[6, 3, 1])[0]):
            account_id = self.rng.choice(sorted(self.accounts))
            if self.rng.random() < 0.05:
                account_id = "ccp:insurance"
            asset = self.rng.choices(["USDC", "BTC", "ETH"], weights=[7, 2, 1])[0]
            rows.append(self._deposit_row(account_id, asset, self._collateral(asset), at))
        late = " (late)" if at != self.now else ""
        spoil = self.rng.random()
        if spoil < 0.03:
            rows.append(self._deposit_row(UNKNOWN_ACCOUNT, "USDC", "100", at))
            return self._deposits_import(rows, f"{len(rows)} deposits, one to an unknown "
                                         "account" + late, Expect.REFUSED)
        if spoil < 0.05:
            rows[0]["amount"] = "1.0000001" if rows[0]["asset"] == "USDC" else "0.000000001"
            return self._deposits_import(rows, f"{len(rows)} deposits, one finer than its "
                                         "asset" + late, Expect.REFUSED)
        return self._deposits_import(rows, f"{len(rows)} deposits ("
                                     + ", ".join(f"{r['amount']} {r['asset']} to "
                                                 f"{r['account_id']}" for r in rows) + ")"
                                     + late)

    def _withdrawals_step(self) -> Step | None:
        funded = sorted(k for k, v in self.net_deposits.items() if v > 0)
        if not funded:
            return None
        at = self._late_time()
        rows = []
        for _ in range(self.rng.choices([1, 2], weights=[4, 1])[0]):
            account_id, asset = self.rng.choice(funded)
            places = 6 if asset == "USDC" else 8
            amount = decimal_text(float(self.net_deposits[(account_id, asset)])
                                  * self.rng.uniform(0.05, 0.9), places)
            if Decimal(amount) <= 0:
                amount = "1" if asset == "USDC" else "0.001"
            rows.append({"ref": self._next("W"), "account_id": account_id, "asset": asset,
                         "amount": amount, "time": iso(at)})
        spoil = self.rng.random()
        expect = Expect.ANY
        description = ", ".join(f"{r['amount']} {r['asset']} from {r['account_id']}"
                                for r in rows)
        if spoil < 0.06:
            rows[-1]["amount"] = ABSURD_AMOUNT
            expect = Expect.REFUSED
            description += f" (the last for {ABSURD_AMOUNT}: beyond any balance)"
        elif spoil < 0.08:
            rows.append({"ref": self._next("W"), "account_id": UNKNOWN_ACCOUNT,
                         "asset": "USDC", "amount": "1", "time": iso(at)})
            expect = Expect.REFUSED
            description += f", 1 USDC from {UNKNOWN_ACCOUNT}"

        def withdrawn() -> None:
            for r in rows:
                self.withdrawals[r["ref"]] = r
                key = (r["account_id"], r["asset"])
                self.net_deposits[key] = self.net_deposits[key] - Decimal(r["amount"])

        if expect is Expect.ANY:
            self._accept(withdrawn)
        step = self._import("withdrawals", rows, f"{len(rows)} withdrawals ({description})"
                            + (" (late)" if at != self.now else ""), expect,
                            len(rows) if expect is Expect.ANY else None,
                            refusal_is_certain=expect is Expect.REFUSED)
        return step

    # ------------------------------------------------------------ trades

    def _members(self) -> list[str]:
        return sorted(self.accounts)

    def _pair(self) -> tuple[str, str]:
        members = self._members()
        buyer, seller = self.rng.sample(members, 2)
        if self.rng.random() < 0.04:
            # Closing (or opening) against the liquidation account, as a liquidator would.
            if self.rng.random() < 0.5:
                buyer = "ccp:liquidation"
            else:
                seller = "ccp:liquidation"
        return buyer, seller

    def _quantity(self, x: Listed) -> str:
        if x.kind == "option":
            return positive_text(0.1, 5, self.rng.randint(0, 2), self.rng)
        scale = (1.0 if x.underlying == "BTC" else 10.0) / float(x.multiplier)
        return positive_text(0.01 * scale, 3 * scale, self.rng.randint(1, 4), self.rng)

    def settled(self, symbol: str) -> bool:
        """Whether the instrument has settled: a settlement accepted at or after its expiry
        settles every instrument then due (one without a price refuses the whole batch)."""
        x = self.instruments.get(symbol)
        settled_until = self.job_times.get("settle", T0 - timedelta(days=1))
        return x is not None and x.expiry is not None and x.expiry <= settled_until

    def _redeliverable(self, sent: SentFile) -> bool:
        """Files the workload sends again. While `KNOWN_BUG_TRADES_AGAIN_AFTER_SETTLEMENT`
        holds, a trades file naming an instrument that has since settled is left out: the
        ledger refuses it instead of recognising it (an open bug, see `test_found_bugs.py`)."""
        return not (KNOWN_BUG_TRADES_AGAIN_AFTER_SETTLEMENT and sent.kind == "trades"
                    and any(self.settled(r["instrument"]) for r in sent.rows))

    def _legs(self, at: datetime) -> list[Leg]:
        """The legs of one trade (good but for a late one in an instrument settled since):
        a single leg, a spread, a straddle or a hedge."""
        live = self.live(at)
        buyer, seller = self._pair()
        shape = self.rng.choices(["single", "spread", "straddle", "hedge"],
                                 weights=[70, 10, 10, 10])[0]
        options = [x for x in live if x.kind == "option"]
        sides: list[tuple[Listed, str, str]]
        if shape == "spread" and len(options) >= 2:
            a, b = self.rng.sample(options, 2)
            sides = [(a, buyer, seller), (b, seller, buyer)]
        elif shape == "straddle" and options:
            a = self.rng.choice(options)
            twins = [x for x in options if x.expiry == a.expiry and x.strike == a.strike
                     and x.underlying == a.underlying and x is not a]
            sides = [(a, buyer, seller)] + [(t, buyer, seller) for t in twins[:1]]
        elif shape == "hedge" and options:
            a = self.rng.choice(options)
            sides = [(self.instruments[f"{a.underlying}-PERP"], buyer, seller),
                     (a, seller, buyer)]
        else:
            weights = [3 if x.kind != "option" else 1 for x in live]
            sides = [(self.rng.choices(live, weights=weights)[0], buyer, seller)]
        return [Leg(x.symbol, b, s, self._quantity(x), self._instrument_price(x, at),
                    self._fee(), self._fee()) for x, b, s in sides]

    def _fee(self) -> str:
        return self.rng.choice(["0", "0", "0.5", "1.25", "2", "0.000001"])

    @staticmethod
    def _trade_rows(trade_id: str, legs: list[Leg], at: datetime) -> list[Row]:
        return [{"trade_id": trade_id, "leg": str(n), "instrument": x.instrument,
                 "buyer": x.buyer, "seller": x.seller, "quantity": x.quantity,
                 "price": x.price, "buyer_fee": x.buyer_fee, "seller_fee": x.seller_fee,
                 "time": iso(at)}
                for n, x in enumerate(legs, start=1)]

    def _trades_step(self) -> Step | None:
        at = self._late_time()
        if not self.live(at) or len(self.accounts) < 2:
            return None
        trades: list[list[Row]] = []
        spoilt = ""
        for _ in range(self.rng.choices([1, 2, 3], weights=[7, 2, 1])[0]):
            legs = self._legs(at)
            if not spoilt and self.rng.random() < 0.1:
                spoilt = self._spoil(legs, at)
            trades.append(self._trade_rows(self._next("T"), legs, at))
        rows = [r for t in trades for r in t]
        late = " (late)" if at != self.now else ""
        shapes = ", ".join(f"{t[0]['trade_id']}: " + "/".join(r["instrument"] for r in t)
                           for t in trades)
        settled = sorted({r["instrument"] for r in rows if self.settled(r["instrument"])})
        if settled and not spoilt:
            spoilt = f"late in {', '.join(settled)}, settled since"
        if spoilt:
            return self._import("trades", rows, f"{len(trades)} trades ({shapes}), {spoilt}"
                                + late, Expect.REFUSED, None)

        def cleared() -> None:
            for t in trades:
                self.trades[t[0]["trade_id"]] = TradeSent(tuple(t), "cleared")

        self._accept(cleared)
        return self._import("trades", rows, f"{len(trades)} trades ({shapes})" + late,
                            Expect.WRITTEN, len(trades))

    def _spoil(self, legs: list[Leg], at: datetime) -> str:
        """Spoil one leg with one of SPEC section 4's reasons to refuse a trade."""
        index = self.rng.randrange(len(legs))
        x = legs[index]
        expired = self.expired(at)
        reasons = ["unknown instrument", "same account", "unknown account", "fine fee",
                   "zero quantity"] + (["expired"] * 2 if expired else [])
        reason = self.rng.choice(reasons)
        if reason == "unknown instrument":
            x.instrument = UNKNOWN_SYMBOL
        elif reason == "same account":
            x.seller = x.buyer
        elif reason == "unknown account":
            x.seller = UNKNOWN_ACCOUNT
        elif reason == "zero quantity":
            x.quantity = "0"
        elif reason == "expired":
            x.instrument = self.rng.choice(expired).symbol
        else:
            x.buyer_fee = "0.0000001"
        return f"leg {x.instrument} spoilt: {reason}"

    # ------------------------------------------------------------ busts

    def _bust_step(self) -> Step | None:
        if not self.trades:
            return None
        choice = self.rng.random()
        if choice < 0.08:
            trade_id = self._next("NOSUCH")
            return self._step("bust", f"bust {trade_id}, a trade never cleared",
                              Expect.REFUSED, trade_id=trade_id)
        candidates = sorted(self.trades)
        if choice < 0.2:
            busted = [t for t in candidates if self.trades[t].status == "busted"]
            if busted:
                trade_id = self.rng.choice(busted)
                return self._step("bust", f"bust {trade_id} again", Expect.REFUSED,
                                  trade_id=trade_id)
        recent = candidates[-40:]
        trade_id = self.rng.choice(recent)
        sent = self.trades[trade_id]
        symbols = {r["instrument"] for r in sent.rows}
        expired = [s for s in symbols if not self.instruments[s].live_at(self.now)]
        if sent.status == "busted":
            expect = Expect.REFUSED
        elif expired:
            expect = Expect.ANY
        else:
            expect = Expect.WRITTEN

        def busted_now() -> None:
            sent.status = "busted"

        if expect is not Expect.REFUSED:
            self._accept(busted_now)
        return self._step("bust", f"bust {trade_id} ({'/'.join(sorted(symbols))})"
                          + (f"; {', '.join(sorted(expired))} expired" if expired else ""),
                          expect, events=1 if expect is not Expect.REFUSED else None,
                          trade_id=trade_id)

    # ------------------------------------------------------------ jobs

    def _job_step(self) -> Step:
        job = self.rng.choices([*JOBS, "eod", "rerun"], weights=[8, 25, 10, 5, 15, 20, 4, 7])[0]
        if job == "rerun" and self.job_times:
            name = self.rng.choice(sorted(self.job_times))
            at = self.job_times[name]
            return self._step("job", f"run {name} at {iso(at)} again", Expect.NOTHING,
                              events=0, job=name, at=at)
        if job == "rerun":
            job = "mtm"
        names = EOD_ORDER if job == "eod" else (job,)
        done = all(self.job_times.get(n) == self.now for n in names)
        fresh = all(self.job_times.get(n, T0 - timedelta(days=1)) < self.now for n in names)
        if done:
            return self._step("job", f"run {job} at {iso(self.now)}, already run then",
                              Expect.NOTHING, events=0, job=job, at=self.now)
        if not fresh:
            job = next(n for n in names if self.job_times.get(n) != self.now)
            names = (job,)
        # A settlement may be refused (no index mark in the 24 hours before an expiry).
        expect = Expect.ANY if "settle" in names else Expect.WRITTEN
        at = self.now

        def ran() -> None:
            for n in names:
                self.job_times[n] = at

        self._accept(ran)
        return self._step("job", f"run {job} at {iso(at)}", expect, job=job, at=at)

    def _past_job_step(self) -> Step | None:
        job = self.rng.choice(["mtm", "margin", "funding", "liquidate"])
        at = self.now - timedelta(minutes=self.rng.randint(1, 90))
        if at <= self.job_times.get(job, T0) or at <= T0:
            return None

        def ran() -> None:
            self.job_times[job] = max(self.job_times.get(job, at), at)

        self._accept(ran)
        return self._step("job", f"run {job} for {iso(at)}, earlier than facts already "
                          "recorded (decided from a replay as of then)", Expect.WRITTEN,
                          job=job, at=at)

    # ------------------------------------------------------------ risk parameters

    def _risk_step(self) -> Step:
        spoil = self.rng.random()
        if spoil < 0.1:
            return self._step("risk", "set haircut_typo[BTC] = 0.2", Expect.REFUSED,
                              name="haircut_typo", underlying="BTC", value="0.2")
        if spoil < 0.15:
            return self._step("risk", "set haircut[BTC] = 1.5", Expect.REFUSED,
                              name="haircut", underlying="BTC", value="1.5")
        if spoil < 0.2:
            return self._step("risk", "set haircut without an underlying", Expect.REFUSED,
                              name="haircut", underlying=None, value="0.2")
        if spoil < 0.35 and self.risk_commands:
            name, underlying, value, at = self.rng.choice(self.risk_commands)
            return self._step("risk", f"set {name}[{underlying or '-'}] = {value} at "
                              f"{iso(at)} again (the same command replayed)", Expect.NOTHING,
                              events=0, name=name, underlying=underlying, value=value, at=at)
        name, underlying, low, high = self.rng.choice(RISK_CHANGES)
        value = decimal_text(self.rng.uniform(low, high), 3)
        at = self.now
        command = (name, underlying, value, at)
        if any(c[:2] == command[:2] and c[3] == at for c in self.risk_commands):
            return self._step("risk", f"set {name}[{underlying or '-'}] = {value} at "
                              f"{iso(at)}, a second value at the same moment",
                              Expect.REFUSED, name=name, underlying=underlying, value=value,
                              at=at)
        self._accept(lambda: self.risk_commands.append(command))
        return self._step("risk", f"set {name}[{underlying or '-'}] = {value}",
                          Expect.WRITTEN, events=1, name=name, underlying=underlying,
                          value=value, at=at)

    def _margin_model_step(self) -> Step:
        if self.rng.random() < 0.1:
            return self._step("margin_model", f"move {UNKNOWN_ACCOUNT} to portfolio margin",
                              Expect.REFUSED, account_id=UNKNOWN_ACCOUNT, value="portfolio")
        account_id = self.rng.choice(self._members())
        owner, model = self.accounts[account_id]
        if self.rng.random() < 0.2:
            return self._step("margin_model", f"move {account_id} to {model} margin, where "
                              "it is already", Expect.NOTHING, events=0,
                              account_id=account_id, value=model)
        other = "portfolio" if model == "standard" else "standard"

        def moved() -> None:
            self.accounts[account_id] = (owner, other)

        self._accept(moved)
        return self._step("margin_model", f"move {account_id} to {other} margin",
                          Expect.WRITTEN, events=1, account_id=account_id, value=other)

    # ------------------------------------------------------------ deliveries again

    def _reimport(self, sent: SentFile) -> Step:
        if sent.accepted:
            expect, events = Expect.NOTHING, 0
        else:
            expect, events = Expect.REFUSED, None
        return self._step("reimport", f"import {sent.kind} {sent.name} again", expect,
                          events=events, kind=sent.kind, file=sent.name)

    def _reimport_step(self) -> Step | None:
        candidates = [f for f in self.files if (f.accepted or f.refusal_is_certain)
                      and self._redeliverable(f)]
        if not candidates:
            return None
        recent = candidates[-60:]
        return self._reimport(self.rng.choice(recent))

    def _redelivery_step(self) -> Step | None:
        """The same facts in a new file: alone (nothing new), with new rows (only those are
        written), or with one of them changed (refused: a correction is a new fact)."""
        kind = self.rng.choices(["deposits", "trades", "marks", "withdrawals", "instruments",
                                 "accounts"], weights=[4, 4, 4, 3, 1, 1])[0]
        earlier = [f for f in self.files[-80:] if f.kind == kind and f.accepted
                   and self._redeliverable(f)]
        if not earlier:
            return None
        sent = self.rng.choice(earlier)
        rows = [dict(r) for r in sent.rows]
        how = self.rng.choice(["same", "same", "more", "changed"])
        if kind in ("withdrawals", "instruments", "accounts") and how == "more":
            how = "same"
        if how == "same":
            return self._import(kind, rows, f"the rows of {sent.name} delivered again",
                                Expect.NOTHING, 0)
        if how == "changed":
            row = rows[self.rng.randrange(len(rows))]
            field_ = {"deposits": "amount", "withdrawals": "amount", "trades": "quantity",
                      "marks": "price", "instruments": "multiplier", "accounts": "owner"}[kind]
            if kind == "accounts":
                row[field_] += " Holdings"
            else:
                row[field_] = format(Decimal(row[field_]) + Decimal("1"), "f")
            key = row.get("ref") or row.get("trade_id") or row.get("account_id") or \
                f"{row['symbol']}@{row.get('time', '')}"
            return self._import(kind, rows, f"the rows of {sent.name} again, {key}'s "
                                f"{field_} changed", Expect.REFUSED, None)
        if kind == "deposits":
            extra = [self._deposit_row(self.rng.choice(self._members()), "USDC",
                                       self._collateral("USDC"))]
            step = self._deposits_import(rows + extra, f"the rows of {sent.name} again and "
                                         f"{extra[0]['ref']}", events=1)
            return step
        if kind == "marks":
            extra = self._mark_rows(self.now)[:2]
            if not extra:
                return None
            return self._marks_import(rows + extra, f"the rows of {sent.name} again and "
                                      f"{len(extra)} new marks")
        legs = self._legs(self.now)
        trade_id = self._next("T")
        extra = self._trade_rows(trade_id, legs, self.now)

        def cleared() -> None:
            self.trades[trade_id] = TradeSent(tuple(extra), "cleared")

        self._accept(cleared)
        return self._import("trades", rows + extra, f"the rows of {sent.name} again and "
                            f"{trade_id}", Expect.WRITTEN, 1)
