"""Event ids: UUIDs made from the position an event is stored at.

An id is a UUID (version 8, RFC 9562) whose first 60 bits are the event's position, ordered
by it as UUIDv7 is by time: unique because positions are, cheap to index because new ids land
at the end, and deterministic, so a replayed simulation gives the same ids. The rest is a
digest of the idempotency key. `clearing verify` recomputes every stored id from its position
and key, which is what keeps ids unique without an index of their own.
"""

from __future__ import annotations

from hashlib import blake2b

_VARIANT = {digit: "89ab"[int(digit, 16) & 3] for digit in "0123456789abcdef"}
"""RFC 9562 variant bits (10xx) over the digest's first hex digit."""


def event_id_for(position: int, idempotency_key: str) -> str:
    high = f"{position:015x}"
    digest = blake2b(idempotency_key.encode("utf-8"), digest_size=8).hexdigest()
    return (f"{high[:8]}-{high[8:12]}-8{high[12:]}-{_VARIANT[digest[0]]}{digest[1:4]}-"
            f"{digest[4:]}")
