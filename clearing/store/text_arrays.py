"""Large text[] parameters for PostgreSQL, sent as one array literal the server parses.

psycopg dumps a Python list into an array element by element, in Python: for the tens of
thousands of keys one import's read models or stream heads look up, that costs more than
the query. Written as one PostgreSQL array literal (`{"a","b"}`, every element quoted, so
an empty string or the word NULL stay what they are) the list goes as one text and the
server parses it, behind a constant `%s::text[]` in the statement.
"""

from __future__ import annotations


def text_array(values: list[str]) -> str:
    """`values` as a PostgreSQL text[] literal, to bind to a `%s::text[]` parameter."""
    joined = '","'.join(values)
    # The separators hold two quotes each: more than theirs means a value holds one.
    if "\\" in joined or joined.count('"') != 2 * (len(values) - 1):
        joined = '","'.join(v.replace("\\", "\\\\").replace('"', '\\"') for v in values)
    return '{"' + joined + '"}' if values else "{}"
