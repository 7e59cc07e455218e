"""Where the ledger lives: the database URL from `--db`, CLEARING_DATABASE_URL or the default.

Secrets (a PostgreSQL password) come only from the environment or the URL the operator gives;
nothing is read from files in the repository.
"""

from __future__ import annotations

import os

DEFAULT_DATABASE_URL = "sqlite:///clearing.db"
DATABASE_URL_ENV = "CLEARING_DATABASE_URL"


def database_url(explicit: str | None = None) -> str:
    """The URL named by the caller, else the environment, else SQLite in the working directory."""
    if explicit:
        return explicit
    return os.environ.get(DATABASE_URL_ENV) or DEFAULT_DATABASE_URL
