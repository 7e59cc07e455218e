"""The `clearing` command line: parse, call one service function, render.

Exit codes (SPEC section 2): 0 ok; 1 a check or job found problems; 2 bad input, usage, or a
refused command. Errors go to stderr and name the file, line, field and reason.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from clearing import render
from clearing.app import Ledger
from clearing.backoffice.csvinput import InputRejected
from clearing.backoffice.imports import ImportKind
from clearing.backoffice.replay import ReplayBounds
from clearing.domain.clock import InvalidTimeError, NaiveTimeError, format_time, parse_time
from clearing.domain.event import InvalidEventPayload, UnknownEventType
from clearing.domain.margin import MissingIndexPrice, MissingRiskParameter
from clearing.domain.rejections import Rejected
from clearing.jobs.catalog import UnknownJob
from clearing.store.errors import StoreError
from clearing.store.failures import DATABASE_ERRORS, describe

app = typer.Typer(
    name="clearing",
    help="An event-sourced clearing-house ledger for crypto derivatives: every fact in an "
         "append-only log, every balance, position and margin figure rebuilt from it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)
db_app = typer.Typer(help="The database schema.", no_args_is_help=True)
projections_app = typer.Typer(help="The read models folded from the log.", no_args_is_help=True)
risk_app = typer.Typer(help="Risk parameters in force, and changing them (each change is an "
                             "event).", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(projections_app, name="projections")
reconcile_app = typer.Typer(help="Compare the ledger with an external statement and list "
                                  "every break (exit 1 if any).", no_args_is_help=True)
app.add_typer(risk_app, name="risk")
app.add_typer(reconcile_app, name="reconcile")

EXIT_PROBLEMS = 1
EXIT_BAD_INPUT = 2


def _time(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        return parse_time(value)
    except (NaiveTimeError, InvalidTimeError) as exc:
        raise typer.BadParameter(str(exc)) from None


Db = Annotated[str | None, typer.Option("--db", help="Database URL (default: "
                                        "$CLEARING_DATABASE_URL or sqlite:///clearing.db).",
                                        show_default=False)]
Json = Annotated[bool, typer.Option("--json", help="One JSON document on stdout.")]
Csv = Annotated[bool, typer.Option("--csv", help="CSV on stdout.")]
AsOf = Annotated[str | None, typer.Option("--as-of", metavar="TIME", help="Fold only facts "
                                          "effective at or before TIME (ISO 8601 with zone).")]
KnownAt = Annotated[str | None, typer.Option("--known-at", metavar="TIME", help="Fold only "
                                             "facts the ledger had recorded by TIME.")]
Until = Annotated[int | None, typer.Option("--until", metavar="POSITION", help="Fold facts up "
                                           "to and including the one at POSITION.")]
Account = Annotated[str | None, typer.Option("--account", help="Only this account.")]

F = TypeVar("F", bound=Callable[..., Any])


def handles_errors(fn: F) -> F:
    """Turn expected rejections into a clear message on stderr and exit code 2.

    A database the command cannot get past (read-only, disk full, the connection lost after
    the store's bounded retries, no privilege) is a refused command too: one line on stderr
    saying why (`clearing.store.failures.describe`), exit 2, no traceback; each transaction is
    all or nothing, so nothing is half-written. Any other database error is a bug and keeps
    its traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except InputRejected as exc:
            for problem in exc.problems:
                render.error(str(problem))
            render.error("nothing was written")
            raise typer.Exit(EXIT_BAD_INPUT) from None
        except (Rejected, StoreError, UnknownEventType, InvalidEventPayload,
                MissingIndexPrice, MissingRiskParameter, UnknownJob) as exc:
            render.error(f"error: {exc}")
            raise typer.Exit(EXIT_BAD_INPUT) from None
        except DATABASE_ERRORS as exc:
            line = describe(exc)
            if line is None:
                raise
            render.error(f"error: {line}")
            raise typer.Exit(EXIT_BAD_INPUT) from None

    return wrapper  # type: ignore[return-value]


def _bounds(as_of: str | None, known_at: str | None, until: int | None) -> ReplayBounds:
    return ReplayBounds(_time(as_of), _time(known_at), until)


@db_app.command("upgrade")
@handles_errors
def db_upgrade(db: Db = None) -> None:
    """Migrate the database to the newest schema."""
    from clearing.config import database_url
    from clearing.store.database import create_engine_for, current_revision, upgrade

    engine = create_engine_for(database_url(db))
    upgrade(engine)
    render.stdout.print(f"database at revision {current_revision(engine)}")


@app.command("import")
@handles_errors
def import_(
    kind: Annotated[ImportKind, typer.Argument(help="What the file holds.")],
    file: Annotated[Path, typer.Argument(help="CSV file with a header row (SPEC section 3).")],
    db: Db = None,
    json_: Json = False,
) -> None:
    """Import a CSV file as one atomic append; re-importing the same file changes nothing."""
    report = Ledger.open(db).import_file(kind, file)
    if json_:
        render.emit_json({"kind": report.kind, "file": report.file, "rows": report.rows,
                          "facts": report.facts, "written": report.written,
                          "already_imported": report.already_imported})
    elif report.already_imported:
        render.stdout.print(f"{file}: nothing written, every row was already recorded")
    else:
        render.stdout.print(f"{file}: {report.written} {kind} recorded "
                            f"({report.facts - report.written} already recorded)")


@app.command()
@handles_errors
def bust(
    trade_id: Annotated[str, typer.Argument(help="The cleared trade to reverse.")],
    reason: Annotated[str, typer.Option("--reason", help="Why (kept in the audit trail).")],
    db: Db = None,
    at: Annotated[str | None, typer.Option("--at", metavar="TIME",
                                           help="Effective time (default now).")] = None,
) -> None:
    """Reverse a cleared trade with compensating events (positions, premium, fees)."""
    result = Ledger.open(db).bust(trade_id, reason, _time(at))
    if result.already_done:
        render.stdout.print(f"trade {trade_id} was already busted")
    else:
        render.stdout.print(f"trade {trade_id} busted at position {result.positions[0]}")


@app.command()
@handles_errors
def balances(db: Db = None, account: Account = None, as_of: AsOf = None,
             known_at: KnownAt = None, until: Until = None, json_: Json = False,
             csv_: Csv = False) -> None:
    """Balances per account and asset (house accounts included)."""
    from clearing.backoffice.queries import balance_rows, ledger_state

    state = ledger_state(Ledger.open(db), _bounds(as_of, known_at, until), account)
    render.emit_rows(balance_rows(state, account), ("account_id", "asset", "balance"),
                     title="Balances", as_json=json_, as_csv=csv_, numeric=("balance",))


@app.command()
@handles_errors
def positions(db: Db = None, account: Account = None, as_of: AsOf = None,
              known_at: KnownAt = None, until: Until = None, json_: Json = False,
              csv_: Csv = False) -> None:
    """Open positions with mark, entry and last settlement price, P&L and greeks."""
    from clearing.backoffice.queries import ledger_state, position_rows

    ledger = Ledger.open(db)
    bounds = _bounds(as_of, known_at, until)
    state = ledger_state(ledger, bounds, account)
    at = bounds.as_of or ledger.clock()
    columns = ("account_id", "instrument", "quantity", "mark_price", "average_entry_price",
               "last_settlement_price", "unrealised_pnl", "delta", "gamma", "vega", "theta")
    render.emit_rows(position_rows(state, at, account), columns, title="Positions",
                     as_json=json_, as_csv=csv_, numeric=columns[2:])


@app.command()
@handles_errors
def statement(
    account_id: Annotated[str, typer.Argument(metavar="ACCOUNT")],
    db: Db = None,
    start: Annotated[str | None, typer.Option("--from", metavar="TIME")] = None,
    end: Annotated[str | None, typer.Option("--to", metavar="TIME")] = None,
    as_of: AsOf = None, known_at: KnownAt = None, until: Until = None,
    json_: Json = False, csv_: Csv = False,
) -> None:
    """Every movement of an account with its position, type, reference and running balance."""
    from clearing.backoffice.queries import ledger_state, statement_rows

    state = ledger_state(Ledger.open(db), _bounds(as_of, known_at, until), account_id,
                         with_statement=True)
    rows = statement_rows(state, account_id, _time(start), _time(end))
    render.emit_rows(rows, ("position", "effective_at", "type", "reference", "asset", "amount",
                            "balance"), title=f"Statement of {account_id}", as_json=json_,
                     as_csv=csv_, numeric=("position", "amount", "balance"))


@app.command()
@handles_errors
def events(
    db: Db = None,
    stream: Annotated[str | None, typer.Option("--stream", help="Only this stream.")] = None,
    type_: Annotated[str | None, typer.Option("--type", help="Only this event type.")] = None,
    after: Annotated[int | None, typer.Option("--after", metavar="POSITION",
                                              help="Start after this event.")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=1_000_000)] = 100,
    json_: Json = False, csv_: Csv = False,
) -> None:
    """Inspect the log, in the order readers see it."""
    import json

    from clearing.store.eventstore import START, LogFilter

    ledger = Ledger.open(db)
    start = START if after is None else ledger.store.log_position_of(after)
    bounds = LogFilter(types=(type_,) if type_ else None, stream_id=stream)
    rows = [
        {"position": r.position, "stream_id": r.stream_id, "stream_version": r.stream_version,
         "type": r.type, "schema_version": r.schema_version,
         "effective_at": format_time(r.effective_at), "recorded_at": format_time(r.recorded_at),
         "idempotency_key": r.idempotency_key, "event_id": r.event_id, "hash": r.hash,
         "metadata": r.metadata, "payload": r.event.to_payload()}
        for r in ledger.store.read_all(start, bounds=bounds, limit=limit)
    ]
    if json_:
        render.emit_json(rows)
        return
    flat = [{**r, "payload": json.dumps(r["payload"], sort_keys=True)} for r in rows]
    render.emit_rows(flat, ("position", "effective_at", "stream_id", "type", "idempotency_key",
                            "payload"), title="Events", as_json=False, as_csv=csv_)


