"""Paying many positions through the settlement account, chunk by chunk.

A batch job (mark-to-market, funding, expiry) pays each holder in events of at most
`POSITIONS_PER_EVENT` positions, each balanced against `ccp:settlement`, so that no event
outgrows the store's payload limit however many holders an instrument has. Every credit is
rounded in the clearing house's favour; because each instrument's exact payments sum to zero
(every fill has two sides), the batch leaves `ccp:settlement` holding exactly the rounding
residual, which its last fact sweeps to `ccp:rounding`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from datetime import datetime
from decimal import Decimal

from clearing.domain.accounts import ROUNDING, SETTLEMENT
from clearing.domain.commands import NewFact
from clearing.domain.event import Event
from clearing.domain.events import PositionMovement, SettlementResidualSwept
from clearing.domain.money import credit_rounded
from clearing.domain.postings import Posting, net_postings

POSITIONS_PER_EVENT = 300
"""Positions paid by one event: keeps each payload well under the store's 64 KiB limit."""
BATCH_STREAM_PREFIX = "batch-"


def chunks(items: Sequence[PositionMovement], size: int = POSITIONS_PER_EVENT
           ) -> list[Sequence[PositionMovement]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def settlement_postings(movements: Sequence[PositionMovement], asset: str
                        ) -> tuple[tuple[Posting, ...], Decimal]:
    """Each account's exact amounts netted into one posting per asset, rounded in the
    house's favour, against `ccp:settlement`; returns the postings and what they left in
    `ccp:settlement` (minus the sum of the credits)."""
    exact: dict[str, Decimal] = defaultdict(Decimal)
    for m in movements:
        exact[m.account_id] += m.amount
    credits = {a: credit_rounded(v, asset) for a, v in exact.items()}
    total = sum(credits.values(), Decimal(0))
    postings = net_postings([*((a, asset, c) for a, c in credits.items()),
                             (SETTLEMENT, asset, -total)])
    return postings, -total


class BatchFacts:
    """Collects one batch's facts with keys derived from the batch id, and its residual."""

    def __init__(self, batch_id: str, job: str, at: datetime) -> None:
        self.batch_id = batch_id
        self.job = job
        self.at = at
        self.facts: list[NewFact] = []
        self.residual: dict[str, Decimal] = defaultdict(Decimal)
        """What the batch's payments leave in `ccp:settlement`, per asset: the rounding
        residual, since each instrument's exact payments sum to zero."""

    def add(self, event: Event, subject: str, stream: str | None = None) -> None:
        self.facts.append(NewFact(stream or f"{BATCH_STREAM_PREFIX}{self.job}", event,
                                  f"{self.batch_id}:{subject}", self.at))

    def pay(self, make: Callable[[tuple[PositionMovement, ...], tuple[Posting, ...], int], Event],
            movements: Sequence[PositionMovement], asset: str, subject: str) -> None:
        """Events of at most POSITIONS_PER_EVENT movements each, built by `make`."""
        for index, chunk in enumerate(chunks(movements)):
            postings, left = settlement_postings(chunk, asset)
            self.residual[asset] += left
            self.add(make(tuple(chunk), postings, index), f"{subject}:{index:05d}")

    def close(self) -> list[NewFact]:
        """The batch's facts, ending with the sweep of its rounding residual."""
        movements = [(SETTLEMENT, asset, -r) for asset, r in sorted(self.residual.items())
                     if r != 0] + [(ROUNDING, asset, r) for asset, r in
                                   sorted(self.residual.items()) if r != 0]
        if movements:
            self.add(SettlementResidualSwept(batch_id=self.batch_id,
                                             postings=net_postings(movements)), "residual")
        return self.facts
