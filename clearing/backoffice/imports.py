"""`clearing import KIND FILE.csv`: one file is one atomic append.

Every row is parsed and decided before anything is written; any problem in any row refuses
the whole file with `FILE:LINE: field: reason`. Re-importing a file writes nothing: each fact
carries the venue's or custodian's own id as its idempotency key.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from pathlib import Path
from typing import NamedTuple, Protocol

from pydantic import ValidationError

from clearing.domain.accounts import InvalidAccountId, MarginModel, check_member_account_id
from clearing.domain.clock import InvalidTimeError, NaiveTimeError, parse_time
from clearing.domain.commands import (
    ClearTrade,
    MoveCollateral,
    NewFact,
    OpenAccount,
    PublishMark,
    decide_clear_trade,
    decide_deposit,
    decide_list_instrument,
    decide_mark,
    decide_open_account,
    decide_withdrawal,
)
from clearing.domain.events import TradeLeg
from clearing.domain.instruments import Instrument, InstrumentError
from clearing.domain.ledger import Account
from clearing.domain.margin import MissingIndexPrice, MissingRiskParameter
from clearing.domain.money import (
    PRICE_SCALE,
    QUANTITY_SCALE,
    InvalidAmount,
    UnknownAsset,
    asset_spec,
    parse_amount,
    parse_decimal,
)
from clearing.domain.rejections import Rejected, SameAccountBothSides
from clearing.backoffice.csvinput import (
    ERRORS_REPORTED_MAX,
    CsvRow,
    InputProblem,
    InputRejected,
    read_csv,
)

_CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f]")
REFERENCE_CHARS_MAX = 128
OWNER_CHARS_MAX = 200
LEGS_MAX = 16
"""Most legs in one multi-leg trade."""
MULTIPLIER_SCALE = 8
STRIKE_SCALE = 8


class ImportKind(StrEnum):
    ACCOUNTS = "accounts"
    INSTRUMENTS = "instruments"
    DEPOSITS = "deposits"
    WITHDRAWALS = "withdrawals"
    TRADES = "trades"
    MARKS = "marks"


COLUMNS: dict[ImportKind, tuple[str, ...]] = {
    ImportKind.ACCOUNTS: ("account_id", "owner", "margin_model"),
    ImportKind.INSTRUMENTS: ("symbol", "kind", "underlying", "settlement_asset", "expiry",
                             "strike", "option_type", "multiplier"),
    ImportKind.DEPOSITS: ("ref", "account_id", "asset", "amount", "time"),
    ImportKind.WITHDRAWALS: ("ref", "account_id", "asset", "amount", "time"),
    ImportKind.TRADES: ("trade_id", "leg", "instrument", "buyer", "seller", "quantity", "price",
                        "buyer_fee", "seller_fee", "time"),
    ImportKind.MARKS: ("time", "symbol", "price", "iv"),
}


class LedgerView(Protocol):
    """What deciding an import needs to know of the ledger as it stands."""

    def account(self, account_id: str) -> Account | None: ...
    def account_ids(self) -> set[str]: ...
    def instruments(self) -> dict[str, Instrument]: ...
    def balance(self, account_id: str, asset: str) -> Decimal: ...
    def check_withdrawal(self, account_id: str, withdrawn: dict[str, Decimal],
                         at: datetime) -> None: ...
    def recorded_keys(self, keys: list[str]) -> set[str]: ...
    def settled_instruments(self) -> set[str]: ...


class DecidedRow(NamedTuple):
    line: int
    fact: NewFact


class _Problems:
    def __init__(self, file: str):
        self.file = file
        self.items: list[InputProblem] = []

    def add(self, line: int, field: str, reason: str) -> None:
        self.items.append(InputProblem(self.file, line, field, reason))
        if self.full():
            raise _StopLooking

    def full(self) -> bool:
        return len(self.items) >= ERRORS_REPORTED_MAX

    def raise_if_any(self) -> None:
        if self.items:
            raise InputRejected(self.items)


class _StopLooking(Exception):
    """A file has shown ERRORS_REPORTED_MAX problems: enough to refuse it and to report."""


class FieldProblem(ValueError):
    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


def _text(row: CsvRow, field: str, limit: int = REFERENCE_CHARS_MAX) -> str:
    value = row.values[field]
    if not value:
        raise FieldProblem(field, "is required")
    if len(value) > limit:
        raise FieldProblem(field, f"is longer than {limit} characters")
    if _CONTROL_CHARACTERS.search(value):
        raise FieldProblem(field, "contains control characters")
    return value


def _time(row: CsvRow, field: str = "time") -> datetime:
    try:
        return parse_time(_text(row, field))
    except (NaiveTimeError, InvalidTimeError) as exc:
        raise FieldProblem(field, str(exc)) from None


def _decimal(row: CsvRow, field: str, scale: int, *, positive: bool = False,
             non_negative: bool = False) -> Decimal:
    try:
        return parse_decimal(_text(row, field), scale=scale, positive=positive,
                             non_negative=non_negative)
    except InvalidAmount as exc:
        raise FieldProblem(field, exc.reason if exc.text else str(exc)) from None


def _account_id(row: CsvRow, field: str) -> str:
    value = _text(row, field)
    if value.startswith("ccp:"):
        return value  # house accounts are checked by the command's own rules
    try:
        return check_member_account_id(value)
    except InvalidAccountId as exc:
        raise FieldProblem(field, exc.reason) from None


def _asset(row: CsvRow) -> str:
    value = _text(row, "asset")
    try:
        asset_spec(value)
    except UnknownAsset as exc:
        raise FieldProblem("asset", str(exc)) from None
    return value


def _amount(row: CsvRow, asset: str) -> Decimal:
    try:
        return parse_amount(_text(row, "amount"), asset)
    except InvalidAmount as exc:
        raise FieldProblem("amount", exc.reason) from None


def parse_account(row: CsvRow) -> OpenAccount:
    account_id = _account_id(row, "account_id")
    if account_id.startswith("ccp:"):
        raise FieldProblem("account_id", "the prefix 'ccp:' is reserved for house accounts")
    model = _text(row, "margin_model")
    if model not in {m.value for m in MarginModel}:
        raise FieldProblem("margin_model", f"{model!r} is not one of standard, portfolio")
    return OpenAccount(account_id, _text(row, "owner", OWNER_CHARS_MAX), MarginModel(model))


def parse_instrument(row: CsvRow) -> Instrument:
    values = row.values
    fields: dict[str, object] = {
        "symbol": _text(row, "symbol"),
        "kind": _text(row, "kind"),
        "underlying": _text(row, "underlying"),
        "settlement_asset": _text(row, "settlement_asset"),
        "multiplier": _decimal(row, "multiplier", MULTIPLIER_SCALE, positive=True),
        "expiry": _time(row, "expiry") if values["expiry"] else None,
        "strike": (_decimal(row, "strike", STRIKE_SCALE, positive=True)
                   if values["strike"] else None),
        "option_type": values["option_type"] or None,
    }
    if fields["kind"] not in ("future", "perpetual", "option"):
        raise FieldProblem("kind", f"{fields['kind']!r} is not one of future, perpetual, "
                                   "option")
    if fields["option_type"] not in (None, "call", "put"):
        raise FieldProblem("option_type", f"{fields['option_type']!r} is not call or put")
    try:
        return Instrument(**fields)  # type: ignore[arg-type]
    except ValidationError as exc:
        error = exc.errors()[0]
        cause = error.get("ctx", {}).get("error")
        if isinstance(cause, InstrumentError):
            raise FieldProblem(cause.field, cause.reason) from None
        field = ".".join(str(p) for p in error.get("loc", ())) or "row"
        raise FieldProblem(field, error.get("msg", "invalid")) from None


def parse_collateral(row: CsvRow) -> MoveCollateral:
    asset = _asset(row)
    return MoveCollateral(_text(row, "ref"), _account_id(row, "account_id"), asset,
                          _amount(row, asset), _time(row))


class AcceptedValues:
    """Cell texts a file has already shown to be valid, with what they parsed to. A trades
    file repeats the same accounts, prices, fees and times on row after row; a text that
    parsed once parses the same again, so only its first occurrence pays for the checks.
    Only accepted texts are kept: a bad one is judged (and reported) by the full checks."""

    def __init__(self) -> None:
        self.accounts: dict[str, str] = {}
        self.decimals: dict[tuple[str, str], Decimal] = {}
        """By (field, text): the field decides the scale and the sign allowed."""
        self.times: dict[str, datetime] = {}


def _cached_account_id(row: CsvRow, field: str, accepted: AcceptedValues) -> str:
    text = row.values[field]
    value = accepted.accounts.get(text)
    if value is None:
        value = accepted.accounts[text] = _account_id(row, field)
    return value


def _cached_decimal(row: CsvRow, field: str, scale: int, accepted: AcceptedValues, *,
                    positive: bool = False, non_negative: bool = False) -> Decimal:
    key = (field, row.values[field])
    value = accepted.decimals.get(key)
    if value is None:
        value = accepted.decimals[key] = _decimal(row, field, scale, positive=positive,
                                                  non_negative=non_negative)
    return value


def _cached_time(row: CsvRow, accepted: AcceptedValues) -> datetime:
    text = row.values["time"]
    value = accepted.times.get(text)
    if value is None:
        value = accepted.times[text] = _time(row)
    return value


def parse_leg(row: CsvRow, accepted: AcceptedValues | None = None
              ) -> tuple[str, datetime, TradeLeg]:
    accepted = accepted or AcceptedValues()
    trade_id = _text(row, "trade_id")
    leg_text = _text(row, "leg")
    if not leg_text.isdigit() or not 1 <= int(leg_text) <= LEGS_MAX:
        raise FieldProblem("leg", f"{leg_text!r} is not a leg number from 1 to {LEGS_MAX}")
    leg = TradeLeg(
        leg=int(leg_text),
        instrument=_text(row, "instrument"),
        buyer=_cached_account_id(row, "buyer", accepted),
        seller=_cached_account_id(row, "seller", accepted),
        quantity=_cached_decimal(row, "quantity", QUANTITY_SCALE, accepted, positive=True),
        price=_cached_decimal(row, "price", PRICE_SCALE, accepted, positive=True),
        buyer_fee=_cached_decimal(row, "buyer_fee", 8, accepted, non_negative=True),
        seller_fee=_cached_decimal(row, "seller_fee", 8, accepted, non_negative=True),
    )
    return trade_id, _cached_time(row, accepted), leg


def parse_mark(row: CsvRow) -> PublishMark:
    iv = (_decimal(row, "iv", 8, non_negative=True) if row.values["iv"] else None)
    return PublishMark(_text(row, "symbol"), _decimal(row, "price", PRICE_SCALE, positive=True),
                       iv, _time(row))


def decide_file(kind: ImportKind, path: Path, view: LedgerView,
                now: datetime) -> tuple[list[DecidedRow], int]:
    """Parse and decide every row of a file; refuse the whole file on any problem. Returns
    the facts decided, each with its line, and the number of rows read."""
    rows = read_csv(path, COLUMNS[kind])
    problems = _Problems(str(path))
    decided: list[DecidedRow] = []
    decider = _DECIDERS[kind]
    try:
        decider(rows, view, now, problems, decided)
    except _StopLooking:
        pass
    problems.raise_if_any()
    return decided, len(rows)


def _guard(problems: _Problems, line: int, action: Callable[[], object]) -> object | None:
    try:
        return action()
    except FieldProblem as exc:
        problems.add(line, exc.field, exc.reason)
    except Rejected as exc:
        problems.add(line, exc.field, exc.reason)
    return None


Decider = Callable[[list[CsvRow], LedgerView, datetime, _Problems, list[DecidedRow]], None]


def _decide_accounts(rows, view, now, problems, decided) -> None:  # type: ignore[no-untyped-def]
    seen: dict[str, int] = {}
    for row in rows:
        cmd = _guard(problems, row.line, lambda: parse_account(row))
        if cmd is None:
            continue
        assert isinstance(cmd, OpenAccount)
        if cmd.account_id in seen:
            problems.add(row.line, "account_id", f"{cmd.account_id!r} already appears on line "
                                                 f"{seen[cmd.account_id]}")
            continue
        seen[cmd.account_id] = row.line
        facts = _guard(problems, row.line, lambda: decide_open_account(
            cmd, view.account(cmd.account_id), now))
        decided.extend(DecidedRow(row.line, f) for f in facts or [])  # type: ignore[union-attr]


def _decide_instruments(rows, view, now, problems, decided) -> None:  # type: ignore[no-untyped-def]
    listed = view.instruments()
    seen: dict[str, int] = {}
    for row in rows:
        instrument = _guard(problems, row.line, lambda: parse_instrument(row))
        if instrument is None:
            continue
        assert isinstance(instrument, Instrument)
        if instrument.symbol in seen:
            problems.add(row.line, "symbol", f"{instrument.symbol} already appears on line "
                                             f"{seen[instrument.symbol]}")
            continue
        seen[instrument.symbol] = row.line
        facts = _guard(problems, row.line, lambda: decide_list_instrument(
            instrument, listed.get(instrument.symbol), now))
        decided.extend(DecidedRow(row.line, f) for f in facts or [])  # type: ignore[union-attr]


def _decide_collateral(withdraw: bool) -> Decider:
    def decide(rows, view, now, problems, decided) -> None:  # type: ignore[no-untyped-def]
        accounts = view.account_ids()
        spent: dict[tuple[str, str], Decimal] = {}
        seen: dict[str, int] = {}
        # A withdrawal already recorded is not judged again against today's balance: the
        # store recognises it (same content: nothing written; other content: refused).
        recorded = view.recorded_keys([f"withdrawal:{row.values['ref']}" for row in rows]) \
            if withdraw else set()
        for row in rows:
            cmd = _guard(problems, row.line, lambda: parse_collateral(row))
            if cmd is None:
                continue
            assert isinstance(cmd, MoveCollateral)
            if cmd.reference in seen:
                problems.add(row.line, "ref", f"{cmd.reference!r} already appears on line "
                                              f"{seen[cmd.reference]}")
                continue
            seen[cmd.reference] = row.line
            if withdraw and f"withdrawal:{cmd.reference}" in recorded:
                facts = _guard(problems, row.line,
                               lambda: decide_withdrawal(cmd, accounts, cmd.amount))
            elif withdraw:
                key = (cmd.account_id, cmd.asset)
                before = spent.get(key, Decimal(0))
                balance = view.balance(cmd.account_id, cmd.asset) - before

                def decide_one() -> list[NewFact]:
                    facts = decide_withdrawal(cmd, accounts, balance)
                    withdrawn = {asset: amount for (acct, asset), amount in spent.items()
                                 if acct == cmd.account_id}
                    withdrawn[cmd.asset] = before + cmd.amount
                    try:
                        view.check_withdrawal(cmd.account_id, withdrawn, cmd.at)
                    except (MissingIndexPrice, MissingRiskParameter) as exc:
                        # Without a price the account's equity is unknown: a withdrawal
                        # that cannot be shown safe is refused, not guessed.
                        raise FieldProblem("amount", "cannot be checked against margin: "
                                                     f"{exc}") from None
                    return facts

                facts = _guard(problems, row.line, decide_one)
                if facts:
                    spent[key] = before + cmd.amount
            else:
                facts = _guard(problems, row.line, lambda: decide_deposit(cmd, accounts))
            decided.extend(DecidedRow(row.line, f) for f in facts or [])  # type: ignore[union-attr]
    return decide


def _decide_trades(rows, view, now, problems, decided) -> None:  # type: ignore[no-untyped-def]
    accounts = view.account_ids()
    instruments = view.instruments()
    settled = view.settled_instruments()
    trades: dict[str, list[tuple[int, datetime, TradeLeg]]] = {}
    unparsed: set[str] = set()
    accepted = AcceptedValues()
    for row in rows:
        parsed = _guard(problems, row.line, lambda: parse_leg(row, accepted))
        if parsed is None:
            # Its other legs are not judged: their numbers would report this row's problem
            # again as a confusing second one ("has legs 2; expected 1..1").
            unparsed.add(row.values["trade_id"])
            continue
        trade_id, at, leg = parsed  # type: ignore[misc]
        trades.setdefault(trade_id, []).append((row.line, at, leg))
    recorded = view.recorded_keys([f"trade:{trade_id}" for trade_id in trades]) \
        if settled else set()
    for trade_id, legs in trades.items():
        if trade_id in unparsed:
            continue
        first_line = legs[0][0]
        numbers = [leg.leg for _, _, leg in legs]
        expected = list(range(1, len(legs) + 1))
        if numbers != expected and sorted(numbers) != expected:
            problems.add(first_line, "leg", f"trade {trade_id!r} has legs "
                                            f"{','.join(map(str, numbers))}; expected 1.."
                                            f"{len(legs)}, each once")
            continue
        at = legs[0][1]
        if any(other != at for _, other, _ in legs):
            problems.add(legs[1][0], "time", f"legs of trade {trade_id!r} have different "
                                             "times")
            continue
        ordered = tuple(leg for _, _, leg in (legs if numbers == expected else
                                              sorted(legs, key=lambda x: x[2].leg)))
        cmd = ClearTrade(trade_id, ordered, at)
        try:
            # A trade already recorded is a redelivery: the store recognises it; only a
            # new trade is refused for an instrument that has settled since.
            facts = decide_clear_trade(cmd, accounts, instruments,
                                       () if f"trade:{trade_id}" in recorded else settled)
        except Rejected as exc:
            line_of_leg = {leg.leg: line for line, _, leg in legs}
            problems.add(line_of_leg.get(_leg_of(exc, cmd), first_line), exc.field,
                         exc.reason)
            continue
        decided.extend([DecidedRow(first_line, f) for f in facts])
        if problems.full():
            break


def _leg_of(exc: Rejected, cmd: ClearTrade) -> int:
    """The leg a rejection is about: the first leg it fits (legs are checked in order)."""
    for leg in cmd.legs:
        if isinstance(exc, SameAccountBothSides):
            # The account alone would also match an earlier leg it trades in correctly.
            if leg.buyer == leg.seller == exc.value:
                return leg.leg
        elif exc.value in (leg.instrument, leg.buyer, leg.seller, leg.buyer_fee,
                           leg.seller_fee):
            return leg.leg
    return 1


def _decide_marks(rows, view, now, problems, decided) -> None:  # type: ignore[no-untyped-def]
    instruments = view.instruments()
    seen: dict[tuple[str, datetime], int] = {}
    for row in rows:
        cmd = _guard(problems, row.line, lambda: parse_mark(row))
        if cmd is None:
            continue
        assert isinstance(cmd, PublishMark)
        key = (cmd.symbol, cmd.at)
        if key in seen:
            problems.add(row.line, "time", f"{cmd.symbol} is already marked at this time on "
                                           f"line {seen[key]}")
            continue
        seen[key] = row.line
        facts = _guard(problems, row.line, lambda: decide_mark(cmd, instruments))
        decided.extend(DecidedRow(row.line, f) for f in facts or [])  # type: ignore[union-attr]


_DECIDERS: dict[ImportKind, Decider] = {
    ImportKind.ACCOUNTS: _decide_accounts,
    ImportKind.INSTRUMENTS: _decide_instruments,
    ImportKind.DEPOSITS: _decide_collateral(withdraw=False),
    ImportKind.WITHDRAWALS: _decide_collateral(withdraw=True),
    ImportKind.TRADES: _decide_trades,
    ImportKind.MARKS: _decide_marks,
}
