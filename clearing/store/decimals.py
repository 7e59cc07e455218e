"""An exact decimal column on both backends.

PostgreSQL keeps NUMERIC, exact and summable by auditors in SQL. SQLite's NUMERIC affinity
would turn 0.1 into a binary float, so there the value is kept as its exact text.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from sqlalchemy import Numeric, Text
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator, TypeEngine


class ExactDecimal(TypeDecorator[Decimal]):
    impl = Numeric
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "sqlite":
            return dialect.type_descriptor(Text())
        return dialect.type_descriptor(Numeric(asdecimal=True))

    def process_bind_param(self, value: Decimal | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if dialect.name == "sqlite":
            return format(value, "f")
        return value

    def process_result_value(self, value: Any, dialect: Dialect) -> Decimal | None:
        if value is None:
            return None
        return Decimal(value) if isinstance(value, str) else value

    def result_processor(self, dialect: Dialect, coltype: Any) -> Any:
        """`process_result_value` without the generic wrapper around it: a read of the
        whole book converts a million values. psycopg already returns NUMERIC as Decimal
        (and NULL as None), so there no conversion is needed at all."""
        inner = self.impl_instance.dialect_impl(dialect).result_processor(dialect, coltype)
        if inner is not None:
            return super().result_processor(dialect, coltype)
        if dialect.name == "sqlite":
            return _from_text
        if dialect.driver == "psycopg":
            return None
        return super().result_processor(dialect, coltype)


def _from_text(value: Any) -> Decimal | None:
    return value if value is None or value.__class__ is not str else Decimal(value)
