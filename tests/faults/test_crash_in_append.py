"""SIGKILL inside an append: nothing is half-written, and importing the file again records it
exactly once, ending where an uninterrupted import ends.

The victim is a genuine `python -m clearing.cli import trades FILE` process, held by the test
hook `CLEARING_TEST_PAUSE_IN_APPEND` inside its append's transaction after all 300 events and
the stream heads are written, before COMMIT, and killed there with SIGKILL. Its twin imports
the same file without a fault.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import func, select

from clearing.store.tables import streams
from clearing.store.testhooks import PAUSE_IN_APPEND_ENV
from tests.conftest import BACKENDS
from tests.faults.scenario import (
    FAULT_TRADES,
    PAUSE_S,
    assert_same_as,
    cli,
    outcome,
    sigkill,
    spawn,
    trades,
    twin,
    wait_for_pause,
)


def stream_heads(engine) -> tuple[int, int]:  # type: ignore[no-untyped-def]
    with engine.connect() as conn:
        count, versions = conn.execute(
            select(func.count(), func.coalesce(func.sum(streams.c.version), 0))).one()
    return int(count), int(versions)


@pytest.mark.parametrize("kind", BACKENDS)
def test_sigkill_inside_an_append_writes_nothing_and_the_reimport_completes_once(
    kind: str, tmp_path: Path,
) -> None:
    reference, victim = twin(kind, tmp_path, "reference"), twin(kind, tmp_path, "victim")
    try:
        path = reference.harness.write_file("trades", trades())
        assert json.loads(cli("import", "trades", str(path), "--db", reference.url,
                              "--json"))["written"] == FAULT_TRADES
        expected = outcome(reference.url)
        before, heads_before = outcome(victim.url), stream_heads(victim.harness.engine)

        process = spawn(["import", "trades", str(path), "--db", victim.url],
                        {PAUSE_IN_APPEND_ENV: str(PAUSE_S)})
        wait_for_pause(process, PAUSE_IN_APPEND_ENV)
        sigkill(process)

        # Nothing half-written: no event, no stream head, no read model moved.
        assert outcome(victim.url) == before
        assert stream_heads(victim.harness.engine) == heads_before

        report = json.loads(cli("import", "trades", str(path), "--db", victim.url, "--json"))
        assert (report["facts"], report["written"]) == (FAULT_TRADES, FAULT_TRADES)
        again = json.loads(cli("import", "trades", str(path), "--db", victim.url, "--json"))
        assert again["already_imported"] is True and again["written"] == 0
        assert_same_as(victim.url, expected)
    finally:
        reference.backend.close()
        victim.backend.close()
