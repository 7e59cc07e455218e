"""SQLAlchemy Core descriptions of the store's tables, for building queries.

These mirror what the Alembic migrations create; the migrations, not this module, are the
source of the schema (`clearing db upgrade`).
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, Integer, MetaData, String, Table, Text

from clearing.store.timestamps import UtcTimestamp

metadata = MetaData()

events = Table(
    "events",
    metadata,
    Column("position", BigInteger, primary_key=True),
    # Transaction that wrote the event: readers order by (txid, position) and never read past
    # the oldest transaction still in flight, so a late commit cannot be skipped.
    Column("txid", BigInteger, nullable=False),
    Column("stream_id", Text, nullable=False),
    Column("stream_version", Integer, nullable=False),
    Column("event_id", String(36), nullable=False),
    Column("type", Text, nullable=False),
    Column("schema_version", Integer, nullable=False),
    Column("payload", Text, nullable=False),
    Column("metadata", Text, nullable=False, key="meta"),
    Column("effective_at", UtcTimestamp, nullable=False),
    Column("recorded_at", UtcTimestamp, nullable=False),
    Column("idempotency_key", Text, nullable=False),
    Column("hash", String(64), nullable=False),
)

streams = Table(
    "streams",
    metadata,
    Column("stream_id", Text, primary_key=True),
    Column("version", Integer, nullable=False),
    Column("last_hash", String(64), nullable=False),
)

checkpoints = Table(
    "checkpoints",
    metadata,
    Column("name", Text, primary_key=True),
    Column("txid", BigInteger, nullable=False),
    Column("position", BigInteger, nullable=False),
)
