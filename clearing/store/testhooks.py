"""Pauses at named moments inside a transaction, so a crash test can kill a process there.

A test sets one of these environment variables to a number of seconds in the process it
means to kill; each time the process reaches that moment it writes one line to stderr
(`clearing: paused at NAME for S s`), which the test waits for, then sleeps. Unset (always,
outside tests), a pause costs one dictionary lookup and changes nothing.

- `CLEARING_TEST_PAUSE_IN_APPEND`: inside an append's transaction, after its events and
  stream heads are written, before it commits (`EventStore._append_in`).
- `CLEARING_TEST_PAUSE_IN_PROJECTION`: inside a projection page's transaction, after the
  page is applied to the read models, before the checkpoint moves and the transaction
  commits (`ProjectionRunner._catch_up`).

(`CLEARING_TEST_PAUSE_AFTER_CHUNK`, between two committed chunks of a job's batch, lives with
the batches in `clearing.jobs.batches`.)
"""

from __future__ import annotations

import os
import sys
import time

PAUSE_IN_APPEND_ENV = "CLEARING_TEST_PAUSE_IN_APPEND"
PAUSE_IN_PROJECTION_ENV = "CLEARING_TEST_PAUSE_IN_PROJECTION"


def pause_at(env_name: str) -> None:
    """Announce on stderr and sleep for `$env_name` seconds, when that variable is set."""
    raw = os.environ.get(env_name)
    if not raw:
        return
    seconds = float(raw)
    sys.stderr.write(f"clearing: paused at {env_name} for {seconds:g} s\n")
    sys.stderr.flush()
    time.sleep(seconds)
