"""Small event types for exercising the store without the ledger's rules."""

from __future__ import annotations

from decimal import Decimal

from pydantic import Field

from clearing.domain.event import Event, EventCatalogue

test_catalogue = EventCatalogue()


@test_catalogue.register
class Noted(Event):
    type_name = "Noted"
    schema_version = 2
    text: str
    amount: Decimal = Field(default=Decimal("0"))


@test_catalogue.upcaster("Noted", 1)
def _noted_v1_to_v2(payload: dict) -> dict:
    """v1 called the field `note` and had no amount."""
    return {"text": payload["note"], "amount": "0"}


@test_catalogue.register
class Counted(Event):
    type_name = "Counted"
    n: int = Field(ge=0)
