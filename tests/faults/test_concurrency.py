"""Several importers and job runners at once on one PostgreSQL ledger, on overlapping accounts.

Seven processes start together on a funded book of 16 members and two perpetuals:
- four importers, each importing its own deposits, trades and withdrawals files in five
  rounds, every file touching members the others touch too; importers 0 and 1 both import one
  shared deposits file, and importers 2 and 3 one shared trades file, at the same moment, and
  importers 1 and 3 a shared withdrawals file midway;
- two job runners, each running `clearing run mtm`, `margin` and `liquidate` at six
  successive business times, the same batches in both (one of them must find each batch done);
- a tailer, reading the log from where it stopped, again and again, while the others write.
Each process is forked from the test and calls the command line's entry point, as
`clearing ...` would, each command with its own engine and connections.

Then one last `clearing run mtm`, and the checks:
- no lost update: every balance equals an independent Decimal model of the accepted files
  (deposits, withdrawals, fees, and variation margin, which telescopes to quantity × (last
  mark − trade price) whichever batches a trade happened to land between);
- no duplicate: every idempotency key once, each file's facts in the log exactly once, the
  shared files' facts written once between their two importers, each batch completed once
  and run by exactly one of the two runners;
- no skipped event: the tailer's incremental reads, joined, are exactly one full read of the
  log (same events, same order, none twice), which holds every stored position, and reading
  twice gives the same order; projections equal a replay (`verify`);
- no deadlock left unhandled: every command exits 0 and no process says "deadlock";
- zero invariant violations: `clearing verify` passes.
"""

from __future__ import annotations

import gc
import json
import os
import random
import signal
import sys
import time
import traceback
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from sqlalchemy import select

from clearing.cli import app
from clearing.domain.events import BatchCompleted
from clearing.store.database import create_engine_for
from clearing.store.eventstore import START, EventStore
from clearing.store.tables import events
from tests.conftest import Backend, make_backend
from tests.faults.scenario import assert_verified, cli
from tests.ledger.harness import T0, LedgerHarness, iso, leg, trade_rows

MEMBERS = tuple(f"c{i:02d}" for i in range(16))
PERPS = {"BTC-PERP": Decimal("100000"), "ETH-PERP": Decimal("3000")}
IMPORTERS = 4
ROUNDS = 5
TRADES_PER_FILE = 100
JOB_TIMES = tuple(T0 + timedelta(hours=h) for h in range(1, 7))
FINAL_AT = T0 + timedelta(hours=8)
JOBS = ("mtm", "margin", "liquidate")
RUNNERS = 2
FUNDING = Decimal("10000000")
DEADLINE_S = 120.0
"""Bound on the concurrent phase; each process is killed past it (the test then fails)."""
TAIL_INTERVAL_S = 0.02


# ------------------------------------------------------------------ the files


@dataclass
class Files:
    """Every file of the run, with what each importer imports, in order."""

    workdir: Path
    rows: dict[Path, tuple[str, list[dict[str, str]]]] = field(default_factory=dict)
    plan: dict[int, list[Path]] = field(default_factory=lambda: defaultdict(list))

    def write(self, name: str, kind: str, rows: list[dict[str, str]]) -> Path:
        from tests.ledger.harness import COLUMNS

        path = self.workdir / f"{name}.csv"
        lines = [",".join(COLUMNS[kind])] + [",".join(r[c] for c in COLUMNS[kind])
                                             for r in rows]
        path.write_text("\n".join(lines) + "\n")
        self.rows[path] = (kind, rows)
        return path


def money_rows(rng: random.Random, prefix: str, count: int, low: int, high: int,
               minutes: int) -> list[dict[str, str]]:
    return [{"ref": f"{prefix}-{n}", "account_id": rng.choice(MEMBERS), "asset": "USDC",
             "amount": f"{rng.randrange(low, high)}.{rng.randrange(100):02d}",
             "time": iso(T0 + timedelta(minutes=minutes))} for n in range(count)]


def trades_rows(rng: random.Random, prefix: str, count: int) -> list[dict[str, str]]:
    rows: list[dict[str, str]] = []
    for n in range(count):
        buyer, seller = rng.sample(MEMBERS, 2)
        symbol = rng.choice(sorted(PERPS))
        price = PERPS[symbol] + Decimal(rng.randrange(-3000, 3000)) / 100
        rows += trade_rows(f"{prefix}-{n}", [leg(
            symbol, buyer=buyer, seller=seller, qty=f"{rng.randrange(1, 300) / 100:.2f}",
            price=str(price), buyer_fee=f"{rng.randrange(0, 300) / 100:.2f}",
            seller_fee=f"{rng.randrange(0, 300) / 100:.2f}")], T0 + timedelta(minutes=1))
    return rows


