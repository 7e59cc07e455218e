"""`clearing scheduler`: the default schedule, catching up every missed batch once and in
order, two schedulers on one database never running a batch twice, and APScheduler ticking
for real with its job store in the ledger's database.

The ledger: twenty members long and short a perpetual and a future that expires at 08:00 on
the second day, with hourly marks for a day (a random walk), so that the hourly
mark-to-market, the funding, the expiry settlement and the margin sweep all write facts.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections import Counter
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from sqlalchemy import func, inspect, select
from typer.testing import CliRunner

from clearing.backoffice.verify import verify
from clearing.cli import app
from clearing.domain.clock import format_time, parse_time
from clearing.domain.events import BatchCompleted
from clearing.jobs.batches import PAUSE_AFTER_CHUNK_ENV, batch_id_for
from clearing.jobs.catalog import EOD_ORDER
from clearing.jobs.schedule import DEFAULT_SCHEDULE, from_data, load
from clearing.jobs.scheduler import JOBSTORE_TABLE, due_slots
from clearing.store.tables import events
from tests.conftest import Backend
from tests.ledger.harness import T0, LedgerHarness, iso, leg, trade_rows

SINCE = T0  # 2026-11-02T12:00:00Z
DAY = SINCE + timedelta(days=1)
FUTURE = "BTC-03NOV26"  # expires 2026-11-03T08:00:00Z, inside the day
PERP = "BTC-PERP"
MEMBERS = [f"m{i:02d}" for i in range(20)]


def build_day(ledger: LedgerHarness) -> None:
    rng = random.Random(11)
    ledger.import_rows("accounts", [{"account_id": a, "owner": a, "margin_model": "standard"}
                                    for a in MEMBERS])
    ledger.list_instruments(PERP, FUTURE)
    ledger.import_rows("deposits", [{"ref": f"D-{a}", "account_id": a, "asset": "USDC",
                                     "amount": "1000000", "time": iso(SINCE)}
                                    for a in MEMBERS])
    rows = []
    for pair in range(len(MEMBERS) // 2):
        for symbol in (PERP, FUTURE):
            rows += trade_rows(f"T{pair}{symbol}", [leg(
                symbol, buyer=MEMBERS[2 * pair], seller=MEMBERS[2 * pair + 1],
                qty=f"{rng.uniform(0.1, 3):.8f}", price="100000")], SINCE)
    marks = []
    price = Decimal(100000)
    for hour in range(25):
        at = iso(SINCE + timedelta(hours=hour, minutes=-1))
        price = (price * Decimal(1 + rng.gauss(0, 0.004))).quantize(Decimal("0.01"))
        marks += [{"time": at, "symbol": "BTC", "price": str(price), "iv": ""},
                  {"time": at, "symbol": PERP, "price": str(price + 37), "iv": ""},
                  {"time": at, "symbol": FUTURE, "price": str(price + 11), "iv": ""}]
    # The TWAP window before the future's expiry: index marks every 10 minutes.
    expiry = parse_time("2026-11-03T08:00:00Z")
    marks += [{"time": iso(expiry - timedelta(minutes=m)), "symbol": "BTC",
               "price": str(price + m), "iv": ""} for m in (5, 15, 25)]
    ledger.import_rows("marks", marks)
    ledger.import_rows("trades", rows)


@pytest.fixture
def day(backend: Backend, tmp_path: Path) -> LedgerHarness:
    harness = LedgerHarness(backend.url, backend.engine(), tmp_path / "files")
    build_day(harness)
    return harness


def expected_batches(until: datetime) -> list[str]:
    """Every batch the default schedule has from SINCE to `until`, both included, in the
    order they run: time by time, and at one time as `eod` orders jobs."""
    ids = []
    hour = SINCE
    while hour <= until:
        due = {"mtm", "liquidate", "margin"}
        if hour.hour in (0, 8, 16):
            due.add("funding")
        if hour.hour == 8:
            due.add("settle")
        ids += [batch_id_for(j, hour) for j in EOD_ORDER if j in due]
        if hour.hour == 0 and hour + timedelta(minutes=5) <= until:
            ids.append(batch_id_for("risk", hour + timedelta(minutes=5)))
        hour += timedelta(hours=1)
    return ids


def completions(ledger: LedgerHarness) -> list[BatchCompleted]:
    """Every BatchCompleted in log order."""
    return [r.event for r in ledger.ledger.store.read_all()
            if r.type == BatchCompleted.type_name]  # type: ignore[misc]


def assert_verified(ledger: LedgerHarness) -> None:
    failed = [f"{c.name}: {c.detail}" for c in verify(ledger.ledger) if not c.ok]
    assert not failed, failed


def cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


# ------------------------------------------------------------------ the schedule as data


def test_the_default_schedule_orders_each_moment_as_end_of_day_does() -> None:
    slots = due_slots(DEFAULT_SCHEDULE, {}, now=DAY, since=SINCE)
    by_time = {format_time(s.at): s.jobs for s in slots}
    assert by_time["2026-11-02T13:00:00Z"] == ("mtm", "liquidate", "margin")
    assert by_time["2026-11-02T16:00:00Z"] == ("mtm", "funding", "liquidate", "margin")
    assert by_time["2026-11-03T00:05:00Z"] == ("risk",)
    assert by_time["2026-11-03T08:00:00Z"] == ("settle", "mtm", "funding", "liquidate",
                                                "margin")
    assert sorted(batch_id_for(j, s.at) for s in slots for j in s.jobs) == sorted(
        expected_batches(DAY))
    # A job resumes after its own last completed batch; the others from `since`.
    resumed = due_slots(DEFAULT_SCHEDULE, {"mtm": DAY - timedelta(hours=2)}, DAY, SINCE)
    assert [format_time(s.at) for s in resumed if "mtm" in s.jobs] == [
        "2026-11-03T11:00:00Z", "2026-11-03T12:00:00Z"]
    # Never further back than catch_up_max; and nothing for a job that never ran, without
    # `since`.
    week_late = DAY + timedelta(days=30)
    late = due_slots(DEFAULT_SCHEDULE, {"mtm": DAY}, week_late)
    assert [s.at for s in late][0] == week_late - timedelta(days=7)
    assert len(late) == 7 * 24 + 1
    assert due_slots(DEFAULT_SCHEDULE, {}, DAY) == []


def test_a_schedule_file_replaces_the_default_and_a_bad_one_is_refused(tmp_path: Path) -> None:
    toml = tmp_path / "schedule.toml"
    toml.write_text('catch_up_max_hours = 24\n[jobs.mtm]\nminute = "*/15"\n'
                    'then = ["margin"]\n')
    plan = load(toml)
    assert plan.catch_up_max == timedelta(hours=24)
    assert from_data(json.loads(json.dumps(plan.to_data()))) == plan
    slots = due_slots(plan, {}, SINCE + timedelta(hours=1), SINCE)
    assert len(slots) == 5 and all(s.jobs == ("mtm", "margin") for s in slots)

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"jobs": {"mtm": {"minute": "0", "then": ["sleep"]}}}))
    code, _, err = cli("scheduler", "--once", "--schedule", str(bad),
                       "--db", f"sqlite:///{tmp_path / 'x.db'}")
    assert code == 2 and "unknown job 'sleep'" in err
    bad.write_text(json.dumps({"jobs": {"mtm": {"minute": "61"}}}))
    code, _, err = cli("scheduler", "--once", "--schedule", str(bad),
                       "--db", f"sqlite:///{tmp_path / 'x.db'}")
    assert code == 2 and "jobs.mtm" in err


# ------------------------------------------------------------------ catching up


def test_a_scheduler_that_was_down_runs_each_missed_batch_once_in_order(
    day: LedgerHarness,
) -> None:
    # Up for the first six hours, then down until the next day's noon.
    first = run_once(day, until=SINCE + timedelta(hours=6))
    assert [r["batch_id"] for r in first] == expected_batches(SINCE + timedelta(hours=6))
    second = run_once(day, until=DAY)
    assert [r["batch_id"] for r in second] == expected_batches(DAY)[len(first):]
    assert not any(r["already_done"] for r in first + second)
    # Caught up: nothing is due; running a batch of the day again changes nothing.
    assert run_once(day, until=DAY) == []
    before = day.event_count()
    for job, at in (("mtm", SINCE), ("settle", SINCE + timedelta(hours=20))):
        code, out, err = cli("run", job, "--at", iso(at), "--json", "--db", day.url)
        assert code == 0 and json.loads(out)["already_done"], err
    assert day.event_count() == before

    closed = completions(day)
    assert [e.batch_id for e in closed] == expected_batches(DAY)  # in order, once each
    settled = next(e for e in closed if e.job == "settle")
    assert settled.events > 0, "the future expiring at 08:00 was settled"
    assert_verified(day)


def run_once(ledger: LedgerHarness, until: datetime) -> list[dict]:
    code, out, err = cli("scheduler", "--once", "--json", "--until", iso(until), "--since",
                         iso(SINCE), "--db", ledger.url)
    assert code == 0, err
    return json.loads(out)


# ------------------------------------------------------------------ two schedulers


def spawn(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "clearing.cli", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})


def test_two_schedulers_on_one_database_run_each_batch_exactly_once(
    day: LedgerHarness,
) -> None:
    before = day.event_count()
    args = ("scheduler", "--once", "--json", "--since", iso(SINCE), "--until", iso(DAY),
            "--db", day.url)
    # A short pause after every chunk widens the windows in which the two could collide.
    pair = [spawn(*args, env={PAUSE_AFTER_CHUNK_ENV: "0.01"}) for _ in range(2)]
    outputs = [p.communicate(timeout=240) for p in pair]
    for process, (_, err) in zip(pair, outputs, strict=True):
        assert process.returncode == 0, err
    runs = [json.loads(out) for out, _ in outputs]

    expected = expected_batches(DAY)
    for mine in runs:
        # Each went through what was due when it started (the other may have done some of
        # it already), in order: a subsequence of the day's batches.
        ids = iter(expected)
        assert all(r["batch_id"] in ids for r in mine), [r["batch_id"] for r in mine]
    wrote = Counter(r["batch_id"] for mine in runs for r in mine if not r["already_done"])
    assert sorted(wrote) == sorted(expected) and set(wrote.values()) == {1}, (
        "a batch was run by both schedulers")
    assert all(any(not r["already_done"] for r in mine) for mine in runs), (
        "the two schedulers did not actually run side by side")
    written = sum(r["events_written"] for mine in runs for r in mine)
    assert day.event_count() - before == written
    closed = completions(day)
    assert Counter(e.batch_id for e in closed) == Counter(expected)
    with day.engine.connect() as conn:
        keys = conn.execute(select(func.count(events.c.idempotency_key.distinct()))
                            ).scalar_one()
    assert keys == day.event_count()
    assert_verified(day)


def test_apscheduler_ticks_two_live_schedulers_and_keeps_its_job_in_the_ledger_database(
    day: LedgerHarness, tmp_path: Path,
) -> None:
    schedule = tmp_path / "every-two-seconds.toml"
    schedule.write_text('[jobs.mtm]\nsecond = "*/2"\nthen = ["margin"]\n')
    until = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=15)
    pair = [spawn("scheduler", "--schedule", str(schedule), "--until", iso(until),
                  "--db", day.url) for _ in range(2)]
    outputs = [p.communicate(timeout=120) for p in pair]
    for process, (_, err) in zip(pair, outputs, strict=True):
        assert process.returncode == 0, err
        assert "Traceback" not in err, err

    assert JOBSTORE_TABLE in inspect(day.engine).get_table_names()
    closed = completions(day)
    ticks = sorted(e.at for e in closed if e.job == "mtm")
    assert len(ticks) >= 2, [str(t) for t in ticks]
    assert all(t.second % 2 == 0 and t <= until for t in ticks)
    # Every even second from the first tick on was run once, by one scheduler or the other,
    # each followed by the margin sweep as of the same time.
    assert ticks == [ticks[0] + timedelta(seconds=2 * n) for n in range(len(ticks))]
    assert sorted(e.at for e in closed if e.job == "margin") == ticks
    assert_verified(day)
