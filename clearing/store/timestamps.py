"""A UTC timestamp column type that orders correctly on both backends.

PostgreSQL keeps `timestamptz`. SQLite has no time type, so times are stored as fixed-width
UTC text (`2026-12-27T08:00:00.000000Z`), whose lexical order is time order, so range
queries by effective or recorded time work the same way on both.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import DateTime, String
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator, TypeEngine

from clearing.domain.clock import ensure_utc, from_storage_time, storage_time


class UtcTimestamp(TypeDecorator[datetime]):
    impl = DateTime(timezone=True)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "sqlite":
            return dialect.type_descriptor(String(27))
        return dialect.type_descriptor(DateTime(timezone=True))

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if dialect.name == "sqlite":
            return storage_time(value)
        return ensure_utc(value)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if isinstance(value, str):
            return from_storage_time(value)
        return value.astimezone(UTC)
