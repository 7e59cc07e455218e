"""Rows in PostgreSQL COPY's text format, built as one buffer.

Each value is written as psycopg's own `write_row` would send it (`str` of numbers and
times, `t` or `f`, `\\N` for NULL) without a call into the driver per value. Text needing
COPY's escapes (a backslash, tab, newline or carriage return) is rare: the buffer is first
written as is and checked as a whole (four scans in C), and escaped value by value only
when it holds more than its separators.

Rows without times (positions, balances, the log's own rows, whose times are already text)
are first written with `str` alone, two to three times faster; the result is kept unless it
holds what only a NULL or a boolean would have written (`None`, `True`, `False`), in which
case the rows are written value by value as below. A time is written once per buffer and
then looked up: the statement's lines share a few effective times, and `str` of a datetime
costs ten times that of a number.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

_NULL = "\\N"
_BOOL = {True: "t", False: "f"}


def copy_buffer(rows: Sequence[Sequence[Any]], width: int) -> str:
    """`rows` of `width` values each, as the text a `COPY ... FROM STDIN` reads."""
    if not rows:
        return ""
    if not any(v.__class__ is datetime for v in rows[0]):
        data = "\n".join(["\t".join([str(v) for v in row]) for row in rows])
        if not (_needs_escapes(data, rows, width) or "None" in data or "True" in data
                or "False" in data):
            return data + "\n"
    times: dict[datetime, str] = {}

    def time_text(value: datetime) -> str:
        text = times[value] = str(value)
        return text

    data = "\n".join(["\t".join([_NULL if v is None else _BOOL[v] if v is True or v is False
                                 else (times.get(v) or time_text(v))
                                 if v.__class__ is datetime else str(v) for v in row])
                      for row in rows])
    if _needs_escapes(data, rows, width):
        data = "\n".join(["\t".join([_NULL if v is None else _BOOL[v] if v is True
                                     or v is False else _escaped(v) if isinstance(v, str)
                                     else str(v) for v in row]) for row in rows])
    return data + "\n"


def _needs_escapes(data: str, rows: Sequence[Sequence[Any]], width: int) -> bool:
    """Whether some value of `data` holds more than its separators."""
    return (data.count("\t") != len(rows) * (width - 1) or data.count("\n") != len(rows) - 1
            or "\\" in data or "\r" in data)


def _escaped(value: str) -> str:
    return (value.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n")
            .replace("\r", "\\r"))
