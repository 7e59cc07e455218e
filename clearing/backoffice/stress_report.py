"""`clearing stress`: the stress test (`domain.stress`) on the ledger as of a moment, for
people (rich tables), programs (`--json`) and the HTML report (a section with a plot of the
cascade rounds).

The state is read (`Ledger.state_at`, which folds or replays the log in memory) and stressed
in memory: nothing is written to the log.

The HTML section joins `clearing report --html` through its extension point:
`report_html.Section("stress", "Stress tests", stress_section, STRESS_NOTE)`. Its markup uses
the page's own CSS classes (cards, tables, `svg.plot`), and its plot is hand-written SVG like
the page's others (no plotting dependency, tooltips from `<title>`).
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from clearing.app import Ledger
from clearing.domain.clock import format_time
from clearing.domain.margin import MissingIndexPrice, MissingRiskParameter
from clearing.domain.stress import (
    DEFAULT_CASCADE,
    AccountOutcome,
    CascadeParameters,
    CascadeRound,
    ScenarioResult,
    StressReport,
    stress_test,
)
from clearing.domain.stress_scenarios import SHIPPED, Scenario, ScenarioError, parse_scenario_text

if TYPE_CHECKING:
    from clearing.backoffice.report import ReportData

SCENARIO_FILE_BYTES_MAX = 1_000_000
TOP_ACCOUNTS = 10
TABLE_ROWS_MAX = 200
"""Rows of a table in the HTML section."""
DETAILED_SCENARIOS_MAX = 2
"""With more scenarios than this, the tables detail only the worst one (every scenario's
cascade rounds are still listed)."""
CHART_WIDTH = 560
CHART_HEIGHT = 250
ASSET_COLOURS = {"BTC": "#f7931a", "ETH": "#627eea"}
OTHER_COLOURS = ("#0d9488", "#db2777", "#65a30d", "#9333ea")
LIQUIDATED_COLOUR = "#dc2626"
INSURANCE_COLOUR = "#059669"
GRID = "#e5e7eb"
MUTED = "#6b7280"
STRESS_NOTE = (
    "Every shipped scenario applied to the book as it stands, revalued with the margin "
    "rules; forced liquidations move prices by a linear impact rule (the cascade), and "
    "collateral sold in them moves its own market. Cover-2: the two largest deficits "
    "against the insurance fund. Nothing here is written to the ledger.")


# ------------------------------------------------------------------ running it


def load_scenario_file(path: Path) -> list[Scenario]:
    """A user's scenarios (JSON if the name ends in .json, else TOML)."""
    try:
        if path.stat().st_size > SCENARIO_FILE_BYTES_MAX:
            raise ScenarioError(str(path), "file", f"larger than {SCENARIO_FILE_BYTES_MAX:,} "
                                                   "bytes")
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ScenarioError(str(path), "file", exc.strerror or str(exc)) from None
    except UnicodeDecodeError:
        raise ScenarioError(str(path), "file", "is not UTF-8 text") from None
    return parse_scenario_text(text, str(path), path.suffix.lower() == ".json")


def run_stress(ledger: Ledger, at: datetime, scenarios: Sequence[Scenario],
               cascade: CascadeParameters = DEFAULT_CASCADE) -> StressReport:
    """The scenarios against the ledger's state as of `at`, in memory."""
    return stress_test(ledger.state_at(at), at, scenarios, cascade)


# ------------------------------------------------------------------ the JSON document


def _s(value: Decimal) -> str:
    return format(value, "f")


def _map(values: Any) -> dict[str, str]:
    return {k: _s(v) for k, v in sorted(values.items())}


def affected(result: ScenarioResult) -> list[AccountOutcome]:
    """Accounts the scenario hurts (a loss, a breach, a close-out), largest loss first."""
    found = [a for a in result.accounts
             if a.loss > 0 or a.liquidated_in_round is not None or a.deficit > 0]
    return sorted(found, key=lambda a: (-a.loss, a.account_id))


def stress_document(report: StressReport) -> dict[str, Any]:
    worst = report.worst
    cascade = report.cascade
    return {
        "at": format_time(report.at),
        "insurance_fund": _s(report.insurance_fund),
        "accounts": report.accounts,
        "positions": report.positions,
        "cascade": {"depth_usd": _map(cascade.depth_usd),
                    "default_depth_usd": _s(cascade.default_depth_usd),
                    "impact_coefficient": _s(cascade.impact_coefficient),
                    "round_move_max": _s(cascade.round_move_max),
                    "rounds_max": cascade.rounds_max},
        "verdict": None if worst is None else {
            "worst_scenario": worst.scenario.name, **_cover(worst)},
        "scenarios": [_scenario_document(s) for s in report.scenarios],
    }


