"""What the fault tests share: a small book, a trades file to import under a fault, twin
databases (one for the fault-free run, one for the faulted run), what the command line shows
of each, and processes to kill.

Every fault test ends the same way: the faulted ledger, once the command is run again, shows
exactly what the fault-free one shows: `clearing balances --json` and `clearing positions
--json` byte for byte, the same number of events, and `clearing verify` passing.
"""

from __future__ import annotations

import json
import os
import random
import select as io_select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.engine import make_url
from typer.testing import CliRunner

from clearing.cli import app
from clearing.store.database import create_engine_for
from clearing.store.tables import events
from tests.conftest import Backend, make_backend
from tests.ledger.harness import T0, LedgerHarness, iso, leg, trade_rows

ACCOUNTS = tuple(f"m{i:02d}" for i in range(12))
INSTRUMENTS = ("BTC-PERP", "ETH-PERP", "BTC-27DEC26")
PRICES = {"BTC-PERP": 100_000, "ETH-PERP": 3_000, "BTC-27DEC26": 101_000}
FAULT_TRADES = 300
"""Trades in the file imported under a fault (one append of 300 facts)."""
PAUSE_S = 60.0
"""How long a test hook holds the victim: far longer than the test needs to kill it."""
HOOK_WAIT_S = 60.0
"""Bound on waiting for a victim to reach its pause."""


def build_base(ledger: LedgerHarness) -> None:
    """Twelve funded members, two perpetuals and a dated future, marks at T0."""
    ledger.import_rows("accounts", [{"account_id": a, "owner": a.upper(),
                                     "margin_model": "standard"} for a in ACCOUNTS])
    ledger.list_instruments(*INSTRUMENTS)
    ledger.import_rows("marks", [{"time": iso(T0), "symbol": s, "price": str(p), "iv": ""}
                                 for s, p in (("BTC", 100_000), ("ETH", 3_000),
                                              *PRICES.items())])
    ledger.import_rows("deposits", [{"ref": f"D-{a}", "account_id": a, "asset": "USDC",
                                     "amount": "5000000", "time": iso(T0)} for a in ACCOUNTS])


def trades(count: int = FAULT_TRADES, seed: int = 7, prefix: str = "F") -> list[dict[str, str]]:
    """`count` seeded trades between distinct members, a minute after T0, with fees."""
    rng = random.Random(seed)
    rows: list[dict[str, str]] = []
    for n in range(count):
        buyer, seller = rng.sample(ACCOUNTS, 2)
        symbol = rng.choice(INSTRUMENTS)
        price = PRICES[symbol] + rng.randrange(-500, 500)
        rows += trade_rows(f"{prefix}{n:04d}", [leg(
            symbol, buyer=buyer, seller=seller, qty=f"{rng.randrange(1, 500) / 100:.2f}",
            price=str(price), buyer_fee="1.5", seller_fee="0.75")], T0 + timedelta(minutes=1))
    return rows


@dataclass
class Twin:
    """One of a pair of identical ledgers: `backend` for its URL, `harness` to feed it."""

    backend: Backend
    harness: LedgerHarness

    @property
    def url(self) -> str:
        return self.backend.url


def twin(kind: str, workdir: Path, name: str) -> Twin:
    """A fresh ledger of `kind` with the base book (its own file or schema)."""
    place = workdir / name
    place.mkdir(parents=True)
    backend = make_backend(kind, place)
    harness = LedgerHarness(backend.url, backend.engine(), place / "files")
    build_base(harness)
    return Twin(backend, harness)


def with_options(url: str, *settings: str) -> str:
    """A PostgreSQL `url` with server settings (`name=value`) added to its libpq `options`:
    they hold for every session opened through it."""
    parsed = make_url(url)
    query = dict(parsed.query)
    query["options"] = " ".join([query.get("options", ""), *(f"-c{s}" for s in settings)])
    return parsed.set(query=query).render_as_string(hide_password=False)


# ------------------------------------------------------------------ what the ledger shows


def cli(*args: str) -> str:
    """`clearing ARGS` in this process; its stdout (exit 0 required)."""
    result = CliRunner().invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == 0, (args, result.output)
    return result.stdout


@dataclass(frozen=True)
class Outcome:
    balances: str
    positions: str
    events: int


def event_count(url: str) -> int:
    engine = create_engine_for(url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(events)).scalar_one())
    finally:
        engine.dispose()


def outcome(url: str) -> Outcome:
    """What `clearing balances --json` and `clearing positions --json` print, and the
    number of events in the log."""
    return Outcome(cli("balances", "--db", url, "--json"),
                   cli("positions", "--db", url, "--json"), event_count(url))


def assert_verified(url: str) -> None:
    document = json.loads(cli("verify", "--db", url, "--json"))
    failed = [c for c in document["checks"] if not c["ok"]]
    assert document["ok"] and not failed, failed


def assert_same_as(url: str, expected: Outcome) -> None:
    """The faulted ledger ends exactly where the fault-free one did, and verifies."""
    got = outcome(url)
    assert got.events == expected.events, "events written twice or lost"
    assert got.balances == expected.balances
    assert got.positions == expected.positions
    assert_verified(url)


# ------------------------------------------------------------------ processes to kill


def spawn(args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    """`python -m clearing.cli ARGS` with extra environment, stderr piped for its hooks."""
    return subprocess.Popen([sys.executable, "-m", "clearing.cli", *args],
                            env={**os.environ, **env}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


def wait_for_pause(process: subprocess.Popen[bytes], hook: str,
                   timeout_s: float = HOOK_WAIT_S) -> None:
    """Block until the process announces it is paused at `hook` (see
    `clearing.store.testhooks`); fail with its stderr if it ends or times out first."""
    assert process.stderr is not None
    deadline = time.monotonic() + timeout_s
    seen = b""
    while time.monotonic() < deadline:
        ready, _, _ = io_select.select([process.stderr], [], [], 0.1)
        if ready:
            chunk = os.read(process.stderr.fileno(), 65_536)
            if not chunk:
                break
            seen += chunk
            if f"paused at {hook}".encode() in seen:
                return
        elif process.poll() is not None:
            break
    raise AssertionError(f"never paused at {hook}: {seen.decode(errors='replace')[-2000:]}")


def sigkill(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    if process.stderr is not None:
        process.stderr.close()
