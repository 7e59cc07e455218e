"""When the jobs run: the default schedule, as data, in one place.

Each entry names a job and when it runs, as APScheduler cron fields (`second`, `minute`,
`hour`, `day`, `month`, `day_of_week`, ...; times are UTC), and the jobs that follow it at the
same business time. The default:

| job | when (UTC) |
| --- | --- |
| `mtm` | every hour, at minute 0; `liquidate` and `margin` follow, as of the same time |
| `funding` | 00:00, 08:00 and 16:00 |
| `settle` | 08:00 every day (dated instruments expire at 08:00) |
| `risk` | 00:05 every day |

Jobs due at one moment run in the order `clearing run eod` uses (`EOD_ORDER`: settle, mtm,
funding, risk, liquidate, margin; any other job after them), so at 08:00 the expiring
instruments settle, the rest is marked to market and funded, and only then are accounts
liquidated and their margin state recorded.

`clearing scheduler --schedule FILE` replaces the default with a TOML or JSON file of the same
shape (the whole table of jobs; keys left out keep the defaults below):

    catch_up_max_hours = 168        # how far back missed batches are caught up (7 days)
    misfire_grace_seconds = 3600    # APScheduler: a run this late still fires

    [jobs.mtm]
    minute = "0"
    then = ["liquidate", "margin"]

    [jobs.funding]
    hour = "0,8,16"
    minute = "0"
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, timedelta
from pathlib import Path
from typing import Any

from apscheduler.triggers.cron import CronTrigger

CRON_FIELDS = ("year", "month", "day", "week", "day_of_week", "hour", "minute", "second")
CATCH_UP_MAX = timedelta(days=7)
"""Missed batches older than this (before now) are not caught up: a scheduler down for a
month does not replay 720 hourly batches on restart; run them with `clearing run` if needed."""
MISFIRE_GRACE_S = 3600
"""APScheduler's misfire grace time: a tick that fires up to an hour late still runs (and a
late tick catches up every batch due since the last one anyway)."""


class ScheduleError(ValueError):
    """A schedule file that cannot be used: names the file and the reason."""


@dataclass(frozen=True)
class Entry:
    """One job on a cron schedule, and the jobs that follow it at the same business time."""

    job: str
    cron: Mapping[str, str]
    then: tuple[str, ...] = ()

    def trigger(self) -> CronTrigger:
        return CronTrigger(timezone=UTC, **dict(self.cron))


@dataclass(frozen=True)
class Schedule:
    entries: tuple[Entry, ...]
    catch_up_max: timedelta = CATCH_UP_MAX
    misfire_grace_s: int = MISFIRE_GRACE_S
    source: str = field(default="default", compare=False)

    def jobs(self) -> set[str]:
        """Every job the schedule runs, followers included."""
        return {e.job for e in self.entries} | {j for e in self.entries for j in e.then}

    def to_data(self) -> dict[str, Any]:
        """Plain data (what a schedule file holds), e.g. to hand to a scheduled function."""
        return {"catch_up_max_hours": self.catch_up_max / timedelta(hours=1),
                "misfire_grace_seconds": self.misfire_grace_s,
                "jobs": {e.job: {**e.cron, "then": list(e.then)} for e in self.entries}}


DEFAULT_SCHEDULE = Schedule(entries=(
    Entry("mtm", {"minute": "0"}, then=("liquidate", "margin")),
    Entry("funding", {"hour": "0,8,16", "minute": "0"}),
    Entry("settle", {"hour": "8", "minute": "0"}),
    Entry("risk", {"hour": "0", "minute": "5"}),
))


def from_data(data: Mapping[str, Any], source: str = "schedule") -> Schedule:
    """A schedule from plain data (a parsed file); refuses unknown jobs, fields and values."""
    from clearing.jobs.catalog import JOBS

    unknown = set(data) - {"jobs", "catch_up_max_hours", "misfire_grace_seconds"}
    if unknown:
        raise ScheduleError(f"{source}: unknown key(s) {', '.join(sorted(unknown))}")
    jobs = data.get("jobs")
    if not isinstance(jobs, Mapping) or not jobs:
        raise ScheduleError(f"{source}: needs a non-empty table `jobs`")
    entries = []
    for job, spec in jobs.items():
        if not isinstance(spec, Mapping):
            raise ScheduleError(f"{source}: jobs.{job} must be a table of cron fields")
        then = spec.get("then", [])
        if isinstance(then, str) or not isinstance(then, list | tuple):
            raise ScheduleError(f"{source}: jobs.{job}.then must be a list of job names")
        for name in (job, *then):
            if name not in JOBS:
                raise ScheduleError(f"{source}: unknown job {name!r} (known: "
                                    f"{', '.join(JOBS)})")
        cron = {k: str(v) for k, v in spec.items() if k != "then"}
        bad = set(cron) - set(CRON_FIELDS)
        if bad or not cron:
            raise ScheduleError(f"{source}: jobs.{job}: cron fields are "
                                f"{', '.join(CRON_FIELDS)} (got {', '.join(sorted(cron))})")
        entry = Entry(job, cron, tuple(then))
        try:
            entry.trigger()
        except ValueError as exc:
            raise ScheduleError(f"{source}: jobs.{job}: {exc}") from None
        entries.append(entry)
    try:
        hours = float(data.get("catch_up_max_hours", CATCH_UP_MAX / timedelta(hours=1)))
        grace = int(data.get("misfire_grace_seconds", MISFIRE_GRACE_S))
    except (TypeError, ValueError):
        raise ScheduleError(f"{source}: catch_up_max_hours and misfire_grace_seconds must "
                            "be numbers") from None
    if hours < 0 or grace < 1:
        raise ScheduleError(f"{source}: catch_up_max_hours must be >= 0 and "
                            "misfire_grace_seconds >= 1")
    return Schedule(tuple(entries), timedelta(hours=hours), grace, source)


def load(path: Path | None) -> Schedule:
    """The schedule in a TOML or JSON file (by its suffix), or the default."""
    if path is None:
        return DEFAULT_SCHEDULE
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ScheduleError(f"{path}: {exc.strerror or exc}") from None
    try:
        data = (json.loads(raw) if path.suffix.lower() == ".json"
                else tomllib.loads(raw.decode("utf-8")))
    except (ValueError, UnicodeDecodeError) as exc:
        kind = "JSON" if path.suffix.lower() == ".json" else "TOML"
        raise ScheduleError(f"{path}: not valid {kind}: {exc}") from None
    if not isinstance(data, dict):
        raise ScheduleError(f"{path}: must hold a table")
    return from_data(data, str(path))
