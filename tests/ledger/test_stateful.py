"""Random back-office days against a real database, every invariant checked after every step.

A hypothesis state machine deposits, withdraws (sometimes more than there is), clears single-
and multi-leg trades (some of which must be refused: unknown or expired instruments, the same
account on both sides, fees finer than USDC, a trade id reused for other terms), busts trades
(sometimes twice), publishes marks and re-imports files it imported before. After each step:
`clearing verify`'s checks all pass, and the ledger's balances, positions and event count equal
those of a small independent model kept here with plain Decimals.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from pathlib import Path

import pytest
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from clearing.backoffice.csvinput import InputRejected
from clearing.domain.rejections import TradeAlreadyBusted, TradeNotFound
from tests.conftest import BACKENDS, Backend, make_backend
from tests.ledger.harness import LedgerHarness, Leg, iso, listing_row

SETTINGS = settings(max_examples=15, stateful_step_count=15, deadline=None)

T0 = datetime(2026, 11, 2, 12, 0, tzinfo=UTC)
MEMBERS = ("alice", "bob", "carol")
EXTERNAL, FEES, ROUNDING = "ccp:external", "ccp:fees", "ccp:rounding"
USDC_QUANTUM = Decimal("0.000001")
SCALE = {"USDC": 6, "BTC": 8}

# symbol -> (multiplier, expiry, is an option)
EXPIRY = datetime(2026, 12, 27, 8, 0, tzinfo=UTC)
LISTED = {
    "BTC-27DEC26-100000-C": (Decimal("1"), EXPIRY, True),
    "ETH-27DEC26-3000-P": (Decimal("0.1"), EXPIRY, True),
    "BTC-27DEC26": (Decimal("1"), EXPIRY, False),
    "BTC-PERP": (Decimal("0.01"), None, False),
    "BTC-26JUN26": (Decimal("1"), datetime(2026, 6, 26, 8, 0, tzinfo=UTC), False),
}
EXPIRED = "BTC-26JUN26"
LIVE = [symbol for symbol in LISTED if symbol != EXPIRED]
UNLISTED = "ETH-27DEC26"
SEED_MARKS = [("BTC", "96000", ""), ("ETH", "3400", ""),
              ("BTC-27DEC26-100000-C", "1500", "0.55"), ("ETH-27DEC26-3000-P", "60", "0.7"),
              ("BTC-27DEC26", "96100", ""), ("BTC-PERP", "96050", ""), (EXPIRED, "70000", "")]
KNOWN_TRADERS = {*MEMBERS, "ccp:liquidation"}
MARKABLE = ["BTC", "ETH", *LISTED, UNLISTED]


def text(value: Decimal) -> str:
    return format(value, "f")


def decimals(low: str, high: str, places: int) -> st.SearchStrategy[Decimal]:
    return st.decimals(min_value=Decimal(low), max_value=Decimal(high), places=places,
                       allow_nan=False, allow_infinity=False)


def amounts(asset: str) -> st.SearchStrategy[Decimal]:
    return decimals("0.000001", "50000", SCALE[asset]) if asset == "USDC" else \
        decimals("0.00000001", "20", SCALE[asset])


quantities = st.integers(0, 8).flatmap(lambda p: decimals("0.00000001", "25", p))
prices = st.integers(0, 8).flatmap(lambda p: decimals("0.00000001", "150000", p))
fees = st.one_of(st.just(Decimal(0)), st.integers(0, 6).flatmap(lambda p: decimals("0", "5", p)))
good_legs = st.builds(
    lambda instrument, pair, qty, price, bf, sf: Leg(
        instrument, pair[0], pair[1], text(qty), text(price), text(bf), text(sf)),
    instrument=st.sampled_from(LIVE),
    pair=st.permutations([*MEMBERS, "ccp:liquidation"]).map(lambda p: (p[0], p[1])),
    qty=quantities, price=prices, bf=fees, sf=fees,
)
SPOILS = [None] * 6 + ["unlisted", "expired", "same account", "unknown account", "zero qty",
                       "fine fee", "after expiry"]
"""Most trades are good; the rest carry one of SPEC section 4's reasons to refuse."""


