"""`clearing reconcile balances|trades FILE.csv`: the ledger against an external statement.

A custodian's balances statement (`account_id,asset,balance`) or a venue's trades statement
(`trade_id,leg,instrument,buyer,seller,quantity,price`) is matched with the read models, after
bringing them up to date, on its natural key: (account_id, asset) or (trade_id, leg). Every
disagreement is a break:

- `missing_in_ledger`: the statement has the key, the ledger has not (`ours` is null);
- `missing_in_statement`: the ledger has the key, the statement has not (`theirs` is null);
- `amount_mismatch`: a balance differs by more than the tolerance (both values);
- `field_mismatch`: a trade leg's instrument, buyer, seller, quantity or price differs; the key
  names the field, e.g. `T1/1/price` (both values).

Rules, in the back office's terms:

- Decimals are compared by value (`1.5` equals `1.50`) and shown at the asset's scale for
  balances, without trailing zeros for quantities and prices.
- Tolerance (`--tolerance`, balances only): an absolute amount, the same for every asset,
  zero by default; two balances match when they differ by at most the tolerance.
- A balance absent on one side counts as zero: a zero (within tolerance) ledger balance the
  statement does not list is not a break, and a zero statement line for a key the ledger
  never had matches.
- House accounts (`ccp:`) are the clearing house's own books, which a member's custodian does
  not report: their ledger balances are compared only for house accounts the statement
  lists (on any line); otherwise they are left out.
- A busted trade no longer stands: its legs are not in the ledger's trade set, so a
  statement that still lists them shows `missing_in_ledger` breaks.
- `matched` counts the statement lines that agree with the ledger; every other statement
  line is a break (a trade leg may show several field mismatches).

Bad input (a malformed row, an unknown asset, too many decimals for the asset, a key listed
twice) refuses the whole statement with `FILE:LINE: field: reason`; nothing is compared or
recorded.

Memory stays bounded whatever the statement's size: the file is read line by line, validated
and sorted externally (sorted runs on disk, then merged, see `external_sort`), while the
ledger side is read in key order through a streaming query, so the comparison is one sorted
merge. Breaks are written out as they are found.

Each run is recorded as a `ReconciliationRun` in the stream `reconciliations`. Its
idempotency key is the kind, the file's SHA-256, the tolerance and the ledger position
compared (the last fact, other than reconciliation runs, folded into the read models), so
running the same statement against the same ledger again records nothing new.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import closing
from dataclasses import dataclass
from decimal import Decimal
from operator import itemgetter
from pathlib import Path
from typing import Any, BinaryIO, Protocol, TextIO

from rich.console import Console
from rich.table import Table
from sqlalchemy import Connection, Select, select, tuple_

from clearing.app import Ledger
from clearing.backoffice.csvinput import (
    ERRORS_REPORTED_MAX,
    FIELD_CHARS_MAX,
    InputProblem,
    InputRejected,
)
from clearing.backoffice.external_sort import Codec, SortedRecords, sort_records
from clearing.backoffice.imports import LEGS_MAX, REFERENCE_CHARS_MAX
from clearing.backoffice.queries import money_text
from clearing.domain.accounts import (
    HOUSE_ACCOUNTS,
    HOUSE_PREFIX,
    InvalidAccountId,
    check_member_account_id,
)
from clearing.domain.commands import NewFact
from clearing.domain.events import ReconciliationRun
from clearing.domain.money import (
    PRICE_SCALE,
    QUANTITY_SCALE,
    InvalidAmount,
    UnknownAsset,
    asset_spec,
    canonical_decimal,
    parse_decimal,
)
from clearing.projections import tables as t
from clearing.projections.ledger import LedgerProjection
from clearing.store.errors import IdempotencyConflict
from clearing.store.tables import checkpoints, events

STATEMENT_ROWS_MAX = 50_000_000
"""Most data rows in one statement (memory does not grow with it; disk does, about twice
the file's size while it is sorted)."""
LINE_BYTES_MAX = 64 * 1024
"""Longest physical line of a statement."""
LEDGER_PAGE_ROWS = 5_000
"""Read-model rows fetched per round trip of the streaming query."""
TABLE_PAGE_ROWS = 1_000
"""Breaks per printed table: a person's screen gets pages, never one huge table."""
PROGRESS_LINES = 20_000
"""Lines read between two progress reports."""
STREAM_ID = "reconciliations"
ZERO = Decimal(0)
TRADE_FIELDS = ("instrument", "buyer", "seller", "quantity", "price")
_CONTROL = re.compile(r"[\x00-\x1f]")
"""Refused in every text field (the sort's temporary files also rely on it: no tab, no
newline inside a field)."""


class InvariantViolation(RuntimeError):
    """The ledger broke a rule the comparison relies on: stop loudly, report nothing."""


@dataclass(frozen=True)
class Break:
    kind: str
    key: str
    ours: str | None
    theirs: str | None

    def document(self) -> dict[str, str | None]:
        return {"kind": self.kind, "key": self.key, "ours": self.ours, "theirs": self.theirs}


@dataclass
class Tally:
    matched: int = 0
    breaks: int = 0


# ---------------------------------------------------------------- the statement's rows

class _FieldProblem(ValueError):
    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


def _text(values: dict[str, str], field: str, limit: int = REFERENCE_CHARS_MAX) -> str:
    value = values[field]
    if not value:
        raise _FieldProblem(field, "is required")
    if len(value) > limit:
        raise _FieldProblem(field, f"is longer than {limit} characters")
    if _CONTROL.search(value):
        raise _FieldProblem(field, "contains control characters")
    return value


def _account_id(values: dict[str, str], field: str) -> str:
    value = _text(values, field)
    if value.startswith(HOUSE_PREFIX):
        if value not in HOUSE_ACCOUNTS:
            raise _FieldProblem(field, f"{value!r} is not a house account (house accounts: "
                                       f"{', '.join(HOUSE_ACCOUNTS)})")
        return value
    try:
        return check_member_account_id(value)
    except InvalidAccountId as exc:
        raise _FieldProblem(field, exc.reason) from None


def _decimal_text(values: dict[str, str], field: str, scale: int, *,
                  positive: bool = False) -> str:
    text = _text(values, field)
    try:
        parse_decimal(text, scale=scale, positive=positive)
    except InvalidAmount as exc:
        raise _FieldProblem(field, exc.reason) from None
    return text


def parse_balance_row(values: dict[str, str], line: int) -> tuple[str, str, str, int]:
    """(account_id, asset, balance as written, line); the balance may be negative (house
    accounts) but has at most the asset's decimals."""
    account_id = _account_id(values, "account_id")
    asset = _text(values, "asset")
    try:
        scale = asset_spec(asset).scale
    except UnknownAsset as exc:
        raise _FieldProblem("asset", str(exc)) from None
    return account_id, asset, _decimal_text(values, "balance", scale), line


def parse_trade_row(values: dict[str, str],
                    line: int) -> tuple[str, int, str, str, str, str, str, int]:
    """(trade_id, leg, instrument, buyer, seller, quantity, price, line)."""
    trade_id = _text(values, "trade_id")
    leg_text = _text(values, "leg")
    if not (leg_text.isascii() and leg_text.isdigit()) or not 1 <= int(leg_text) <= LEGS_MAX:
        raise _FieldProblem("leg", f"{leg_text!r} is not a leg number from 1 to {LEGS_MAX}")
    return (trade_id, int(leg_text), _text(values, "instrument"),
            _account_id(values, "buyer"), _account_id(values, "seller"),
            _decimal_text(values, "quantity", QUANTITY_SCALE, positive=True),
            _decimal_text(values, "price", PRICE_SCALE, positive=True), line)


def _split(line: str) -> list[str]:
    return line.split("\t")


BALANCE_CODEC = Codec(
    encode=lambda r: f"{r[0]}\t{r[1]}\t{r[2]}\t{r[3]}",
    decode=lambda s: (lambda p: (p[0], p[1], p[2], int(p[3])))(_split(s)),
)
TRADE_CODEC = Codec(
    encode=lambda r: "\t".join(map(str, r)),
    decode=lambda s: (lambda p: (p[0], int(p[1]), p[2], p[3], p[4], p[5], p[6],
                                 int(p[7])))(_split(s)),
)


# ---------------------------------------------------------------- reading, streaming

class _LineProblem(Exception):
    def __init__(self, problem: InputProblem):
        self.problem = problem


Progress = Callable[[int], None]
"""Told the bytes of the statement read so far, now and then."""


def _physical_lines(handle: BinaryIO, name: str, digest: Any,
                    progress: Progress | None = None) -> Iterator[str]:
    """The file's lines, decoded strictly, each at most `LINE_BYTES_MAX` bytes, feeding the
    SHA-256 of the whole file as they pass."""
    number = 0
    read = 0
    while True:
        raw = handle.readline(LINE_BYTES_MAX + 1)
        if not raw:
            if progress is not None:
                progress(read)
            return
        number += 1
        read += len(raw)
        if progress is not None and number % PROGRESS_LINES == 0:
            progress(read)
        digest.update(raw)
        if len(raw) > LINE_BYTES_MAX:
            raise _LineProblem(InputProblem(name, number, "row",
                                            f"the line is longer than {LINE_BYTES_MAX} bytes"))
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _LineProblem(InputProblem(name, number, "file", "is not valid UTF-8 "
                                                                  f"(byte {exc.start} of the "
                                                                  "line)")) from None
        if number == 1:
            text = text.removeprefix("\ufeff")
        yield text


@dataclass(frozen=True)
class StatementKind:
    """What one kind of statement holds and how its lines are read, keyed and compared."""

    name: str
    columns: tuple[str, ...]
    key_columns: str
    parse: Callable[[dict[str, str], int], tuple[Any, ...]]
    codec: Codec


BALANCES = StatementKind("balances", ("account_id", "asset", "balance"), "account_id,asset",
                         parse_balance_row, BALANCE_CODEC)
TRADES = StatementKind("trades", ("trade_id", "leg", "instrument", "buyer", "seller",
                                  "quantity", "price"), "trade_id,leg", parse_trade_row,
                       TRADE_CODEC)
KINDS = {k.name: k for k in (BALANCES, TRADES)}
_KEY = itemgetter(0, 1)
"""Both kinds keep their two key fields first in a record, and the line last."""


@dataclass
class Statement:
    """A statement validated whole and sorted by key, ready to be merged with the ledger."""

    file: str
    rows: int
    sha256: str
    records: SortedRecords
    house_accounts: frozenset[str]
    """House accounts the statement lists on any line (balances)."""


def read_statement(path: Path, kind: StatementKind, workdir: Path,
                   progress: Progress | None = None) -> Statement:
    """Validate every line, sort by key on disk under `workdir`, refuse duplicate keys."""
    name = str(path)
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise InputRejected([InputProblem(name, 0, "file", exc.strerror or str(exc))]) from None
    reading = _StatementReading(name, kind)
    with handle, closing(reading.records(handle, progress)) as rows:
        records = sort_records(rows, _KEY, kind.codec, workdir)
    if reading.problems:
        raise InputRejected(reading.problems)
    _refuse_duplicates(records, name, kind)
    return Statement(name, reading.rows, reading.digest.hexdigest(), records,
                     frozenset(reading.house_accounts))


class _StatementReading:
    """One pass over a statement file: valid records in file order, and what the pass
    learns on the way (problems, data rows, the file's SHA-256, house accounts listed)."""

    def __init__(self, name: str, kind: StatementKind) -> None:
        self.name = name
        self.kind = kind
        self.problems: list[InputProblem] = []
        self.rows = 0
        self.digest = hashlib.sha256()
        self.house_accounts: set[str] = set()

    def records(self, handle: BinaryIO,
                progress: Progress | None = None) -> Iterator[tuple[Any, ...]]:
        """After the first problem nothing more is yielded, only checked, up to
        `ERRORS_REPORTED_MAX` problems."""
        name, kind, problems = self.name, self.kind, self.problems
        reader = csv.reader(_physical_lines(handle, name, self.digest, progress), strict=True)
        try:
            header = [h.strip() for h in next(reader)]
            if not any(header) and not any(any(c.strip() for c in row) for row in reader):
                raise StopIteration  # nothing but blank lines
        except StopIteration:
            problems.append(InputProblem(name, 1, "header", "the file is empty; expected "
                                                            + ",".join(kind.columns)))
            return
        except _LineProblem as exc:
            problems.append(exc.problem)
            return
        except csv.Error as exc:
            problems.append(InputProblem(name, 1, "header", str(exc)))
            return
        problems.extend(_header_problems(name, header, kind.columns))
        if problems:
            return
        while len(problems) < ERRORS_REPORTED_MAX:
            # A record's line is where it starts (a quoted cell may span lines).
            line = reader.line_num + 1
            try:
                cells = next(reader)
            except StopIteration:
                break
            except _LineProblem as exc:
                problems.append(exc.problem)
                break
            except csv.Error as exc:
                reason = str(exc)
                if "field larger" in reason:
                    reason = f"a cell is longer than {FIELD_CHARS_MAX} characters"
                problems.append(InputProblem(name, line, "row", reason))
                break
            cells = [c.strip() for c in cells]
            if not any(cells):
                continue
            if self.rows >= STATEMENT_ROWS_MAX:
                problems.append(InputProblem(name, line, "file",
                                             f"has more than {STATEMENT_ROWS_MAX} rows"))
                break
            self.rows += 1
            if len(cells) != len(header):
                problems.append(InputProblem(name, line, "row", f"has {len(cells)} cells, "
                                                                f"the header has {len(header)}"))
                continue
            try:
                record = kind.parse(dict(zip(header, cells, strict=True)), line)
            except _FieldProblem as exc:
                problems.append(InputProblem(name, line, exc.field, exc.reason))
                continue
            if not problems:
                if kind is BALANCES and record[0] in HOUSE_ACCOUNTS:
                    self.house_accounts.add(record[0])
                yield record


def _header_problems(name: str, header: list[str],
                     columns: tuple[str, ...]) -> list[InputProblem]:
    problems = [InputProblem(name, 1, c, "missing column") for c in columns if c not in header]
    problems += [InputProblem(name, 1, c or "(empty)", "unexpected column (extra columns are "
                                                      "refused)")
                 for c in header if c not in columns]
    if len(set(header)) != len(header):
        problems.append(InputProblem(name, 1, "header", "a column appears twice"))
    return problems


def _refuse_duplicates(records: SortedRecords, name: str, kind: StatementKind) -> None:
    problems: list[InputProblem] = []
    previous: tuple[Any, ...] | None = None
    with closing(iter(records)) as rows:
        for record in rows:
            if previous is not None and _KEY(record) == _KEY(previous):
                problems.append(InputProblem(
                    name, record[-1], kind.key_columns,
                    f"{_key_text(_KEY(record))} already appears on line {previous[-1]}"))
                if len(problems) >= ERRORS_REPORTED_MAX:
                    break
                continue
            previous = record
    if problems:
        raise InputRejected(sorted(problems, key=lambda p: p.line))


def _key_text(key: Iterable[Any]) -> str:
    return "/".join(map(str, key))


# ---------------------------------------------------------------- the ledger's side

def _ordered(conn: Connection, column: Any) -> Any:
    """Key order as Python compares strings (by code point): byte order of UTF-8, which
    PostgreSQL gives only under the "C" collation (SQLite's default is already binary)."""
    return column.collate("C") if conn.dialect.name == "postgresql" else column


def _ledger_query(conn: Connection, kind: StatementKind) -> Select[Any]:
    if kind is BALANCES:
        b = t.balances.c
        return select(b.account_id, b.asset, b.balance).order_by(
            _ordered(conn, b.account_id), _ordered(conn, b.asset))
    legs = t.trade_legs.c
    return (select(legs.trade_id, legs.leg, legs.instrument, legs.buyer, legs.seller,
                   legs.quantity, legs.price)
            .where(legs.busted.is_(False))
            .order_by(_ordered(conn, legs.trade_id), legs.leg))


def ledger_position(conn: Connection) -> int:
    """The last fact, other than reconciliation runs, folded into the ledger's read models
    (0 for an empty ledger): what a reconciliation compared with."""
    checkpoint = conn.execute(select(checkpoints.c.txid, checkpoints.c.position).where(
        checkpoints.c.name == LedgerProjection.name)).first()
    if checkpoint is None:
        return 0
    position = conn.execute(
        select(events.c.position)
        .where(events.c.type != ReconciliationRun.type_name,
               tuple_(events.c.txid, events.c.position)
               <= tuple_(checkpoint.txid, checkpoint.position))
        .order_by(events.c.txid.desc(), events.c.position.desc()).limit(1)).scalar()
    return int(position or 0)


def _rows(result: Iterable[Any]) -> Iterator[tuple[Any, ...]]:
    for row in result:
        yield tuple(row)


# ---------------------------------------------------------------- the comparison (pure)

def _outer_join(ours: Iterable[tuple[Any, ...]], theirs: Iterable[tuple[Any, ...]]
                ) -> Iterator[tuple[tuple[Any, ...] | None, tuple[Any, ...] | None]]:
    """Pairs of records with the same key from two key-ordered streams (None where one side
    lacks the key). Both sides must be strictly increasing by key."""
    ours_it, theirs_it = _increasing(ours, "ledger"), _increasing(theirs, "statement")
    o, s = next(ours_it, None), next(theirs_it, None)
    while o is not None or s is not None:
        if s is None or (o is not None and _KEY(o) < _KEY(s)):
            yield o, None
            o = next(ours_it, None)
        elif o is None or _KEY(s) < _KEY(o):
            yield None, s
            s = next(theirs_it, None)
        else:
            yield o, s
            o, s = next(ours_it, None), next(theirs_it, None)


def _increasing(records: Iterable[tuple[Any, ...]], side: str) -> Iterator[tuple[Any, ...]]:
    previous = None
    for record in records:
        key = _KEY(record)
        if previous is not None and not previous < key:
            raise InvariantViolation(f"the {side} side is not in key order: "
                                     f"{_key_text(key)} after {_key_text(previous)}")
        previous = key
        yield record


def compare_balances(ours: Iterable[tuple[str, str, Decimal]],
                     theirs: Iterable[tuple[str, str, str, int]], tally: Tally,
                     tolerance: Decimal = ZERO,
                     house_accounts_listed: frozenset[str] = frozenset()) -> Iterator[Break]:
    """Breaks between ledger balances (account_id, asset, balance) and statement records
    (account_id, asset, balance text, line), both in key order (see the module's rules)."""
    for o, s in _outer_join(ours, theirs):
        if s is None:
            assert o is not None
            account_id, asset, balance = o
            if abs(balance) <= tolerance:
                continue
            if account_id.startswith(HOUSE_PREFIX) and account_id not in house_accounts_listed:
                continue
            yield _count(tally, Break("missing_in_statement", f"{account_id}/{asset}",
                                      money_text(balance, asset), None))
            continue
        account_id, asset, text, _ = s
        stated = Decimal(text)
        if o is None:
            if abs(stated) <= tolerance:
                tally.matched += 1
            else:
                yield _count(tally, Break("missing_in_ledger", f"{account_id}/{asset}", None,
                                          money_text(stated, asset)))
            continue
        balance = o[2]
        if abs(balance - stated) <= tolerance:
            tally.matched += 1
        else:
            yield _count(tally, Break("amount_mismatch", f"{account_id}/{asset}",
                                      money_text(balance, asset), money_text(stated, asset)))


def compare_trades(ours: Iterable[tuple[Any, ...]], theirs: Iterable[tuple[Any, ...]],
                   tally: Tally) -> Iterator[Break]:
    """Breaks between the ledger's standing trade legs (trade_id, leg, instrument, buyer,
    seller, quantity, price) and statement records (the same, decimals as text, then the
    line), both in key order."""
    for o, s in _outer_join(ours, theirs):
        if s is None:
            assert o is not None
            yield _count(tally, Break("missing_in_statement", _key_text(_KEY(o)),
                                      _leg_text(o), None))
            continue
        if o is None:
            yield _count(tally, Break("missing_in_ledger", _key_text(_KEY(s)), None,
                                      _leg_text(s)))
            continue
        ours_fields = _leg_fields(o)
        theirs_fields = _leg_fields(s)
        found = False
        for field, a, b in zip(TRADE_FIELDS, ours_fields, theirs_fields, strict=True):
            if a != b:
                found = True
                yield _count(tally, Break("field_mismatch", f"{_key_text(_KEY(o))}/{field}",
                                          _field_text(a), _field_text(b)))
        if not found:
            tally.matched += 1


def _leg_fields(record: tuple[Any, ...]) -> tuple[str, str, str, Decimal, Decimal]:
    return (record[2], record[3], record[4], Decimal(record[5]), Decimal(record[6]))


def _field_text(value: str | Decimal) -> str:
    return canonical_decimal(value) if isinstance(value, Decimal) else value


def _leg_text(record: tuple[Any, ...]) -> str:
    return " ".join(f"{name}={_field_text(value)}"
                    for name, value in zip(TRADE_FIELDS, _leg_fields(record), strict=True))


def _count(tally: Tally, found: Break) -> Break:
    tally.breaks += 1
    return found


# ---------------------------------------------------------------- the run

class BreakSink(Protocol):
    """Where breaks go as they are found, then the run's outcome."""

    def write(self, found: Break) -> None: ...
    def finish(self, report: ReconcileReport) -> None: ...


@dataclass(frozen=True)
class ReconcileReport:
    kind: str
    file: str
    rows: int
    matched: int
    breaks: int
    tolerance: Decimal
    ledger_position: int
    event_position: int
    recorded: bool
    """False when this very run (same statement, ledger and tolerance) was recorded before."""


def reconcile(ledger: Ledger, kind: StatementKind, path: Path, sink: BreakSink,
              tolerance: Decimal = ZERO, progress: Progress | None = None) -> ReconcileReport:
    """Compare a statement with the ledger, write every break to `sink`, record the run.
    `progress` hears how many bytes of the statement have been read (reading and sorting
    it is most of the work)."""
    if tolerance < 0:
        raise ValueError("tolerance must not be negative")
    if kind is not BALANCES and tolerance != 0:
        raise ValueError("a tolerance applies to balances only")
    tally = Tally()
    with tempfile.TemporaryDirectory(prefix="clearing-reconcile-") as workdir:
        statement = read_statement(path, kind, Path(workdir), progress)
        ledger.refresh()
        with ledger.engine.connect() as conn:
            if conn.dialect.name == "postgresql":
                # One snapshot for the position and the rows: the key names what was compared.
                conn.execution_options(isolation_level="REPEATABLE READ")
            position = ledger_position(conn)
            result = conn.execute(_ledger_query(conn, kind).execution_options(
                stream_results=True, yield_per=LEDGER_PAGE_ROWS))
            ours = _rows(result)
            if kind is BALANCES:
                found = compare_balances(ours, statement.records, tally, tolerance,
                                         statement.house_accounts)
            else:
                found = compare_trades(ours, statement.records, tally)
            with closing(found):
                for item in found:
                    sink.write(item)
            result.close()
    fact = reconciliation_fact(kind, path, statement, tally, tolerance, position, ledger)
    try:
        appended = ledger.record([fact], [{"source": {"file": path.name},
                                           "correlation_id": f"reconcile:{kind.name}"}])
        recorded, event_position = appended.written == 1, appended.positions[0]
    except IdempotencyConflict as exc:
        # The same statement under another file name: the same run, already in the log.
        recorded, event_position = False, exc.position
    report = ReconcileReport(kind.name, str(path), statement.rows, tally.matched, tally.breaks,
                             tolerance, position, event_position, recorded)
    sink.finish(report)
    return report


def reconciliation_fact(kind: StatementKind, path: Path, statement: Statement, tally: Tally,
                        tolerance: Decimal, position: int, ledger: Ledger) -> NewFact:
    event = ReconciliationRun(kind=kind.name, file_name=path.name,
                              file_sha256=statement.sha256, rows=statement.rows,
                              matched=tally.matched, breaks=tally.breaks, tolerance=tolerance,
                              ledger_position=position)
    key = (f"reconciliation:{kind.name}:{statement.sha256}:{canonical_decimal(tolerance)}:"
           f"{position}")
    return NewFact(STREAM_ID, event, key, ledger.clock())


# ---------------------------------------------------------------- output, streamed

class JsonBreaks:
    """`{"breaks": [...], "matched": N}` written as the breaks come (SPEC section 2's
    reconcile shape; key order differs, which JSON does not mind)."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.first = True
        out.write('{\n  "breaks": [')

    def write(self, found: Break) -> None:
        self.out.write(("\n    " if self.first else ",\n    ")
                       + json.dumps(found.document(), ensure_ascii=False))
        self.first = False

    def finish(self, report: ReconcileReport) -> None:
        closing_bracket = "]" if self.first else "\n  ]"
        self.out.write(f'{closing_bracket},\n  "matched": {report.matched}\n}}\n')


class CsvBreaks:
    def __init__(self, out: TextIO) -> None:
        self.writer = csv.writer(out, lineterminator="\n")
        self.writer.writerow(("kind", "key", "ours", "theirs"))

    def write(self, found: Break) -> None:
        self.writer.writerow((found.kind, found.key, found.ours or "", found.theirs or ""))

    def finish(self, report: ReconcileReport) -> None:
        pass


class TableBreaks:
    """Rich tables of at most `TABLE_PAGE_ROWS` breaks each, then a one-line summary."""

    def __init__(self, console: Console, title: str) -> None:
        self.console = console
        self.title = title
        self.page: list[Break] = []
        self.pages = 0

    def write(self, found: Break) -> None:
        self.page.append(found)
        if len(self.page) >= TABLE_PAGE_ROWS:
            self._flush()

    def _flush(self) -> None:
        if not self.page:
            return
        self.pages += 1
        table = Table(title=self.title if self.pages == 1 else f"{self.title} (continued)",
                      header_style="bold")
        for column in ("kind", "key", "ours", "theirs"):
            table.add_column(column)
        for b in self.page:
            table.add_row(b.kind, b.key, b.ours or "", b.theirs or "")
        self.console.print(table)
        self.page = []

    def finish(self, report: ReconcileReport) -> None:
        self._flush()
        state = (f"recorded at position {report.event_position}" if report.recorded else
                 f"already recorded at position {report.event_position}")
        self.console.print(f"matched {report.matched}, breaks {report.breaks} "
                           f"({report.rows} statement rows; {state})",
                           markup=False, highlight=False)

