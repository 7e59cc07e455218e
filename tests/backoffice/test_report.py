"""`clearing report --html FILE`: one self-contained page of the ledger's state and history.

Each scenario builds a small ledger through the real import path and jobs (the ledger
harness), runs the command as an operator would and reads the page back: one HTML document,
inline SVG plots, nothing fetched from outside, the headline figures of the scenario, and
not one event more in the log. The margin samples behind the plots are checked against
`clearing replay --as-of` at each sample time, late-recorded facts included. Every scenario
runs on SQLite and PostgreSQL.

The rendering check in a real browser (`scripts/check_report.sh`: the demo's page in headless
Chromium, screenshotted) runs here only where `chromium` is installed; CI does not depend on
it, and skips it elsewhere.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from sqlalchemy import func, select

from clearing.backoffice.replay import ReplayBounds, replay
from clearing.backoffice.report import (
    PATH_BUCKETS,
    PricePath,
    gather,
    sample_step,
    sample_times,
    value_books,
)
from clearing.backoffice.report_html import (
    SECTIONS,
    Section,
    axis_labels,
    nice_ticks,
    render_page,
)
from clearing.domain.events import MarkPublished
from clearing.jobs.catalog import run_job
from clearing.store.eventstore import PendingEvent
from clearing.store.tables import checkpoints
from tests.ledger.conftest import ledger  # noqa: F401 - the fixture, shared
from tests.ledger.harness import T0, LedgerHarness, iso, leg

PERP = "BTC-PERP"
CRASH_AT = T0 + timedelta(hours=3)
REPO = Path(__file__).resolve().parents[2]
REMOTE_REFERENCE = re.compile(
    r"""(?:src|href|xlink:href)\s*=\s*["']?\s*(?:[a-z][a-z0-9+.-]*:)?//""", re.IGNORECASE)
CARD = re.compile(r'<div class="label">([^<]*)</div><div class="value">([^<]*)</div>')


def crash_scenario(ledger: LedgerHarness) -> None:  # noqa: F811 - the fixture
    """dan is long 10 BTC-PERP bought from s1, s2 and s3 at 100,000 with 150,000 USDC of
    collateral; the index climbs for two hours, then crashes to 84,000: dan is liquidated,
    the 3,000 insurance fund pays what it can of his deficit and ADL closes the rest. eve,
    long 1 with 17,200, keeps about 1,200 of equity (less funding): above maintenance
    (844.20), below initial (1,684.20), so she gets a margin call."""
    ledger.given_accounts("dan", "eve", "s1", "s2", "s3")
    ledger.list_perpetual(PERP)
    for account, amount in (("dan", "150000"), ("eve", "17200"), ("s1", "400000"),
                            ("s2", "300000"), ("s3", "300000"), ("ccp:insurance", "3000")):
        ledger.deposit(account, "USDC", amount)
    for hour, price in enumerate(("100000", "101000", "102000")):
        at = T0 + timedelta(hours=hour)
        ledger.mark("BTC", price, at=at)
        ledger.mark(PERP, price, at=at)
        if hour == 0:
            ledger.trades(
                ("T1", [leg(PERP, buyer="dan", seller="s1", qty="4", price="100000")]),
                ("T2", [leg(PERP, buyer="dan", seller="s2", qty="3", price="100000")]),
                ("T3", [leg(PERP, buyer="dan", seller="s3", qty="3", price="100000")]),
                ("T4", [leg(PERP, buyer="eve", seller="s1", qty="1", price="100000")]),
                at=at)
        run_job(ledger.ledger, "eod", at)
    ledger.mark("BTC", "84000", at=CRASH_AT)
    ledger.mark(PERP, "84000", at=CRASH_AT)
    run_job(ledger.ledger, "eod", CRASH_AT)


def write_report(ledger: LedgerHarness, tmp_path: Path,  # noqa: F811 - the fixture
                 *args: str) -> str:
    path = tmp_path / "report.html"
    result = ledger.cli("report", "--html", str(path), *args)
    assert result.exit_code == 0, result.output
    assert str(path) in result.output
    return path.read_text(encoding="utf-8")


def cards(page: str) -> dict[str, str]:
    """The headline cards at the top of the page (sections further down, such as the stress
    tests, have cards of their own)."""
    end = page.find('<section id="index"')
    headline = page if end < 0 else page[:end]
    return dict(CARD.findall(headline))


def test_the_page_is_one_self_contained_document_with_inline_plots(
    ledger: LedgerHarness, tmp_path: Path,  # noqa: F811 - the fixture
) -> None:
    crash_scenario(ledger)
    page = write_report(ledger, tmp_path)

    assert page.startswith("<!DOCTYPE html>")
    assert page.count("<html") == 1 and page.count("</html>") == 1
    assert page.count("<body") == 1 and page.rstrip().endswith("</html>")
    plots = {m.group(1) for m in re.finditer(
        r'<section id="([a-z-]+)"(?:(?!</section>).)*<svg class="plot"', page, re.DOTALL)}
    assert plots == {"index", "equity", "utilisation", "pressure", "insurance",
                     "open-interest", "stress"}
    assert page.count("<svg") == page.count("</svg>")
    assert "http://" not in page and "https://" not in page
    assert not REMOTE_REFERENCE.search(page)
    for outside in ("<script", "<link", "<img", "<iframe", "@import", "url("):
        assert outside not in page, outside
    assert "default-src 'none'" in page  # and the browser is told to fetch nothing


