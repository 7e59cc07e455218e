"""No SQL text is assembled from strings (issue 8, least privilege and safety): statements
are constants, SQLAlchemy constructs, or psycopg `sql` compositions with identifiers quoted
by the driver. Values are always bound parameters; this test guards the statement text.

It reads the source of the package and of the migrations and fails on an f-string, a
`%`-format or a `.format()` that builds text looking like SQL, or that is handed to
something that runs SQL. Messages that merely mention a statement (an error saying UPDATE
was refused) are not statements and are recognised by where they go."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted([*(ROOT / "clearing").rglob("*.py"), *(ROOT / "migrations").rglob("*.py")])
RUNS_SQL = {"execute", "executemany", "executescript", "exec_driver_sql", "text", "copy",
            "prepare"}
LOOKS_LIKE_SQL = re.compile(
    r"^\s*(SELECT|INSERT|UPDATE|DELETE|CREATE|DROP|ALTER|COPY|TRUNCATE|GRANT|REVOKE|WITH|"
    r"SET|LOCK|VACUUM|ANALYZE|DO \$\$)\b|\b(FROM|WHERE|JOIN|ON CONFLICT|VALUES|ORDER BY)\s")


def _literal_text(node: ast.JoinedStr) -> str:
    return "".join(part.value for part in node.values
                   if isinstance(part, ast.Constant) and isinstance(part.value, str))


def _is_formatting(node: ast.AST) -> bool:
    if isinstance(node, ast.JoinedStr):
        return any(isinstance(part, ast.FormattedValue) for part in node.values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mod):
        return isinstance(node.left, (ast.Constant, ast.JoinedStr))
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        return node.func.attr == "format" and isinstance(node.func.value, ast.Constant)
    return False


def _formatted_text(node: ast.AST) -> str:
    if isinstance(node, ast.JoinedStr):
        return _literal_text(node)
    if isinstance(node, ast.BinOp) and isinstance(node.left, ast.Constant):
        return str(node.left.value)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
            and isinstance(node.func.value, ast.Constant):
        return str(node.func.value.value)
    return ""


def _called_name(call: ast.Call) -> str:
    func = call.func
    return func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")


def _in_raise(tree: ast.AST) -> set[int]:
    """Nodes inside `raise` statements: their text is a message for a person."""
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Raise):
            inside.update(id(inner) for inner in ast.walk(node))
    return inside


def sql_built_from_strings(path: Path, root: Path = ROOT) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    skip = _in_raise(tree)
    name = path.relative_to(root)
    found = []
    for node in ast.walk(tree):  # outer nodes first: a statement is reported once
        if id(node) in skip:
            continue
        if isinstance(node, ast.Call) and _called_name(node) in RUNS_SQL:
            for arg in node.args[:1]:
                if any(_is_formatting(inner) for inner in ast.walk(arg)):
                    found.append(f"{name}:{node.lineno}: {_called_name(node)}() given "
                                 "formatted text")
                    skip.update(id(inner) for inner in ast.walk(node))
        elif _is_formatting(node) and LOOKS_LIKE_SQL.search(_formatted_text(node)):
            found.append(f"{name}:{node.lineno}: SQL-like text formatted")
    return found


@pytest.mark.parametrize("path", SOURCES, ids=[str(p.relative_to(ROOT)) for p in SOURCES])
def test_no_statement_is_formatted_from_strings(path: Path) -> None:
    assert sql_built_from_strings(path) == []


def test_the_check_catches_formatted_statements_and_spares_messages(tmp_path: Path) -> None:
    source = tmp_path / "example.py"
    source.write_text(
        'table = "t"\n'
        'cur.execute(f"SELECT * FROM {table}")\n'
        'query = "DELETE FROM %s" % table\n'
        'conn.execute(text("DROP TABLE {}".format(table)))\n'
        'cur.execute("SELECT 1 FROM t WHERE k = %s", (table,))\n'
        'raise ValueError(f"UPDATE of {table} refused")\n', encoding="utf-8")
    assert sql_built_from_strings(source, tmp_path) == [
        "example.py:2: execute() given formatted text",
        "example.py:3: SQL-like text formatted",
        "example.py:4: execute() given formatted text",
    ]
