"""The benchmark's workload: one event type with a ~200-byte payload, and its rows.

The event type lives in its own catalogue so the benchmark never depends on (or pollutes)
the ledger's real catalogue. The same events feed both sides of every figure: the store gets
`PendingEvent`s, the bare driver gets the row tuples the store would have written from them
(same payload text, same envelope), so the two sides move the same bytes.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from clearing.domain.event import Event, EventCatalogue, canonical_json
from clearing.store.eventstore import PendingEvent

bench_catalogue = EventCatalogue()

RAW_COLUMNS = (
    "position", "stream_id", "stream_version", "event_id", "type", "schema_version",
    "payload", "metadata", "effective_at", "recorded_at", "idempotency_key", "hash",
)
"""Column order of a raw row; the raw tables have exactly these columns."""

EFFECTIVE_EPOCH = datetime(2026, 1, 1, tzinfo=UTC)
ROW_NAMESPACE = uuid.UUID("0b3e1c52-2f4d-4c1e-9a57-5d1f0c6b7e21")
INSTRUMENTS = ("BTC-27DEC26-100000-C", "BTC-27DEC26-90000-P", "ETH-26JUN26-4000-C",
               "ETH-PERPETUAL", "BTC-PERPETUAL")


@bench_catalogue.register
class BenchTradeCleared(Event):
    """A trade between two accounts, shaped like the ledger's own trade facts."""

    type_name = "BenchTradeCleared"

    trade_id: str
    buyer_account_id: str
    seller_account_id: str
    instrument: str
    quantity: Decimal
    price: Decimal
    venue_reference: str


class Workload:
    """Event `index` of a phase, always the same for the same index.

    Events go to `streams` streams round-robin, so a batch of 1,000 touches 100 streams and
    the store's per-stream work (locks, heads, hash chains) is exercised, not bypassed. Each
    phase has its own prefix, so keys and streams never collide across phases or runs.
    """

    def __init__(self, prefix: str, streams: int) -> None:
        self.prefix = prefix
        self.streams = streams

    def stream_id(self, index: int) -> str:
        return f"{self.prefix}-stream-{index % self.streams:04d}"

    def stream_version(self, index: int) -> int:
        """The version event `index` gets in its stream when events are appended in order."""
        return index // self.streams + 1

    def event(self, index: int) -> BenchTradeCleared:
        return BenchTradeCleared(
            trade_id=f"trade-{index:010d}",
            buyer_account_id=f"account-{(index * 7) % 100_000:06d}",
            seller_account_id=f"account-{(index * 13 + 1) % 100_000:06d}",
            instrument=INSTRUMENTS[index % len(INSTRUMENTS)],
            quantity=Decimal(index % 1_000 + 1).scaleb(-3),
            price=Decimal(20_000 + index % 50_000).scaleb(-1),
            venue_reference=hashlib.md5(str(index).encode()).hexdigest()[:12],
        )

    def pending(self, index: int) -> PendingEvent:
        return PendingEvent(
            stream_id=self.stream_id(index),
            event=self.event(index),
            idempotency_key=f"{self.prefix}-{index:012d}",
            effective_at=EFFECTIVE_EPOCH + timedelta(seconds=index),
        )

    def batch(self, start: int, count: int) -> list[PendingEvent]:
        return [self.pending(index) for index in range(start, start + count)]

    def raw_rows(
        self,
        start: int,
        count: int,
        *,
        first_position: int,
        recorded_at: datetime,
        timestamp: Callable[[datetime], Any],
    ) -> list[tuple[Any, ...]]:
        """The rows the store would write for events `start..start+count`, in RAW_COLUMNS
        order, at positions from `first_position`. `timestamp` adapts times to the backend
        (datetime for PostgreSQL, the store's fixed-width text for SQLite). The hash is a
        stand-in of the same width: the raw side measures the driver, not SHA-256."""
        rows = []
        for offset, index in enumerate(range(start, start + count)):
            item = self.pending(index)
            payload = canonical_json(item.event.to_payload())
            rows.append((
                first_position + offset,
                item.stream_id,
                self.stream_version(index),
                str(uuid.uuid5(ROW_NAMESPACE, item.idempotency_key)),
                item.event.type_name,
                item.event.schema_version,
                payload,
                "{}",
                timestamp(item.effective_at),
                timestamp(recorded_at),
                item.idempotency_key,
                hashlib.sha256(payload.encode("utf-8")).hexdigest(),
            ))
        return rows


def payload_bytes(index: int = 0) -> int:
    """Size of one stored payload, for the report."""
    event = Workload("size", 1).event(index)
    return len(canonical_json(event.to_payload()).encode("utf-8"))