def test_the_headline_figures_are_the_scenarios(
    ledger: LedgerHarness, tmp_path: Path,  # noqa: F811 - the fixture
) -> None:
    crash_scenario(ledger)
    events = ledger.event_count()
    page = write_report(ledger, tmp_path)

    figures = cards(page)
    assert figures["Members"] == "5"
    assert figures["Events"] == f"{events:,}"
    assert figures["Trades cleared"] == "4"
    assert figures["Liquidations"] == "1"
    assert figures["Margin calls"] == "1"
    assert figures["BTC index"] == "84,000"
    # The fund paid its 3,000 to dan's deficit and had nothing left; no fee came in (dan's
    # equity was below zero).
    assert figures["Insurance fund"] == "$0.00"
    assert "ADL closes" in page
    liquidated = re.search(r"<h3>Positions liquidated <span class=\"count\">(\d+)</span>", page)
    assert liquidated and liquidated.group(1) == "1"
    adl = re.search(r"<h3>Auto-deleveraging closes <span class=\"count\">(\d+)</span>", page)
    assert adl and int(adl.group(1)) >= 1
    assert "<td class=\"\">dan</td><td class=\"\">BTC-PERP</td>" in page
    assert "3,000.00" in page  # the insurance fund's payment, in its table
    calls = page[page.index('id="margin-calls"'):]
    row = re.search(r'<td class="">eve</td><td class="num">([\d,.]+)</td>'
                    r'<td class="num">([\d,.]+)</td>', calls)
    assert row is not None
    assert row.group(2) == "1,684.20"  # 2.005% of 84,000
    assert Decimal("844.20") <= Decimal(row.group(1).replace(",", "")) < Decimal("1684.20")


def test_the_report_writes_nothing_to_the_ledger(
    ledger: LedgerHarness, tmp_path: Path,  # noqa: F811 - the fixture
) -> None:
    crash_scenario(ledger)
    # A fact the read models have not folded yet: the report must not fold it for them.
    at = CRASH_AT + timedelta(hours=1)
    ledger.ledger.store.append([PendingEvent(
        "marks-BTC", MarkPublished(symbol="BTC", price=Decimal(85000), marked_at=at),
        "test:a-mark-not-yet-projected", at)])
    with ledger.engine.connect() as conn:
        before = conn.execute(select(checkpoints.c.name, checkpoints.c.position)
                              .order_by(checkpoints.c.name)).all()
    count = ledger.event_count()

    write_report(ledger, tmp_path)
    write_report(ledger, tmp_path, "--as-of", iso(T0 + timedelta(hours=1)))

    assert ledger.event_count() == count
    with ledger.engine.connect() as conn:
        assert conn.execute(select(checkpoints.c.name, checkpoints.c.position)
                            .order_by(checkpoints.c.name)).all() == before
        assert conn.execute(select(func.count()).select_from(checkpoints)).scalar_one() \
            == len(before)


def test_as_of_shows_the_ledger_before_the_crash(
    ledger: LedgerHarness, tmp_path: Path,  # noqa: F811 - the fixture
) -> None:
    crash_scenario(ledger)
    page = write_report(ledger, tmp_path, "--as-of", iso(CRASH_AT - timedelta(minutes=1)))

    figures = cards(page)
    assert figures["Liquidations"] == "0"
    assert figures["BTC index"] == "102,000"
    assert figures["Insurance fund"] == "$3.00k"
    assert "No position was liquidated." in page
    assert "as of Mon 02 Nov 2026 14:59 UTC" in page


def test_margin_samples_equal_a_replay_as_of_each_sample_even_with_late_facts(
    ledger: LedgerHarness,  # noqa: F811 - the fixture
) -> None:
    """A deposit recorded last but effective in the first hour lands in every sample from
    then on, exactly as `clearing replay --as-of` would place it."""
    crash_scenario(ledger)
    ledger.deposit("dan", "USDC", "25000", at=T0 + timedelta(minutes=30))

    data = gather(ledger.ledger)

    assert data.late_facts == 1
    assert len(data.samples) >= 4
    for sample in data.samples:
        state = replay(ledger.ledger.store, ReplayBounds(as_of=sample.at))
        expected = value_books(state, sample.at)
        assert expected is not None
        assert (sample.equity_usd, sample.initial_usd, sample.maintenance_usd) == (
            expected.equity_usd, expected.initial_usd, expected.maintenance_usd), sample.at
    assert data.samples[1].equity_usd - data.samples[0].equity_usd >= Decimal(25000) - 1


