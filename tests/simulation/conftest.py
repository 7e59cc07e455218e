"""Regression scenarios for what the simulation found reuse the ledger harness: a fresh ledger
per test, once per backend."""

from tests.ledger.conftest import ledger  # noqa: F401 - the fixture, shared
