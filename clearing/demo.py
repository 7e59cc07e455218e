"""`clearing demo`: the main job, run on a fresh database.

For now this is a small built-in smoke scenario (the full simulated market with a crash,
liquidations and settlement arrives with the back-office work): it writes the venue's files
for a few days of trading, imports them through the real commands, busts one trade, replays
the log and ends with `clearing verify`'s verdict.
"""

from __future__ import annotations

import csv
import random
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from rich.progress import Progress

from clearing import render
from clearing.app import Ledger
from clearing.backoffice.imports import COLUMNS, ImportKind
from clearing.backoffice.replay import replay
from clearing.backoffice.verify import Check, verify
from clearing.store.database import create_engine_for, open_database
from clearing.store.eventstore import EventStore

DEMO_DB_FILE = "clearing-demo.db"


@dataclass
class DemoOutcome:
    accounts: int = 0
    events: int = 0
    trades: int = 0
    liquidations: int = 0
    settlements: int = 0
    checks: list[Check] = field(default_factory=list)

    @property
    def verified(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    def document(self) -> dict[str, Any]:
        return {
            "accounts": self.accounts, "events": self.events, "trades": self.trades,
            "liquidations": self.liquidations, "settlements": self.settlements,
            "verify": {"ok": self.verified, "checks": [
                {"name": c.name, "ok": c.ok, "detail": c.detail} for c in self.checks]},
        }


def _fresh_database(url: str | None) -> Ledger:
    if url is None:
        path = Path(DEMO_DB_FILE)
        for suffix in ("", "-wal", "-shm"):
            Path(str(path) + suffix).unlink(missing_ok=True)
        url = f"sqlite:///{path}"
    engine = open_database(url)
    if EventStore(engine).count():
        raise SystemExit(f"demo needs an empty database; {url} already holds events")
    return Ledger(engine, actor="demo")


def _write(path: Path, kind: ImportKind, rows: list[dict[str, Any]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS[kind])
        writer.writeheader()
        writer.writerows(rows)
    return path


def run_demo(url: str | None, *, accounts: int, days: int, seed: int,
             quiet: bool) -> DemoOutcome:
    rng = random.Random(seed)
    ledger = _fresh_database(url)
    outcome = DemoOutcome(accounts=accounts)
    start = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0) \
        - timedelta(days=days)
    expiry = start + timedelta(days=days + 30, hours=8)
    future = f"BTC-{expiry.day}{expiry.strftime('%b').upper()}{expiry.year % 100:02d}"
    call = f"{future}-100000-C"
    with tempfile.TemporaryDirectory() as tmp, Progress(disable=quiet,
                                                        transient=True) as progress:
        task = progress.add_task("simulating the market", total=days + 4)
        folder = Path(tmp)
        names = [f"acct{i:05d}" for i in range(accounts)]
        files = [
            (ImportKind.ACCOUNTS, [{"account_id": n, "owner": f"Member {n}",
                                    "margin_model": rng.choice(["standard", "portfolio"])}
                                   for n in names]),
            (ImportKind.INSTRUMENTS, [
                {"symbol": "BTC-PERP", "kind": "perpetual", "underlying": "BTC",
                 "settlement_asset": "USDC", "expiry": "", "strike": "", "option_type": "",
                 "multiplier": "1"},
                {"symbol": future, "kind": "future", "underlying": "BTC",
                 "settlement_asset": "USDC", "expiry": expiry.isoformat(), "strike": "",
                 "option_type": "", "multiplier": "1"},
                {"symbol": call, "kind": "option", "underlying": "BTC",
                 "settlement_asset": "USDC", "expiry": expiry.isoformat(), "strike": "100000",
                 "option_type": "call", "multiplier": "1"},
            ]),
            (ImportKind.DEPOSITS, [{"ref": f"dep-{n}", "account_id": n, "asset": "USDC",
                                    "amount": str(rng.randrange(50_000, 500_000)),
                                    "time": start.isoformat()} for n in names]),
        ]
        for kind, rows in files:
            ledger.import_file(kind, _write(folder / f"{kind}.csv", kind, rows))
            progress.advance(task)
        index = Decimal(95_000)
        trade_no = 0
        for day in range(days):
            at = start + timedelta(days=day, hours=12)
            index = (index * Decimal(str(1 + rng.gauss(0, 0.03)))).quantize(Decimal("0.01"))
            trades = []
            for _ in range(max(accounts // 2, 1)):
                trade_no += 1
                buyer, seller = rng.sample(names, 2)
                symbol = rng.choice(["BTC-PERP", future, call])
                price = index * Decimal("0.04") if symbol == call else index
                trades.append({"trade_id": f"T{trade_no:06d}", "leg": 1, "instrument": symbol,
                               "buyer": buyer, "seller": seller,
                               "quantity": str(Decimal(rng.randrange(1, 50)) / 10),
                               "price": str(price.quantize(Decimal("0.01"))),
                               "buyer_fee": "1.5", "seller_fee": "1.5",
                               "time": at.isoformat()})
            ledger.import_file(ImportKind.TRADES, _write(folder / f"trades-{day}.csv",
                                                         ImportKind.TRADES, trades))
            marks = [{"time": at.isoformat(), "symbol": s, "price": str(p), "iv": iv}
                     for s, p, iv in (("BTC", index, ""), ("BTC-PERP", index, ""),
                                      (future, index, ""),
                                      (call, (index * Decimal("0.04")).quantize(
                                          Decimal("0.01")), "0.55"))]
            ledger.import_file(ImportKind.MARKS, _write(folder / f"marks-{day}.csv",
                                                        ImportKind.MARKS, marks))
            outcome.trades += len(trades)
            progress.advance(task)
        ledger.bust("T000001", "demo: a trade reported in error")
        progress.advance(task)
        replay(ledger.store)
        outcome.checks = verify(ledger)
        outcome.events = ledger.store.count()
        progress.advance(task)
    if not quiet:
        render.stdout.print(f"[bold]Smoke scenario[/bold]: {accounts} accounts, {days} days, "
                            f"{outcome.trades} trades cleared, {outcome.events} events "
                            "(the full simulated market is still to come)")
        for c in outcome.checks:
            mark = "[green]pass[/green]" if c.ok else "[red]FAIL[/red]"
            render.stdout.print(f"  {mark} {c.name}: {c.detail}")
        render.stdout.print("[bold green]verify: ok[/bold green]" if outcome.verified
                            else "[bold red]verify: FAILED[/bold red]")
    return outcome


__all__ = ["run_demo", "DemoOutcome", "create_engine_for"]
