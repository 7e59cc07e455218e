"""How the read models are written: COPY of new rows, upsert of changed ones, keys sent as
one text. Run on SQLite and PostgreSQL alike; the awkward cases take the slower paths."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest
from sqlalchemy import select

from clearing.domain.ledger import Account, LedgerState, StatementLine, Touched
from clearing.projections import tables as t
from clearing.projections.ledger import load_state, save_state, state_rows
from clearing.store.database import write_transaction
from clearing.store.eventstore import EventStore, PendingEvent
from clearing.store.hashchain import verify_chain
from tests.store.events_for_tests import Noted, test_catalogue

T0 = datetime(2026, 12, 1, 8, 0, tzinfo=UTC)
TABLES = {x.name: x for x in t.LEDGER_TABLES}
AWKWARD = "tab\there\nnew line\\back\\slash\r\u00e9"
SEPARATED = "unit\x1fseparator"
NOTHING_LOADED = state_rows(LedgerState())


def _saved(engine, state: LedgerState) -> None:  # type: ignore[no-untyped-def]
    with write_transaction(engine) as conn:
        save_state(conn, TABLES, state, unchanged_from=NOTHING_LOADED)


def _loaded(engine, keys: Touched) -> LedgerState:  # type: ignore[no-untyped-def]
    with engine.connect() as conn:
        return load_state(conn, TABLES, keys)


def test_text_needing_copy_escapes_and_keys_holding_the_separator_round_trip(engine) -> None:  # type: ignore[no-untyped-def]
    state = LedgerState()
    state.accounts[AWKWARD] = Account(AWKWARD, "Owner\twith a tab", "standard")
    state.accounts[SEPARATED] = Account(SEPARATED, "Plain", "portfolio")
    state.balances[(AWKWARD, "USDC")] = Decimal("1.500000")
    state.balances[(SEPARATED, "USDC")] = Decimal("-1.500000")
    state.statement.append(StatementLine(1, AWKWARD, "USDC", T0, "Noted", "ref\\1",
                                         Decimal("1.500000"), Decimal("1.500000")))
    _saved(engine, state)

    keys = Touched(accounts={AWKWARD, SEPARATED},
                   balances={(AWKWARD, "USDC"), (SEPARATED, "USDC")})
    loaded = _loaded(engine, keys)
    assert loaded.accounts == state.accounts
    assert loaded.balances == state.balances
    with engine.connect() as conn:
        rows = conn.execute(select(t.statement)).all()
    assert [StatementLine(*row) for row in rows] == state.statement


def test_a_row_stored_but_not_loaded_is_replaced_not_refused(engine) -> None:  # type: ignore[no-untyped-def]
    first = LedgerState(balances={("alice", "USDC"): Decimal("1.000000"),
                                  ("bob", "USDC"): Decimal("-1.000000")})
    _saved(engine, first)
    # Saved again as if new: the COPY meets the stored keys and gives way to the upsert,
    # in the same transaction, which goes on to write the rest.
    second = LedgerState(balances={("alice", "USDC"): Decimal("2.000000"),
                                   ("carol", "USDC"): Decimal("-2.000000")})
    second.statement.append(StatementLine(2, "alice", "USDC", T0, "Noted", "r",
                                          Decimal("1.000000"), Decimal("2.000000")))
    _saved(engine, second)

    keys = Touched(balances={("alice", "USDC"), ("bob", "USDC"), ("carol", "USDC")})
    assert _loaded(engine, keys).balances == {("alice", "USDC"): Decimal("2.000000"),
                                              ("bob", "USDC"): Decimal("-1.000000"),
                                              ("carol", "USDC"): Decimal("-2.000000")}
    with engine.connect() as conn:
        assert conn.execute(select(t.statement.c.position)).scalars().all() == [2]


def test_streams_named_with_the_separator_keep_their_versions(engine) -> None:  # type: ignore[no-untyped-def]
    store = EventStore(engine, event_catalogue=test_catalogue, clock=lambda: T0)
    for i in range(2):
        store.append([PendingEvent(SEPARATED, Noted(text=f"n{i}"), f"k{i}", T0),
                      PendingEvent("", Noted(text=f"e{i}"), f"e{i}", T0),
                      PendingEvent("plain", Noted(text=f"p{i}"), f"p{i}", T0)])
    assert [r.stream_version for r in store.read_stream(SEPARATED)] == [1, 2]
    assert store.stream_version(SEPARATED) == 2 and store.stream_version("") == 2
    assert verify_chain(engine).ok


def test_rows_saved_by_a_batch_that_then_fails_are_not_kept(engine) -> None:  # type: ignore[no-untyped-def]
    # The save is the transaction's first statement (a page whose facts load nothing).
    state = LedgerState(balances={("alice", "USDC"): Decimal("1.000000")})
    with pytest.raises(RuntimeError):
        with write_transaction(engine) as conn:
            save_state(conn, TABLES, state, unchanged_from=NOTHING_LOADED)
            raise RuntimeError("the batch fails after its rows were written")
    assert _loaded(engine, Touched(balances={("alice", "USDC")})).balances == {}
