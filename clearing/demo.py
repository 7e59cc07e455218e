"""`clearing demo`: the main job, on a fresh database.

It simulates a market from a seed (see `demo_market`) and runs it through the ledger exactly
as a venue and a back office would: every file through `clearing import`'s code, every job
through `clearing run`'s, hour by hour. Then it reconciles the ledger with custodian and venue
statements that carry a few deliberate breaks, replays the log at a moment before the crash,
verifies every invariant and tells the story of the week.
"""

from __future__ import annotations

import csv
import tempfile
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from sqlalchemy import select

from clearing import render
from clearing.app import Ledger
from clearing.backoffice.csvinput import InputRejected
from clearing.backoffice.imports import COLUMNS, ImportKind
from clearing.backoffice.reconcile import BALANCES, TRADES, Break, ReconcileReport, reconcile
from clearing.backoffice.replay import ReplayBounds, replay
from clearing.backoffice.verify import Check, verify
from clearing.demo_market import Market, Step, simulate
from clearing.domain.accounts import INSURANCE, is_house
from clearing.domain.clock import format_time
from clearing.domain.margin_sweep import all_margins
from clearing.jobs.catalog import run_jobs
from clearing.projections import tables as t
from clearing.store.database import open_database
from clearing.store.eventstore import EventStore

DEMO_DB_FILE = "clearing-demo.db"
USDC = "USDC"


@dataclass
class DayStory:
    day: str
    btc_close: str = ""
    trades: int = 0
    variation_margin: Decimal = Decimal(0)
    margin_calls: int = 0
    liquidations: int = 0
    auto_deleveraged: int = 0
    settlements: int = 0
    insurance_fund: Decimal = Decimal(0)

    def document(self) -> dict[str, Any]:
        return {"day": self.day, "btc_close": self.btc_close, "trades": self.trades,
                "variation_margin_paid": format(self.variation_margin, "f"),
                "margin_calls": self.margin_calls, "liquidations": self.liquidations,
                "auto_deleveraged": self.auto_deleveraged, "settlements": self.settlements,
                "insurance_fund": format(self.insurance_fund, "f")}


@dataclass
class DemoOutcome:
    accounts: int = 0
    events: int = 0
    trades: int = 0
    liquidations: int = 0
    settlements: int = 0
    margin_calls: int = 0
    auto_deleveraged: int = 0
    busted: list[str] = field(default_factory=list)
    refused_withdrawals: list[str] = field(default_factory=list)
    days: list[DayStory] = field(default_factory=list)
    losers: list[tuple[str, Decimal]] = field(default_factory=list)
    breaks: list[Break] = field(default_factory=list)
    expected_breaks: set[tuple[str, str]] = field(default_factory=set)
    reconciled: list[ReconcileReport] = field(default_factory=list)
    replayed_before_crash: dict[str, str] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def verified(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    @property
    def breaks_as_expected(self) -> bool:
        return {(b.kind, b.key) for b in self.breaks} == self.expected_breaks

    def document(self) -> dict[str, Any]:
        return {
            "accounts": self.accounts, "events": self.events, "trades": self.trades,
            "liquidations": self.liquidations, "settlements": self.settlements,
            "margin_calls": self.margin_calls, "auto_deleveraged": self.auto_deleveraged,
            "busted": self.busted, "refused_withdrawals": self.refused_withdrawals,
            "days": [d.document() for d in self.days],
            "biggest_losers": [{"account_id": a, "cash_pnl": format(v, "f")}
                               for a, v in self.losers],
            "breaks": [b.document() for b in self.breaks],
            "breaks_as_expected": self.breaks_as_expected,
            "replay_before_crash": self.replayed_before_crash,
            "seconds": round(self.seconds, 1),
            "verify": {"ok": self.verified, "checks": [
                {"name": c.name, "ok": c.ok, "detail": c.detail} for c in self.checks]},
        }


def _fresh_ledger(url: str | None) -> Ledger:
    if url is None:
        path = Path(DEMO_DB_FILE)
        for suffix in ("", "-wal", "-shm"):
            Path(str(path) + suffix).unlink(missing_ok=True)
        for lock in Path(".").glob(f"{DEMO_DB_FILE}.*.lock"):
            lock.unlink(missing_ok=True)
        url = f"sqlite:///{path}"
    engine = open_database(url)
    if EventStore(engine).count():
        raise SystemExit(f"demo needs an empty database; {url} already holds events")
    return Ledger(engine, actor="demo")


class _Files:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.count = 0

    def write(self, kind: ImportKind, rows: list[dict[str, str]]) -> Path:
        self.count += 1
        path = self.folder / f"{self.count:05d}-{kind}.csv"
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=COLUMNS[kind])
            writer.writeheader()
            writer.writerows(rows)
        return path