@app.command()
@handles_errors
def replay(db: Db = None, as_of: AsOf = None, known_at: KnownAt = None, until: Until = None,
           json_: Json = False) -> None:
    """Rebuild all state from the log in memory. Without a bound, compare it with the stored
    read models and list every difference (exit 1 if any)."""
    from clearing.backoffice.queries import balance_rows, position_rows
    from clearing.backoffice.replay import differences
    from clearing.backoffice.replay import replay as replay_state
    from clearing.projections import tables as t
    from clearing.projections.ledger import load_full_state

    ledger = Ledger.open(db)
    bounds = _bounds(as_of, known_at, until)
    state = replay_state(ledger.store, bounds)
    if not bounds.unbounded:
        at = bounds.as_of or ledger.clock()
        document = {"balances": balance_rows(state), "positions": position_rows(state, at)}
        if json_:
            render.emit_json(document)
        else:
            render.emit_table("Balances (replayed)", document["balances"],
                              ("account_id", "asset", "balance"), ("balance",))
            render.emit_table("Positions (replayed)", document["positions"],
                              ("account_id", "instrument", "quantity", "last_settlement_price"))
        return
    ledger.refresh()
    with ledger.engine.connect() as conn:
        stored = load_full_state(conn, {x.name: x for x in t.LEDGER_TABLES})
    found = differences(stored, state)
    if json_:
        render.emit_json({"differences": [
            {"model": d.model, "key": d.key, "field": d.field, "stored": str(d.stored),
             "replayed": str(d.replayed)} for d in found]})
    elif found:
        for d in found:
            render.stdout.print(str(d), markup=False)
    else:
        render.stdout.print("read models equal a full replay of the log")
    if found:
        raise typer.Exit(EXIT_PROBLEMS)