def _cover(result: ScenarioResult) -> dict[str, Any]:
    cover = result.cover
    return {"cover_1": _s(cover.cover_1), "cover_1_accounts": list(cover.cover_1_accounts),
            "cover_2": _s(cover.cover_2), "cover_2_accounts": list(cover.cover_2_accounts),
            "insurance_fund": _s(cover.insurance_fund), "verdict": cover.verdict,
            "shortfall": _s(cover.shortfall), "sentence": cover.sentence()}


def _scenario_document(result: ScenarioResult) -> dict[str, Any]:
    s = result.scenario
    return {
        "name": s.name, "kind": s.kind, "description": s.description,
        "moves": _map(s.moves), "vol_factor": _s(s.vol_factor),
        "vol_factors": _map(s.vol_factors),
        "base_prices": _map(result.base_prices), "final_prices": _map(result.final_prices),
        "cascade_rounds": result.cascade_rounds, "converged": result.converged,
        "totals": {
            "loss": _s(result.loss_usd), "shock_loss": _s(result.shock_loss_usd),
            "accounts_below_maintenance": result.below_maintenance,
            "accounts_bankrupt_at_shock": result.bankrupt_at_shock,
            "accounts_liquidated": result.liquidated, "accounts_bankrupt": result.bankrupt,
            "deficit": _s(result.deficit_usd), "fees": _s(result.fees_usd),
            "insurance_covered": _s(result.insurance_paid_usd),
            "auto_deleveraged": _s(result.adl_usd), "uncovered": _s(result.uncovered_usd),
            "house_loss": _s(result.house_loss_usd)},
        "cover": _cover(result),
        "rounds": [_round_document(r) for r in result.rounds],
        "collateral_sales": [
            {"round": x.round, "account_id": x.account_id, "asset": x.asset,
             "amount": _s(x.amount), "proceeds": _s(x.proceeds_usd),
             "loss_underlying": x.loss_underlying, "loss": _s(x.loss_usd),
             "cross_margin": x.cross_margin} for x in result.sales],
        "accounts": [_account_document(a) for a in affected(result)],
    }


def _round_document(r: CascadeRound) -> dict[str, Any]:
    return {
        "round": r.round, "prices": _map(r.prices), "impact": _map(r.impact),
        "accounts_liquidated": list(r.accounts_liquidated),
        "positions_notional": _s(r.positions_notional_usd), "net_sold": _map(r.net_sold_usd),
        "collateral_sold": _map(r.collateral_sold),
        "collateral_sold_usd": _map(r.collateral_sold_usd),
        "cross_margin_sold_usd": _map(r.cross_margin_sold_usd), "fees": _s(r.fees_usd),
        "deficit": _s(r.deficit_usd), "insurance_paid": _s(r.insurance_paid_usd),
        "auto_deleveraged": _s(r.adl_usd), "uncovered": _s(r.uncovered_usd),
        "insurance_fund_left": _s(r.insurance_fund_left), "breaching": r.breaching}


def _account_document(a: AccountOutcome) -> dict[str, Any]:
    return {
        "account_id": a.account_id, "model": a.model, "equity_before": _s(a.equity_before),
        "equity_shocked": _s(a.equity_shocked), "initial_shocked": _s(a.initial_shocked),
        "maintenance_shocked": _s(a.maintenance_shocked), "status_shocked": a.status_shocked,
        "liquidated_in_round": a.liquidated_in_round, "equity_final": _s(a.equity_final),
        "loss": _s(a.loss), "deficit": _s(a.deficit), "insurance_paid": _s(a.insurance_paid),
        "auto_deleveraged": _s(a.adl), "uncovered": _s(a.uncovered),
        "collateral_sold": _map(a.collateral_sold), "loss_underlying": a.loss_underlying}


# ------------------------------------------------------------------ rich tables


def _money(value: Decimal) -> str:
    return f"{value:,.2f}"


def _pct(value: Decimal) -> str:
    return f"{float(value) * 100:+.2f}%"


