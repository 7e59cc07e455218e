"""Output for people (rich tables) and for programs (`--json`, `--csv`), on stdout; errors on
stderr. Decimals are strings and times ISO 8601 UTC in every machine-readable shape."""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

stdout = Console(soft_wrap=True)
stderr = Console(stderr=True, soft_wrap=True)


def emit_json(document: Any) -> None:
    sys.stdout.write(json.dumps(document, indent=2, ensure_ascii=False, default=str) + "\n")


def emit_csv(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    writer = csv.DictWriter(sys.stdout, fieldnames=list(columns), extrasaction="ignore",
                            lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else row.get(k) for k in columns})


def emit_table(title: str, rows: Sequence[dict[str, Any]], columns: Sequence[str],
               numeric: Sequence[str] = ()) -> None:
    if not rows:
        stdout.print(f"[dim]{title}: nothing to show[/dim]")
        return
    table = Table(title=title, header_style="bold")
    for column in columns:
        table.add_column(column, justify="right" if column in numeric else "left")
    for row in rows:
        table.add_row(*("" if row.get(c) is None else str(row.get(c)) for c in columns))
    stdout.print(table)


def emit_rows(rows: Sequence[dict[str, Any]], columns: Sequence[str], *, title: str,
              as_json: bool, as_csv: bool, numeric: Sequence[str] = ()) -> None:
    if as_json:
        emit_json(list(rows))
    elif as_csv:
        emit_csv(rows, columns)
    else:
        emit_table(title, rows, columns, numeric)


def error(message: str) -> None:
    stderr.print(message, markup=False, highlight=False)