@app.command()
@handles_errors
def verify(db: Db = None, json_: Json = False) -> None:
    """Check every invariant: append-only guard, hash chain, zero sums, replay equality."""
    from clearing.backoffice.verify import verify as run_checks

    checks = run_checks(Ledger.open(db))
    ok = all(c.ok for c in checks)
    if json_:
        render.emit_json({"ok": ok, "checks": [{"name": c.name, "ok": c.ok, "detail": c.detail}
                                               for c in checks]})
    else:
        for c in checks:
            mark = "[green]pass[/green]" if c.ok else "[red]FAIL[/red]"
            render.stdout.print(f"{mark}  {c.name}: {c.detail}")
        render.stdout.print("[bold green]verified[/bold green]" if ok
                            else "[bold red]verification failed[/bold red]")
    if not ok:
        raise typer.Exit(EXIT_PROBLEMS)


StatementFile = Annotated[Path, typer.Argument(metavar="FILE.csv", help="The statement: CSV "
                                                 "with a header row (SPEC section 3).")]


def _reconcile(kind_name: str, file: Path, db: str | None, tolerance: str, json_: bool,
               csv_: bool) -> None:
    import sys

    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

    from clearing.backoffice import reconcile as r
    from clearing.domain.money import InvalidAmount, parse_decimal

    try:
        amount = parse_decimal(tolerance, scale=8, non_negative=True)
    except InvalidAmount as exc:
        raise typer.BadParameter(str(exc), param_hint="--tolerance") from None
    sink: r.BreakSink
    if json_:
        sink = r.JsonBreaks(sys.stdout)
    elif csv_:
        sink = r.CsvBreaks(sys.stdout)
    else:
        sink = r.TableBreaks(render.stdout, f"Breaks: {kind_name} statement {file.name}")
    ledger = Ledger.open(db)
    shown = not (json_ or csv_) and render.stderr.is_terminal
    total = file.stat().st_size if file.is_file() else None
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                  console=render.stderr, transient=True, disable=not shown) as bar:
        task = bar.add_task(f"reading {file.name}", total=total)

        def progress(done: int) -> None:
            bar.update(task, completed=done)
            if done == total:
                bar.stop()  # all read; sorting the last run and the breaks follow

        report = r.reconcile(ledger, r.KINDS[kind_name], file, sink, amount, progress)
    if report.breaks:
        raise typer.Exit(EXIT_PROBLEMS)