def _moves(scenario: Scenario) -> str:
    return ", ".join(f"{u} {float(m) * 100:+.0f}%" for u, m in sorted(scenario.moves.items()))


def _vol(scenario: Scenario) -> str:
    if scenario.vol_factors:
        return ", ".join(f"{u} x{f}" for u, f in sorted(scenario.vol_factors.items()))
    return f"x{scenario.vol_factor}"


def print_stress(report: StressReport, console: Console, top: int = TOP_ACCOUNTS) -> None:
    cascade = report.cascade
    depth = ", ".join(f"{u} {v:,.0f}" for u, v in sorted(cascade.depth_usd.items()))
    console.print(f"[bold]Stress test[/bold] as of {format_time(report.at)}: "
                  f"{report.accounts:,} member accounts, {report.positions:,} positions, "
                  f"insurance fund {_money(report.insurance_fund)}. Impact: depth {depth} "
                  f"USD, coefficient {cascade.impact_coefficient}.", highlight=False)
    console.print(_summary_table(report))
    for result in report.scenarios:
        if result.cascade_rounds:
            console.print(_rounds_table(result))
    shown = report.scenarios if len(report.scenarios) <= DETAILED_SCENARIOS_MAX else \
        tuple(s for s in (report.worst,) if s is not None)
    for result in shown:
        sales = result.cross_margin_sales
        if sales:
            console.print(_sales_table(result))
        hurt = affected(result)
        if hurt:
            console.print(_accounts_table(result, hurt[:top], len(hurt)))
    for result in report.scenarios:
        if not result.converged:
            console.print(f"[bold red]{result.scenario.name}: the cascade did not settle in "
                          f"{cascade.rounds_max} rounds[/bold red]")
    worst = report.worst
    if worst is not None:
        colour = "green" if worst.cover.sufficient else "red"
        accounts = " and ".join(worst.cover.cover_2_accounts) or "no account"
        console.print(f"[bold {colour}]Cover-2 ({worst.scenario.name}, {accounts}): "
                      f"{worst.cover.sentence()}[/bold {colour}]", highlight=False)


def _summary_table(report: StressReport) -> Table:
    table = Table(title="Scenarios", header_style="bold")
    for column in ("scenario", "moves", "vol", "loss", "below MM", "liquidated", "rounds",
                   "deficit", "fund covers", "ADL", "uncovered", "Cover-1", "Cover-2",
                   "verdict"):
        table.add_column(column, justify="left" if column in
                         ("scenario", "moves", "vol", "verdict") else "right")
    for r in report.scenarios:
        verdict = ("[green]sufficient[/green]" if r.cover.sufficient else
                   f"[red]short {_money(r.cover.shortfall)}[/red]")
        table.add_row(r.scenario.name, _moves(r.scenario), _vol(r.scenario),
                      _money(r.loss_usd), str(r.below_maintenance), str(r.liquidated),
                      str(r.cascade_rounds) + ("" if r.converged else "+"),
                      _money(r.deficit_usd), _money(r.insurance_paid_usd), _money(r.adl_usd),
                      _money(r.uncovered_usd), _money(r.cover.cover_1),
                      _money(r.cover.cover_2), verdict)
    return table


def _rounds_table(result: ScenarioResult) -> Table:
    names = sorted(result.base_prices)
    table = Table(title=f"Cascade: {result.scenario.name}", header_style="bold")
    table.add_column("round", justify="right")
    for name in names:
        table.add_column(name, justify="right")
    for column in ("liquidated", "notional", "collateral sold", "of which cross-margin",
                   "deficit", "fund paid", "ADL", "fund left", "breaching"):
        table.add_column(column, justify="right")
    for r in result.rounds:
        prices = [f"{r.prices[n]:,.2f} ({_pct(r.impact.get(n, Decimal(0)))})" for n in names]
        sold = ", ".join(f"{a} {v:,.0f}" for a, v in r.collateral_sold_usd.items()) or "—"
        cross = ", ".join(f"{a} {v:,.0f}" for a, v in r.cross_margin_sold_usd.items()) or "—"
        table.add_row(str(r.round) if r.round else "0 (shock)", *prices,
                      str(len(r.accounts_liquidated)), _money(r.positions_notional_usd), sold,
                      cross, _money(r.deficit_usd), _money(r.insurance_paid_usd),
                      _money(r.adl_usd), _money(r.insurance_fund_left), str(r.breaching))
    return table


