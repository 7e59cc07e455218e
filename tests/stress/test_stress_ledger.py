"""`clearing stress` and the `stress` job on a real ledger: the same cascade as the pure
model, nothing written by the command, one audit fact by the job, and the demo's spiral."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from clearing.app import Ledger
from clearing.backoffice.stress_report import STRESS_NOTE, run_stress, stress_section
from clearing.demo import run_demo
from clearing.domain.stress import CascadeParameters
from clearing.domain.stress_scenarios import choose
from clearing.jobs.catalog import run_job
from tests.ledger.harness import T0, LedgerHarness, leg

D = Decimal
PERP = "BTC-PERP"
T1 = T0 + timedelta(hours=1)


def three_longs(ledger: LedgerHarness) -> None:
    """The book of the pure cascade test: alice and bob long 10 BTC-PERP each on 100,000,
    carol on 120,000, a market maker short the 30; an insurance fund of 50,000."""
    ledger.given_accounts("alice", "bob", "carol", "mm")
    ledger.list_perpetual(PERP)
    for account_id, amount in (("alice", "100000"), ("bob", "100000"), ("carol", "120000"),
                               ("mm", "10000000"), ("ccp:insurance", "50000")):
        ledger.deposit(account_id, "USDC", amount)
    ledger.trades(*((f"T{n}", [leg(PERP, buyer=who, seller="mm", qty="10", price="100000")])
                    for n, who in enumerate(("alice", "bob", "carol"), start=1)))
    ledger.mark("BTC", "100000", at=T1)
    ledger.mark(PERP, "100000", at=T1)


def stress_json(ledger: LedgerHarness, *args: str) -> dict:  # type: ignore[type-arg]
    result = ledger.cli("stress", *args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_clearing_stress_runs_the_hand_computed_cascade_and_writes_nothing(
    ledger: LedgerHarness,
) -> None:
    three_longs(ledger)
    before = ledger.snapshot()

    document = stress_json(ledger, "--shock", "BTC=-10%", "--depth", "BTC=36000000")
    (scenario,) = document["scenarios"]
    assert [r["prices"]["BTC"] for r in scenario["rounds"]] == ["90000.00", "85500.00",
                                                                 "83469.38"]
    assert [r["accounts_liquidated"] for r in scenario["rounds"]] == [
        [], ["alice", "bob"], ["carol"]]
    assert scenario["cover"]["cover_2"] == "90306.25"
    assert scenario["cover"]["cover_2_accounts"] == ["carol", "alice"]
    assert document["verdict"]["verdict"] == "insufficient"
    assert document["verdict"]["shortfall"] == "40306.25"
    assert scenario["totals"]["insurance_covered"] == "50000.00"
    assert document["insurance_fund"] == "50000.000000" and document["accounts"] == 4

    for args in ((), ("--scenario", "crash-30", "--top", "2"),
                 ("--shock", "BTC=-0.3", "--vol-shock", "2", "--as-of", "2026-11-02T13:00Z"),
                 ("--scenario", "covid-2020-03-12", "--vol-shock", "3", "--impact", "0.5")):
        result = ledger.cli("stress", *args)
        assert result.exit_code == 0, result.output
    assert "Cover-2" in result.stdout
    assert ledger.snapshot() == before  # not an event, balance or position more


def test_every_shipped_scenario_by_default(ledger: LedgerHarness) -> None:
    three_longs(ledger)
    document = stress_json(ledger)
    names = [s["name"] for s in document["scenarios"]]
    assert names[:2] == ["covid-2020-03-12", "china-2021-05-19"] and len(names) == 7
    crash = next(s for s in document["scenarios"] if s["name"] == "crash-30")
    assert crash["totals"]["accounts_below_maintenance"] == 3
    assert document["verdict"]["worst_scenario"] in names


def test_a_scenarios_file_adds_to_the_shipped_ones(ledger: LedgerHarness,
                                                   tmp_path: Path) -> None:
    three_longs(ledger)
    path = tmp_path / "mine.toml"
    path.write_text('[[scenario]]\nname = "gentle"\nmoves = { BTC = "-2%" }\n',
                    encoding="utf-8")
    document = stress_json(ledger, "--scenarios", str(path), "--scenario", "gentle")
    (gentle,) = document["scenarios"]
    assert gentle["moves"] == {"BTC": "-0.02"} and gentle["cascade_rounds"] == 0
    assert gentle["cover"]["verdict"] == "sufficient"


@pytest.mark.parametrize("args", [
    ("--scenario", "crash-31"),
    ("--shock", "BTC"),
    ("--shock", "BTC=-150%"),
    ("--shock", "DOGE=-0.1"),
    ("--scenario", "crash-30", "--shock", "BTC=-0.1"),
    ("--vol-shock", "0"),
    ("--depth", "BTC=-5"),
    ("--scenarios", "no-such-file.toml"),
])
def test_bad_stress_input_is_refused_and_writes_nothing(ledger: LedgerHarness,
                                                        args: tuple[str, ...]) -> None:
    three_longs(ledger)
    count = ledger.event_count()
    result = ledger.cli("stress", *args)
    assert result.exit_code == 2, result.output
    assert ledger.event_count() == count


def test_the_stress_job_records_the_headline_and_moves_no_money(
    ledger: LedgerHarness,
) -> None:
    three_longs(ledger)
    count, balances, positions = ledger.snapshot()
    run = run_job(ledger.ledger, "stress", T1)[0]
    assert (run.job, run.events_written, run.already_done) == ("stress", 2, False)
    (fact,) = [r for r in ledger.events() if r.type == "StressTestRecorded"]
    assert fact.stream_id == "stress-tests" and fact.effective_at == T1
    recorded = fact.event
    assert recorded.insurance_fund == D("50000") and recorded.accounts == 4
    assert len(recorded.scenarios) == 7
    crash = next(s for s in recorded.scenarios if s.scenario == "crash-30")
    assert crash.accounts_below_maintenance == 3 and crash.accounts_bankrupt == 3
    assert crash.deficit == crash.insurance_covered + crash.auto_deleveraged
    assert crash.cover_2 > 0 and crash.verdict in ("sufficient", "insufficient")
    assert recorded.worst_scenario is not None and recorded.cover_2 >= crash.cover_2
    assert ledger.snapshot() == (count + 2, balances, positions)
    assert run_job(ledger.ledger, "stress", T1)[0].already_done
    assert ledger.event_count() == count + 2


@pytest.fixture(scope="module")
def demo_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    path = tmp_path_factory.mktemp("demo") / "demo.db"
    outcome = run_demo(f"sqlite:///{path}", accounts=60, days=4, seed=7, quiet=True)
    assert outcome.verified
    yield f"sqlite:///{path}"


def test_the_demo_book_spirals_under_a_30_percent_crash(demo_url: str) -> None:
    """On thin liquidity (the demo's book is small), the first close-outs move BTC far
    enough to breach accounts the crash alone left standing."""
    ledger = Ledger.open(demo_url)
    count = ledger.store.count()
    thin = CascadeParameters(depth_usd={"BTC": D("500000"), "ETH": D("200000")})
    report = run_stress(ledger, datetime.now(UTC), choose(["crash-30"]), thin)
    (crash,) = report.scenarios
    assert crash.cascade_rounds >= 2 and crash.converged
    assert all(r.accounts_liquidated for r in crash.rounds[1:])
    prices = [r.prices["BTC"] for r in crash.rounds]
    assert prices == sorted(prices, reverse=True) and prices[-1] < prices[0]
    assert crash.liquidated > crash.below_maintenance  # the spiral took more than the shock
    assert ledger.store.count() == count


def test_the_stress_section_joins_the_html_report(demo_url: str) -> None:
    from clearing.backoffice.report import gather
    from clearing.backoffice.report_html import SECTIONS, Section, render_page

    data = gather(Ledger.open(demo_url))
    page = render_page(data, [*SECTIONS, Section("stress", "Stress tests", stress_section,
                                                 STRESS_NOTE)])
    section = page[page.index('<section id="stress"'):]
    assert "Cover-2 verdict" in section and "Cascade rounds" in section
    assert section.count('<svg class="plot"') >= 1 and "crash-30" in section
