"""Assets and exact money: every amount is a Decimal quantised to its asset's scale.

Rounding is always explicit and always favours the clearing house, so that it never pays out
money it does not hold (SPEC section 4): payouts to accounts round down, charges and
requirements round up, and whatever a set of rounded legs leaves over is posted to
`ccp:rounding`. A signed amount credited to an account is therefore always rounded towards
negative infinity: a credit becomes smaller, a debit larger.
"""

from __future__ import annotations

import decimal
import re
from dataclasses import dataclass, field
from decimal import ROUND_CEILING, ROUND_FLOOR, ROUND_HALF_EVEN, Decimal, InvalidOperation
from typing import Annotated

from pydantic import Field, PlainSerializer

# Money maths is exact before quantisation: products of 8-decimal prices and quantities need
# far more than the default 28 significant digits' headroom once notionals grow.
MONEY_PRECISION = 60
decimal.DefaultContext.prec = MONEY_PRECISION
decimal.getcontext().prec = MONEY_PRECISION

USD_SCALE = 2
"""Requirements are reported in USD, rounded up to cents."""
QUANTITY_SCALE = 8
"""Largest number of decimals accepted for a quantity or a price."""
PRICE_SCALE = 8
_PLAIN_DECIMAL = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)")
"""A number as a file may write it: ASCII digits, an optional sign and decimal point. Python's
Decimal also reads `1_000` and non-ASCII digits (`１０`); an input file may not."""


@dataclass(frozen=True)
class AssetSpec:
    code: str
    scale: int
    quantum: Decimal = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "quantum", Decimal(1).scaleb(-self.scale))


ASSETS: dict[str, AssetSpec] = {
    "USDC": AssetSpec("USDC", 6),
    "BTC": AssetSpec("BTC", 8),
    "ETH": AssetSpec("ETH", 8),
}
SETTLEMENT_ASSET = "USDC"
"""Every instrument is linear and settles in USDC, whose price is 1 USD."""


class UnknownAsset(ValueError):
    def __init__(self, asset: str):
        super().__init__(f"unknown asset {asset!r} (known: {', '.join(ASSETS)})")
        self.asset = asset


class InvalidAmount(ValueError):
    """A decimal field that is not a finite number, has too many decimals, or is out of range."""

    def __init__(self, text: str, reason: str):
        super().__init__(f"{text!r} {reason}")
        self.text = text
        self.reason = reason


def asset_spec(asset: str) -> AssetSpec:
    try:
        return ASSETS[asset]
    except KeyError:
        raise UnknownAsset(asset) from None


def parse_decimal(text: str, *, scale: int, positive: bool = False,
                  non_negative: bool = False) -> Decimal:
    """Parse a decimal exactly as written: no exponent, no NaN or infinity, at most `scale`
    decimals. Refusing extra decimals (rather than rounding them away) keeps an input file's
    numbers and the ledger's numbers identical."""
    raw = text.strip()
    if not raw:
        raise InvalidAmount(text, "is empty")
    if len(raw) > 40:
        raise InvalidAmount(text[:40] + "…", "is too long for a number")
    try:
        value = Decimal(raw)
    except InvalidOperation:
        raise InvalidAmount(text, "is not a number") from None
    if not value.is_finite():
        raise InvalidAmount(text, "is not a finite number")
    if any(c in raw for c in "eE"):
        raise InvalidAmount(text, "must be written without an exponent")
    if not _PLAIN_DECIMAL.fullmatch(raw):
        raise InvalidAmount(text, "is not a plain decimal number (ASCII digits, an optional "
                                  "sign and decimal point)")
    exponent = value.as_tuple().exponent
    assert isinstance(exponent, int)
    if -exponent > scale:
        raise InvalidAmount(text, f"has more than {scale} decimals")
    if positive and value <= 0:
        raise InvalidAmount(text, "must be greater than zero")
    if non_negative and value < 0:
        raise InvalidAmount(text, "must not be negative")
    return value


def parse_amount(text: str, asset: str, *, positive: bool = True) -> Decimal:
    """An amount of `asset`, at most the asset's decimals, quantised to its scale."""
    spec = asset_spec(asset)
    value = parse_decimal(text, scale=spec.scale, positive=positive, non_negative=not positive)
    return value.quantize(spec.quantum)


def quantize(amount: Decimal, asset: str) -> Decimal:
    """Exact quantisation of an amount that must already fit the asset's scale."""
    spec = ASSETS.get(asset) or asset_spec(asset)
    value = amount.quantize(spec.quantum)
    if value != amount:
        raise InvalidAmount(str(amount), f"has more than {spec.scale} decimals")
    return value


def credit_rounded(amount: Decimal, asset: str) -> Decimal:
    """A signed amount credited to an account, rounded in the clearing house's favour
    (towards negative infinity): payouts round down, charges round up."""
    return amount.quantize((ASSETS.get(asset) or asset_spec(asset)).quantum, rounding=ROUND_FLOOR)


def payout_rounded(amount: Decimal, asset: str) -> Decimal:
    """A positive payout, rounded down."""
    return amount.quantize((ASSETS.get(asset) or asset_spec(asset)).quantum, rounding=ROUND_FLOOR)


def charge_rounded(amount: Decimal, asset: str) -> Decimal:
    """A positive charge, rounded up."""
    return amount.quantize((ASSETS.get(asset) or asset_spec(asset)).quantum, rounding=ROUND_CEILING)


def requirement_usd(amount: Decimal) -> Decimal:
    """A margin requirement in USD, rounded up to the cent."""
    return amount.quantize(Decimal("0.01"), rounding=ROUND_CEILING)


def usd_cents(amount: Decimal) -> Decimal:
    """A reported USD value (equity, collateral) rounded down to the cent: never overstated."""
    return amount.quantize(Decimal("0.01"), rounding=ROUND_FLOOR)


_INFORMATIONAL_QUANTA = {scale: Decimal(1).scaleb(-scale) for scale in range(19)}


def informational(value: Decimal, scale: int = 10) -> Decimal:
    """A derived figure that is not money (an average entry price): half-even at `scale`."""
    quantum = _INFORMATIONAL_QUANTA.get(scale) or Decimal(1).scaleb(-scale)
    return value.quantize(quantum, rounding=ROUND_HALF_EVEN)


def canonical_decimal(value: Decimal) -> str:
    """The one text form of a quantity or price: no exponent, no trailing zeros."""
    if value == 0:
        return "0"
    text = format(value.normalize(), "f")
    return text


def _plain(value: Decimal) -> str:
    return format(value, "f")


ExactDecimal = Annotated[
    Decimal,
    Field(allow_inf_nan=False),
    PlainSerializer(_plain, return_type=str, when_used="json"),
]
"""A Decimal as events carry it: finite, and serialised as plain text without exponent."""
