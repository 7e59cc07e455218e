"""`clearing verify`: the invariants of SPEC section 6, each passed or failed with the first
counterexample."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal

from sqlalchemy import func, select, text
from sqlalchemy.exc import DBAPIError

from clearing.app import Ledger
from clearing.backoffice.replay import differences, replay
from clearing.projections import tables as t
from clearing.projections.ledger import load_full_state
from clearing.store.hashchain import verify_chain
from clearing.store.tables import events


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


def check_append_only(ledger: Ledger) -> Check:
    """Invariant 1: the database itself refuses to change a stored event."""
    is_pg = ledger.engine.dialect.name == "postgresql"
    with ledger.engine.connect() as conn:
        if is_pg:
            names = set(conn.execute(text(
                "SELECT tgname FROM pg_trigger WHERE tgrelid = 'events'::regclass "
                "AND NOT tgisinternal AND tgenabled <> 'D'")).scalars())
            wanted = {"events_refuse_update_delete", "events_refuse_truncate"}
        else:
            names = set(conn.execute(text(
                "SELECT name FROM sqlite_master WHERE type = 'trigger' "
                "AND tbl_name = 'events'")).scalars())
            wanted = {"events_refuse_update", "events_refuse_delete"}
        conn.rollback()
        missing = wanted - names
        if missing:
            return Check("append_only", False, f"guard triggers missing or disabled: "
                                               f"{', '.join(sorted(missing))}")
        for statement in ("UPDATE events SET type = type", "DELETE FROM events"):
            # Try it for real on one event, inside a transaction that is always rolled back.
            transaction = conn.begin()
            try:
                changed = conn.execute(text(
                    statement + " WHERE position = (SELECT min(position) FROM events)"
                )).rowcount
            except DBAPIError:
                changed = 0
            finally:
                transaction.rollback()
            if changed:
                return Check("append_only", False, f"{statement.split()[0]} was accepted")
    return Check("append_only", True, "UPDATE and DELETE on events are refused")


def check_hash_chain(ledger: Ledger) -> Check:
    """Invariant 2."""
    report = verify_chain(ledger.engine)
    if report.ok:
        return Check("hash_chain", True, f"{report.events_checked} events verified")
    return Check("hash_chain", False, f"first bad position {report.first_bad_position}: "
                                      f"{report.reason}")


def check_balances_sum_to_zero(ledger: Ledger) -> Check:
    """Invariant 3: with the house accounts, every asset's balances sum to exactly zero."""
    totals: dict[str, Decimal] = defaultdict(Decimal)
    with ledger.engine.connect() as conn:
        for row in conn.execute(select(t.balances.c.asset, t.balances.c.balance)):
            totals[row.asset] += row.balance
    bad = {a: v for a, v in sorted(totals.items()) if v != 0}
    if bad:
        asset, total = next(iter(bad.items()))
        return Check("balances_zero_sum", False, f"{asset} balances sum to {total}")
    return Check("balances_zero_sum", True, f"{len(totals)} assets sum to zero")


def check_open_interest_nets(ledger: Ledger) -> Check:
    """Invariant 4: for every instrument, longs equal shorts."""
    totals: dict[str, Decimal] = defaultdict(Decimal)
    with ledger.engine.connect() as conn:
        for row in conn.execute(select(t.positions.c.instrument, t.positions.c.quantity)):
            totals[row.instrument] += row.quantity
    bad = {i: v for i, v in sorted(totals.items()) if v != 0}
    if bad:
        symbol, total = next(iter(bad.items()))
        return Check("open_interest_nets_to_zero", False, f"{symbol} positions sum to {total}")
    return Check("open_interest_nets_to_zero", True, f"{len(totals)} instruments net to zero")


def check_projections_equal_replay(ledger: Ledger) -> Check:
    """Invariant 5: every read model equals a replay of all events, field by field."""
    with ledger.engine.connect() as conn:
        stored = load_full_state(conn, {x.name: x for x in t.LEDGER_TABLES})
    found = differences(stored, replay(ledger.store))
    if found:
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        return Check("projections_equal_replay", False, f"{found[0]}{more}")
    return Check("projections_equal_replay", True, "read models equal a full replay")


def check_idempotency_keys_unique(ledger: Ledger) -> Check:
    """Invariant 6: no idempotency key was recorded twice."""
    with ledger.engine.connect() as conn:
        row = conn.execute(
            select(events.c.idempotency_key, func.count().label("n"))
            .group_by(events.c.idempotency_key).having(func.count() > 1).limit(1)).first()
    if row is not None:
        return Check("idempotency_keys_unique", False, f"{row.idempotency_key!r} appears "
                                                       f"{row.n} times")
    return Check("idempotency_keys_unique", True, "every idempotency key appears once")


CHECKS: list[Callable[[Ledger], Check]] = [
    check_append_only,
    check_hash_chain,
    check_balances_sum_to_zero,
    check_open_interest_nets,
    check_projections_equal_replay,
    check_idempotency_keys_unique,
]


def verify(ledger: Ledger) -> list[Check]:
    ledger.refresh()
    return [check(ledger) for check in CHECKS]
