"""SIGKILL inside a projection update: the read models and their checkpoint stay where they
were, and the next catch-up applies the page exactly once.

The victim is a genuine `python -m clearing.cli import trades FILE` process. Its append
commits (300 events); then, catching the read models up, it is held by the test hook
`CLEARING_TEST_PAUSE_IN_PROJECTION` inside the page's transaction, after the page is applied
to balances, positions, statement and trades, before the checkpoint moves, and killed there.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import Engine, select

from clearing.projections import tables as t
from clearing.store.tables import checkpoints
from clearing.store.testhooks import PAUSE_IN_PROJECTION_ENV
from tests.conftest import BACKENDS
from tests.faults.scenario import (
    FAULT_TRADES,
    PAUSE_S,
    assert_same_as,
    cli,
    event_count,
    outcome,
    sigkill,
    spawn,
    trades,
    twin,
    wait_for_pause,
)


def stored(engine: Engine) -> tuple[object, ...]:
    """The read models as stored, without catching them up first (a command would)."""
    with engine.connect() as conn:
        return (
            sorted(conn.execute(select(t.balances)).all()),
            sorted(conn.execute(select(t.positions)).all()),
            len(conn.execute(select(t.statement.c.position)).all()),
            len(conn.execute(select(t.trade_legs.c.trade_id)).all()),
            conn.execute(select(checkpoints.c.txid, checkpoints.c.position)
                         .where(checkpoints.c.name == "ledger")).one(),
        )


@pytest.mark.parametrize("kind", BACKENDS)
def test_sigkill_inside_a_projection_update_then_the_next_catch_up_applies_it_once(
    kind: str, tmp_path: Path,
) -> None:
    reference, victim = twin(kind, tmp_path, "reference"), twin(kind, tmp_path, "victim")
    try:
        path = reference.harness.write_file("trades", trades())
        cli("import", "trades", str(path), "--db", reference.url)
        expected = outcome(reference.url)
        read_models_before = stored(victim.harness.engine)
        events_before = event_count(victim.url)

        process = spawn(["import", "trades", str(path), "--db", victim.url],
                        {PAUSE_IN_PROJECTION_ENV: str(PAUSE_S)})
        wait_for_pause(process, PAUSE_IN_PROJECTION_ENV)
        sigkill(process)

        # The facts are in the log; the page applied to the read models was rolled back
        # with its checkpoint.
        assert event_count(victim.url) == events_before + FAULT_TRADES
        assert stored(victim.harness.engine) == read_models_before

        # The next command catches up (applying the page once), and its result is the
        # fault-free one; importing the file again finds every fact already recorded.
        assert_same_as(victim.url, expected)
        assert stored(victim.harness.engine)[:4] == stored(reference.harness.engine)[:4]
        assert "already recorded" in cli("import", "trades", str(path), "--db", victim.url)
        assert_same_as(victim.url, expected)
    finally:
        reference.backend.close()
        victim.backend.close()