class _Collect:
    def __init__(self) -> None:
        self.breaks: list[Break] = []
        self.report: ReconcileReport | None = None

    def write(self, found: Break) -> None:
        self.breaks.append(found)

    def finish(self, report: ReconcileReport) -> None:
        self.report = report


def run_demo(url: str | None, *, accounts: int, days: int, seed: int,
             quiet: bool) -> DemoOutcome:
    began = datetime.now(UTC)
    ledger = _fresh_ledger(url)
    start = began.replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=days + 1)
    market = simulate(accounts, days, seed, start)
    outcome = DemoOutcome(accounts=accounts)
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
               TimeElapsedColumn())
    with tempfile.TemporaryDirectory(prefix="clearing-demo-") as tmp, \
            Progress(*columns, disable=quiet, transient=True, console=render.stderr) as bar:
        files = _Files(Path(tmp))
        task = bar.add_task("opening the market", total=len(market.steps) + 6)
        for kind, rows in ((ImportKind.ACCOUNTS, market.accounts),
                           (ImportKind.INSTRUMENTS, market.instruments),
                           (ImportKind.DEPOSITS, market.deposits)):
            ledger.import_file(kind, files.write(kind, rows))
        bar.advance(task)
        for step in market.steps:
            bar.update(task, description=f"trading {step.at:%a %d %b %H:00}")
            _run_step(ledger, files, market, step, outcome)
            bar.advance(task)
        bar.update(task, description="reconciling with the custodian and the venue")
        _reconcile(ledger, files, outcome)
        bar.advance(task)
        bar.update(task, description="replaying the log before the crash")
        _replay_before_crash(ledger, market, outcome)
        bar.advance(task)
        bar.update(task, description="verifying every invariant")
        outcome.checks = verify(ledger)
        bar.advance(task)
    _tell(ledger, market, outcome)
    outcome.events = ledger.store.count()
    outcome.seconds = (datetime.now(UTC) - began).total_seconds()
    if not quiet:
        _print_story(outcome, market)
    return outcome


def _run_step(ledger: Ledger, files: _Files, market: Market, step: Step,
              outcome: DemoOutcome) -> None:
    if step.marks:
        ledger.import_file(ImportKind.MARKS, files.write(ImportKind.MARKS, step.marks))
    if step.trades:
        ledger.import_file(ImportKind.TRADES, files.write(ImportKind.TRADES, step.trades))
    if step.at == market.start + timedelta(hours=23):
        _bust_one(ledger, step, outcome)
    if step.at == market.start + timedelta(days=1, hours=10):
        _withdrawals(ledger, files, step, outcome)
    if step.jobs:
        run_jobs(ledger, step.jobs, step.at)


def _bust_one(ledger: Ledger, step: Step, outcome: DemoOutcome) -> None:
    """The venue reports a perpetual trade of the first day as made in error."""
    with ledger.engine.connect() as conn:
        trade_id = conn.execute(
            select(t.trade_legs.c.trade_id).where(t.trade_legs.c.instrument == "ETH-PERP")
            .order_by(t.trade_legs.c.trade_id).limit(1)).scalar_one_or_none()
    if trade_id is not None:
        ledger.bust(trade_id, "venue: trade reported in error", step.at)
        outcome.busted.append(trade_id)


def _withdrawals(ledger: Ledger, files: _Files, step: Step, outcome: DemoOutcome) -> None:
    """Two members ask for collateral back: a modest request passes; one that would leave
    the account below its initial margin is refused and writes nothing."""
    margins = all_margins(ledger.state_at(step.at), step.at)
    loaded = sorted(((m.equity - m.initial, a) for a, m in margins.items() if m.initial > 0),
                    reverse=True)
    if len(loaded) < 2:
        return
    (room, modest), (_, greedy) = loaded[0], loaded[-1]
    requests = [(modest, str(min(room / 4, Decimal(10_000)).quantize(Decimal(1)))),
                (greedy, str(max(ledger.balance(greedy, USDC), Decimal(1)).quantize(
                    Decimal(1))))]
    for account_id, amount in requests:
        row = {"ref": f"wd-{account_id}-{step.at:%Y%m%d}", "account_id": account_id,
               "asset": USDC, "amount": amount, "time": step.at.isoformat()}
        try:
            ledger.import_file(ImportKind.WITHDRAWALS,
                               files.write(ImportKind.WITHDRAWALS, [row]))
        except InputRejected as refused:
            outcome.refused_withdrawals.append(f"{account_id} {amount} USDC: "
                                               f"{refused.problems[0].reason}")