@reconcile_app.command("balances")
@handles_errors
def reconcile_balances(
    file: StatementFile,
    db: Db = None,
    tolerance: Annotated[str, typer.Option(
        "--tolerance", metavar="AMOUNT", help="Balances differing by at most this absolute "
        "amount (any asset) match.")] = "0",
    json_: Json = False, csv_: Csv = False,
) -> None:
    """A custodian's balances statement (account_id,asset,balance) against the ledger.

    A balance absent on one side counts as zero; house (ccp:) accounts are compared only when
    the statement lists them. Each run is recorded in the log."""
    _reconcile("balances", file, db, tolerance, json_, csv_)


@reconcile_app.command("trades")
@handles_errors
def reconcile_trades(file: StatementFile, db: Db = None, json_: Json = False,
                     csv_: Csv = False) -> None:
    """A venue's trades statement (trade_id,leg,instrument,buyer,seller,quantity,price)
    against the ledger's standing trades.

    Busted trades no longer stand: a statement still listing them shows missing_in_ledger
    breaks. Each run is recorded in the log."""
    _reconcile("trades", file, db, "0", json_, csv_)


@app.command()
@handles_errors
def report(
    html: Annotated[Path, typer.Option("--html", metavar="FILE", help="Write the page to "
                                       "FILE (replaced if it exists).")],
    db: Db = None, as_of: AsOf = None,
) -> None:
    """One self-contained HTML page of the ledger's state and history: index prices with
    the liquidations, equity and margin utilisation, the insurance fund, open interest,
    margin calls and reconciliation runs. Reads the log; writes nothing to the ledger."""
    import os
    import time

    from clearing.backoffice.report import TooManyLateFacts, gather
    from clearing.backoffice.report_html import render_page

    began = time.monotonic()
    try:
        data = gather(Ledger.open(db), _time(as_of))
    except TooManyLateFacts as exc:
        render.error(f"error: {exc}")
        raise typer.Exit(EXIT_PROBLEMS) from None
    page = render_page(data).encode("utf-8")
    partial = html.with_name(f".{html.name}.partial")
    try:
        partial.write_bytes(page)
        os.replace(partial, html)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        render.error(f"{html}: cannot write the report: {exc.strerror or exc}")
        raise typer.Exit(EXIT_BAD_INPUT) from None
    render.stdout.print(f"{html}: {len(page) / 1024:,.0f} KiB, {data.facts:,} events, "
                        f"{len(data.samples)} margin samples, "
                        f"{time.monotonic() - began:.1f} s", markup=False, highlight=False)