def spoilt(trade: list[Leg], spoil: str | None, index: int) -> list[Leg]:
    x = trade[index % len(trade)]
    bad = {
        None: x,
        "unlisted": Leg(UNLISTED, x.buyer, x.seller, x.qty, x.price),
        "expired": Leg(EXPIRED, x.buyer, x.seller, x.qty, x.price),
        "same account": Leg(x.instrument, x.buyer, x.buyer, x.qty, x.price),
        "unknown account": Leg(x.instrument, x.buyer, "mallory", x.qty, x.price),
        "zero qty": Leg(x.instrument, x.buyer, x.seller, "0", x.price),
        "fine fee": Leg(x.instrument, x.buyer, x.seller, x.qty, x.price, "0.0000001"),
        "after expiry": Leg("BTC-27DEC26", x.buyer, x.seller, x.qty, x.price),
    }[spoil]
    return [bad if i == index % len(trade) else leg for i, leg in enumerate(trade)]


times = st.integers(0, 1000).map(lambda h: T0 + timedelta(hours=h))
"""Up to 41 days after T0, before the 27DEC26 expiry."""
AFTER_EXPIRY = EXPIRY + timedelta(hours=1)


def leg_is_clearable(x: Leg, at: datetime) -> bool:
    """SPEC section 4's refusals, restated independently of the product."""
    if x.instrument not in LISTED or x.buyer == x.seller:
        return False
    if x.buyer not in KNOWN_TRADERS or x.seller not in KNOWN_TRADERS:
        return False
    if Decimal(x.qty) <= 0 or Decimal(x.price) <= 0:
        return False
    if any(Decimal(fee) % USDC_QUANTUM != 0 for fee in (x.buyer_fee, x.seller_fee)):
        return False
    expiry = LISTED[x.instrument][1]
    return expiry is None or at < expiry


def clearing_movements(trade: list[Leg]) -> list[tuple[str, str, Decimal]]:
    """Premiums buyer to seller (charge rounded up, payout down, the rest to rounding) and
    fees to the fee account, leg by leg."""
    moves: list[tuple[str, str, Decimal]] = []
    for x in trade:
        multiplier, _, is_option = LISTED[x.instrument]
        if is_option:
            premium = Decimal(x.price) * Decimal(x.qty) * multiplier
            paid = premium.quantize(USDC_QUANTUM, rounding=ROUND_CEILING)
            received = premium.quantize(USDC_QUANTUM, rounding=ROUND_FLOOR)
            moves += [(x.buyer, "USDC", -paid), (x.seller, "USDC", received),
                      (ROUNDING, "USDC", paid - received)]
        moves += [(x.buyer, "USDC", -Decimal(x.buyer_fee)),
                  (x.seller, "USDC", -Decimal(x.seller_fee)),
                  (FEES, "USDC", Decimal(x.buyer_fee) + Decimal(x.seller_fee))]
    return moves