def plan_files(workdir: Path) -> Files:
    rng = random.Random(20261125)
    files = Files(workdir)
    shared_deposits = files.write("shared-deposits", "deposits",
                                  money_rows(rng, "SD", 30, 1_000, 50_000, 2))
    shared_trades = files.write("shared-trades", "trades", trades_rows(rng, "ST", 40))
    shared_withdrawals = files.write("shared-withdrawals", "withdrawals",
                                     money_rows(rng, "SW", 15, 100, 5_000, 3))
    for importer in range(IMPORTERS):
        files.plan[importer].append(shared_deposits if importer < 2 else shared_trades)
        for r in range(ROUNDS):
            if r == 2 and importer in (1, 3):
                files.plan[importer].append(shared_withdrawals)
            tag = f"i{importer}r{r}"
            files.plan[importer] += [
                files.write(f"{tag}-deposits", "deposits",
                            money_rows(rng, f"D{tag}", 20, 1_000, 100_000, 2)),
                files.write(f"{tag}-trades", "trades",
                            trades_rows(rng, f"T{tag}", TRADES_PER_FILE)),
                files.write(f"{tag}-withdrawals", "withdrawals",
                            money_rows(rng, f"W{tag}", 10, 100, 10_000, 3)),
            ]
    return files


def marks_rows(rng: random.Random) -> list[dict[str, str]]:
    """The perpetuals' marks at T0, at each job time and at the final mark-to-market."""
    rows = [{"time": iso(T0), "symbol": s, "price": p, "iv": ""}
            for s, p in (("BTC", "100000"), ("ETH", "3000"))]
    for at in (T0, *JOB_TIMES, FINAL_AT):
        rows += [{"time": iso(at), "symbol": s,
                  "price": str(base + Decimal(rng.randrange(-200_000, 200_000)) / 100),
                  "iv": ""} for s, base in PERPS.items()]
    return rows


# ------------------------------------------------------------------ the processes


def _run_commands(commands: list[list[str]], outdir: Path) -> None:
    """In a forked child: each command through the CLI's entry point, its stdout to a file
    of its own, its exit code to `codes.json`."""
    codes = []
    for n, args in enumerate(commands):
        with (outdir / f"{n:03d}.out").open("w") as out:
            sys.stdout = out  # (pytest's capture may have replaced it in the parent)
            try:
                returned = app(args, standalone_mode=False)
                code = returned if isinstance(returned, int) else 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:  # noqa: BLE001 - reported to the test, then it fails
                traceback.print_exc()
                code = 70
        codes.append(code)
    (outdir / "codes.json").write_text(json.dumps(codes))


def _tail(url: str, stop: Path, outdir: Path) -> None:
    """In a forked child: read the log from where the last read stopped until `stop`
    exists, then once more; every position seen, in the order seen."""
    engine = create_engine_for(url)
    store = EventStore(engine)
    seen: list[int] = []
    cursor = START
    reads = 0
    while True:
        last_round = stop.exists()
        for recorded in store.read_all(cursor, page_size=200):
            seen.append(recorded.position)
            cursor = recorded.log_position
        reads += 1
        if last_round:
            break
        time.sleep(TAIL_INTERVAL_S)
    (outdir / "tail.json").write_text(json.dumps({"positions": seen, "reads": reads}))
    (outdir / "codes.json").write_text("[0]")


def fork(outdir: Path, target, *args) -> int:  # type: ignore[no-untyped-def]
    outdir.mkdir(parents=True)
    pid = os.fork()
    if pid:
        return pid
    code = 70
    try:  # the child: never returns into pytest
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        errors = os.open(outdir / "stderr", os.O_WRONLY | os.O_CREAT)
        os.dup2(errors, 2)
        sys.stderr = os.fdopen(2, "w", buffering=1)
        target(*args)
        code = 0
    except BaseException:  # noqa: BLE001
        traceback.print_exc()
    finally:
        sys.stderr.flush()
        os._exit(code)


def wait_all(pids: dict[int, str], deadline_s: float) -> dict[str, int]:
    ended: dict[str, int] = {}
    deadline = time.monotonic() + deadline_s
    while pids:
        for pid in list(pids):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                ended[pids.pop(pid)] = os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            raise AssertionError(f"still running after {deadline_s:.0f} s: "
                                 f"{sorted(pids.values())}")
        time.sleep(0.02)
    return ended


