"""Bad input through the real command line: every malformed row or file is refused whole.

Each case imports one bad file into a small valid ledger with `clearing import` and expects
exit code 2, a `FILE:LINE: field: reason` line on stderr naming the exact line and field, and
not one event written (SPEC sections 2 and 3). Positive controls at the end prove that the
same machinery accepts good files, so the refusals are the files' fault, not the harness's.
"""

from __future__ import annotations

import re
import shutil
import sqlite3
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from typer.testing import Result
from sqlalchemy.engine import make_url
from typer.testing import CliRunner

from clearing.cli import app
from clearing.store.eventstore import EventStore
from tests.conftest import Backend
from tests.e2e.files import (
    AT,
    BASE_EVENTS,
    BASE_FILES,
    EXPIRY,
    FUTURE,
    OPTION,
    PERP,
    collateral,
    instrument,
    rows,
    trade,
)

EXIT_BAD_INPUT = 2
PROBLEM_LINE = re.compile(r"^(?P<file>.+):(?P<line>\d+): (?P<field>[^:]+): (?P<reason>.+)$")
MEGABYTES_10 = 10 * 1024 * 1024


class CliLedger:
    """A ledger driven only through `clearing`, as an operator would drive it."""

    def __init__(self, backend: Backend, directory: Path):
        self.url = backend.url
        self.directory = directory
        self.store = EventStore(backend.engine())
        self.runner = CliRunner()
        self.files_written = 0

    def write(self, content: str | bytes, name: str | None = None) -> Path:
        self.files_written += 1
        path = self.directory / (name or f"input-{self.files_written}.csv")
        path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
        return path

    def import_(self, kind: str, path: Path) -> Result:
        return self.runner.invoke(app, ["import", kind, str(path), "--db", self.url])

    def import_ok(self, kind: str, content: str | bytes) -> Result:
        path = self.write(content)
        result = self.import_(kind, path)
        assert result.exit_code == 0, (kind, result.stdout, result.stderr, result.exception)
        return result

    def event_count(self) -> int:
        return self.store.count()


def _import_base(cli: CliLedger) -> None:
    for kind, content in BASE_FILES:
        cli.import_ok(kind, content)
    assert cli.event_count() == BASE_EVENTS


