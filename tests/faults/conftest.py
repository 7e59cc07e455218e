"""Fault tests reuse the ledger harness (`ledger`: a fresh ledger per test, once per backend)
and build twin ledgers of their own (tests.faults.scenario)."""

from tests.ledger.conftest import ledger  # noqa: F401 - the fixture, shared
