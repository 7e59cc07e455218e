"""Typed failures of the event store, each carrying the offending value."""

from __future__ import annotations


class StoreError(Exception):
    """Base of every event-store rejection."""


class EmptyAppend(StoreError):
    def __init__(self) -> None:
        super().__init__("an append needs at least one event")


class ConcurrencyConflict(StoreError):
    """A stream was not at the version the writer expected; nothing was written."""

    def __init__(self, stream_id: str, expected: int, actual: int):
        super().__init__(
            f"stream {stream_id!r} is at version {actual}, the append expected {expected}"
        )
        self.stream_id = stream_id
        self.expected = expected
        self.actual = actual


class IdempotencyConflict(StoreError):
    """An idempotency key was reused for a different fact; nothing was written."""

    def __init__(self, key: str, index: int, position: int):
        super().__init__(
            f"idempotency key {key!r} was already used at position {position} "
            "for different content"
        )
        self.key = key
        self.index = index
        self.position = position


class DuplicateKeyInAppend(StoreError):
    """One append carries the same idempotency key twice."""

    def __init__(self, key: str, index: int):
        super().__init__(f"idempotency key {key!r} appears twice in one append")
        self.key = key
        self.index = index


class PayloadTooLarge(StoreError):
    def __init__(self, index: int, size_bytes: int, limit_bytes: int):
        super().__init__(
            f"event {index}: payload is {size_bytes} bytes, the limit is {limit_bytes}"
        )
        self.index = index
        self.size_bytes = size_bytes
        self.limit_bytes = limit_bytes


class SchemaOutOfDate(StoreError):
    """The database is at an older schema revision than this code needs."""

    def __init__(self, current: str | None, head: str):
        super().__init__(
            f"database schema is at revision {current or 'none'}, this version needs {head}: "
            "run `clearing db upgrade`"
        )
        self.current = current
        self.head = head


class UnknownPosition(StoreError):
    def __init__(self, position: int):
        super().__init__(f"no event at position {position}")
        self.position = position