# ------------------------------------------------------------------ the model


def model_balances(files: Files, accepted: set[Path], marks: dict[str, Decimal]
                   ) -> dict[tuple[str, str], Decimal]:
    """Balances from the accepted files alone, with Decimal arithmetic: deposits and
    withdrawals against `ccp:external`, fees to `ccp:fees`, and each trade's variation
    margin to the final marks, quantity × (mark − price), the long receiving it."""
    balances: dict[tuple[str, str], Decimal] = defaultdict(Decimal)
    for member in MEMBERS:
        balances[(member, "USDC")] += FUNDING
        balances[("ccp:external", "USDC")] -= FUNDING
    for path in accepted:
        kind, rows = files.rows[path]
        for row in rows:
            if kind in ("deposits", "withdrawals"):
                sign = 1 if kind == "deposits" else -1
                amount = Decimal(row["amount"]) * sign
                balances[(row["account_id"], "USDC")] += amount
                balances[("ccp:external", "USDC")] -= amount
                continue
            quantity, price = Decimal(row["quantity"]), Decimal(row["price"])
            margin = quantity * (marks[row["instrument"]] - price)
            balances[(row["buyer"], "USDC")] += margin - Decimal(row["buyer_fee"])
            balances[(row["seller"], "USDC")] -= margin + Decimal(row["seller_fee"])
            balances[("ccp:fees", "USDC")] += Decimal(row["buyer_fee"]) + Decimal(
                row["seller_fee"])
    return {k: v for k, v in balances.items() if v != 0}


def idempotency_keys(kind: str, rows: list[dict[str, str]]) -> set[str]:
    if kind == "trades":
        return {f"trade:{r['trade_id']}" for r in rows}
    return {f"{kind[:-1]}:{r['ref']}" for r in rows}


# ------------------------------------------------------------------ the test


@pytest.fixture
def postgresql(tmp_path: Path) -> Iterator[Backend]:
    backend = make_backend("postgresql", tmp_path)
    yield backend
    backend.close()