def _sales_table(result: ScenarioResult) -> Table:
    table = Table(title=f"Cross-margin sales: {result.scenario.name} (collateral sold for "
                        "losses on another underlying)", header_style="bold")
    for column in ("round", "account", "loss on", "loss", "sold", "amount", "proceeds"):
        table.add_column(column, justify="right" if column in
                         ("round", "loss", "amount", "proceeds") else "left")
    for x in result.cross_margin_sales:
        table.add_row(str(x.round), x.account_id, x.loss_underlying or "—", _money(x.loss_usd),
                      x.asset, format(x.amount, "f"), _money(x.proceeds_usd))
    return table


def _accounts_table(result: ScenarioResult, rows: Sequence[AccountOutcome],
                    total: int) -> Table:
    table = Table(title=f"Accounts: {result.scenario.name} ({len(rows)} of {total} hurt, "
                        "largest loss first)", header_style="bold")
    for column in ("account", "model", "equity before", "equity shocked", "maintenance",
                   "status", "round", "equity final", "loss", "deficit", "fund", "ADL",
                   "collateral sold"):
        table.add_column(column, justify="left" if column in
                         ("account", "model", "status", "collateral sold") else "right")
    for a in rows:
        sold = ", ".join(f"{asset} {amount}" for asset, amount in a.collateral_sold.items())
        table.add_row(a.account_id, a.model, _money(a.equity_before), _money(a.equity_shocked),
                      _money(a.maintenance_shocked), a.status_shocked,
                      "—" if a.liquidated_in_round is None else str(a.liquidated_in_round),
                      _money(a.equity_final), _money(a.loss), _money(a.deficit),
                      _money(a.insurance_paid), _money(a.adl + a.uncovered), sold or "—")
    return table


# ------------------------------------------------------------------ the HTML section


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _colour(name: str, index: int) -> str:
    return ASSET_COLOURS.get(name, OTHER_COLOURS[index % len(OTHER_COLOURS)])