@projections_app.command("rebuild")
@handles_errors
def projections_rebuild(db: Db = None) -> None:
    """Rebuild every read model from the log into fresh tables, then swap them in."""
    folded = Ledger.open(db, as_application=False).runner.rebuild()
    render.stdout.print(f"read models rebuilt from {folded} events")


@app.command()
@handles_errors
def price(
    option_type: Annotated[str, typer.Option("--type", help="call or put")],
    forward: Annotated[float, typer.Option("--forward", help="Forward (index) price F.")],
    strike: Annotated[float, typer.Option("--strike", help="Strike K.")],
    expiry: Annotated[str, typer.Option("--expiry", metavar="TIME")],
    at: Annotated[str, typer.Option("--at", metavar="TIME", help="Valuation time.")],
    vol: Annotated[float | None, typer.Option("--vol", help="Volatility, e.g. 0.6.")] = None,
    premium: Annotated[float | None, typer.Option("--premium", help="Premium: solve for the "
                                                  "implied volatility instead.")] = None,
    rate: Annotated[float, typer.Option("--rate", help="Discount rate.")] = 0.0,
    json_: Json = False,
) -> None:
    """Black-76 price and greeks; with --premium instead of --vol, the implied volatility."""
    from clearing.domain.pricing import ImpliedVolatilityError, black76, implied_vol
    from clearing.domain.valuation import SECONDS_PER_YEAR

    if option_type not in ("call", "put"):
        raise typer.BadParameter("must be call or put", param_hint="--type")
    if (vol is None) == (premium is None):
        raise typer.BadParameter("give exactly one of --vol and --premium")
    expiry_at, valued_at = _time(expiry), _time(at)
    assert expiry_at is not None and valued_at is not None
    t_years = max((expiry_at - valued_at).total_seconds(), 0.0) / SECONDS_PER_YEAR
    try:
        if premium is not None:
            iv = implied_vol(option_type, forward, strike, premium, t_years, rate)  # type: ignore[arg-type]
            document: dict[str, str] = {"iv": f"{iv:.10f}"}
        else:
            assert vol is not None
            value = black76(option_type, forward, strike, vol, t_years, rate)  # type: ignore[arg-type]
            document = {k: f"{getattr(value, k):.10f}" for k in
                        ("price", "delta", "gamma", "vega", "theta")}
    except (ValueError, ImpliedVolatilityError) as exc:
        render.error(f"error: {exc}")
        raise typer.Exit(EXIT_BAD_INPUT) from None
    if json_:
        render.emit_json(document)
    else:
        render.emit_table("Black-76", [document], list(document), list(document))


@app.command()
@handles_errors
def margin(
    db: Db = None, account: Account = None, as_of: AsOf = None, known_at: KnownAt = None,
    until: Until = None, json_: Json = False, csv_: Csv = False,
    explain: Annotated[bool, typer.Option("--explain", help="The workings of one account "
                                          "(needs --account).")] = False,
    var: Annotated[bool, typer.Option("--var", help="Add 99% historical VaR and expected "
                                      "shortfall over a 2-day margin period of risk.")] = False,
) -> None:
    """Equity, collateral after haircuts, initial and maintenance requirement, margin ratio
    (maintenance / equity) and status of every account."""
    from clearing.backoffice.margin_report import explain as explain_account
    from clearing.backoffice.margin_report import margin_rows

    ledger = Ledger.open(db)
    bounds = _bounds(as_of, known_at, until)
    at = bounds.as_of or ledger.clock()
    if explain:
        if account is None:
            raise typer.BadParameter("--explain needs --account")
        document = explain_account(ledger, bounds, at, account)
        if json_:
            render.emit_json(document)
            return
        render.emit_table(f"Margin of {account}", [document],
                          ("model", "collateral_value", "equity", "initial", "maintenance",
                           "margin_ratio", "status"))
        render.emit_table("Contributions", document["contributions"],
                          ("symbol", "initial", "maintenance"), ("initial", "maintenance"))
        render.emit_table("Worst scenarios", document["worst_scenarios"],
                          ("underlying", "move", "vol_state", "loss"), ("move", "loss"))
        return
    rows = margin_rows(ledger, bounds, at, account, with_var=var)
    columns = ["account_id", "model", "collateral_value", "equity", "initial", "maintenance",
               "margin_ratio", "status"]
    if var:
        columns += ["var_99_2d", "expected_shortfall_99_2d"]
    render.emit_rows(rows, columns, title=f"Margin at {format_time(at)}", as_json=json_,
                     as_csv=csv_, numeric=columns[2:7] + columns[8:])