class LedgerMachine(RuleBasedStateMachine):
    backend_kind = "sqlite"
    workdirs: pytest.TempPathFactory

    def __init__(self) -> None:
        super().__init__()
        workdir = self.workdirs.mktemp(self.backend_kind)
        self.backend: Backend = make_backend(self.backend_kind, workdir)
        self.ledger = LedgerHarness(self.backend.url, self.backend.engine(), workdir / "files")
        self.balances: dict[tuple[str, str], Decimal] = defaultdict(Decimal)
        self.positions: dict[tuple[str, str], Decimal] = defaultdict(Decimal)
        self.events = 0
        self.trades: dict[str, tuple[tuple[Leg, ...], datetime]] = {}
        self.busted: set[str] = set()
        self.collateral_refs: dict[str, tuple[str, str, str, Decimal]] = {}
        self.marks: dict[tuple[str, datetime], tuple[str, str]] = {}
        self.counter = 0

    def teardown(self) -> None:
        self.backend.close()

    # ------------------------------------------------------------ helpers

    def move(self, account: str, asset: str, amount: Decimal) -> None:
        self.balances[(account, asset)] += amount

    def new_ref(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}{self.counter}"

    def refused(self, action: Callable[[], object],
                *errors: type[Exception]) -> BaseException:
        """Run an action the model says must be refused; it must write nothing."""
        event(f"refused: {action.__qualname__.split('.')[-3]}")
        before = self.ledger.snapshot()
        with pytest.raises(errors or (InputRejected,)) as caught:
            action()
        assert self.ledger.snapshot() == before
        return caught.value

    # ------------------------------------------------------------ the day's work

    @initialize()
    def open_the_books(self) -> None:
        self.ledger.given_accounts(*MEMBERS)
        self.ledger.import_rows("instruments", [listing_row(symbol, text(multiplier))
                                                for symbol, (multiplier, _, _) in LISTED.items()])
        # Yesterday's marks, so that margin can value collateral and positions.
        yesterday = iso(T0 - timedelta(days=1))
        self.ledger.import_rows("marks", [
            {"time": yesterday, "symbol": symbol, "price": price, "iv": iv}
            for symbol, price, iv in SEED_MARKS])
        self.events += len(MEMBERS) + len(LISTED) + len(SEED_MARKS)

    @rule(account=st.sampled_from(MEMBERS), asset=st.sampled_from(["USDC", "BTC"]),
          data=st.data(), reuse=st.sampled_from([False] * 5 + [True]))
    def deposit(self, account: str, asset: str, data: st.DataObject, reuse: bool) -> None:
        amount = data.draw(amounts(asset))
        ref = self.new_ref("D")
        deposits = [r for r, c in self.collateral_refs.items() if c[0] == "deposit"]
        if reuse and deposits:
            ref = data.draw(st.sampled_from(deposits))
        content = ("deposit", account, asset, amount)
        known = self.collateral_refs.get(ref)
        if known is not None and known != content:
            self.refused(lambda: self.ledger.deposit(account, asset, text(amount), ref=ref))
            return
        report = self.ledger.deposit(account, asset, text(amount), ref=ref)
        if known is not None:
            assert report.written == 0
            return
        assert report.written == 1
        event("deposited")
        self.collateral_refs[ref] = content
        self.move(account, asset, amount)
        self.move(EXTERNAL, asset, -amount)
        self.events += 1

    @precondition(lambda self: any(v > 0 for (a, _), v in self.balances.items()
                                   if a in MEMBERS))
    @rule(percents=st.lists(st.integers(1, 120), min_size=1, max_size=2), data=st.data())
    def withdraw(self, percents: list[int], data: st.DataObject) -> None:
        """Mostly within the balance, sometimes beyond it (above 100%), mostly from accounts
        that hold something."""
        funded = [k for k, v in sorted(self.balances.items()) if v > 0 and k[0] in MEMBERS]
        wallets = st.sampled_from(funded * 6 + [(a, s) for a in MEMBERS for s in SCALE])
        wanted: dict[tuple[str, str], Decimal] = defaultdict(Decimal)
        planned = []
        for percent in percents:
            account, asset = data.draw(wallets)
            balance = self.balances[(account, asset)]
            quantum = Decimal(1).scaleb(-SCALE[asset])
            amount = (max(balance, Decimal(0)) * percent / 100).quantize(quantum)
            if amount <= 0:
                amount = data.draw(amounts(asset))
            planned.append((account, asset, amount))
            wanted[(account, asset)] += amount
        refs = [self.new_ref("W") for _ in planned]

        def withdraw() -> object:
            return self.ledger.withdrawals(*((a, s, text(x)) for a, s, x in planned), refs=refs)

        if any(total > self.balances[key] for key, total in wanted.items()):
            self.refused(withdraw)
            return
        try:
            report = withdraw()
        except InputRejected as exc:
            # Margin rules may refuse a withdrawal the balance allows; nothing else may.
            assert all("margin" in p.reason.lower() for p in exc.problems), exc
            event("refused by margin")
            return
        assert report.written == len(planned)
        event("withdrawn")
        for ref, (account, asset, amount) in zip(refs, planned, strict=True):
            self.collateral_refs[ref] = ("withdrawal", account, asset, amount)
            self.move(account, asset, -amount)
            self.move(EXTERNAL, asset, amount)
        self.events += len(planned)

    @rule(trade=st.lists(good_legs, min_size=1, max_size=3), at=times,
          spoil=st.sampled_from(SPOILS), index=st.integers(0, 2), data=st.data(),
          reuse=st.sampled_from([False] * 5 + [True]))
    def clear(self, trade: list[Leg], at: datetime, spoil: str | None, index: int,
              data: st.DataObject, reuse: bool) -> None:
        trade = spoilt(trade, spoil, index)
        if spoil == "after expiry":
            at = AFTER_EXPIRY
        trade_id = self.new_ref("T")
        if reuse and self.trades:
            trade_id = data.draw(st.sampled_from(sorted(self.trades)))
            if data.draw(st.booleans()):  # the very same trade again
                trade, at = list(self.trades[trade_id][0]), self.trades[trade_id][1]
        known = self.trades.get(trade_id)
        if known is not None:
            if known == (tuple(trade), at):
                assert self.ledger.trade(trade_id, trade, at=at).written == 0
            else:
                self.refused(lambda: self.ledger.trade(trade_id, trade, at=at))
            return
        if not all(leg_is_clearable(x, at) for x in trade):
            self.refused(lambda: self.ledger.trade(trade_id, trade, at=at))
            return
        assert self.ledger.trade(trade_id, trade, at=at).written == 1
        event(f"cleared: {len(trade)} legs")
        self.trades[trade_id] = (tuple(trade), at)
        for account, asset, amount in clearing_movements(trade):
            self.move(account, asset, amount)
        for x in trade:
            self.positions[(x.buyer, x.instrument)] += Decimal(x.qty)
            self.positions[(x.seller, x.instrument)] -= Decimal(x.qty)
        self.events += 1

    @precondition(lambda self: self.trades)
    @rule(data=st.data(), hours=st.integers(-5, 48))
    def bust(self, data: st.DataObject, hours: int) -> None:
        trade_id = data.draw(st.sampled_from([*sorted(self.trades), "NO-SUCH-TRADE"]))
        if trade_id not in self.trades:
            self.refused(lambda: self.ledger.bust(trade_id), TradeNotFound)
            return
        trade, traded_at = self.trades[trade_id]
        at = traded_at + timedelta(hours=hours)
        if trade_id in self.busted:
            self.refused(lambda: self.ledger.bust(trade_id, at=at), TradeAlreadyBusted)
            return
        self.ledger.bust(trade_id, reason="random bust", at=at)
        event("busted")
        self.busted.add(trade_id)
        for account, asset, amount in clearing_movements(list(trade)):
            self.move(account, asset, -amount)
        for x in trade:
            self.positions[(x.buyer, x.instrument)] -= Decimal(x.qty)
            self.positions[(x.seller, x.instrument)] += Decimal(x.qty)
        self.events += 1

    @rule(symbol=st.sampled_from(MARKABLE), price=prices,
          iv=st.one_of(st.none(), decimals("0.01", "3", 2)),
          at=st.integers(0, 3).map(lambda h: T0 + timedelta(hours=h)))
    def mark(self, symbol: str, price: Decimal, iv: Decimal | None, at: datetime) -> None:
        content = (text(price), "" if iv is None else text(iv))
        is_option = symbol in LISTED and LISTED[symbol][2]
        known = self.marks.get((symbol, at))

        def publish() -> object:
            return self.ledger.mark(symbol, content[0], iv=content[1] or None, at=at)

        if symbol == UNLISTED or (iv is not None and not is_option) or \
                (known is not None and known != content):
            self.refused(publish)
            return
        report = publish()
        assert report.written == (0 if known else 1)  # type: ignore[attr-defined]
        if not known:
            self.marks[(symbol, at)] = content
            self.events += 1

    @precondition(lambda self: len(self.ledger.files) > 3)
    @rule(data=st.data())
    def reimport(self, data: st.DataObject) -> None:
        """Any file imported before, imported again: nothing changes."""
        kind, path = data.draw(st.sampled_from(self.ledger.files[3:]))
        before = self.ledger.snapshot()
        assert self.ledger.reimport(path).written == 0
        event(f"re-imported: {kind}")
        assert self.ledger.snapshot() == before

    # ------------------------------------------------------------ after every step

    @invariant()
    def every_check_of_verify_passes(self) -> None:
        self.ledger.assert_verified()

    @invariant()
    def the_ledger_agrees_with_the_model(self) -> None:
        events, balances, positions = self.ledger.snapshot()
        assert balances == {k: v for k, v in self.balances.items() if v != 0}
        assert positions == {k: v for k, v in self.positions.items() if v != 0}
        assert events == self.events


@pytest.mark.parametrize("kind", BACKENDS)
def test_random_days_keep_every_invariant(kind: str, tmp_path: Path,
                                          tmp_path_factory: pytest.TempPathFactory) -> None:
    make_backend(kind, tmp_path).close()  # skips (or fails under CI) without PostgreSQL

    class Machine(LedgerMachine):
        backend_kind = kind
        workdirs = tmp_path_factory

    run_state_machine_as_test(Machine, settings=SETTINGS)
