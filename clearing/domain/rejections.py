"""Typed rejections of commands: each names the field at fault, the reason and the value.

A rejection is an expected answer to bad input (exit code 2, nothing written), not a crash.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

from clearing.domain.clock import format_time


class Rejected(ValueError):
    """Base of every command rejection."""

    def __init__(self, field: str, reason: str, value: object = None):
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason
        self.value = value


class UnknownAccount(Rejected):
    def __init__(self, account_id: str, field: str = "account_id"):
        super().__init__(field, f"unknown account {account_id!r}", account_id)


class UnknownInstrument(Rejected):
    def __init__(self, symbol: str, field: str = "instrument"):
        super().__init__(field, f"unknown instrument {symbol!r}", symbol)


class InstrumentExpired(Rejected):
    def __init__(self, symbol: str, expiry: datetime, at: datetime):
        super().__init__(
            "time", f"{symbol} expired at {format_time(expiry)}, the trade is at "
                    f"{format_time(at)}", symbol)


class SameAccountBothSides(Rejected):
    def __init__(self, account_id: str):
        super().__init__("seller", f"{account_id!r} is both buyer and seller", account_id)


class InsufficientBalance(Rejected):
    def __init__(self, account_id: str, asset: str, balance: Decimal, amount: Decimal):
        super().__init__(
            "amount", f"withdrawing {amount} {asset} from {account_id!r} exceeds its "
                      f"balance of {balance} {asset}", amount)
        self.account_id = account_id
        self.asset = asset
        self.balance = balance
        self.amount = amount


class AlreadyExists(Rejected):
    """The same id was used before for different content."""


class TradeNotFound(Rejected):
    def __init__(self, trade_id: str):
        super().__init__("trade_id", f"no cleared trade {trade_id!r}", trade_id)


class TradeAlreadyBusted(Rejected):
    def __init__(self, trade_id: str):
        super().__init__("trade_id", f"trade {trade_id!r} is already busted", trade_id)


class InstrumentSettled(Rejected):
    def __init__(self, trade_id: str, symbol: str):
        super().__init__("trade_id", f"trade {trade_id!r} cannot be busted: {symbol} has "
                                     "settled", symbol)


class InsufficientMargin(Rejected):
    """A withdrawal would leave equity below the initial margin requirement."""

    def __init__(self, account_id: str, asset: str, amount: Decimal, equity_after: Decimal,
                 initial: Decimal):
        super().__init__(
            "amount", f"withdrawing {amount} {asset} would leave {account_id!r} with equity "
                      f"{equity_after} USD, below its initial margin requirement of "
                      f"{initial} USD", amount)
        self.account_id = account_id
        self.asset = asset
        self.amount = amount
        self.equity_after = equity_after
        self.initial = initial