def test_an_empty_ledger_has_a_page_too(
    ledger: LedgerHarness, tmp_path: Path,  # noqa: F811 - the fixture
) -> None:
    page = write_report(ledger, tmp_path)
    assert cards(page)["Events"] == "0"
    assert "No margin call was issued." in page
    assert ledger.event_count() == 0


def test_a_report_it_cannot_write_is_refused_with_the_reason(
    ledger: LedgerHarness, tmp_path: Path,  # noqa: F811 - the fixture
) -> None:
    result = ledger.cli("report", "--html", str(tmp_path / "missing" / "report.html"))
    assert result.exit_code == 2
    assert "cannot write the report" in result.output


def test_sections_are_the_extension_point() -> None:
    """A later part of the page (the stress tests) joins by adding a Section."""
    data = _empty_data()
    extra = Section("stress", "Stress tests", lambda d: f"<p>{d.members} books shocked</p>")
    page = render_page(data, [*SECTIONS, extra])
    assert '<section id="stress" class="wide"><h2>Stress tests</h2><p>0 books shocked</p>' \
        in page
    assert '<a href="#stress">Stress tests</a>' in page
    assert 'id="stress"' not in render_page(data, [s for s in SECTIONS if s.anchor != "stress"])


# ------------------------------------------------------------------ the pure parts


def test_samples_fall_on_whole_steps_between_the_first_and_last_fact() -> None:
    start = datetime(2026, 11, 17, 0, 30, tzinfo=UTC)
    end = datetime(2026, 11, 17, 4, 15, tzinfo=UTC)
    step = sample_step(start, end)
    assert step == timedelta(hours=1)
    assert [t.strftime("%H:%M") for t in sample_times(start, end, step)] == [
        "00:30", "01:00", "02:00", "03:00", "04:00", "04:15"]
    year = sample_step(start, start + timedelta(days=365))
    assert year == timedelta(days=2)
    assert sample_times(None, None, step) == []


def test_a_price_path_keeps_every_extreme_within_its_bound() -> None:
    start = datetime(2026, 1, 1, tzinfo=UTC)
    path = PricePath(start, timedelta(days=365) / PATH_BUCKETS)
    for minute in range(0, 365 * 24 * 60, 7):
        path.add(start + timedelta(minutes=minute), Decimal(100 + minute % 1000))
    path.add(start + timedelta(days=100), Decimal(1))  # a spike down
    points = path.points()
    assert len(points) <= 4 * PATH_BUCKETS
    assert min(p.value for p in points) == 1
    assert [p.at for p in points] == sorted(p.at for p in points)


def test_axis_ticks_are_round_and_labelled_in_one_unit() -> None:
    ticks, step = nice_ticks(67_100_000, 69_900_000, 4)
    assert step == 1_000_000 and ticks[0] <= 67_100_000 and ticks[-1] >= 69_900_000
    assert axis_labels("money", ticks, step) == ["67M", "68M", "69M", "70M"]
    ticks, step = nice_ticks(0, 15_400, 4)
    assert axis_labels("money", ticks, step) == ["0", "5k", "10k", "15k", "20k"]
    assert axis_labels("pct", [0, 0.1, 0.2], 0.1) == ["0%", "10%", "20%"]
    ticks, step = nice_ticks(0, 1.2, 4, step_min=1)
    assert step == 1 and axis_labels("count", ticks, step) == ["0", "1", "2"]


# ------------------------------------------------------------------ in a real browser


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="chromium is not installed (scripts/check_report.sh installs it)")
def test_the_demo_page_renders_in_headless_chromium(tmp_path: Path) -> None:
    """scripts/check_report.sh on a small demo: the page is written, checked and rendered;
    the screenshot has the window's size and is far from blank (a blank page of this size
    compresses to a few kilobytes)."""
    shot = tmp_path / "report.png"
    env = {**os.environ, "CHECK_REPORT_DEMO_ARGS": "--accounts 40 --days 3",
           "CHECK_REPORT_HEIGHT": "3000"}
    done = subprocess.run(["bash", str(REPO / "scripts" / "check_report.sh"), str(shot)],
                          env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    assert (width, height) == (1400, 3000)
    assert len(png) > 100_000
    assert shot.with_suffix(".html").stat().st_size < 2 * 1024 * 1024


def _empty_data():  # type: ignore[no-untyped-def]
    from collections import Counter

    from clearing.backoffice.report import ReportData, Table
    from clearing.domain.ledger import LedgerState

    now = datetime(2026, 11, 2, tzinfo=UTC)
    return ReportData(
        at=now, as_of=None, generated_at=now, start=None, end=None, head_position=0,
        head_hash=None, facts=0, counts=Counter(), members=0, sample_step=timedelta(hours=1),
        samples=[], current=None, index_paths={}, insurance_fund=[],
        insurance_fund_now=Decimal(0), open_interest=[], liquidations=Table(),
        adl_closes=Table(), insurance_payments=Table(), losses=Table(), margin_calls=Table(),
        reconciliations=Table(), late_facts=0, state=LedgerState())