def _pairs(values: list[str] | None, option: str) -> list[tuple[str, str]]:
    """`NAME=VALUE` options, in order."""
    found = []
    for value in values or []:
        name, sep, text = value.partition("=")
        if not sep or not name.strip() or not text.strip():
            raise typer.BadParameter(f"{value!r} is not NAME=VALUE", param_hint=option)
        found.append((name.strip(), text.strip()))
    return found


@app.command()
@handles_errors
def stress(
    db: Db = None,
    scenario: Annotated[list[str] | None, typer.Option(
        "--scenario", metavar="NAME", help="A scenario to run (repeatable); default: every "
        "shipped scenario and every one in --scenarios FILE.")] = None,
    shock: Annotated[list[str] | None, typer.Option(
        "--shock", metavar="UNDERLYING=MOVE", help="Run one custom scenario instead: a "
        "relative move per underlying, e.g. --shock BTC=-0.3 --shock ETH=-35%.")] = None,
    vol_shock: Annotated[str | None, typer.Option(
        "--vol-shock", metavar="FACTOR", help="Multiply implied volatilities by FACTOR (for "
        "--shock; with named scenarios it replaces their own factor).")] = None,
    scenarios_file: Annotated[Path | None, typer.Option(
        "--scenarios", metavar="FILE", help="More scenarios, JSON (.json) or TOML: a list "
        "under 'scenario', each with name, moves {U = MOVE}, optional vol (a factor or "
        "{U = FACTOR}) and description.")] = None,
    depth: Annotated[list[str] | None, typer.Option(
        "--depth", metavar="UNDERLYING=USD", help="Market depth for the price impact of "
        "liquidations (repeatable; default BTC=10000000 ETH=4000000).")] = None,
    impact: Annotated[str | None, typer.Option(
        "--impact", metavar="K", help="Impact coefficient: a round's move is -K x net USD "
        "sold / depth (default 1).")] = None,
    as_of: AsOf = None,
    top: Annotated[int, typer.Option("--top", min=1, max=100_000,
                                     help="Accounts listed per scenario in the tables.")] = 10,
    json_: Json = False,
) -> None:
    """Revalue the book under price and volatility shocks, in memory: losses, accounts below
    maintenance and bankrupt, the deleveraging cascade (liquidations moving prices, round by
    round, collateral sales included), what the insurance fund covers and what falls to
    auto-deleveraging, and Cover-1 / Cover-2 against the fund. Writes nothing to the ledger.

    Shipped scenarios: covid-2020-03-12 (BTC -37%, ETH -42%, vol x2.5), china-2021-05-19
    (BTC -14%, ETH -27%, vol x1.5), china-2021-05-19-intraday (BTC -30%, ETH -44%, vol x2),
    crash-30, rally-30 (all -/+30%, vol x2), decouple-btc-down (BTC -20%, ETH +10%),
    decouple-eth-down (ETH -25%, BTC +5%); the model and the sources are documented in
    clearing/domain/stress.py and stress_scenarios.py."""
    from decimal import Decimal

    from clearing.backoffice.stress_report import (
        load_scenario_file,
        print_stress,
        run_stress,
        stress_document,
    )
    from clearing.domain.money import InvalidAmount, parse_decimal
    from clearing.domain.stress import DEFAULT_CASCADE, CascadeParameters
    from clearing.domain.stress_scenarios import (
        ScenarioError,
        UnknownScenario,
        choose,
        custom_scenario,
        parse_move,
        parse_vol_factor,
    )

    if scenario and shock:
        raise typer.BadParameter("give --scenario or --shock, not both", param_hint="--shock")
    try:
        factor = None if vol_shock is None else parse_vol_factor(vol_shock)
        extra = [] if scenarios_file is None else load_scenario_file(scenarios_file)
        if shock:
            chosen = [custom_scenario({u: parse_move(m, "--shock", u)
                                       for u, m in _pairs(shock, "--shock")},
                                      factor if factor is not None else Decimal(1))]
        else:
            chosen = choose(scenario or [], extra)
            if factor is not None:
                chosen = [s.with_vol_factor(factor) for s in chosen]
    except (ScenarioError, UnknownScenario) as exc:
        render.error(f"error: {exc}")
        raise typer.Exit(EXIT_BAD_INPUT) from None
    try:
        depths = {u: parse_decimal(v, scale=2, positive=True)
                  for u, v in _pairs(depth, "--depth")}
        coefficient = DEFAULT_CASCADE.impact_coefficient if impact is None else \
            parse_decimal(impact, scale=8, non_negative=True)
    except InvalidAmount as exc:
        raise typer.BadParameter(str(exc), param_hint="--depth/--impact") from None
    cascade = CascadeParameters(depth_usd={**DEFAULT_CASCADE.depth_usd, **depths},
                                impact_coefficient=coefficient)
    ledger = Ledger.open(db)
    at = _time(as_of) or ledger.clock()
    report = run_stress(ledger, at, chosen, cascade)
    if json_:
        render.emit_json(stress_document(report))
    else:
        print_stress(report, render.stdout, top)