def test_importers_and_job_runners_at_once_lose_nothing_and_duplicate_nothing(
    postgresql: Backend, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    started = time.monotonic()
    url = postgresql.url
    harness = LedgerHarness(url, postgresql.engine(), tmp_path / "setup")
    harness.import_rows("accounts", [{"account_id": m, "owner": m.upper(),
                                      "margin_model": "standard"} for m in MEMBERS])
    harness.list_instruments(*PERPS)
    marks = marks_rows(random.Random(3))
    harness.import_rows("marks", marks)
    harness.import_rows("deposits", [{"ref": f"F-{m}", "account_id": m, "asset": "USDC",
                                      "amount": str(FUNDING), "time": iso(T0)}
                                     for m in MEMBERS])
    final_marks = {r["symbol"]: Decimal(r["price"]) for r in marks
                   if r["time"] == iso(FINAL_AT)}
    workdir = tmp_path / "files"
    workdir.mkdir()
    files = plan_files(workdir)
    harness.engine.dispose()
    gc.collect()  # no connection of this process may be left for a child to inherit and use

    out = tmp_path / "out"
    stop = tmp_path / "stop"
    pids: dict[int, str] = {}
    for importer, paths in files.plan.items():
        commands = [["import", files.rows[p][0], str(p), "--db", url, "--json"] for p in paths]
        pids[fork(out / f"importer{importer}", _run_commands, commands,
                  out / f"importer{importer}")] = f"importer{importer}"
    job_commands = [["run", job, "--at", iso(at), "--db", url, "--json"]
                    for at in JOB_TIMES for job in JOBS]
    for runner in range(RUNNERS):
        pids[fork(out / f"runner{runner}", _run_commands, job_commands,
                  out / f"runner{runner}")] = f"runner{runner}"
    tailer = fork(out / "tailer", _tail, url, stop, out / "tailer")
    writers = wait_all(pids, DEADLINE_S)
    concurrent_s = time.monotonic() - started
    stop.touch()
    ended = wait_all({tailer: "tailer"}, 60.0)

    # ---- no process failed, none met a deadlock it did not handle
    for name, code in {**writers, **ended}.items():
        stderr = (out / name / "stderr").read_text()
        assert code == 0, (name, stderr[-3000:])
        codes = json.loads((out / name / "codes.json").read_text())
        assert codes == [0] * len(codes), (name, stderr[-3000:])
        assert "deadlock" not in stderr.lower(), (name, stderr[-3000:])
        assert "Traceback" not in stderr, (name, stderr[-3000:])

    def outputs(name: str, count: int) -> list[dict[str, object]]:
        return [json.loads((out / name / f"{n:03d}.out").read_text()) for n in range(count)]

    imported = {f"importer{i}": outputs(f"importer{i}", len(files.plan[i]))
                for i in range(IMPORTERS)}
    runs = {f"runner{r}": outputs(f"runner{r}", len(job_commands)) for r in range(RUNNERS)}

    # ---- one last mark-to-market, every trade now in
    cli("run", "mtm", "--at", iso(FINAL_AT), "--db", url)

    # ---- no lost update: balances equal the independent model of the accepted files
    accepted = {p for paths in files.plan.values() for p in paths}
    shown = {(r["account_id"], r["asset"]): Decimal(r["balance"])
             for r in json.loads(cli("balances", "--db", url, "--json"))}
    expected = model_balances(files, accepted, final_marks)
    assert {k: v for k, v in shown.items() if v != 0} == expected

    # ---- no duplicate
    engine = create_engine_for(url)
    try:
        store = EventStore(engine)
        with engine.connect() as conn:
            stored = conn.execute(select(events.c.position, events.c.idempotency_key)).all()
        keys = [key for _, key in stored]
        assert len(keys) == len(set(keys)), "an idempotency key was recorded twice"
        for path, (kind, rows) in files.rows.items():
            assert idempotency_keys(kind, rows) <= set(keys), f"{path.name}: facts missing"
        for shared in ("shared-deposits", "shared-trades", "shared-withdrawals"):
            reports = [doc for docs in imported.values() for doc in docs
                       if Path(str(doc["file"])).stem == shared]
            assert len(reports) == 2
            facts = len(idempotency_keys(*files.rows[workdir / f"{shared}.csv"]))
            assert sorted(int(str(r["written"])) for r in reports) == [0, facts], reports
        for i, docs in imported.items():
            for doc in docs:
                assert doc["facts"] == len(idempotency_keys(*files.rows[Path(str(doc["file"]))]))
        log = list(store.read_all())
        closings = [r.event for r in log if r.type == BatchCompleted.type_name]
        first_mtm = next(n for n, r in enumerate(log) if r.type == BatchCompleted.type_name
                         and r.event.job == "mtm")  # type: ignore[attr-defined]
        trades_after_mtm = sum(r.type == "TradeCleared" for r in log[first_mtm:])
        batch_ids = [e.batch_id for e in closings]  # type: ignore[attr-defined]
        assert len(batch_ids) == len(set(batch_ids)) == len(job_commands) + 1
        for n, args in enumerate(job_commands):
            done = [runs[r][n] for r in runs]
            assert sorted(bool(d["already_done"]) for d in done) == [False, True], done
            if args[1] == "liquidate":  # the book stays funded: nothing to liquidate
                assert [d["events_written"] for d in done if not d["already_done"]] == [1]

        # ---- no skipped event
        tail = json.loads((out / "tailer" / "tail.json").read_text())
        full = [r.position for r in store.read_all()]
        assert full == [r.position for r in store.read_all(page_size=97)]  # stable order
        assert len(full) == len(set(full)) == len(stored)
        assert set(full) == {position for position, _ in stored}
        final_mtm = len(full) - len(tail["positions"])
        assert tail["positions"] == full[:len(tail["positions"])], "the tailer skipped"
        assert final_mtm > 0 and all(
            r.effective_at == FINAL_AT for r in store.read_all() if r.position in
            set(full[len(tail["positions"]):])), "the tailer missed events before the end"
    finally:
        engine.dispose()

    # ---- zero invariant violations (projections equal replay among them)
    assert_verified(url)

    with capsys.disabled():
        written = sum(int(str(d["written"])) for docs in imported.values() for d in docs)
        print(f"\n[postgresql] {IMPORTERS} importers ({sum(map(len, files.plan.values()))} "
              f"files, {written} facts), {RUNNERS} job runners ({len(job_commands)} batches "
              f"each; {trades_after_mtm} trades cleared after the first mtm batch closed), "
              f"1 tailer ({tail['reads']} reads): concurrent phase "
              f"{concurrent_s:.1f} s, {len(full)} events, {time.monotonic() - started:.1f} s "
              "in all")
