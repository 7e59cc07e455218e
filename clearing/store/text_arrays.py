"""Large text[] parameters for PostgreSQL, sent as one text the server splits.

psycopg dumps a Python list into an array element by element, in Python: for the tens of
thousands of keys one import's read models or stream heads look up, that costs more than
the query. Joined by the ASCII unit separator, they go as one text and
`string_to_array` splits them in the server. Account ids, assets, symbols, trade ids and
stream ids hold no control characters; a value that holds the separator, or is empty (which
splitting would lose), sends the whole list the ordinary way.
"""

from __future__ import annotations

from typing import Any

SEPARATOR = chr(31)


def text_array(values: list[str]) -> tuple[str, Any]:
    """The SQL for a text[] parameter (with its `%s`) and the value to bind to it."""
    joined = SEPARATOR.join(values)
    if values and joined.count(SEPARATOR) == len(values) - 1 and "" not in values:
        return "string_to_array(%s, chr(31))", joined
    return "%s::text[]", values
