"""Tamper evidence: every event's hash covers its predecessor's hash and its own bytes.

The chain runs per stream (an event's predecessor is the previous version of its stream),
so appends to different streams never wait on one another, while any edit, removal or
reordering of a stored event breaks the chain from that event on. `verify_chain` walks every
stream from version 1 and names the first bad position.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Engine, select

from clearing.domain.clock import storage_time
from clearing.store.event_ids import event_id_for
from clearing.store.tables import events, streams

GENESIS_HASH = "0" * 64
VERIFY_PAGE_SIZE = 5_000


def canonical_event_bytes(
    *,
    stream_id: str,
    stream_version: int,
    event_id: str,
    type_name: str,
    schema_version: int,
    payload: str,
    metadata: str,
    effective_at: datetime,
    recorded_at: datetime,
    idempotency_key: str,
) -> bytes:
    """The bytes a hash covers: every envelope field except the position and txid, which the
    database assigns and which the log order itself makes evident. Each field is written as
    its length, a colon and its text, so no two different envelopes share bytes."""
    return envelope_bytes(stream_id, stream_version, event_id, type_name, schema_version,
                          payload, metadata, storage_time(effective_at),
                          storage_time(recorded_at), idempotency_key)


def envelope_bytes(stream_id: str, stream_version: int, event_id: str, type_name: str,
                   schema_version: int, payload: str, metadata: str, effective_at: str,
                   recorded_at: str, idempotency_key: str) -> bytes:
    """`canonical_event_bytes` with the times already in storage form (the append hot path)."""
    version = str(stream_version)
    schema = str(schema_version)
    return (f"{len(stream_id)}:{stream_id}{len(version)}:{version}{len(event_id)}:{event_id}"
            f"{len(type_name)}:{type_name}{len(schema)}:{schema}{len(payload)}:{payload}"
            f"{len(metadata)}:{metadata}{len(effective_at)}:{effective_at}"
            f"{len(recorded_at)}:{recorded_at}{len(idempotency_key)}:{idempotency_key}"
            ).encode("utf-8")


def chain_hash(previous_hash: str, event_bytes: bytes) -> str:
    return hashlib.sha256(bytes.fromhex(previous_hash) + event_bytes).hexdigest()


@dataclass(frozen=True)
class ChainReport:
    ok: bool
    events_checked: int
    first_bad_position: int | None = None
    reason: str = ""


def verify_chain(engine: Engine) -> ChainReport:
    """Recompute every hash, stream by stream, and compare with the stored chain heads."""
    heads: dict[str, tuple[int, str]] = {}
    with engine.connect() as conn:
        for row in conn.execute(select(streams.c.stream_id, streams.c.version,
                                       streams.c.last_hash)):
            heads[row.stream_id] = (row.version, row.last_hash)
    checked = 0
    bad: tuple[int, str] | None = None
    current_stream: str | None = None
    previous_hash = GENESIS_HASH
    previous_version = 0

    def close_stream() -> tuple[int, str] | None:
        if current_stream is None:
            return None
        head = heads.pop(current_stream, None)
        if head is None:
            return (last_position, f"stream {current_stream!r} is missing from streams")
        if head != (previous_version, previous_hash):
            return (last_position, f"stream {current_stream!r} head is version {head[0]}, "
                                   f"events end at version {previous_version}")
        return None

    last_position = 0
    query = select(events).order_by(events.c.stream_id, events.c.stream_version)
    with engine.connect() as conn:
        result = conn.execution_options(stream_results=True, yield_per=VERIFY_PAGE_SIZE)
        for row in result.execute(query):
            if row.stream_id != current_stream:
                problem = close_stream()
                if problem and (bad is None or problem[0] < bad[0]):
                    bad = problem
                current_stream = row.stream_id
                previous_hash = GENESIS_HASH
                previous_version = 0
            checked += 1
            last_position = row.position
            problem = None
            if row.stream_version != previous_version + 1:
                problem = (row.position, f"stream {row.stream_id!r} jumps from version "
                                         f"{previous_version} to {row.stream_version}")
            expected = chain_hash(
                previous_hash,
                canonical_event_bytes(
                    stream_id=row.stream_id,
                    stream_version=row.stream_version,
                    event_id=row.event_id,
                    type_name=row.type,
                    schema_version=row.schema_version,
                    payload=row.payload,
                    metadata=row.meta,
                    effective_at=row.effective_at,
                    recorded_at=row.recorded_at,
                    idempotency_key=row.idempotency_key,
                ),
            )
            if problem is None and row.event_id != event_id_for(row.position,
                                                                row.idempotency_key):
                problem = (row.position, f"event id {row.event_id} at position "
                                         f"{row.position} is not the one its position and "
                                         "key give")
            if problem is None and expected != row.hash:
                problem = (row.position, f"hash mismatch at position {row.position} "
                                         f"(stream {row.stream_id!r} v{row.stream_version})")
            if problem and (bad is None or problem[0] < bad[0]):
                bad = problem
            previous_hash = row.hash
            previous_version = row.stream_version
    problem = close_stream()
    if problem and (bad is None or problem[0] < bad[0]):
        bad = problem
    if bad is None and heads:
        stream_id = sorted(heads)[0]
        bad = (0, f"stream {stream_id!r} is recorded at version {heads[stream_id][0]} "
                  "but has no events")
    if bad is None:
        return ChainReport(ok=True, events_checked=checked)
    return ChainReport(ok=False, events_checked=checked, first_bad_position=bad[0],
                       reason=bad[1])