@app.command("account-model")
@handles_errors
def account_model(
    account_id: Annotated[str, typer.Argument(metavar="ACCOUNT")],
    model: Annotated[str, typer.Argument(help="standard or portfolio")],
    db: Db = None,
) -> None:
    """Move an account to another margin model (recorded as an event)."""
    result = Ledger.open(db).change_margin_model(account_id, model)
    render.stdout.print(f"{account_id}: margin model {model}" + (
        " (unchanged)" if result.already_done else ""))


@app.command()
@handles_errors
def run(
    job: Annotated[str, typer.Argument(help="risk, margin, mtm, funding, liquidate, settle, "
                                             "or eod (all of them in order).")],
    db: Db = None,
    at: Annotated[str | None, typer.Option("--at", metavar="TIME",
                                           help="Business time of the batch (default now).")
                  ] = None,
    json_: Json = False,
) -> None:
    """Run a job once as of TIME. The batch id is the job and the time, so running the same
    batch again does nothing and says so."""
    from clearing.jobs.catalog import run_job

    ledger = Ledger.open(db)
    when = _time(at) or ledger.clock()
    runs = run_job(ledger, job, when)
    documents = [{"job": r.job, "batch_id": r.batch_id, "at": format_time(r.at),
                  "events_written": r.events_written, "already_done": r.already_done}
                 for r in runs]
    if json_:
        render.emit_json(documents[0] if len(documents) == 1 else documents)
        return
    for d in documents:
        state = "already done" if d["already_done"] else f"{d['events_written']} events"
        render.stdout.print(f"{d['job']} at {d['at']}: {state} (batch {d['batch_id']})")


