"""Accounts: the venue's members and the clearing house's own house accounts.

The house accounts make the books close: deposits come from `ccp:external` (the outside
world), so that with them every asset's balances sum to exactly zero (SPEC section 4).
"""

from __future__ import annotations

import re
from enum import StrEnum

HOUSE_PREFIX = "ccp:"
EXTERNAL = "ccp:external"
FEES = "ccp:fees"
INSURANCE = "ccp:insurance"
LIQUIDATION = "ccp:liquidation"
ROUNDING = "ccp:rounding"
SETTLEMENT = "ccp:settlement"
"""The clearing house's settlement account: variation margin, funding and expiry cash pass
through it chunk by chunk; a complete batch leaves it at zero (its rounding residual swept to
`ccp:rounding`)."""
HOUSE_ACCOUNTS = (EXTERNAL, FEES, INSURANCE, LIQUIDATION, ROUNDING, SETTLEMENT)

ACCOUNT_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
OWNER_LENGTH_MAX = 200


class MarginModel(StrEnum):
    STANDARD = "standard"
    PORTFOLIO = "portfolio"


class InvalidAccountId(ValueError):
    def __init__(self, account_id: str, reason: str):
        super().__init__(f"account id {account_id!r} {reason}")
        self.account_id = account_id
        self.reason = reason


def is_house(account_id: str) -> bool:
    return account_id.startswith(HOUSE_PREFIX)


def check_member_account_id(account_id: str) -> str:
    """A member account id: letters, digits and `_.@-`, up to 64 characters; the `ccp:`
    prefix is reserved for house accounts."""
    if is_house(account_id):
        raise InvalidAccountId(account_id, "uses the reserved prefix 'ccp:'")
    if not ACCOUNT_ID_PATTERN.match(account_id):
        raise InvalidAccountId(
            account_id, "must be 1-64 characters of letters, digits and _.@- "
                        "starting with a letter or digit")
    return account_id
