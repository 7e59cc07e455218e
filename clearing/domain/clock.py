"""Times in the ledger: always timezone-aware UTC, parsed strictly, formatted one way.

The ledger has two clocks (SPEC "two clocks"): `effective_at`, the business time of a fact,
and `recorded_at`, when the ledger learnt it. Both are UTC datetimes. A time without a zone is
ambiguous money-wise (which day's funding? which expiry?), so it is refused, never guessed.
"""

from __future__ import annotations

from datetime import UTC, datetime


class NaiveTimeError(ValueError):
    """A time was given without a timezone."""

    def __init__(self, text: str):
        super().__init__(f"time {text!r} has no timezone (use e.g. 2026-12-27T08:00:00Z)")
        self.text = text


class InvalidTimeError(ValueError):
    """A time is not ISO 8601."""

    def __init__(self, text: str):
        super().__init__(f"time {text!r} is not ISO 8601 (use e.g. 2026-12-27T08:00:00Z)")
        self.text = text


def parse_time(text: str) -> datetime:
    """Parse an ISO 8601 time with a zone and return it in UTC."""
    raw = text.strip()
    if not raw:
        raise InvalidTimeError(text)
    try:
        value = datetime.fromisoformat(raw.replace("z", "Z"))
    except ValueError:
        raise InvalidTimeError(text) from None
    if value.tzinfo is None or value.utcoffset() is None:
        raise NaiveTimeError(text)
    return value.astimezone(UTC)


def ensure_utc(value: datetime) -> datetime:
    """Refuse naive datetimes and normalise aware ones to UTC."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise NaiveTimeError(value.isoformat())
    return value.astimezone(UTC)


def format_time(value: datetime) -> str:
    """ISO 8601 UTC with a `Z`, microseconds only when present: the one output form."""
    value = ensure_utc(value)
    if value.microsecond:
        return value.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return value.strftime("%Y-%m-%dT%H:%M:%SZ")


def storage_time(value: datetime) -> str:
    """Fixed-width UTC text whose lexical order is time order (SQLite storage, hashing)."""
    if value.tzinfo is not UTC:
        value = ensure_utc(value)
    return value.replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def from_storage_time(text: str) -> datetime:
    """The inverse of `storage_time`."""
    return datetime.fromisoformat(text)