def _reconcile(ledger: Ledger, files: _Files, outcome: DemoOutcome) -> None:
    """Statements as a custodian and the venue would send them, with deliberate breaks:
    a missing line, a wrong amount, an unknown account; a wrong price, a missing leg, a
    busted trade the venue still lists."""
    ledger.refresh()
    with ledger.engine.connect() as conn:
        balances = [(r.account_id, r.asset, r.balance) for r in conn.execute(
            select(t.balances).order_by(t.balances.c.account_id, t.balances.c.asset))
            if not is_house(r.account_id) and r.balance != 0]
        legs = list(conn.execute(select(t.trade_legs).order_by(
            t.trade_legs.c.trade_id, t.trade_legs.c.leg)))
    from clearing.backoffice.queries import money_text

    rows = [{"account_id": a, "asset": s, "balance": money_text(b, s)} for a, s, b in balances]
    dropped, changed = rows.pop(3), rows[7]
    changed["balance"] = money_text(Decimal(changed["balance"]) + Decimal("1.25"), USDC)
    rows.append({"account_id": "m9999", "asset": USDC, "balance": "1000.000000"})
    outcome.expected_breaks |= {
        ("missing_in_statement", f"{dropped['account_id']}/{dropped['asset']}"),
        ("amount_mismatch", f"{changed['account_id']}/{changed['asset']}"),
        ("missing_in_ledger", "m9999/USDC")}
    path = files.folder / "custodian-balances.csv"
    _write_csv(path, ("account_id", "asset", "balance"), rows)
    _reconcile_file(ledger, BALANCES, path, outcome)

    standing = [leg for leg in legs if not leg.busted]
    trade_rows = [{"trade_id": leg.trade_id, "leg": str(leg.leg), "instrument": leg.instrument,
                   "buyer": leg.buyer, "seller": leg.seller,
                   "quantity": format(leg.quantity, "f"), "price": format(leg.price, "f")}
                  for leg in standing]
    missing = trade_rows.pop(10)
    wrong = trade_rows[20]
    wrong["price"] = format(Decimal(wrong["price"]) + 5, "f")
    outcome.expected_breaks |= {
        ("missing_in_statement", f"{missing['trade_id']}/{missing['leg']}"),
        ("field_mismatch", f"{wrong['trade_id']}/{wrong['leg']}/price")}
    for leg in legs:
        if leg.busted:
            trade_rows.append({"trade_id": leg.trade_id, "leg": str(leg.leg),
                               "instrument": leg.instrument, "buyer": leg.buyer,
                               "seller": leg.seller, "quantity": format(leg.quantity, "f"),
                               "price": format(leg.price, "f")})
            outcome.expected_breaks.add(("missing_in_ledger", f"{leg.trade_id}/{leg.leg}"))
    path = files.folder / "venue-trades.csv"
    _write_csv(path, ("trade_id", "leg", "instrument", "buyer", "seller", "quantity", "price"),
               trade_rows)
    _reconcile_file(ledger, TRADES, path, outcome)


