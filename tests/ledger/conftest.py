"""The `ledger` fixture: a fresh, empty ledger database per test, once per backend."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Backend
from tests.ledger.harness import LedgerHarness


@pytest.fixture
def ledger(backend: Backend, tmp_path: Path) -> Iterator[LedgerHarness]:
    """A ledger in a test's words. Every scenario ends with `clearing verify`'s checks
    passing (SPEC section 6), unless the test broke the ledger on purpose."""
    harness = LedgerHarness(backend.url, backend.engine(), tmp_path / "files")
    yield harness
    if not harness.tampered:
        harness.assert_verified()
