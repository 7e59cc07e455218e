"""Input files for end-to-end tests, written as a back-office clerk would write them.

The headers are copied from SPEC section 3 rather than imported from the product, so a test
notices when the product's columns drift from the contract.
"""

from __future__ import annotations

ACCOUNTS = "account_id,owner,margin_model"
INSTRUMENTS = "symbol,kind,underlying,settlement_asset,expiry,strike,option_type,multiplier"
COLLATERAL = "ref,account_id,asset,amount,time"
TRADES = "trade_id,leg,instrument,buyer,seller,quantity,price,buyer_fee,seller_fee,time"
MARKS = "time,symbol,price,iv"

HEADERS = {
    "accounts": ACCOUNTS,
    "instruments": INSTRUMENTS,
    "deposits": COLLATERAL,
    "withdrawals": COLLATERAL,
    "trades": TRADES,
    "marks": MARKS,
}

EXPIRY = "2026-12-27T08:00:00Z"
"""When the dated future and the option of the base ledger expire."""
AT = "2026-02-01T00:00:00Z"
"""A business time well inside every base instrument's life."""

FUTURE = "BTC-27DEC26"
OPTION = "BTC-27DEC26-100000-C"
PERP = "BTC-PERP"


def csv_text(header: str, *rows: str) -> str:
    """A CSV file: the header, then one line per row, each ending in a newline."""
    return "".join(f"{line}\n" for line in (header, *rows))


def rows(kind: str, *lines: str) -> str:
    """A file of `kind` with the contract's header."""
    return csv_text(HEADERS[kind], *lines)


BASE_FILES: tuple[tuple[str, str], ...] = (
    ("accounts", rows("accounts",
                      "alice,Alice Trading Ltd,standard",
                      "bob,Bob Capital LLC,portfolio")),
    ("instruments", rows("instruments",
                         f"{PERP},perpetual,BTC,USDC,,,,1",
                         f"{FUTURE},future,BTC,USDC,{EXPIRY},,,1",
                         f"{OPTION},option,BTC,USDC,{EXPIRY},100000,call,1")),
    ("deposits", rows("deposits",
                      f"dep-1,alice,USDC,100000,{AT}",
                      f"dep-2,bob,USDC,100000,{AT}",
                      f"dep-3,alice,BTC,2,{AT}")),
    ("marks", rows("marks", f"{AT},BTC,90000,")),
)
"""A small valid ledger: two members, a perpetual, a dated future and an option on BTC,
collateral for both members and a BTC index price to value it."""
BASE_EVENTS = 9


def trade(trade_id: str = "T-1", leg: str = "1", instrument: str = PERP,
          buyer: str = "alice", seller: str = "bob", quantity: str = "1",
          price: str = "90000", buyer_fee: str = "0.5", seller_fee: str = "0.5",
          time: str = AT) -> str:
    """One trade row; every cell defaults to a valid value, so a case names only its fault."""
    return ",".join((trade_id, leg, instrument, buyer, seller, quantity, price, buyer_fee,
                     seller_fee, time))


def collateral(ref: str = "ref-9", account_id: str = "alice", asset: str = "USDC",
               amount: str = "10", time: str = AT) -> str:
    """One deposit or withdrawal row."""
    return ",".join((ref, account_id, asset, amount, time))


def instrument(symbol: str, kind: str, underlying: str = "BTC", settlement_asset: str = "USDC",
               expiry: str = "", strike: str = "", option_type: str = "",
               multiplier: str = "1") -> str:
    """One listing row."""
    return ",".join((symbol, kind, underlying, settlement_asset, expiry, strike, option_type,
                     multiplier))
