"""Double entry: every movement of money is a set of postings summing to zero per asset."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from decimal import Decimal

from pydantic import BaseModel, ConfigDict

from clearing.domain.money import ExactDecimal, quantize


class Posting(BaseModel):
    """One leg of a money movement: `amount` of `asset` credited (+) or debited (−)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    account_id: str
    asset: str
    amount: ExactDecimal


class UnbalancedPostings(ValueError):
    """Postings that do not sum to zero for some asset: money created or destroyed."""

    def __init__(self, asset: str, total: Decimal):
        super().__init__(f"postings in {asset} sum to {total}, not zero")
        self.asset = asset
        self.total = total


def check_balanced(postings: Iterable[Posting]) -> None:
    totals: dict[str, Decimal] = {}
    for posting in postings:
        asset, amount = posting.asset, posting.amount
        quantize(amount, asset)
        total = totals.get(asset)
        totals[asset] = amount if total is None else total + amount
    for asset, total in sorted(totals.items()):
        if total != 0:
            raise UnbalancedPostings(asset, total)


def net_postings(movements: Iterable[tuple[str, str, Decimal]]) -> tuple[Posting, ...]:
    """Net (account, asset, amount) movements into one posting per account and asset, in a
    canonical order, dropping zeros, each at its asset's scale (refusing an amount that does
    not fit it). The event carrying them checks that they balance (`MoneyMovement`)."""
    totals: dict[tuple[str, str], Decimal] = defaultdict(Decimal)
    for account_id, asset, amount in movements:
        totals[(account_id, asset)] += amount
    return tuple(
        Posting(account_id=account_id, asset=asset, amount=quantize(amount, asset))
        for (account_id, asset), amount in sorted(totals.items())
        if amount != 0
    )
