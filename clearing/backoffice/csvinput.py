"""Reading the venue's and custodians' CSV files strictly, with the line of every problem.

Limits are explicit so that a malformed or hostile file fails fast with a clear message
instead of exhausting memory (they are listed in README, "Input limits").
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

FILE_BYTES_MAX = 256 * 1024 * 1024
"""Largest input file accepted by `clearing import`."""
ROWS_MAX = 2_000_000
"""Most data rows in one imported file (one file is one atomic append)."""
FIELD_CHARS_MAX = 1_024
"""Longest single cell."""
ERRORS_REPORTED_MAX = 50
"""A file with many bad rows reports this many, then stops looking."""

csv.field_size_limit(FIELD_CHARS_MAX)


@dataclass(frozen=True)
class InputProblem:
    """One problem in an input file, in the form `FILE:LINE: field: reason`."""

    file: str
    line: int
    field: str
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.field}: {self.reason}"


class InputRejected(ValueError):
    """A file (or command) refused as a whole; nothing was written."""

    def __init__(self, problems: Sequence[InputProblem]):
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


@dataclass(frozen=True)
class CsvRow:
    line: int
    values: dict[str, str]


def read_csv(path: Path, columns: Sequence[str]) -> list[CsvRow]:
    """Every data row of a CSV file whose header is exactly `columns` (in any order)."""
    name = str(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise InputRejected([InputProblem(name, 0, "file", exc.strerror or str(exc))]) from None
    if size > FILE_BYTES_MAX:
        raise InputRejected([InputProblem(name, 0, "file", f"is {size} bytes, the limit is "
                                                           f"{FILE_BYTES_MAX}")])
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise InputRejected([InputProblem(name, line, "file", "is not valid UTF-8 (byte "
                                                              f"{exc.start})")]) from None
    text = text.removeprefix("\ufeff")
    if not text.strip():
        raise InputRejected([InputProblem(name, 1, "header", "the file is empty; expected "
                                                             + ",".join(columns))])
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader)
    except csv.Error as exc:
        raise InputRejected([InputProblem(name, 1, "header", str(exc))]) from None
    header = [h.strip() for h in header]
    _check_header(name, header, columns)
    rows: list[CsvRow] = []
    problems: list[InputProblem] = []
    while True:
        # A record's line is where it starts: a quoted cell may span several lines, and the
        # reader counts every empty line, so the next record starts just after the last one.
        line = reader.line_num + 1
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            reason = str(exc)
            if "field larger" in reason:
                reason = f"a cell is longer than {FIELD_CHARS_MAX} characters"
            problems.append(InputProblem(name, line, "row", reason))
            break
        if not cells or all(not c.strip() for c in cells):
            continue
        if len(rows) >= ROWS_MAX:
            problems.append(InputProblem(name, line, "file",
                                         f"has more than {ROWS_MAX} rows"))
            break
        if len(cells) != len(header):
            problems.append(InputProblem(name, line, "row",
                                         f"has {len(cells)} cells, the header has "
                                         f"{len(header)}"))
            if len(problems) >= ERRORS_REPORTED_MAX:
                break
            continue
        rows.append(CsvRow(line, dict(zip(header, [c.strip() for c in cells], strict=True))))
    if problems:
        raise InputRejected(problems)
    if not rows:
        raise InputRejected([InputProblem(name, 1, "file", "has a header but no rows")])
    return rows


def _check_header(name: str, header: list[str], columns: Sequence[str]) -> None:
    problems = []
    for column in columns:
        if column not in header:
            problems.append(InputProblem(name, 1, column, "missing column"))
    for column in header:
        if column not in columns:
            problems.append(InputProblem(name, 1, column or "(empty)",
                                         "unexpected column (extra columns are refused)"))
    if len(set(header)) != len(header):
        problems.append(InputProblem(name, 1, "header", "a column appears twice"))
    if problems:
        raise InputRejected(problems)
