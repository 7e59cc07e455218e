"""A simulated crypto derivatives market for `clearing demo`, generated from a seed.

Nothing here touches the ledger: it writes what a venue and custodians would send (accounts,
listings, deposits, trades, marks) as rows in the shapes of SPEC section 3, in time order,
so that the demo can feed them through the real imports and run the real jobs between them.

The market: BTC and ETH index prices follow a random walk with a sharp crash in the middle of
the run; BTC and ETH perpetuals; a BTC future and a strip of BTC calls and puts expiring every
day at 08:00 UTC; members trading futures, perpetuals, single options and multi-leg option
strategies (call spreads, straddles, covered calls); a few highly leveraged "whales" long
perpetuals whom the crash bankrupts beyond what the small insurance fund can cover, so that
auto-deleveraging has to step in.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal

from clearing.domain.instruments import format_symbol_date
from clearing.domain.pricing import black76

EXPIRY_HOUR = 8
HOURLY_VOL = {"BTC": 0.6 / math.sqrt(24 * 365), "ETH": 0.75 / math.sqrt(24 * 365)}
START_PRICE = {"BTC": 95_000.0, "ETH": 3_400.0}
CRASH_HOUR = 13
CRASH_GAP = -0.22
"""The crash: the index gaps down 20% within one hour, faster than the hourly margin checks."""
AFTERSHOCK_HOURS = 4
AFTERSHOCK_DRIFT = -0.012
STRIKE_MONEYNESS = (0.9, 0.95, 1.0, 1.05, 1.1)
BASE_IV = 0.6
TWAP_EXTRA_MARKS = (timedelta(hours=7, minutes=40), timedelta(hours=7, minutes=50))
INSURANCE_SEED = "15000"
WHALES_MIN = 3
MAKERS = 4

Row = dict[str, str]


def _q(value: float, places: int) -> str:
    return str(Decimal(repr(value)).quantize(Decimal(1).scaleb(-places)))


@dataclass
class Step:
    """What happens up to `at`: the rows to import, then the jobs to run at `at`."""

    at: datetime
    marks: list[Row] = field(default_factory=list)
    trades: list[Row] = field(default_factory=list)
    jobs: list[str] = field(default_factory=list)


@dataclass
class Market:
    start: datetime
    days: int
    accounts: list[Row]
    instruments: list[Row]
    deposits: list[Row]
    steps: list[Step]
    whales: list[str]
    crash_day: int
    index_path: dict[str, list[tuple[datetime, float]]]


def expiry_of(start: datetime, day: int) -> datetime:
    return start + timedelta(days=day, hours=EXPIRY_HOUR)


def future_symbol(underlying: str, expiry: datetime) -> str:
    return f"{underlying}-{format_symbol_date(expiry.date())}"


def option_symbol(expiry: datetime, strike: int, option_type: str) -> str:
    return f"BTC-{format_symbol_date(expiry.date())}-{strike}-{option_type[0].upper()}"


class _Simulator:
    def __init__(self, accounts: int, days: int, seed: int, start: datetime) -> None:
        self.rng = random.Random(seed)
        self.n_accounts = accounts
        self.days = days
        self.start = start
        self.crash_day = max(1, days // 2)
        self.names = [f"m{i:04d}" for i in range(1, accounts + 1)]
        n_whales = max(WHALES_MIN, accounts // 40)
        self.makers = self.names[:MAKERS]
        self.whales = self.names[MAKERS:MAKERS + n_whales]
        self.traders = self.names[MAKERS + n_whales:] or self.names
        self.trade_no = 0
        self.prices: dict[str, float] = dict(START_PRICE)
        self.path: dict[str, list[tuple[datetime, float]]] = {"BTC": [], "ETH": []}
        self.strikes: dict[int, list[int]] = {}

    # ------------------------------------------------------------ reference data

    def accounts(self) -> list[Row]:
        rows = []
        for name in self.names:
            model = "portfolio" if self.rng.random() < 0.35 and name not in self.whales \
                else "standard"
            rows.append({"account_id": name, "owner": f"Member {name[1:]}",
                         "margin_model": model})
        return rows

    def instruments(self) -> list[Row]:
        rows = [self._listing(f"{u}-PERP", "perpetual", u, None) for u in ("BTC", "ETH")]
        for day in range(1, self.days + 2):
            expiry = expiry_of(self.start, day)
            rows.append(self._listing(future_symbol("BTC", expiry), "future", "BTC", expiry))
            spot = START_PRICE["BTC"]
            strikes = sorted({int(round(spot * k / 1000.0)) * 1000 for k in STRIKE_MONEYNESS})
            self.strikes[day] = strikes
            for strike in strikes:
                for option_type in ("call", "put"):
                    rows.append(self._listing(option_symbol(expiry, strike, option_type),
                                              "option", "BTC", expiry, strike, option_type))
        return rows

    @staticmethod
    def _listing(symbol: str, kind: str, underlying: str, expiry: datetime | None,
                 strike: int | None = None, option_type: str | None = None) -> Row:
        return {"symbol": symbol, "kind": kind, "underlying": underlying,
                "settlement_asset": "USDC", "expiry": expiry.isoformat() if expiry else "",
                "strike": str(strike) if strike else "", "option_type": option_type or "",
                "multiplier": "1"}

    def deposits(self) -> list[Row]:
        at = self.start.isoformat()
        rows = [{"ref": "seed-insurance-fund", "account_id": "ccp:insurance", "asset": "USDC",
                 "amount": INSURANCE_SEED, "time": at}]
        for name in self.names:
            if name in self.makers:
                usdc = 5_000_000
            elif name in self.whales:
                usdc = self.rng.randrange(60_000, 90_000)
            else:
                usdc = self.rng.randrange(40_000, 400_000)
            rows.append({"ref": f"dep-{name}-usdc", "account_id": name, "asset": "USDC",
                         "amount": str(usdc), "time": at})
            if name in self.traders and self.rng.random() < 0.3:
                asset = self.rng.choice(["BTC", "ETH"])
                amount = _q(self.rng.uniform(0.5, 3.0) * (1 if asset == "BTC" else 15), 4)
                rows.append({"ref": f"dep-{name}-{asset.lower()}", "account_id": name,
                             "asset": asset, "amount": amount, "time": at})
        return rows

    # ------------------------------------------------------------ the days

    def steps(self) -> list[Step]:
        steps: list[Step] = []
        for day in range(self.days):
            for hour in range(24):
                at = self.start + timedelta(days=day, hours=hour)
                self._walk(at, day, hour)
                step = Step(at)
                step.marks = self._marks(at, day)
                if hour == EXPIRY_HOUR - 1:
                    for extra in TWAP_EXTRA_MARKS:
                        when = self.start + timedelta(days=day) + extra
                        step.marks += self._index_marks(when)
                if 9 <= hour <= 22:
                    step.trades = self._trades(at, day, hour)
                step.jobs = self._jobs(day, hour)
                steps.append(step)
        return steps

    def _walk(self, at: datetime, day: int, hour: int) -> None:
        crash_day = day == self.crash_day
        aftershock = crash_day and CRASH_HOUR < hour <= CRASH_HOUR + AFTERSHOCK_HOURS
        recovering = crash_day and hour > CRASH_HOUR + AFTERSHOCK_HOURS
        for underlying in ("BTC", "ETH"):
            if at != self.start:
                shock = self.rng.gauss(0.0, HOURLY_VOL[underlying])
                if crash_day and hour == CRASH_HOUR:
                    shock = CRASH_GAP * (1.15 if underlying == "ETH" else 1.0)
                elif aftershock:
                    shock += AFTERSHOCK_DRIFT
                elif recovering:
                    shock += 0.004
                self.prices[underlying] *= math.exp(shock)
            self.path[underlying].append((at, self.prices[underlying]))

    def _index_marks(self, at: datetime) -> list[Row]:
        return [{"time": at.isoformat(), "symbol": u, "price": _q(self.prices[u], 2), "iv": ""}
                for u in ("BTC", "ETH")]

    def _marks(self, at: datetime, day: int) -> list[Row]:
        rows = self._index_marks(at)
        for underlying in ("BTC", "ETH"):
            premium = 1 + self.rng.uniform(-0.0008, 0.0012)
            rows.append({"time": at.isoformat(), "symbol": f"{underlying}-PERP",
                         "price": _q(self.prices[underlying] * premium, 2), "iv": ""})
        for expiry_day in (day, day + 1):
            if expiry_day < 1:
                continue
            expiry = expiry_of(self.start, expiry_day)
            if expiry <= at:
                continue
            rows.append({"time": at.isoformat(), "symbol": future_symbol("BTC", expiry),
                         "price": _q(self.prices["BTC"], 2), "iv": ""})
            for strike in self.strikes[expiry_day]:
                for option_type in ("call", "put"):
                    price, iv = self._option_price(at, expiry, strike, option_type)
                    rows.append({"time": at.isoformat(),
                                 "symbol": option_symbol(expiry, strike, option_type),
                                 "price": price, "iv": _q(iv, 4)})
        return rows

    def _option_price(self, at: datetime, expiry: datetime, strike: int,
                      option_type: str) -> tuple[str, float]:
        spot = self.prices["BTC"]
        moneyness = math.log(strike / spot)
        iv = BASE_IV * (1 + 0.8 * moneyness * moneyness) + (0.35 if spot < 80_000 else 0.0)
        years = max((expiry - at).total_seconds(), 60.0) / (365 * 24 * 3600)
        value = black76(option_type, spot, float(strike), iv, years).price  # type: ignore[arg-type]
        return _q(max(value, 1.0), 2), iv

    def _next_trade_id(self) -> str:
        self.trade_no += 1
        return f"T{self.trade_no:06d}"

    def _trades(self, at: datetime, day: int, hour: int) -> list[Row]:
        rows: list[Row] = []
        if day == 0 and hour == 9:
            rows += self._whale_positions(at)
        expiry_day = day + 1
        per_hour = max(1, self.n_accounts // 14)
        for _ in range(per_hour):
            kind = self.rng.random()
            if kind < 0.4:
                rows += self._delta_one_trade(at, expiry_day)
            elif kind < 0.7:
                rows += self._option_trade(at, expiry_day)
            else:
                rows += self._strategy_trade(at, expiry_day)
        return rows

    def _leg(self, trade_id: str, leg: int, symbol: str, buyer: str, seller: str,
             quantity: float, price: str, at: datetime) -> Row:
        return {"trade_id": trade_id, "leg": str(leg), "instrument": symbol, "buyer": buyer,
                "seller": seller, "quantity": _q(quantity, 1), "price": price,
                "buyer_fee": "1.5", "seller_fee": "1.5", "time": at.isoformat()}

    def _whale_positions(self, at: datetime) -> list[Row]:
        """Each whale buys a perpetual position worth about 10 times its collateral."""
        rows = []
        for i, whale in enumerate(self.whales):
            maker = self.makers[i % len(self.makers)]
            rows.append(self._leg(self._next_trade_id(), 1, "BTC-PERP", whale, maker,
                                  self.rng.uniform(6.0, 8.0), _q(self.prices["BTC"], 2), at))
        return rows

    def _pair(self) -> tuple[str, str]:
        a, b = self.rng.sample(self.traders + self.makers, 2)
        return a, b

    def _delta_one_trade(self, at: datetime, expiry_day: int) -> list[Row]:
        buyer, seller = self._pair()
        underlying = "BTC" if self.rng.random() < 0.75 else "ETH"
        if underlying == "BTC" and self.rng.random() < 0.4:
            symbol = future_symbol("BTC", expiry_of(self.start, expiry_day))
        else:
            symbol = f"{underlying}-PERP"
        size = self.rng.uniform(0.1, 1.5) * (1 if underlying == "BTC" else 10)
        return [self._leg(self._next_trade_id(), 1, symbol, buyer, seller, size,
                          _q(self.prices[underlying], 2), at)]

    def _option(self, at: datetime, expiry_day: int, strike: int, option_type: str
                ) -> tuple[str, str]:
        expiry = expiry_of(self.start, expiry_day)
        return option_symbol(expiry, strike, option_type), \
            self._option_price(at, expiry, strike, option_type)[0]

    def _option_trade(self, at: datetime, expiry_day: int) -> list[Row]:
        buyer, seller = self._pair()
        strike = self.rng.choice(self.strikes[expiry_day])
        symbol, price = self._option(at, expiry_day, strike, self.rng.choice(["call", "put"]))
        return [self._leg(self._next_trade_id(), 1, symbol, buyer, seller,
                          self.rng.uniform(0.1, 1.0), price, at)]

    def _strategy_trade(self, at: datetime, expiry_day: int) -> list[Row]:
        """A call spread, a straddle or a covered call, cleared all legs or none."""
        holder, other = self._pair()
        strikes = self.strikes[expiry_day]
        size = self.rng.uniform(0.1, 1.0)
        trade_id = self._next_trade_id()
        choice = self.rng.random()
        if choice < 0.4:
            low, high = sorted(self.rng.sample(strikes, 2))
            (s1, p1), (s2, p2) = (self._option(at, expiry_day, low, "call"),
                                  self._option(at, expiry_day, high, "call"))
            return [self._leg(trade_id, 1, s1, holder, other, size, p1, at),
                    self._leg(trade_id, 2, s2, other, holder, size, p2, at)]
        if choice < 0.75:
            strike = min(strikes, key=lambda k: abs(k - self.prices["BTC"]))
            (s1, p1), (s2, p2) = (self._option(at, expiry_day, strike, "call"),
                                  self._option(at, expiry_day, strike, "put"))
            return [self._leg(trade_id, 1, s1, holder, other, size, p1, at),
                    self._leg(trade_id, 2, s2, holder, other, size, p2, at)]
        strike = max(strikes)
        symbol, premium = self._option(at, expiry_day, strike, "call")
        return [self._leg(trade_id, 1, "BTC-PERP", holder, other, size,
                          _q(self.prices["BTC"], 2), at),
                self._leg(trade_id, 2, symbol, other, holder, size, premium, at)]

    def _jobs(self, day: int, hour: int) -> list[str]:
        jobs = []
        if hour == EXPIRY_HOUR:
            jobs.append("settle")
        crash_watch = day == self.crash_day and hour >= CRASH_HOUR
        if hour % 4 == 0 or crash_watch:
            jobs.append("mtm")
        if hour % 8 == 0:
            jobs.append("funding")
        if hour == 0:
            jobs.append("risk")
        if hour % 4 == 0 or crash_watch:
            jobs += ["liquidate", "margin"]
        return jobs


def simulate(accounts: int, days: int, seed: int, start: datetime) -> Market:
    sim = _Simulator(accounts, days, seed, start)
    accounts_rows = sim.accounts()
    instruments = sim.instruments()
    deposits = sim.deposits()
    steps = sim.steps()
    return Market(start, days, accounts_rows, instruments, deposits, steps, sim.whales,
                  sim.crash_day, sim.path)