def _nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values (1, 2, 2.5 or 5 x 10^k apart) covering [lo, hi]."""
    raw = (hi - lo) / max(count, 1)
    magnitude = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1.0
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.floor(lo / step) * step
    ticks = [first]
    while ticks[-1] < hi - 1e-9:
        ticks.append(ticks[-1] + step)
    return ticks


def cascade_svg(result: ScenarioResult, width: int = CHART_WIDTH,
                height: int = CHART_HEIGHT) -> str:
    """The cascade as an inline SVG: each underlying's price as % of its level before the
    shock (lines: before, the shock, then each round) and the accounts closed out in each
    round (bars, scaled to the largest); hovering a column shows its figures."""
    rounds = result.rounds
    names = [n for n in sorted(result.base_prices) if result.base_prices[n]]
    left, right, top, bottom = 48, 42, 14, 38
    x0, x1, y0, y1 = left, width - right, height - bottom, top
    slot = (x1 - x0) / (len(rounds) + 1)

    def x(column: int) -> float:  # column 0 is "before", column i + 1 is round i
        return x0 + slot * (column + 0.5)

    def level(r: CascadeRound, name: str) -> float:
        return float(r.prices[name] / result.base_prices[name]) * 100

    levels = [level(r, n) for r in rounds for n in names] + [100.0]
    pad = max((max(levels) - min(levels)) * 0.06, 0.5)
    ticks = _nice_ticks(min(levels) - pad, max(levels) + pad)
    lo, hi = ticks[0], ticks[-1]

    def y(value: float) -> float:
        return y0 - (y0 - y1) * (value - lo) / (hi - lo)

    most = max((len(r.accounts_liquidated) for r in rounds), default=0) or 1

    def bar_top(n: int) -> float:
        return y0 - (y0 - y1) * 0.5 * n / most

    out = [f'<svg class="plot" viewBox="0 0 {width} {height}" role="img" '
           f'aria-label="{_e("Cascade rounds: " + result.scenario.name)}">']
    for t in ticks:
        out.append(f'<line x1="{x0}" x2="{x1}" y1="{y(t):.1f}" y2="{y(t):.1f}" '
                   f'stroke="{GRID}" stroke-width="1"/><text x="{x0 - 6}" y="{y(t) + 4:.1f}" '
                   f'text-anchor="end" class="tick">{t:g}%</text>')
    out.append(f'<line x1="{x0}" x2="{x1}" y1="{y(100):.1f}" y2="{y(100):.1f}" '
               f'stroke="{MUTED}" stroke-width="1" stroke-dasharray="4 3"/>')
    labels = ["before", *("shock" if r.round == 0 else f"round {r.round}" for r in rounds)]
    for column, label in enumerate(labels):
        out.append(f'<text x="{x(column):.1f}" y="{y0 + 16}" text-anchor="middle" '
                   f'class="tick">{label}</text>')
    for i, r in enumerate(rounds):
        n = len(r.accounts_liquidated)
        if n:
            w = min(slot * 0.45, 36)
            out.append(f'<rect x="{x(i + 1) - w / 2:.1f}" y="{bar_top(n):.1f}" '
                       f'width="{w:.1f}" height="{y0 - bar_top(n):.1f}" '
                       f'fill="{LIQUIDATED_COLOUR}" fill-opacity="0.22"/><text '
                       f'x="{x(i + 1):.1f}" y="{bar_top(n) - 4:.1f}" text-anchor="middle" '
                       f'class="tick strong">{n}</text>')
    ends: list[tuple[float, float]] = []
    for k, name in enumerate(names):
        points = [(x(0), y(100.0))] + [(x(i + 1), y(level(r, name)))
                                       for i, r in enumerate(rounds)]
        path = "M" + " L".join(f"{px:.1f},{py:.1f}" for px, py in points)
        colour = _colour(name, k)
        out.append(f'<path d="{path}" fill="none" stroke="{colour}" stroke-width="2.2" '
                   'stroke-linejoin="round"/>')
        out.extend(f'<circle cx="{px:.1f}" cy="{py:.1f}" r="3.2" fill="{colour}"/>'
                   for px, py in points)
        ends.append((points[-1][1], level(rounds[-1], name)))
    placed: list[float] = []
    for end_y, value in sorted(ends):  # end labels top to bottom, never overlapping
        label_y = max(end_y + 4, placed[-1] + 12) if placed else end_y + 4
        placed.append(label_y)
        out.append(f'<text x="{x(len(rounds)) + 7:.1f}" y="{label_y:.1f}" '
                   f'class="tick strong">{value:.1f}%</text>')
    out.append(f'<line x1="{x0}" x2="{x1}" y1="{y0}" y2="{y0}" stroke="{MUTED}" '
               'stroke-width="1"/>')
    tips = [["before the shock"] + [f"{n} {result.base_prices[n]:,.2f}" for n in names]]
    for r in rounds:
        lines = ["the shock" if r.round == 0 else f"round {r.round}"]
        lines += [f"{n} {r.prices[n]:,.2f} ({_pct(r.impact.get(n, Decimal(0)))})"
                  for n in names]
        if r.round:
            lines.append(f"{len(r.accounts_liquidated)} closed out, notional "
                         f"{_money(r.positions_notional_usd)}")
            lines += [f"{a} collateral sold {v:,.2f} USD" for a, v in
                      r.collateral_sold_usd.items()]
            lines += [f"  of which cross-margin {a} {v:,.2f}" for a, v in
                      r.cross_margin_sold_usd.items()]
            lines.append(f"deficit {_money(r.deficit_usd)}, fund paid "
                         f"{_money(r.insurance_paid_usd)}, ADL {_money(r.adl_usd)}")
        lines.append(f"insurance fund left {_money(r.insurance_fund_left)}")
        lines.append(f"{r.breaching} breaching at these prices")
        tips.append(lines)
    for column, lines in enumerate(tips):
        out.append(f'<rect class="hover" x="{x(column) - slot / 2:.1f}" y="{y1}" '
                   f'width="{slot:.1f}" height="{y0 - y1}"><title>'
                   f'{_e(chr(10).join(lines))}</title></rect>')
    out.append("</svg>")
    return "".join(out)


def _legend(names: Sequence[str]) -> str:
    keys = [f'<span class="key"><svg width="18" height="10"><line x1="0" x2="18" y1="5" '
            f'y2="5" stroke="{_colour(n, k)}" stroke-width="2.5"/></svg>{_e(n)}, % of its '
            'price before the shock</span>' for k, n in enumerate(names)]
    keys.append(f'<span class="key"><svg width="12" height="10"><rect width="12" height="10" '
                f'fill="{LIQUIDATED_COLOUR}" fill-opacity="0.3"/></svg>accounts closed out'
                '</span>')
    return f'<div class="legend">{"".join(keys)}</div>'


def _card(label: str, value: str, sub: str, *, alert: bool = False,
          accent: str | None = None) -> str:
    style = f' style="border-top-color:{accent}"' if accent else ""
    return (f'<div class="card{" alert" if alert else ""}"{style}><div class="label">'
            f'{_e(label)}</div><div class="value">{_e(value)}</div><div class="sub">'
            f"{_e(sub)}</div></div>")


def _html_table(columns: Sequence[str], rows: Sequence[Sequence[str]],
                numeric_from: int) -> str:
    th = "".join(f'<th class="{"num" if i >= numeric_from else ""}">{_e(c)}</th>'
                 for i, c in enumerate(columns))
    body = "".join(
        "<tr>" + "".join(f'<td class="{"num" if i >= numeric_from else ""}'
                         f'{" neg" if str(v).startswith("-") and i >= numeric_from else ""}">'
                         f"{v if isinstance(v, _Raw) else _e(v)}</td>"
                         for i, v in enumerate(row)) + "</tr>" for row in rows)
    return (f'<div class="table-wrap"><table><thead><tr>{th}</tr></thead><tbody>{body}'
            "</tbody></table></div>")


class _Raw(str):
    """Cell content that is already HTML."""


def stress_html(report: StressReport, top: int = TOP_ACCOUNTS) -> str:
    """The stress report as an HTML fragment: verdict cards, the scenarios, a plot of each
    scenario's cascade rounds, the worst scenario's rounds, cross-margin sales and accounts."""
    worst = report.worst
    if worst is None:
        return '<p class="quiet">No scenario was run.</p>'
    cover = worst.cover
    spirals = [s for s in report.scenarios if s.cascade_rounds >= 2]
    cards = [
        _card("Cover-2 verdict", cover.verdict, f"{worst.scenario.name}: "
              + ("fund covers the two largest deficits" if cover.sufficient
                 else f"short by {cover.shortfall:,.2f}"),
              alert=not cover.sufficient, accent=None if not cover.sufficient
              else INSURANCE_COLOUR),
        _card("Cover-2 needed", f"{cover.cover_2:,.2f}",
              " + ".join(cover.cover_2_accounts) or "no deficit"),
        _card("Insurance fund", f"{report.insurance_fund:,.2f}", "balance before the stress",
              accent=INSURANCE_COLOUR),
        _card("Worst loss", f"{worst.loss_usd:,.2f}",
              f"{worst.liquidated} closed out in {worst.cascade_rounds} rounds"),
        _card("Spirals", str(len(spirals)), "scenarios with 2 or more cascade rounds",
              alert=bool(spirals)),
    ]
    parts = [f'<div class="cards">{"".join(cards)}</div>']
    rows = []
    for r in report.scenarios:
        badge = ('<span class="badge ok">sufficient</span>' if r.cover.sufficient else
                 f'<span class="badge bad">short {r.cover.shortfall:,.2f}</span>')
        final = ", ".join(f"{u} {_pct(r.final_prices[u] / r.base_prices[u] - 1)}"
                          for u in sorted(r.final_prices) if r.base_prices.get(u))
        rows.append((r.scenario.name, _moves(r.scenario), _vol(r.scenario), final,
                     f"{r.loss_usd:,.2f}", str(r.below_maintenance), str(r.liquidated),
                     str(r.cascade_rounds), f"{r.deficit_usd:,.2f}",
                     f"{r.insurance_paid_usd:,.2f}", f"{r.adl_usd:,.2f}",
                     f"{r.uncovered_usd:,.2f}", f"{r.cover.cover_1:,.2f}",
                     f"{r.cover.cover_2:,.2f}", _Raw(badge)))
    parts.append("<h3>Scenarios</h3>" + _html_table(
        ("scenario", "moves", "vol", "final prices", "loss", "below MM", "closed out",
         "rounds", "deficit", "fund covers", "ADL", "uncovered", "Cover-1", "Cover-2",
         "verdict"), rows, numeric_from=4))
    charted = [s for s in report.scenarios if s.cascade_rounds] or [worst]
    names = sorted({n for s in charted for n in s.base_prices})
    parts.append("<h3>Cascade rounds</h3>" + _legend(names))
    parts.append('<div style="display:grid;grid-template-columns:repeat(auto-fill,'
                 'minmax(320px,1fr));gap:14px">' + "".join(
                     f'<div class="chart"><div class="sub"><b>{_e(s.scenario.name)}</b> '
                     f'{_e(s.scenario.description)}</div>{cascade_svg(s)}</div>'
                     for s in charted) + "</div>")
    round_rows = []
    for r in worst.rounds:
        prices = ", ".join(f"{n} {r.prices[n]:,.2f} ({_pct(r.impact.get(n, Decimal(0)))})"
                           for n in sorted(r.prices))
        sold = ", ".join(f"{a} {v:,.0f}" for a, v in r.collateral_sold_usd.items()) or "—"
        cross = ", ".join(f"{a} {v:,.0f}" for a, v in r.cross_margin_sold_usd.items()) or "—"
        round_rows.append(("shock" if r.round == 0 else str(r.round), prices,
                           str(len(r.accounts_liquidated)), f"{r.positions_notional_usd:,.2f}",
                           sold, cross, f"{r.deficit_usd:,.2f}",
                           f"{r.insurance_paid_usd:,.2f}", f"{r.adl_usd:,.2f}",
                           f"{r.insurance_fund_left:,.2f}", str(r.breaching)))
    parts.append(f"<h3>Rounds of the worst scenario, {_e(worst.scenario.name)}</h3>"
                 + _html_table(("round", "prices (move)", "closed out", "notional",
                                "collateral sold", "cross-margin", "deficit", "fund paid",
                                "ADL", "fund left", "breaching"), round_rows, numeric_from=2))
    sales = [(s.scenario.name, x) for s in report.scenarios for x in s.cross_margin_sales]
    if sales:
        parts.append(f'<h3>Cross-margin sales <span class="count">{len(sales):,}</span></h3>'
                     '<p class="quiet">Collateral sold in a close-out caused by losses on '
                     "another underlying: the sale moves the collateral's own market.</p>"
                     + _html_table(
                         ("scenario", "round", "account", "loss on", "asset", "loss",
                          "amount", "proceeds"),
                         [(name, str(x.round), x.account_id, x.loss_underlying or "—",
                           x.asset, f"{x.loss_usd:,.2f}", format(x.amount, "f"),
                           f"{x.proceeds_usd:,.2f}") for name, x in sales[:TABLE_ROWS_MAX]],
                         numeric_from=5))
    hurt = affected(worst)
    if hurt:
        parts.append(f"<h3>Accounts hit hardest, {_e(worst.scenario.name)} "
                     f'<span class="count">{len(hurt):,}</span></h3>' + _html_table(
                         ("account", "model", "status at shock", "equity before",
                          "equity shocked", "maintenance", "round", "equity final", "loss",
                          "deficit"),
                         [(a.account_id, a.model, a.status_shocked, f"{a.equity_before:,.2f}",
                           f"{a.equity_shocked:,.2f}", f"{a.maintenance_shocked:,.2f}",
                           "—" if a.liquidated_in_round is None else str(a.liquidated_in_round),
                           f"{a.equity_final:,.2f}", f"{a.loss:,.2f}", f"{a.deficit:,.2f}")
                          for a in hurt[:top]], numeric_from=3))
    depth = ", ".join(f"{u} {v:,.0f}" for u, v in sorted(report.cascade.depth_usd.items()))
    parts.append(f'<p class="quiet">Price impact per round: -{report.cascade.impact_coefficient}'
                 f" × net USD sold / depth ({_e(depth)} USD), at most "
                 f"{float(report.cascade.round_move_max) * 100:.0f}% a round. Historical "
                 "scenarios are approximate close-to-close (or intraday) moves; see "
                 "<code>clearing stress --help</code>.</p>")
    return "".join(parts)


def stress_section(data: ReportData) -> str | None:
    """`clearing report --html`'s stress section: every shipped scenario on the book as of
    the report's time (None when no member holds anything to stress)."""
    try:
        report = stress_test(data.state, data.at, SHIPPED)
    except (MissingIndexPrice, MissingRiskParameter) as exc:
        return f'<p class="quiet">The book cannot be stressed yet: {_e(exc)}.</p>'
    if not report.accounts:
        return None
    return stress_html(report)
