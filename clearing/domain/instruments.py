"""Instruments: dated futures, perpetuals and European cash-settled options.

A symbol is a promise about the instrument (`BTC-27DEC26-100000-C` says: BTC, expiring on
27 December 2026, strike 100,000, a call), so a listing whose fields contradict its symbol is
refused rather than trusted.
"""

from __future__ import annotations

import re
from datetime import date, datetime
from decimal import Decimal
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator, model_validator

from clearing.domain.clock import ensure_utc
from clearing.domain.money import ASSETS, SETTLEMENT_ASSET, canonical_decimal

MONTHS = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")
UNDERLYINGS = tuple(a for a in ASSETS if a != SETTLEMENT_ASSET)
_DATED = re.compile(r"^(?P<day>\d{1,2})(?P<month>[A-Z]{3})(?P<year>\d{2})$")


class InstrumentKind(StrEnum):
    FUTURE = "future"
    PERPETUAL = "perpetual"
    OPTION = "option"


class OptionType(StrEnum):
    CALL = "call"
    PUT = "put"


class InstrumentError(ValueError):
    """A listing that is inconsistent: the field it names and why."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class ParsedSymbol(BaseModel):
    model_config = ConfigDict(frozen=True)
    underlying: str
    kind: InstrumentKind
    expiry_date: date | None = None
    strike: Decimal | None = None
    option_type: OptionType | None = None


def parse_symbol(symbol: str) -> ParsedSymbol:
    """Read `BTC-PERP`, `BTC-27DEC26` or `BTC-27DEC26-100000-C`."""
    parts = symbol.split("-")
    if len(parts) not in (2, 4) or parts[0] not in UNDERLYINGS:
        raise InstrumentError(
            "symbol", f"{symbol!r} is not UNDERLYING-PERP, UNDERLYING-DDMMMYY or "
                      f"UNDERLYING-DDMMMYY-STRIKE-C|P with UNDERLYING one of "
                      f"{', '.join(UNDERLYINGS)}")
    underlying = parts[0]
    if len(parts) == 2 and parts[1] == "PERP":
        return ParsedSymbol(underlying=underlying, kind=InstrumentKind.PERPETUAL)
    expiry_date = _parse_date(symbol, parts[1])
    if len(parts) == 2:
        return ParsedSymbol(underlying=underlying, kind=InstrumentKind.FUTURE,
                            expiry_date=expiry_date)
    strike_text, flag = parts[2], parts[3]
    if flag not in ("C", "P"):
        raise InstrumentError("symbol", f"{symbol!r} must end in C (call) or P (put)")
    if not re.fullmatch(r"\d+(\.\d+)?", strike_text) or Decimal(strike_text) <= 0:
        raise InstrumentError("symbol", f"{symbol!r} has no valid strike")
    return ParsedSymbol(
        underlying=underlying,
        kind=InstrumentKind.OPTION,
        expiry_date=expiry_date,
        strike=Decimal(strike_text),
        option_type=OptionType.CALL if flag == "C" else OptionType.PUT,
    )


def _parse_date(symbol: str, text: str) -> date:
    match = _DATED.match(text)
    if not match or match["month"] not in MONTHS:
        raise InstrumentError("symbol", f"{symbol!r}: {text!r} is not a date like 27DEC26")
    try:
        return date(2000 + int(match["year"]), MONTHS.index(match["month"]) + 1,
                    int(match["day"]))
    except ValueError:
        raise InstrumentError("symbol", f"{symbol!r}: {text!r} is not a real date") from None


def format_symbol_date(value: date) -> str:
    return f"{value.day}{MONTHS[value.month - 1]}{value.year % 100:02d}"


class Instrument(BaseModel):
    """A listed contract. Prices are in USD per unit of underlying; P&L, premiums, fees and
    settlements are paid in the settlement asset (linear instruments, SPEC section 4)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    symbol: str
    kind: InstrumentKind
    underlying: str
    settlement_asset: str
    expiry: datetime | None = None
    strike: Decimal | None = None
    option_type: OptionType | None = None
    multiplier: Decimal

    @field_validator("expiry")
    @classmethod
    def _utc(cls, value: datetime | None) -> datetime | None:
        return None if value is None else ensure_utc(value)

    @model_validator(mode="after")
    def _consistent(self, info: ValidationInfo) -> Instrument:
        if not (info.context and info.context.get("from_the_log")):
            check_listing(self)
        return self

    @property
    def is_option(self) -> bool:
        return self.kind is InstrumentKind.OPTION

    @property
    def is_linear_delta_one(self) -> bool:
        """Futures and perpetuals: settled by variation margin."""
        return self.kind in (InstrumentKind.FUTURE, InstrumentKind.PERPETUAL)

    def is_expired_at(self, at: datetime) -> bool:
        return self.expiry is not None and at >= self.expiry


def check_listing(instrument: Instrument) -> None:
    """Refuse a listing whose fields contradict its symbol or its kind."""
    parsed = parse_symbol(instrument.symbol)
    if instrument.kind is not parsed.kind:
        raise InstrumentError("kind", f"{instrument.kind} contradicts symbol "
                                      f"{instrument.symbol!r} ({parsed.kind})")
    if instrument.underlying != parsed.underlying:
        raise InstrumentError("underlying", f"{instrument.underlying!r} contradicts symbol "
                                            f"{instrument.symbol!r}")
    if instrument.settlement_asset != SETTLEMENT_ASSET:
        raise InstrumentError("settlement_asset",
                              f"{instrument.settlement_asset!r}: instruments settle in "
                              f"{SETTLEMENT_ASSET}")
    if instrument.multiplier <= 0:
        raise InstrumentError("multiplier", "must be greater than zero")
    if parsed.kind is InstrumentKind.PERPETUAL:
        for field in ("expiry", "strike", "option_type"):
            if getattr(instrument, field) is not None:
                raise InstrumentError(field, "must be empty for a perpetual")
        return
    if instrument.expiry is None:
        raise InstrumentError("expiry", f"is required for a {parsed.kind}")
    if instrument.expiry.date() != parsed.expiry_date:
        raise InstrumentError(
            "expiry", f"{instrument.expiry.date().isoformat()} contradicts symbol "
                      f"{instrument.symbol!r} ({parsed.expiry_date})")
    if parsed.kind is InstrumentKind.FUTURE:
        for field in ("strike", "option_type"):
            if getattr(instrument, field) is not None:
                raise InstrumentError(field, "must be empty for a future")
        return
    if instrument.strike is None:
        raise InstrumentError("strike", "is required for an option")
    if instrument.strike != parsed.strike:
        raise InstrumentError("strike", f"{canonical_decimal(instrument.strike)} contradicts "
                                        f"symbol {instrument.symbol!r}")
    if instrument.option_type is not parsed.option_type:
        raise InstrumentError("option_type", f"{instrument.option_type} contradicts symbol "
                                             f"{instrument.symbol!r}")