@pytest.fixture(scope="session")
def sqlite_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The base ledger imported once into SQLite; each SQLite test starts from a copy (the
    same bytes an import would produce, at a fraction of the cost of migrating anew)."""
    directory = tmp_path_factory.mktemp("sqlite-base")
    built = Backend("sqlite", f"sqlite:///{directory / 'built.db'}", lambda: None)
    _import_base(CliLedger(built, directory))
    built.close()
    template = directory / "base.db"
    with closing(sqlite3.connect(directory / "built.db")) as source, \
            closing(sqlite3.connect(template)) as copy:
        source.backup(copy)  # consistent, write-ahead log included
    return template


@pytest.fixture
def ledger(backend: Backend, tmp_path: Path, request: pytest.FixtureRequest) -> CliLedger:
    """Alice and Bob with collateral, a BTC perpetual, a dated future and an option."""
    if backend.kind == "sqlite":
        database = make_url(backend.url).database
        assert database is not None and not Path(database).exists()
        shutil.copyfile(request.getfixturevalue("sqlite_base"), database)
        cli = CliLedger(backend, tmp_path)
        assert cli.event_count() == BASE_EVENTS
        return cli
    cli = CliLedger(backend, tmp_path)
    _import_base(cli)
    return cli


@dataclass(frozen=True)
class Bad:
    """One bad file and the problem it must be refused with."""

    id: str
    kind: str
    content: str | bytes = field(repr=False)
    line: int
    field: str
    reason: str
    given: tuple[tuple[str, str], ...] = ()
    """Good files imported first (and accepted) on top of the base ledger."""
    problems: int = 1
    """How many problems the file has: each is reported once, and only once."""


def _big_cell_line() -> str:
    return collateral(ref="x" * MEGABYTES_10)


TRADE_T1 = rows("trades", trade("T-1"))

CASES: list[Bad] = [
    # ---------------------------------------------------------------- whole files
    Bad("empty-file", "deposits", "", 1, "header", "the file is empty"),
    Bad("blank-lines-only", "deposits", "\n\n  \n", 1, "header", "the file is empty"),
    Bad("header-only", "deposits", rows("deposits"), 1, "file", "has a header but no rows"),
    Bad("latin-1-byte-on-line-3", "accounts",
        rows("accounts", "carol,Carol,standard", "dave,Zürich AG,standard").encode("latin-1"),
        3, "file", "is not valid UTF-8"),
    Bad("utf-16-file", "accounts", rows("accounts", "carol,Carol,standard").encode("utf-16"),
        1, "file", "is not valid UTF-8"),
    Bad("10mb-line", "deposits", rows("deposits", _big_cell_line()), 2, "row",
        "a cell is longer than 1024 characters"),
    Bad("missing-column", "deposits",
        "ref,account_id,asset,amount\nref-9,alice,USDC,10\n", 1, "time", "missing column"),
    Bad("extra-column", "trades",
        rows("trades").rstrip("\n") + ",venue\n" + trade() + ",X\n", 1, "venue",
        "unexpected column"),
    Bad("column-twice", "marks", "time,symbol,price,iv,price\n", 1, "header",
        "a column appears twice"),
    Bad("row-with-too-few-cells", "deposits", rows("deposits", "ref-9,alice,USDC,10"), 2, "row",
        "has 4 cells, the header has 5"),
    Bad("thousands-separator-splits-row", "deposits",
        rows("deposits", collateral(), collateral(ref="ref-10", amount="1,000")), 3, "row",
        "has 6 cells, the header has 5"),
    Bad("unterminated-quote-swallows-the-rest", "accounts",
        rows("accounts", 'carol,"Carol,standard', "dave,Dave,standard"), 2, "row",
        "unexpected end of data"),
    Bad("quoted-cell-spanning-two-lines", "accounts",
        rows("accounts", 'carol,"Carol', 'Ltd",standard', "dave,Dave,standard"), 2, "owner",
        "contains control characters"),
    Bad("line-counted-past-a-two-line-cell", "accounts",
        rows("accounts", 'carol,"Carol', 'Ltd",standard', "ccp:x,X,standard"), 4,
        "account_id", "reserved", problems=2),
    Bad("line-counted-past-blank-lines", "deposits",
        rows("deposits", collateral(), "", "", collateral(ref="ref-10", amount="-1")), 5,
        "amount", "must be greater than zero"),
    Bad("crlf-line-endings", "deposits",
        rows("deposits", collateral(), collateral(ref="ref-10", asset="DOGE")
             ).replace("\n", "\r\n"), 3, "asset", "unknown asset 'DOGE'"),
    # ---------------------------------------------------------------- accounts
    Bad("account-reserved-ccp-prefix", "accounts", rows("accounts", "ccp:treasury,Us,standard"),
        2, "account_id", "reserved"),
    Bad("account-unknown-margin-model", "accounts", rows("accounts", "carol,Carol,aggressive"),
        2, "margin_model", "'aggressive' is not one of standard, portfolio"),
    Bad("account-id-with-space", "accounts", rows("accounts", "carol smith,Carol,standard"),
        2, "account_id", "must be 1-64 characters"),
    Bad("account-empty-owner", "accounts", rows("accounts", "carol,,standard"), 2, "owner",
        "is required"),
    Bad("account-owner-with-control-character", "accounts",
        rows("accounts", "carol,Carol\tLtd,standard"), 2, "owner", "control characters"),
    Bad("account-twice-in-one-file", "accounts",
        rows("accounts", "carol,Carol,standard", "carol,Carol,standard"), 3, "account_id",
        "already appears on line 2"),
    Bad("account-reopened-with-other-details", "accounts",
        rows("accounts", "carol,Carol,standard", "alice,Alice Trading Ltd,portfolio"), 3,
        "account_id", "'alice' was already recorded with different content"),
    # ---------------------------------------------------------------- instruments
    Bad("option-strike-contradicts-symbol", "instruments",
        rows("instruments", instrument("BTC-27DEC26-90000-C", "option", expiry=EXPIRY,
                                       strike="95000", option_type="call")),
        2, "strike", "contradicts symbol"),
    Bad("option-expiry-contradicts-symbol", "instruments",
        rows("instruments", instrument("BTC-27DEC26-90000-C", "option",
                                       expiry="2026-12-28T08:00:00Z", strike="90000",
                                       option_type="call")),
        2, "expiry", "contradicts symbol"),
    Bad("option-type-contradicts-symbol", "instruments",
        rows("instruments", instrument("BTC-27DEC26-90000-C", "option", expiry=EXPIRY,
                                       strike="90000", option_type="put")),
        2, "option_type", "contradicts symbol"),
    Bad("option-type-not-call-or-put", "instruments",
        rows("instruments", instrument("BTC-27DEC26-90000-C", "option", expiry=EXPIRY,
                                       strike="90000", option_type="C")),
        2, "option_type", "is not call or put"),
    Bad("perpetual-with-expiry", "instruments",
        rows("instruments", instrument("ETH-PERP", "perpetual", underlying="ETH",
                                       expiry=EXPIRY)),
        2, "expiry", "must be empty for a perpetual"),
    Bad("future-without-expiry", "instruments",
        rows("instruments", instrument("ETH-27DEC26", "future", underlying="ETH")),
        2, "expiry", "is required"),
    Bad("expiry-without-zone", "instruments",
        rows("instruments", instrument("ETH-27DEC26", "future", underlying="ETH",
                                       expiry="2026-12-27T08:00:00")),
        2, "expiry", "has no timezone"),
    Bad("kind-contradicts-symbol", "instruments",
        rows("instruments", instrument("ETH-PERP", "future", underlying="ETH")),
        2, "kind", "contradicts symbol"),
    Bad("unknown-kind", "instruments",
        rows("instruments", instrument("ETH-PERP", "swap", underlying="ETH")),
        2, "kind", "'swap' is not one of future, perpetual, option"),
    Bad("underlying-contradicts-symbol", "instruments",
        rows("instruments", instrument("ETH-PERP", "perpetual", underlying="BTC")),
        2, "underlying", "contradicts symbol"),
    Bad("symbol-of-unknown-underlying", "instruments",
        rows("instruments", instrument("DOGE-PERP", "perpetual", underlying="DOGE")),
        2, "symbol", "is not UNDERLYING-PERP"),
    Bad("symbol-date-that-does-not-exist", "instruments",
        rows("instruments", instrument("ETH-31FEB27", "future", underlying="ETH",
                                       expiry="2027-02-28T08:00:00Z")),
        2, "symbol", "is not a real date"),
    Bad("settles-in-btc", "instruments",
        rows("instruments", instrument("ETH-PERP", "perpetual", underlying="ETH",
                                       settlement_asset="BTC")),
        2, "settlement_asset", "instruments settle in USDC"),
    Bad("zero-multiplier", "instruments",
        rows("instruments", instrument("ETH-PERP", "perpetual", underlying="ETH",
                                       multiplier="0")),
        2, "multiplier", "must be greater than zero"),
    Bad("relisted-with-other-terms", "instruments",
        rows("instruments", instrument("ETH-PERP", "perpetual", underlying="ETH"),
             instrument(PERP, "perpetual", multiplier="10")),
        3, "symbol", "already listed with other terms"),
    # ---------------------------------------------------------------- deposits
    Bad("deposit-unknown-account", "deposits", rows("deposits", collateral(account_id="carol")),
        2, "account_id", "unknown account 'carol'"),
    Bad("deposit-to-house-account", "deposits",
        rows("deposits", collateral(account_id="ccp:fees")),
        2, "account_id", "unknown account 'ccp:fees'"),
    Bad("deposit-unknown-asset", "deposits", rows("deposits", collateral(asset="DOGE")),
        2, "asset", "unknown asset 'DOGE'"),
    Bad("deposit-negative-amount", "deposits", rows("deposits", collateral(amount="-5")),
        2, "amount", "must be greater than zero"),
    Bad("deposit-zero-amount", "deposits", rows("deposits", collateral(amount="0")),
        2, "amount", "must be greater than zero"),
    Bad("deposit-usdc-7-decimals", "deposits",
        rows("deposits", collateral(amount="1.0000001")), 2, "amount", "more than 6 decimals"),
    Bad("deposit-btc-9-decimals", "deposits",
        rows("deposits", collateral(asset="BTC", amount="0.123456789")), 2, "amount",
        "more than 8 decimals"),
    Bad("deposit-nan", "deposits", rows("deposits", collateral(amount="NaN")),
        2, "amount", "is not a finite number"),
    Bad("deposit-infinity", "deposits", rows("deposits", collateral(amount="Infinity")),
        2, "amount", "is not a finite number"),
    Bad("deposit-1e400", "deposits", rows("deposits", collateral(amount="1e400")),
        2, "amount", "without an exponent"),
    Bad("deposit-41-digit-amount", "deposits", rows("deposits", collateral(amount="9" * 41)),
        2, "amount", "too long for a number"),
    Bad("deposit-words-for-amount", "deposits", rows("deposits", collateral(amount="ten")),
        2, "amount", "is not a number"),
    Bad("deposit-amount-with-underscore", "deposits",
        rows("deposits", collateral(amount="10_000")), 2, "amount",
        "is not a plain decimal number"),
    Bad("deposit-amount-in-fullwidth-digits", "deposits",
        rows("deposits", collateral(amount="\uff11\uff10")), 2, "amount",
        "is not a plain decimal number"),
    Bad("deposit-time-without-zone", "deposits",
        rows("deposits", collateral(time="2026-12-01 00:00")), 2, "time", "has no timezone"),
    Bad("deposit-month-13", "deposits",
        rows("deposits", collateral(time="2026-13-01T00:00:00Z")), 2, "time",
        "is not ISO 8601"),
    Bad("deposit-ref-twice-in-one-file", "deposits",
        rows("deposits", collateral(ref="ref-9"), collateral(ref="ref-9", amount="20")),
        3, "ref", "'ref-9' already appears on line 2"),
    Bad("deposit-ref-reused-with-other-amount", "deposits",
        rows("deposits", collateral(ref="ref-10"), collateral(ref="dep-1", amount="99")),
        3, "ref", "already recorded with different content"),
    # ---------------------------------------------------------------- withdrawals
    Bad("withdrawal-above-balance", "withdrawals",
        rows("withdrawals", collateral(amount="100000.000001")), 2, "amount",
        "exceeds its balance of 100000"),
    Bad("withdrawals-together-above-balance", "withdrawals",
        rows("withdrawals", collateral(ref="w-1", amount="60000"),
             collateral(ref="w-2", amount="60000")), 3, "amount", "exceeds its balance"),
    Bad("withdrawal-of-asset-never-deposited", "withdrawals",
        rows("withdrawals", collateral(account_id="bob", asset="ETH", amount="1")), 2,
        "amount", "exceeds its balance of 0"),
    Bad("withdrawal-unknown-account", "withdrawals",
        rows("withdrawals", collateral(account_id="carol")), 2, "account_id",
        "unknown account 'carol'"),
    Bad("withdrawal-beyond-initial-margin", "withdrawals",
        rows("withdrawals", collateral(asset="BTC", amount="1")), 2, "amount",
        "below its initial margin requirement",
        given=(("trades", rows("trades", trade("T-big", quantity="100"))),)),
    Bad("withdrawal-zero-amount", "withdrawals", rows("withdrawals", collateral(amount="0.00")),
        2, "amount", "must be greater than zero"),
    # ---------------------------------------------------------------- trades
    Bad("trade-unknown-instrument", "trades",
        rows("trades", trade(instrument="BTC-27DEC26-100000-X")), 2, "instrument",
        "unknown instrument 'BTC-27DEC26-100000-X'"),
    Bad("trade-unknown-buyer", "trades", rows("trades", trade(buyer="carol")), 2, "buyer",
        "unknown account 'carol'"),
    Bad("trade-unknown-seller", "trades", rows("trades", trade(seller="carol")), 2, "seller",
        "unknown account 'carol'"),
    Bad("trade-house-fee-account-as-buyer", "trades", rows("trades", trade(buyer="ccp:fees")),
        2, "buyer", "unknown account 'ccp:fees'"),
    Bad("trade-same-account-both-sides", "trades",
        rows("trades", trade(buyer="alice", seller="alice")), 2, "seller",
        "'alice' is both buyer and seller"),
    Bad("trade-on-expired-future", "trades",
        rows("trades", trade(instrument=FUTURE, time="2026-12-28T00:00:00Z")), 2, "time",
        f"{FUTURE} expired at {EXPIRY}"),
    Bad("trade-at-the-expiry-instant", "trades",
        rows("trades", trade(instrument=OPTION, price="100", time=EXPIRY)), 2, "time",
        "expired at"),
    Bad("trade-legs-1-and-3", "trades",
        rows("trades", trade(leg="1", instrument=OPTION, price="100"),
             trade(leg="3", instrument=FUTURE, buyer="bob", seller="alice")),
        2, "leg", "has legs 1,3; expected 1..2"),
    Bad("trade-leg-1-twice", "trades",
        rows("trades", trade(leg="1"), trade(leg="1", instrument=FUTURE)),
        2, "leg", "has legs 1,1"),
    Bad("trade-leg-0", "trades", rows("trades", trade(leg="0")), 2, "leg",
        "'0' is not a leg number from 1 to 16"),
    Bad("trade-legs-at-different-times", "trades",
        rows("trades", trade(leg="1"), trade(leg="2", instrument=FUTURE,
                                             time="2026-02-01T00:00:01Z")),
        3, "time", "have different times"),
    Bad("trade-second-leg-same-account-both-sides", "trades",
        rows("trades", trade(leg="1"), trade(leg="2", instrument=FUTURE, buyer="alice",
                                             seller="alice")),
        3, "seller", "'alice' is both buyer and seller"),
    Bad("trade-second-leg-unknown-instrument", "trades",
        rows("trades", trade(leg="1"), trade(leg="2", instrument="ETH-PERP")),
        3, "instrument", "unknown instrument 'ETH-PERP'"),
    Bad("trade-first-leg-unreadable-is-reported-once", "trades",
        rows("trades", trade(leg="1", quantity="one"), trade(leg="2", instrument=FUTURE)),
        2, "quantity", "is not a number"),
    Bad("trade-quantity-not-a-number", "trades", rows("trades", trade(quantity="one")), 2,
        "quantity", "is not a number"),
    Bad("trade-quantity-with-exponent", "trades", rows("trades", trade(quantity="1e2")), 2,
        "quantity", "without an exponent"),
    Bad("trade-zero-quantity", "trades", rows("trades", trade(quantity="0")), 2, "quantity",
        "must be greater than zero"),
    Bad("trade-quantity-9-decimals", "trades", rows("trades", trade(quantity="0.000000001")),
        2, "quantity", "more than 8 decimals"),
    Bad("trade-negative-price", "trades", rows("trades", trade(price="-90000")), 2, "price",
        "must be greater than zero"),
    Bad("trade-price-infinity", "trades", rows("trades", trade(price="-Infinity")), 2, "price",
        "is not a finite number"),
    Bad("trade-fee-more-decimals-than-usdc", "trades",
        rows("trades", trade(buyer_fee="0.0000001")), 2, "buyer_fee",
        "more than 6 decimals for USDC"),
    Bad("trade-negative-fee", "trades", rows("trades", trade(seller_fee="-0.5")), 2,
        "seller_fee", "must not be negative"),
    Bad("trade-time-without-zone", "trades", rows("trades", trade(time="2026-02-01T00:00:00")),
        2, "time", "has no timezone"),
    Bad("trade-id-reused-with-other-content", "trades",
        rows("trades", trade("T-2"), trade("T-1", quantity="2")), 3, "trade_id",
        "'T-1' was already recorded with different content", given=(("trades", TRADE_T1),)),
    # ---------------------------------------------------------------- marks
    Bad("mark-unknown-symbol", "marks", rows("marks", f"{AT},SOL,150,"), 2, "symbol",
        "'SOL' is neither an underlying"),
    Bad("mark-iv-on-perpetual", "marks", rows("marks", f"{AT},{PERP},90000,0.5"), 2, "iv",
        "applies to options only"),
    Bad("mark-iv-on-index", "marks", rows("marks", f"{AT},BTC,90000,0.5"), 2, "iv",
        "applies to options only"),
    Bad("mark-zero-price", "marks", rows("marks", f"{AT},BTC,0,"), 2, "price",
        "must be greater than zero"),
    Bad("mark-negative-iv", "marks", rows("marks", f"{AT},{OPTION},1200,-0.1"), 2, "iv",
        "must not be negative"),
    Bad("mark-iv-nan", "marks", rows("marks", f"{AT},{OPTION},1200,nan"), 2, "iv",
        "is not a finite number"),
    Bad("mark-same-symbol-and-time-twice", "marks",
        rows("marks", f"{AT},BTC,90000,", f"{AT},BTC,90001,"), 3, "time",
        "already marked at this time on line 2"),
    Bad("mark-time-without-zone", "marks", rows("marks", f"2026-12-01 00:00,BTC,90000,"), 2,
        "time", "has no timezone"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_file_is_refused_whole_with_its_line_and_field(case: Bad, ledger: CliLedger) -> None:
    for kind, content in case.given:
        ledger.import_ok(kind, content)
    events_before = ledger.event_count()
    path = ledger.write(case.content, f"{case.id}.csv")

    result = ledger.import_(case.kind, path)

    assert result.exit_code == EXIT_BAD_INPUT, (result.stderr, result.exception)
    expected = re.compile(rf"^{re.escape(str(path))}:{case.line}: {re.escape(case.field)}: "
                          rf".*{re.escape(case.reason)}", re.MULTILINE)
    assert expected.search(result.stderr), result.stderr
    problems = [line for line in result.stderr.splitlines() if line != "nothing was written"]
    assert len(problems) == case.problems, result.stderr
    assert all(PROBLEM_LINE.match(p) for p in problems), result.stderr
    assert result.stdout == ""
    assert ledger.event_count() == events_before


def test_a_file_of_bad_rows_reports_the_first_50_and_stops(ledger: CliLedger) -> None:
    bad_rows = [f"ccp:member-{n},Member {n},standard" for n in range(1, 201)]
    path = ledger.write(rows("accounts", *bad_rows))

    result = ledger.import_("accounts", path)

    assert result.exit_code == EXIT_BAD_INPUT, (result.stderr, result.exception)
    problems = [PROBLEM_LINE.match(line) for line in result.stderr.splitlines()
                if line != "nothing was written"]
    assert [int(m["line"]) for m in problems if m] == list(range(2, 52))
    assert ledger.event_count() == BASE_EVENTS


# -------------------------------------------------------------------- positive controls


@dataclass(frozen=True)
class Good:
    id: str
    kind: str
    content: str | bytes = field(repr=False)
    events: int


GOOD: list[Good] = [
    Good("accounts", "accounts", rows("accounts", "carol,Carol,standard"), 1),
    Good("accounts-with-bom-and-crlf", "accounts",
         ("\ufeff" + rows("accounts", "carol,Carol,standard", "dave,Dave,portfolio")
          ).replace("\n", "\r\n"), 2),
    Good("instruments", "instruments",
         rows("instruments", instrument("ETH-PERP", "perpetual", underlying="ETH"),
              instrument("ETH-27DEC26-4000-P", "option", underlying="ETH", expiry=EXPIRY,
                         strike="4000", option_type="put")), 2),
    Good("deposits", "deposits",
         rows("deposits", collateral(), collateral(ref="ref-10", asset="BTC",
                                                   amount="0.12345678")), 2),
    Good("withdrawals", "withdrawals",
         rows("withdrawals", collateral(ref="w-1", amount="40000"),
              collateral(ref="w-2", account_id="bob", amount="30000")), 2),
    Good("multi-leg-trade", "trades",
         rows("trades", trade(leg="2", instrument=FUTURE, buyer="bob", seller="alice"),
              trade(leg="1", instrument=OPTION, price="1200", buyer_fee="0.000001")), 1),
    Good("marks", "marks",
         rows("marks", "2026-02-02T00:00:00Z,BTC,91000,", f"{AT},{OPTION},1200,0.55",
              f"2026-02-01T01:00:00+01:00,{PERP},90010,"), 3),
]


@pytest.mark.parametrize("case", GOOD, ids=[c.id for c in GOOD])
def test_good_file_is_accepted_and_reimporting_it_changes_nothing(case: Good,
                                                                   ledger: CliLedger) -> None:
    path = ledger.write(case.content, f"{case.id}.csv")

    first = ledger.import_(case.kind, path)
    assert first.exit_code == 0, (first.stderr, first.exception)
    assert first.stderr == ""
    assert ledger.event_count() == BASE_EVENTS + case.events

    again = ledger.import_(case.kind, path)
    assert again.exit_code == 0, (again.stderr, again.exception)
    assert "nothing written" in again.stdout
    assert ledger.event_count() == BASE_EVENTS + case.events


def test_reimporting_a_withdrawal_of_the_whole_balance_changes_nothing(
        ledger: CliLedger) -> None:
    path = ledger.write(rows("withdrawals", collateral(account_id="bob", amount="100000")))
    assert ledger.import_("withdrawals", path).exit_code == 0
    assert ledger.event_count() == BASE_EVENTS + 1

    again = ledger.import_("withdrawals", path)

    assert again.exit_code == 0, again.stderr
    assert ledger.event_count() == BASE_EVENTS + 1


def test_collateral_without_an_index_price_counts_as_zero_in_a_withdrawal_check(
        ledger: CliLedger) -> None:
    """Unpriced collateral can only add value, so it is valued at nothing rather than
    blocking the member's other withdrawals."""
    deposit = ledger.write(rows("deposits", collateral("dep-eth", "bob", "ETH", "1")))
    assert ledger.import_("deposits", deposit).exit_code == 0
    path = ledger.write(rows("withdrawals", collateral(account_id="bob", amount="10")))
    result = ledger.import_("withdrawals", path)
    assert result.exit_code == 0, result.stderr
    assert ledger.event_count() == BASE_EVENTS + 2