def _write_csv(path: Path, columns: tuple[str, ...], rows: list[dict[str, str]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def _reconcile_file(ledger: Ledger, kind: Any, path: Path, outcome: DemoOutcome) -> None:
    sink = _Collect()
    report = reconcile(ledger, kind, path, sink)
    outcome.breaks.extend(sink.breaks)
    outcome.reconciled.append(report)


def _replay_before_crash(ledger: Ledger, market: Market, outcome: DemoOutcome) -> None:
    """What an auditor sees for the hour before the crash, as the ledger knew it then."""
    moment = market.start + timedelta(days=market.crash_day, hours=12)
    state = replay(ledger.store, ReplayBounds(as_of=moment))
    whale = market.whales[0]
    outcome.replayed_before_crash = {
        "as_of": format_time(moment),
        "insurance_fund": format(state.balances.get((INSURANCE, USDC), Decimal(0)), "f"),
        "open_positions": str(sum(1 for p in state.positions.values() if p.quantity != 0)),
        f"{whale}_usdc": format(state.balances.get((whale, USDC), Decimal(0)), "f"),
    }


def _tell(ledger: Ledger, market: Market, outcome: DemoOutcome) -> None:
    """Tally the week from the log itself."""
    stories: dict[str, DayStory] = {}
    for day in range(market.days):
        date = (market.start + timedelta(days=day)).date().isoformat()
        closes = [p for t_, p in market.index_path["BTC"] if t_.date().isoformat() == date]
        stories[date] = DayStory(date, f"{closes[-1]:,.0f}" if closes else "")
    cash_pnl: dict[str, Decimal] = defaultdict(Decimal)
    insurance = Decimal(0)
    counts: Counter[str] = Counter()
    for fact in ledger.store.read_all(page_size=5_000):
        day = fact.effective_at.date().isoformat()
        story = stories.get(day)
        kind = fact.type
        counts[kind] += 1
        event = fact.event
        if kind in ("CollateralDeposited", "CollateralWithdrawn"):
            if getattr(event, "account_id", "") == INSURANCE:
                insurance += sum((p.amount for p in event.postings  # type: ignore[attr-defined]
                                  if p.account_id == INSURANCE), Decimal(0))
        elif hasattr(event, "postings"):
            for p in event.postings:
                if p.asset == USDC and not is_house(p.account_id):
                    cash_pnl[p.account_id] += p.amount
                if p.account_id == INSURANCE:
                    insurance += p.amount
        if story is None:
            continue
        if kind == "TradeCleared":
            story.trades += 1
        elif kind == "VariationMarginSettled":
            story.variation_margin += sum((p.amount for p in event.postings  # type: ignore[attr-defined]
                                           if p.amount > 0 and not is_house(p.account_id)),
                                          Decimal(0))
        elif kind == "MarginCallIssued":
            story.margin_calls += 1
        elif kind == "PositionLiquidated":
            story.liquidations += 1
        elif kind == "AutoDeleveraged":
            story.auto_deleveraged += 1
        elif kind == "InstrumentSettled":
            story.settlements += 1
        story.insurance_fund = insurance
    running = Decimal(0)
    for story in stories.values():
        if story.insurance_fund == 0:
            story.insurance_fund = running
        running = story.insurance_fund
    outcome.days = list(stories.values())
    outcome.trades = counts["TradeCleared"]
    outcome.liquidations = counts["PositionLiquidated"]
    outcome.settlements = counts["InstrumentSettled"]
    outcome.margin_calls = counts["MarginCallIssued"]
    outcome.auto_deleveraged = counts["AutoDeleveraged"]
    outcome.losers = sorted(cash_pnl.items(), key=lambda kv: kv[1])[:5]


def _print_story(outcome: DemoOutcome, market: Market) -> None:
    out = render.stdout
    out.print(f"\n[bold]clearing demo[/bold]: {outcome.accounts} members, {market.days} days "
              f"from {market.start:%d %b %Y}, a crash on day {market.crash_day + 1}")
    table = Table(title="The week, day by day", header_style="bold")
    for column in ("day", "BTC close", "trades", "VM paid", "margin calls", "liquidations",
                   "ADL", "expiries settled", "insurance fund"):
        table.add_column(column, justify="left" if column == "day" else "right")
    for d in outcome.days:
        table.add_row(d.day, d.btc_close, str(d.trades), f"{d.variation_margin:,.2f}",
                      str(d.margin_calls), str(d.liquidations), str(d.auto_deleveraged),
                      str(d.settlements), f"{d.insurance_fund:,.2f}")
    out.print(table)
    out.print(f"Cleared {outcome.trades} trades (busted: {', '.join(outcome.busted) or 'none'}); "
              f"{outcome.margin_calls} margin calls, {outcome.liquidations} positions "
              f"liquidated, {outcome.auto_deleveraged} auto-deleveraging closes.")
    for refusal in outcome.refused_withdrawals:
        out.print(f"Withdrawal refused: {refusal}", markup=False)
    losers = ", ".join(f"{a} {v:,.2f}" for a, v in outcome.losers)
    out.print(f"Biggest losers (cash P&L, USDC): {losers}")
    found = ", ".join(f"{b.kind} {b.key}" for b in outcome.breaks)
    verdict = "exactly the deliberate ones" if outcome.breaks_as_expected else \
        "NOT the deliberate ones"
    out.print(f"Reconciliation: {len(outcome.breaks)} breaks, {verdict}: {found}",
              markup=False)
    replayed = outcome.replayed_before_crash
    out.print(f"Replay as of {replayed.get('as_of')}: insurance fund "
              f"{replayed.get('insurance_fund')}, {replayed.get('open_positions')} open "
              "positions", markup=False)
    for c in outcome.checks:
        mark = "[green]pass[/green]" if c.ok else "[red]FAIL[/red]"
        out.print(f"  {mark} {c.name}: {c.detail}")
    out.print(("[bold green]verify: ok[/bold green]" if outcome.verified
               else "[bold red]verify: FAILED[/bold red]")
              + f"  ({outcome.seconds:.1f} s, {outcome.events} events)")