@app.command()
@handles_errors
def scheduler(
    db: Db = None,
    schedule: Annotated[Path | None, typer.Option(
        "--schedule", metavar="FILE", help="A TOML or JSON schedule replacing the default "
        "(mtm hourly, then liquidate and margin; funding 00/08/16; settle 08:00; risk 00:05 "
        "UTC).")] = None,
    once: Annotated[bool, typer.Option("--once", help="Run every missed batch up to now (or "
                                       "--until), in order, then exit.")] = False,
    until: Annotated[str | None, typer.Option("--until", metavar="TIME", help="Stop at TIME; "
                                              "with --once, catch up to TIME instead of now.")
                     ] = None,
    since: Annotated[str | None, typer.Option("--since", metavar="TIME", help="Where a job "
                                              "that never completed a batch starts catching "
                                              "up (default: when the scheduler starts).")
                     ] = None,
    json_: Json = False,
) -> None:
    """Run the jobs on their schedule (APScheduler) until stopped. On start, and at every
    tick, each batch missed since the job's last completed one runs once, in order (at most
    7 days back). Any number of schedulers may serve one database: a batch runs only once."""
    import logging

    from clearing.jobs.schedule import ScheduleError, load
    from clearing.jobs.scheduler import run_once, serve

    try:
        plan = load(schedule)
    except ScheduleError as exc:
        render.error(f"error: {exc}")
        raise typer.Exit(EXIT_BAD_INPUT) from None
    if not once:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
        logging.getLogger("alembic").setLevel(logging.WARNING)
        serve(db, plan, since=_time(since), until=_time(until))
        return
    result = run_once(db, plan, until=_time(until), since=_time(since))
    documents = [{"job": r.job, "batch_id": r.batch_id, "at": format_time(r.at),
                  "events_written": r.events_written, "already_done": r.already_done}
                 for r in result.runs]
    if json_:
        render.emit_json(documents)
    else:
        for d in documents:
            state = "already done" if d["already_done"] else f"{d['events_written']} events"
            render.stdout.print(f"{d['job']} at {d['at']}: {state}")
    for failure in result.failures:
        render.error(f"{failure.job} at {format_time(failure.at)} failed: {failure.error}")
    if result.failures:
        raise typer.Exit(EXIT_PROBLEMS)


@risk_app.command("show")
@handles_errors
def risk_show(
    db: Db = None, as_of: AsOf = None, json_: Json = False,
) -> None:
    """The risk parameters in force (defaults overlaid with every change so far)."""
    ledger = Ledger.open(db)
    when = _time(as_of) or ledger.clock()
    params = ledger.risk_parameters(when)
    rows = []
    for name, value in params.model_dump().items():
        if isinstance(value, dict):
            rows.extend({"name": name, "underlying": u, "value": str(v)}
                        for u, v in sorted(value.items()))
        else:
            rows.append({"name": name, "underlying": None, "value": str(value)})
    render.emit_rows(rows, ("name", "underlying", "value"),
                     title=f"Risk parameters at {format_time(when)}", as_json=json_,
                     as_csv=False, numeric=("value",))


@risk_app.command("set")
@handles_errors
def risk_set(
    name: Annotated[str, typer.Argument(help="Parameter name (see `clearing risk show`).")],
    value: Annotated[str, typer.Argument(help="New value, a decimal.")],
    underlying: Annotated[str | None, typer.Option("--underlying", help="For per-asset "
                                                   "parameters (haircut, portfolio_range).")
                          ] = None,
    db: Db = None,
    at: Annotated[str | None, typer.Option("--at", metavar="TIME",
                                           help="Effective from (default now).")] = None,
) -> None:
    """Change one risk parameter from a moment on; recorded as a RiskParametersSet event."""
    from clearing.domain.money import InvalidAmount, parse_decimal

    try:
        amount = parse_decimal(value, scale=10)
    except InvalidAmount as exc:
        raise typer.BadParameter(str(exc), param_hint="VALUE") from None
    ledger = Ledger.open(db)
    result = ledger.set_risk_parameter(name, underlying, amount, _time(at))
    render.stdout.print(f"{name}{'[' + underlying + ']' if underlying else ''} = {value}"
                        + (" (already recorded)" if result.already_done else ""))


@app.command()
@handles_errors
def demo(
    db: Annotated[str | None, typer.Option("--db", help="Database URL (default: a fresh "
                                           "SQLite file clearing-demo.db here).")] = None,
    accounts: Annotated[int, typer.Option("--accounts", min=2, max=100_000)] = 200,
    days: Annotated[int, typer.Option("--days", min=1, max=365)] = 7,
    seed: Annotated[int, typer.Option("--seed")] = 7,
    json_: Json = False,
) -> None:
    """The main job: a simulated market run through the whole ledger, ending with verify."""
    from clearing.demo import run_demo

    outcome = run_demo(db, accounts=accounts, days=days, seed=seed, quiet=json_)
    if json_:
        render.emit_json(outcome.document())
    if not outcome.verified:
        raise typer.Exit(EXIT_PROBLEMS)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
