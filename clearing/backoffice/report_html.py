"""`clearing report --html`: the report's data (see `report`) as one self-contained HTML page.

The page needs nothing from outside: CSS is inline, the plots are inline SVG written here,
there is no script, and a Content-Security-Policy forbids every fetch, so it reads the same
offline, attached to an e-mail or years later. The plots are hand-written SVG rather than
matplotlib: they need only lines, steps, bars and markers on a time axis; text stays text
(crisp at any zoom, searchable, in the page's font); tooltips come from SVG `<title>`
elements; and the page costs no plotting dependency and stays small.

The page is a list of sections (`SECTIONS`), each a function of the report's data returning
its HTML. That list is the extension point: a later section (the stress tests) joins the
page by adding a `Section` there, or a caller passes its own list to `render_page`.
"""

from __future__ import annotations

import html
import math
from bisect import bisect_right
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from clearing.backoffice.report import (
    AdlClose,
    Liquidation,
    MarginSample,
    PricePoint,
    Reconciliation,
    ReportData,
    Row,
    Table,
)
from clearing.backoffice.stress_report import STRESS_NOTE, stress_section
from clearing.domain.clock import format_time

# ------------------------------------------------------------------ palette and sizes

INK = "#1f2937"
MUTED = "#6b7280"
GRID = "#e5e7eb"
ASSET_COLOURS = {"BTC": "#f7931a", "ETH": "#627eea"}
OTHER_COLOURS = ("#0d9488", "#db2777", "#65a30d", "#9333ea")
EQUITY = "#2563eb"
INITIAL = "#f59e0b"
MAINTENANCE = "#dc2626"
RATIO_P90 = "#7c3aed"
INSURANCE = "#059669"
LIQUIDATION = "#dc2626"
ADL = "#7c3aed"
STATUS_COLOURS = {"restricted": "#f59e0b", "liquidating": "#dc2626", "bankrupt": "#111827"}

FULL_WIDTH = 1160
HALF_WIDTH = 560
TABLE_ROWS_SHOWN = 200
"""Rows shown per table on the page; the heading gives the full count."""
HOVER_BANDS_MAX = 400
"""Tooltip bands per chart (one per sample, thinned beyond this)."""


# ------------------------------------------------------------------ sections (extension point)


@dataclass(frozen=True)
class Section:
    """One part of the page: an anchor, a title, a short note under the title, and a function
    of the report's data returning the section's HTML (None leaves the section out).
    `wide=False` sections sit two abreast."""

    anchor: str
    title: str
    body: Callable[[ReportData], str | None]
    note: str = ""
    wide: bool = True


def render_page(data: ReportData, sections: Sequence[Section] | None = None) -> str:
    """The whole page as one string."""
    chosen = SECTIONS if sections is None else sections
    parts = []
    shown = []
    for section in chosen:
        body = section.body(data)
        if body is None:
            continue
        shown.append(section)
        note = f'<p class="note">{section.note}</p>' if section.note else ""
        parts.append(f'<section id="{section.anchor}" class="{"wide" if section.wide else "half"}'
                     f'"><h2>{_e(section.title)}</h2>{note}{body}</section>')
    nav = "".join(f'<a href="#{s.anchor}">{_e(s.title)}</a>' for s in shown)
    return PAGE.format(title=_e(_page_title(data)), css=CSS, header=_header(data), nav=nav,
                       sections="\n".join(parts), footer=_footer(data))


def _page_title(data: ReportData) -> str:
    return f"Clearing report — {_when(data.at)}"


# ------------------------------------------------------------------ the sections


def headline_section(data: ReportData) -> str:
    cur = data.current
    cards = []
    for asset, path in data.index_paths.items():
        if path:
            first, last = path[0].value, path[-1].value
            change = (last - first) / first if first else None
            cards.append(_card(f"{asset} index", _usd(last, 0),
                               f"{_signed_pct(change)} over the period",
                               accent=_asset_colour(asset)))
    open_usd = sum((r.notional_usd or Decimal(0) for r in data.open_interest), Decimal(0))
    breaks = sum(r.breaks for r in data.reconciliations.rows)
    under = cur.under_pressure if cur else 0
    cards += [
        _card("Member equity", _usd_compact(cur.equity_usd) if cur else "—",
              _equity_change(data), accent=EQUITY),
        _card("Margin utilisation", _pct(cur.initial_utilisation) if cur else "—",
              f"IM / equity · MM {_pct(cur.maintenance_utilisation)}" if cur else "",
              accent=INITIAL),
        _card("Open interest", _usd_compact(open_usd),
              _plural(len(data.open_interest), "instrument") + " open"),
        _card("Insurance fund", _usd_compact(data.insurance_fund_now), _fund_change(data),
              accent=INSURANCE),
        _card("Members", f"{data.members:,}",
              f"{cur.accounts_with_positions:,} with positions" if cur else ""),
        _card("Events", f"{data.facts:,}",
              f"of {data.head_position:,} in the log" if data.as_of else "in the log"),
        _card("Trades cleared", f"{data.trades:,}", f"{data.busted:,} busted"),
        _card("Margin calls", f"{data.margin_calls.total:,}",
              f"{under:,} below initial now", alert=under > 0),
        _card("Liquidations", f"{data.liquidations.total:,}",
              f"{_plural(data.adl_closes.total, 'ADL close')}",
              alert=data.liquidations.total > 0),
        _card("Reconciliation", _plural(breaks, "break"),
              f"in {_plural(data.reconciliations.total, 'run')}", alert=breaks > 0),
    ]
    return f'<div class="cards">{"".join(cards)}</div>'


def _plural(count: int, noun: str) -> str:
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


def index_section(data: ReportData) -> str | None:
    if not any(data.index_paths.values()) or data.start is None or data.end is None:
        return None
    charts = []
    for asset, path in data.index_paths.items():
        if not path:
            continue
        colour = _asset_colour(asset)
        points = [(p.at, float(p.value)) for p in path]
        markers = _event_markers(asset, path, data.liquidations, data.adl_closes)
        legend = [_legend_line(f"{asset} index (USD)", colour)]
        if any(m.colour == LIQUIDATION for m in markers):
            legend.append(_legend_marker("liquidation", LIQUIDATION, "down"))
        if any(m.colour == ADL for m in markers):
            legend.append(_legend_marker("auto-deleveraging", ADL, "diamond"))
        chart = time_chart([Line(f"{asset} index", points, colour, fill=True)],
                           start=data.start, end=data.end, width=FULL_WIDTH, height=250,
                           axis=MONEY, markers=markers,
                           label=f"{asset} index price in USD")
        charts.append(f'<div class="chart"><div class="legend">{"".join(legend)}</div>'
                      f"{chart}</div>")
    return "".join(charts)


def equity_section(data: ReportData) -> str | None:
    if len(data.samples) < 2 or data.start is None or data.end is None:
        return None
    points = [(s.at, float(s.equity_usd)) for s in data.samples]
    chart = time_chart([Line("member equity", points, EQUITY, fill=True)],
                       start=data.start, end=data.end, width=HALF_WIDTH, height=260,
                       axis=MONEY, label="member equity in USD")
    legend = _legend_line("Σ equity of member accounts (USD)", EQUITY)
    return f'<div class="legend">{legend}</div>{chart}'


def utilisation_section(data: ReportData) -> str | None:
    if len(data.samples) < 2 or data.start is None or data.end is None:
        return None
    lines = [
        Line("initial / equity", _series(data.samples, "initial_utilisation"), INITIAL),
        Line("maintenance / equity", _series(data.samples, "maintenance_utilisation"),
             MAINTENANCE),
        Line("p90 account margin ratio",
             [(s.at, None if s.margin_ratio_p90 is None else float(s.margin_ratio_p90))
              for s in data.samples], RATIO_P90, dash="5 4"),
    ]
    chart = time_chart(lines, start=data.start, end=data.end, width=HALF_WIDTH, height=260,
                       axis=PCT, zero_based=True, label="margin utilisation")
    legend = "".join(_legend_line(x.name, x.colour, x.dash) for x in lines)
    return f'<div class="legend">{legend}</div>{chart}'


def pressure_section(data: ReportData) -> str | None:
    if len(data.samples) < 2 or data.start is None or data.end is None:
        return None
    if not any(s.under_pressure for s in data.samples):
        return '<p class="quiet">Every account stayed at or above its initial margin at ' \
               'every sample.</p>'
    bars = [Bars(status, [(s.at, float(s.statuses.get(status, 0))) for s in data.samples],
                 colour) for status, colour in STATUS_COLOURS.items()]
    bars = [b for b in bars if any(v for _, v in b.points)]
    chart = time_chart([], bars=bars, start=data.start, end=data.end, width=FULL_WIDTH,
                       height=170, axis=COUNT, zero_based=True,
                       bar_width=data.sample_step, label="accounts below initial margin")
    legend = "".join(_legend_box(b.name, b.colour) for b in bars)
    return f'<div class="legend">{legend}</div>{chart}'


def insurance_section(data: ReportData) -> str | None:
    if not data.insurance_fund or data.start is None or data.end is None:
        return None
    points = [(p.at, float(p.value)) for p in data.insurance_fund]
    points.append((data.end, float(data.insurance_fund_now)))
    markers = [Marker(p.at, _value_at(data.insurance_fund, p.at), INSURANCE, "down",
                      f"{_when(p.at)}: paid {_usd(p.amount)} of {p.account_id}'s deficit "
                      f"{_usd(p.deficit)}")
               for p in data.insurance_payments.rows]
    chart = time_chart([Line("insurance fund", points, INSURANCE, step=True, fill=True)],
                       start=data.start, end=data.end, width=HALF_WIDTH, height=300,
                       axis=MONEY, zero_based=True, markers=markers,
                       label="insurance fund in USDC")
    legend = _legend_line("ccp:insurance balance (USDC)", INSURANCE)
    if markers:
        legend += _legend_marker("paid a bankrupt account's deficit", INSURANCE, "down")
    return f'<div class="legend">{legend}</div>{chart}'


def open_interest_section(data: ReportData) -> str | None:
    rows = [r for r in data.open_interest if r.notional_usd is not None]
    if not rows:
        return '<p class="quiet">No open positions.</p>'
    shown = rows[:OPEN_INTEREST_BARS]
    bars = [HBar(r.symbol, float(r.notional_usd or 0), _asset_colour(r.underlying),
                 f"{_usd_compact(r.notional_usd)} · {_qty_short(r.quantity)} open",
                 f"{r.symbol} ({r.kind}): {_qty(r.quantity)} open, notional "
                 f"{_usd(r.notional_usd)}, {r.holders} holders") for r in shown]
    rest = rows[OPEN_INTEREST_BARS:]
    if rest:
        total = sum((r.notional_usd or Decimal(0) for r in rest), Decimal(0))
        bars.append(HBar(f"{len(rest)} others", float(total), MUTED, _usd_compact(total),
                         ", ".join(r.symbol for r in rest)))
    underlyings = sorted({r.underlying for r in shown})
    legend = "".join(_legend_box(u, _asset_colour(u)) for u in underlyings)
    return f'<div class="legend">{legend}</div>' + bar_chart(bars, width=HALF_WIDTH)


OPEN_INTEREST_BARS = 14


def default_section(data: ReportData) -> str:
    parts = []
    parts.append(_table(
        "Positions liquidated", data.liquidations,
        ("time", "account", "instrument", "quantity", "mark price", "notional", "fee",
         "equity before", "maintenance before"),
        lambda r: (_when(r.at), r.account_id, r.instrument, _qty(r.quantity),
                   _price(r.mark_price), _usd(r.notional), _usdc(r.fee),
                   _usd(r.equity_before), _usd(r.maintenance_before)),
        numeric_from=3, empty="No position was liquidated."))
    parts.append(_table(
        "Auto-deleveraging closes", data.adl_closes,
        ("time", "bankrupt account", "counterparty", "instrument", "quantity",
         "bankruptcy price", "mark price", "amount", "score"),
        lambda r: (_when(r.at), r.bankrupt_account, r.counterparty, r.instrument,
                   _qty(r.quantity), _price(r.bankruptcy_price), _price(r.mark_price),
                   _usdc(r.amount), f"{r.score:.4f}"),
        numeric_from=4, empty="No position was auto-deleveraged."))
    if data.insurance_payments.total:
        parts.append(_table(
            "Insurance fund payments", data.insurance_payments,
            ("time", "account", "deficit", "paid", "fund before"),
            lambda r: (_when(r.at), r.account_id, _usdc(r.deficit), _usdc(r.amount),
                       _usdc(r.fund_before)), numeric_from=2, empty=""))
    if data.losses.total:
        parts.append(_table(
            "Losses borne by the clearing house", data.losses,
            ("time", "account", "amount"),
            lambda r: (_when(r.at), r.account_id, _usdc(r.amount)), numeric_from=2,
            empty=""))
    return "".join(parts)


def margin_calls_section(data: ReportData) -> str:
    return _table(
        "Margin calls", data.margin_calls,
        ("time", "account", "equity", "initial requirement", "shortfall"),
        lambda r: (_when(r.at), r.account_id, _usd(r.equity), _usd(r.initial),
                   _usd(r.shortfall)), numeric_from=2, empty="No margin call was issued.",
        heading=False)


def reconciliation_section(data: ReportData) -> str:
    def row(r: Reconciliation) -> tuple[str, ...]:
        badge = (f'<span class="badge bad">{r.breaks:,}</span>' if r.breaks
                 else '<span class="badge ok">0</span>')
        return (_when(r.at), r.kind, r.file_name, f"{r.rows:,}", f"{r.matched:,}",
                _Raw(badge), format(r.tolerance, "f"), f"{r.ledger_position:,}",
                _Raw(f'<code title="{r.file_sha256}">{r.file_sha256[:12]}…</code>'))

    return _table(
        "Reconciliation runs", data.reconciliations,
        ("run at", "statement", "file", "lines", "matched", "breaks", "tolerance",
         "ledger position", "file SHA-256"),
        row, numeric_from=3, empty="No reconciliation has been run.", heading=False)


SECTIONS: list[Section] = [
    Section("headline", "Headline figures", headline_section),
    Section("index", "Index prices", index_section,
            "Hover a marker for the positions closed there. Markers sit on the index path "
            "at the moment of the liquidation or auto-deleveraging close."),
    Section("equity", "Member equity", equity_section,
            "Σ equity of every member account (collateral after haircuts, unrealised "
            "variation margin, option value), sampled through the history.", wide=False),
    Section("utilisation", "Margin utilisation", utilisation_section,
            "Σ requirement / Σ equity over member accounts. The dashed line is the 90th "
            "percentile of accounts' margin ratio (maintenance / equity): at 100% an "
            "account is liquidated.", wide=False),
    Section("pressure", "Accounts under margin pressure", pressure_section,
            "Accounts below their initial requirement at each sample, by status."),
    Section("insurance", "Insurance fund", insurance_section,
            "The fund's USDC balance: liquidation fees in, bankrupt accounts' deficits out.",
            wide=False),
    Section("open-interest", "Open interest", open_interest_section,
            "Open long quantity per instrument, valued at its underlying's index price.",
            wide=False),
    Section("default", "Liquidations and auto-deleveraging", default_section,
            "Every default-management fact in the log, with the figures it was decided on."),
    Section("margin-calls", "Margin calls", margin_calls_section),
    Section("reconciliation", "Reconciliation runs", reconciliation_section,
            "Each comparison with an external statement, as recorded in the log; "
            "<code>clearing reconcile</code> lists the breaks themselves."),
    Section("stress", "Stress tests", stress_section, STRESS_NOTE),
    # EXTENSION POINT: add a Section here (e.g. Section("stress", "Stress tests", body))
    # for a new part of the page; `body(data)` gets `data.state` (the ledger as of
    # `data.at`) to value the book itself, and returns its HTML or None.
]


# ------------------------------------------------------------------ header, footer, tables


def _header(data: ReportData) -> str:
    span = ""
    if data.start is not None and data.end is not None:
        span = f"History {_when(data.start)} → {_when(data.end)}"
    as_of = f"as of {_when(data.as_of)}" if data.as_of else "everything recorded"
    return (f'<div class="eyebrow">clearing report</div>'
            f"<h1>Clearing house: state and history</h1>"
            f'<div class="meta"><span>{_e(as_of)}, valued at {_e(_when(data.at))}</span>'
            f"<span>{_e(span)}</span>"
            f"<span>log position {data.head_position:,}"
            + (f' · hash <code>{_e((data.head_hash or "")[:16])}…</code>'
               if data.head_hash else "") + "</span></div>")


def _footer(data: ReportData) -> str:
    late = (f" {data.late_facts:,} facts were recorded out of time order; the samples were "
            "folded a second time to place them." if data.late_facts else "")
    return (f"Generated {_e(format_time(data.generated_at))} by <code>clearing report</code> "
            f"from the log up to position {data.head_position:,}"
            + (f" (chain hash <code>{_e(data.head_hash or '')}</code>)" if data.head_hash
               else "")
            + f". Margin figures are sampled every {_e(_duration(data.sample_step))}, each "
            "the ledger as <code>clearing replay --as-of</code> rebuilds it at that moment, "
            f"valued with the risk parameters then in force.{late} The page reads nothing "
            "from the network and wrote nothing to the ledger.")


RED_WHEN_NEGATIVE = {"equity", "equity before", "amount", "paid", "fund before"}
"""Money columns where a negative figure is a warning (not quantities: a short is fine)."""


class _Raw(str):
    """Cell content that is already HTML."""


def _table(title: str, table: Table[Row], columns: Sequence[str],
           cells: Callable[[Row], Sequence[str]], *, numeric_from: int, empty: str,
           heading: bool = True) -> str:
    head = ""
    if heading:
        head = f'<h3>{_e(title)} <span class="count">{table.total:,}</span></h3>'
    if not table.total:
        return head + (f'<p class="quiet">{_e(empty)}</p>' if empty else "")
    rows = table.rows[:TABLE_ROWS_SHOWN]
    th = "".join(f'<th class="{"num" if i >= numeric_from else ""}">{_e(c)}</th>'
                 for i, c in enumerate(columns))
    body = []
    for r in rows:
        tds = []
        for i, value in enumerate(cells(r)):
            text = value if isinstance(value, _Raw) else _e(value)
            css = "num" if i >= numeric_from else ""
            if columns[i] in RED_WHEN_NEGATIVE and text.startswith("-"):
                css += " neg"
            tds.append(f'<td class="{css}">{text}</td>')
        body.append(f"<tr>{''.join(tds)}</tr>")
    more = ""
    if table.total > len(rows):
        more = (f'<p class="quiet">Showing the first {len(rows):,} of {table.total:,}; '
                "<code>clearing events --type …</code> lists them all.</p>")
    return (f'{head}<div class="table-wrap"><table><thead><tr>{th}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table></div>{more}")


def _card(label: str, value: str, sub: str = "", *, alert: bool = False,
          accent: str | None = None) -> str:
    style = f' style="border-top-color:{accent}"' if accent else ""
    return (f'<div class="card{" alert" if alert else ""}"{style}>'
            f'<div class="label">{_e(label)}</div><div class="value">{_e(value)}</div>'
            f'<div class="sub">{_e(sub)}</div></div>')


def _equity_change(data: ReportData) -> str:
    if not data.samples or data.current is None:
        return ""
    first = data.samples[0].equity_usd
    if not first:
        return ""
    return f"{_signed_pct((data.current.equity_usd - first) / first)} since the start"


def _fund_change(data: ReportData) -> str:
    paid = sum((p.amount for p in data.insurance_payments.rows), Decimal(0))
    return f"{_usd_compact(paid)} paid out" if paid else "nothing paid out"


def _event_markers(asset: str, path: list[PricePoint], liquidations: Table[Liquidation],
                   closes: Table[AdlClose]) -> list[Marker]:
    """One marker per moment and kind (several positions closed in one run share it)."""
    grouped: dict[tuple[datetime, str], list[Liquidation | AdlClose]] = {}
    rows: list[Liquidation | AdlClose] = [*liquidations.rows, *closes.rows]
    for row in rows:
        if row.underlying == asset:
            kind = "liq" if isinstance(row, Liquidation) else "adl"
            grouped.setdefault((row.at, kind), []).append(row)
    markers = []
    for (at, kind), group in sorted(grouped.items()):
        value = _value_at(path, at)
        if kind == "liq":
            lines = [f"{r.account_id} {_qty(r.quantity)} {r.instrument} at "
                     f"{_price(r.mark_price)}, fee {_usdc(r.fee)}" for r in group
                     if isinstance(r, Liquidation)]
            title = f"{_when(at)}: {len(group)} liquidated\n" + _lines(lines)
            markers.append(Marker(at, value, LIQUIDATION, "down", title, len(group)))
        else:
            lines = [f"{r.counterparty} {_qty(r.quantity)} {r.instrument} against "
                     f"{r.bankrupt_account} at {_price(r.bankruptcy_price)}" for r in group
                     if isinstance(r, AdlClose)]
            title = f"{_when(at)}: {len(group)} auto-deleveraged\n" + _lines(lines)
            markers.append(Marker(at, value, ADL, "diamond", title, len(group)))
    return markers


TOOLTIP_LINES_MAX = 20


def _lines(lines: Sequence[str]) -> str:
    shown = "\n".join(lines[:TOOLTIP_LINES_MAX])
    more = len(lines) - TOOLTIP_LINES_MAX
    return shown + (f"\n… and {more} more (see the table below)" if more > 0 else "")


def _value_at(path: Sequence[PricePoint], at: datetime) -> float:
    """The path's value at `at`, linearly interpolated, so a marker sits on the line."""
    times = [p.at for p in path]
    i = bisect_right(times, at)
    if i == 0:
        return float(path[0].value)
    if i == len(path):
        return float(path[-1].value)
    a, b = path[i - 1], path[i]
    span = (b.at - a.at).total_seconds()
    if not span:
        return float(b.value)
    w = (at - a.at).total_seconds() / span
    return float(a.value) * (1 - w) + float(b.value) * w


def _series(samples: Sequence[MarginSample],
            name: str) -> list[tuple[datetime, float | None]]:
    values = []
    for s in samples:
        value = getattr(s, name)
        values.append((s.at, None if value is None else float(value)))
    return values


# ------------------------------------------------------------------ SVG charts


@dataclass(frozen=True)
class Line:
    name: str
    points: Sequence[tuple[datetime, float | None]]
    """None leaves a gap."""
    colour: str
    step: bool = False
    fill: bool = False
    dash: str | None = None


@dataclass(frozen=True)
class Bars:
    """Stacked bars on the time axis, one per point, `bar_width` wide."""

    name: str
    points: Sequence[tuple[datetime, float]]
    colour: str


@dataclass(frozen=True)
class Marker:
    at: datetime
    value: float
    colour: str
    shape: str
    """`down` (a triangle pointing at the value) or `diamond`."""
    tooltip: str
    count: int = 1


@dataclass(frozen=True)
class HBar:
    label: str
    value: float
    colour: str
    text: str
    tooltip: str


PLOT_LEFT = 64
PLOT_RIGHT = 16
PLOT_TOP = 14
PLOT_BOTTOM = 40


def time_chart(lines: Sequence[Line], *, start: datetime, end: datetime, width: int,
               height: int, axis: str,
               zero_based: bool = False, markers: Sequence[Marker] = (),
               bars: Sequence[Bars] = (), bar_width: timedelta | None = None,
               label: str = "") -> str:
    """Lines, stacked bars and markers over a time axis, as an inline SVG element."""
    x0, x1 = PLOT_LEFT, width - PLOT_RIGHT
    y0, y1 = height - PLOT_BOTTOM, PLOT_TOP
    if end <= start:
        end = start + timedelta(hours=1)
    span_s = (end - start).total_seconds()

    def x(at: datetime) -> float:
        return x0 + (x1 - x0) * (at - start).total_seconds() / span_s

    values = [v for line in lines for _, v in line.points if v is not None]
    values += [m.value for m in markers]
    stacks: dict[datetime, float] = {}
    for b in bars:
        for at, v in b.points:
            stacks[at] = stacks.get(at, 0.0) + v
    values += list(stacks.values())
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    if zero_based:
        lo = min(lo, 0.0)
    if hi == lo:
        hi = lo + (abs(lo) * 0.1 or 1.0)
    pad = (hi - lo) * 0.06
    lo_padded = lo if zero_based and lo == 0 else lo - pad
    hi_padded = hi + pad
    # Room for the markers: triangles and their counts stand above the line, diamonds below.
    if any(m.shape == "down" for m in markers):
        hi_padded = max(hi_padded, max(m.value for m in markers) + (hi - lo) * 0.2)
    if any(m.shape == "diamond" for m in markers):
        lo_padded = min(lo_padded, min(m.value for m in markers) - (hi - lo) * 0.25)
    ticks, step = nice_ticks(lo_padded, hi_padded, max(3, (y0 - y1) // 45),
                             step_min=1.0 if axis == COUNT else 0.0)
    lo, hi = ticks[0], ticks[-1]

    def y(value: float) -> float:
        return y0 - (y0 - y1) * (value - lo) / (hi - lo)

    out = [(f'<svg class="plot" viewBox="0 0 {width} {height}" role="img" '
            f'aria-label="{_e(label)}">')]
    for t, text in zip(ticks, axis_labels(axis, ticks, step), strict=True):
        out.append(f'<line x1="{x0}" x2="{x1}" y1="{y(t):.1f}" y2="{y(t):.1f}" '
                   f'stroke="{GRID}" stroke-width="1"/>')
        out.append(f'<text x="{x0 - 8}" y="{y(t) + 4:.1f}" text-anchor="end" '
                   f'class="tick">{_e(text)}</text>')
    for at, text, strong in time_ticks(start, end, max(3, (x1 - x0) // 105)):
        xt = x(at)
        out.append(f'<line x1="{xt:.1f}" x2="{xt:.1f}" y1="{y1}" y2="{y0}" stroke="{GRID}" '
                   f'stroke-width="1" stroke-dasharray="{"" if strong else "2 3"}"/>')
        for n, part in enumerate(text.split("\n")):
            out.append(f'<text x="{xt:.1f}" y="{y0 + 16 + 13 * n}" text-anchor="middle" '
                       f'class="tick{" strong" if strong and n else ""}">{_e(part)}</text>')
    if bars:
        out.extend(_bars_svg(bars, x, y, bar_width))
    for line in lines:
        out.extend(_line_svg(line, x, y, y0))
    out.append(f'<line x1="{x0}" x2="{x1}" y1="{y0}" y2="{y0}" stroke="{MUTED}" '
               'stroke-width="1"/>')
    if lines:
        out.extend(_hover_bands(lines, x, y1, y0, axis))
    clustered = cluster_markers(markers, x)
    counted = counts_shown(clustered, x)
    for i, m in enumerate(clustered):
        out.append(_marker_svg(m, x(m.at), y(m.value), show_count=i in counted))
    out.append("</svg>")
    return "".join(out)


def _line_svg(line: Line, x: Callable[[datetime], float], y: Callable[[float], float],
              base: float) -> list[str]:
    runs: list[list[tuple[float, float]]] = [[]]
    previous: float | None = None
    for at, value in line.points:
        if value is None:
            if runs[-1]:
                runs.append([])
            previous = None
            continue
        px, py = x(at), y(value)
        if line.step and previous is not None:
            runs[-1].append((px, previous))
        runs[-1].append((px, py))
        previous = py
    out = []
    for run in (r for r in runs if r):
        d = "M" + " L".join(f"{px:.1f},{py:.1f}" for px, py in run)
        if line.fill:
            area = d + f" L{run[-1][0]:.1f},{base} L{run[0][0]:.1f},{base} Z"
            out.append(f'<path d="{area}" fill="{line.colour}" fill-opacity="0.10" '
                       'stroke="none"/>')
        dash = f' stroke-dasharray="{line.dash}"' if line.dash else ""
        out.append(f'<path d="{d}" fill="none" stroke="{line.colour}" stroke-width="2" '
                   f'stroke-linejoin="round" stroke-linecap="round"{dash}/>')
    return out


def _bars_svg(bars: Sequence[Bars], x: Callable[[datetime], float],
              y: Callable[[float], float], width: timedelta | None) -> list[str]:
    out = []
    base: dict[datetime, float] = {}
    for b in bars:
        for at, value in b.points:
            if not value:
                continue
            bottom = base.get(at, 0.0)
            top = bottom + value
            base[at] = top
            left = x(at - width / 2) if width else x(at) - 2
            right = x(at + width / 2) if width else x(at) + 2
            w = max(1.5, right - left - 1)
            out.append(f'<rect x="{left:.1f}" y="{y(top):.1f}" width="{w:.1f}" '
                       f'height="{max(0.5, y(bottom) - y(top)):.1f}" fill="{b.colour}">'
                       f"<title>{_e(_when(at))}: {value:g} {_e(b.name)}</title></rect>")
    return out


def _hover_bands(lines: Sequence[Line], x: Callable[[datetime], float], top: float,
                 bottom: float, axis: str) -> list[str]:
    """Invisible bands, one per sample, whose tooltip lists every line's value there."""
    moments = sorted({at for line in lines for at, _ in line.points})
    if len(moments) > HOVER_BANDS_MAX:
        stride = math.ceil(len(moments) / HOVER_BANDS_MAX)
        moments = moments[::stride]
    lookup = [dict(line.points) for line in lines]
    xs = [x(at) for at in moments]
    out = []
    for i, at in enumerate(moments):
        left = (xs[i - 1] + xs[i]) / 2 if i else xs[i]
        right = (xs[i] + xs[i + 1]) / 2 if i + 1 < len(xs) else xs[i]
        if right - left < 0.5:
            continue
        text = [_when(at)]
        for line, values in zip(lines, lookup, strict=True):
            value = values.get(at)
            if value is not None:
                text.append(f"{line.name}: {hover_value(axis, value)}")
        out.append(f'<rect class="hover" x="{left:.1f}" y="{top}" width="{right - left:.1f}" '
                   f'height="{bottom - top}"><title>{_e(chr(10).join(text))}</title></rect>')
    return out


def hover_value(axis: str, value: float) -> str:
    if axis == PCT:
        return f"{value * 100:.2f}%"
    if axis == COUNT:
        return f"{value:,.0f}"
    return f"{value:,.2f}"


MARKER_GAP_PX = 14
"""Markers of one kind closer than this merge into one, with the sum of their counts."""


def cluster_markers(markers: Sequence[Marker], x: Callable[[datetime], float]) -> list[Marker]:
    """Merge markers of one kind that would overlap: the first one's place (above the highest
    value for triangles, below the lowest for diamonds), every tooltip, the total count."""
    merged: list[Marker] = []
    for m in sorted(markers, key=lambda m: (m.shape, m.colour, m.at)):
        last = merged[-1] if merged else None
        if last is None or (last.shape, last.colour) != (m.shape, m.colour) \
                or x(m.at) - x(last.at) >= MARKER_GAP_PX:
            merged.append(m)
            continue
        value = max(last.value, m.value) if m.shape == "down" else min(last.value, m.value)
        tooltip = last.tooltip + "\n\n" + m.tooltip
        if tooltip.count("\n") > TOOLTIP_LINES_MAX * 2:
            tooltip = last.tooltip if last.tooltip.endswith("…") else last.tooltip + "\n…"
        merged[-1] = Marker(last.at, value, m.colour, m.shape, tooltip, last.count + m.count)
    return merged


COUNT_LABEL_GAP_PX = 28


def counts_shown(markers: Sequence[Marker], x: Callable[[datetime], float]) -> set[int]:
    """Which markers' counts (×N) are written: the largest first, none crowding another of
    its kind."""
    shown: set[int] = set()
    order = sorted(range(len(markers)), key=lambda i: -markers[i].count)
    for i in order:
        m = markers[i]
        if m.count < 2:
            break
        if all(markers[j].shape != m.shape
               or abs(x(markers[j].at) - x(m.at)) >= COUNT_LABEL_GAP_PX for j in shown):
            shown.add(i)
    return shown


def _marker_svg(m: Marker, px: float, py: float, *, show_count: bool = True) -> str:
    if m.shape == "diamond":  # below the line, so it never hides a liquidation above it
        cy = py + 11
        shape = (f'<path d="M{px:.1f},{cy - 7:.1f} L{px + 6:.1f},{cy:.1f} L{px:.1f},'
                 f'{cy + 7:.1f} L{px - 6:.1f},{cy:.1f} Z"')
        label_y = cy + 19
    else:
        tip = py - 3
        shape = (f'<path d="M{px:.1f},{tip:.1f} L{px - 6.5:.1f},{tip - 11:.1f} '
                 f'L{px + 6.5:.1f},{tip - 11:.1f} Z"')
        label_y = tip - 14
    count = (f'<text x="{px:.1f}" y="{label_y:.1f}" text-anchor="middle" class="mark-count" '
             f'style="fill:{m.colour}">×{m.count}</text>' if m.count > 1 and show_count else "")
    return (f'<g class="marker"><title>{_e(m.tooltip)}</title>{shape} fill="{m.colour}" '
            f'stroke="#fff" stroke-width="1.2"/>{count}</g>')


def bar_chart(bars: Sequence[HBar], *, width: int) -> str:
    """Horizontal bars with their labels, largest first as given."""
    label_w, text_w, row_h = 170, 150, 24
    height = PLOT_TOP + row_h * len(bars) + 8
    x0, x1 = label_w, width - text_w
    top = max((b.value for b in bars), default=1.0) or 1.0
    out = [(f'<svg class="plot" viewBox="0 0 {width} {height}" role="img" '
            'aria-label="open interest by instrument">')]
    for i, b in enumerate(bars):
        yb = PLOT_TOP + i * row_h
        w = max(2.0, (x1 - x0) * b.value / top)
        out.append(f'<g class="bar"><title>{_e(b.tooltip)}</title>'
                   f'<text x="{x0 - 8}" y="{yb + 15}" text-anchor="end" class="bar-label">'
                   f"{_e(b.label)}</text>"
                   f'<rect x="{x0}" y="{yb + 3}" width="{w:.1f}" height="{row_h - 7}" rx="3" '
                   f'fill="{b.colour}"/>'
                   f'<text x="{x0 + w + 6:.1f}" y="{yb + 15}" class="tick">{_e(b.text)}</text>'
                   "</g>")
    out.append("</svg>")
    return "".join(out)


# ------------------------------------------------------------------ axes


def nice_ticks(lo: float, hi: float, count: int,
               step_min: float = 0.0) -> tuple[list[float], float]:
    """Round tick values covering [lo, hi] with about `count` intervals (1, 2, 2.5, 5 × 10^k),
    none closer than `step_min` (1 for counts of things)."""
    raw = max((hi - lo) / max(1, count), step_min)
    power = 10 ** math.floor(math.log10(raw))
    mantissas = (1, 2, 5, 10) if step_min else (1, 2, 2.5, 5, 10)
    step = next(m * power for m in mantissas if m * power >= raw)
    first = math.floor(lo / step) * step
    ticks = []
    value = first
    while value < hi + step * 0.999:
        ticks.append(round(value, 12))
        value += step
    if len(ticks) < 2:
        ticks.append(first + step)
    return ticks, step


TIME_STEPS = (timedelta(hours=1), timedelta(hours=2), timedelta(hours=3),
              timedelta(hours=6), timedelta(hours=12), timedelta(days=1), timedelta(days=2),
              timedelta(days=7), timedelta(days=14), timedelta(days=28), timedelta(days=91),
              timedelta(days=364))
MONDAY = datetime(1970, 1, 5, tzinfo=UTC)


def time_ticks(start: datetime, end: datetime,
               count: int) -> list[tuple[datetime, str, bool]]:
    """Ticks at round UTC times, about `count` of them: (time, label, starts a new day)."""
    span = end - start
    step = next((s for s in TIME_STEPS if span / s <= count), TIME_STEPS[-1])
    moment = MONDAY + step * math.ceil((start - MONDAY) / step)
    ticks = []
    previous_day = None
    while moment <= end:
        if step < timedelta(days=1):
            new_day = moment.date() != previous_day
            label = moment.strftime("%H:%M") + ("\n" + moment.strftime("%a %d %b")
                                                if new_day else "")
            ticks.append((moment, label, new_day))
            previous_day = moment.date()
        elif step < timedelta(days=7):
            ticks.append((moment, moment.strftime("%a\n%d %b"), True))
        else:
            new_year = not ticks or moment.year != ticks[-1][0].year
            ticks.append((moment, moment.strftime("%d %b") + (moment.strftime("\n%Y")
                                                             if new_year else ""), new_year))
        moment += step
    return ticks


MONEY = "money"
PCT = "pct"
COUNT = "count"


def axis_labels(axis: str, ticks: Sequence[float], step: float) -> list[str]:
    """Tick labels in one unit for the whole axis (k, M or B for money; percent) with just
    enough decimals to tell neighbouring ticks apart."""
    if axis == PCT:
        return [f"{t * 100:.{_decimals(step * 100)}f}%" for t in ticks]
    if axis == COUNT:
        return [f"{t:,.{_decimals(step)}f}" for t in ticks]
    top = max(abs(t) for t in ticks)
    unit, suffix = next(((u, s) for u, s in ((1e9, "B"), (1e6, "M"), (1e3, "k"))
                         if top >= u * (10 if u == 1e3 else 1)), (1.0, ""))
    return [f"{t / unit:,.{_decimals(step / unit)}f}{suffix}" if t else "0" for t in ticks]


def _decimals(step: float) -> int:
    """Decimals that show a multiple of `step` exactly (2.5 needs one, 0.25 two)."""
    for decimals in range(7):
        if abs(step * 10 ** decimals - round(step * 10 ** decimals)) < 1e-6:
            return decimals
    return 6


# ------------------------------------------------------------------ legends


def _legend_line(name: str, colour: str, dash: str | None = None) -> str:
    dashed = f' stroke-dasharray="{dash}"' if dash else ""
    return (f'<span class="key"><svg width="22" height="10" aria-hidden="true"><line x1="1" '
            f'x2="21" y1="5" y2="5" stroke="{colour}" stroke-width="2.5"{dashed}/></svg>'
            f"{_e(name)}</span>")


def _legend_box(name: str, colour: str) -> str:
    return (f'<span class="key"><svg width="12" height="12" aria-hidden="true"><rect '
            f'width="12" height="12" rx="2" fill="{colour}"/></svg>{_e(name)}</span>')


def _legend_marker(name: str, colour: str, shape: str) -> str:
    path = "M6,1 L11,6 L6,11 L1,6 Z" if shape == "diamond" else "M6,11 L0.5,1 L11.5,1 Z"
    return (f'<span class="key"><svg width="12" height="12" aria-hidden="true"><path '
            f'd="{path}" fill="{colour}"/></svg>{_e(name)}</span>')


def _asset_colour(asset: str) -> str:
    if asset in ASSET_COLOURS:
        return ASSET_COLOURS[asset]
    return OTHER_COLOURS[sum(map(ord, asset)) % len(OTHER_COLOURS)]


# ------------------------------------------------------------------ text


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _when(at: datetime | None) -> str:
    if at is None:
        return ""
    at = at.astimezone(UTC)
    return at.strftime("%a %d %b %Y %H:%M UTC")


def _duration(step: timedelta) -> str:
    hours = step.total_seconds() / 3600
    if hours < 24:
        return f"{hours:g} hour" + ("s" if hours != 1 else "")
    days = hours / 24
    return f"{days:g} day" + ("s" if days != 1 else "")


def _usd(value: Decimal | None, decimals: int = 2) -> str:
    """A USD figure (equity, a requirement, a notional) with thousands separators."""
    if value is None:
        return "—"
    return f"{value:,.{decimals}f}"


def _usdc(value: Decimal) -> str:
    """An amount posted in USDC, exactly: to the cent, or to the micro-dollar when it holds
    less (a rounding residual of 0.000002 shows as such, not as 0.00)."""
    digits = max(2, -int(value.normalize().as_tuple().exponent))
    return f"{value:,.{min(digits, 6)}f}"


def _usd_compact(value: Decimal | None) -> str:
    if value is None:
        return "—"
    v = float(value)
    for unit, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= unit:
            return f"${v / unit:,.2f}{suffix}" if abs(v) < unit * 100 else \
                f"${v / unit:,.1f}{suffix}"
    return f"${v:,.2f}"


def _qty_short(value: Decimal) -> str:
    """A quantity for a label: at most two decimals."""
    return _qty(value.quantize(Decimal("0.01")).normalize())


def _price(value: Decimal) -> str:
    return f"{value:,.2f}" if abs(value) >= 100 else _qty(value)


def _qty(value: Decimal) -> str:
    if value == value.to_integral_value():
        return f"{value:,.0f}"
    text = format(value.normalize(), "f")
    whole, _, frac = text.partition(".")
    return f"{int(whole):,}.{frac}" if whole not in ("-0",) else f"-0.{frac}"


def _pct(value: Decimal | None) -> str:
    return "—" if value is None else f"{float(value) * 100:.1f}%"


def _signed_pct(value: Decimal | None) -> str:
    return "—" if value is None else f"{float(value) * 100:+.1f}%"


# ------------------------------------------------------------------ the page

CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"

PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{csp}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="clearing report">
<title>{title}</title>
<style>{css}</style>
</head>
<body>
<header><div class="inner">{header}</div></header>
<nav><div class="inner">{nav}</div></nav>
<main>
{sections}
</main>
<footer><div class="inner">{footer}</div></footer>
</body>
</html>
""".replace("{csp}", CSP)

CSS = """
*{box-sizing:border-box}
body{margin:0;background:#f1f5f9;color:#1f2937;font:14px/1.45 system-ui,-apple-system,
"Segoe UI",Roboto,"Helvetica Neue",Arial,"Noto Sans",sans-serif}
code{font:12px ui-monospace,SFMono-Regular,Menlo,Consolas,"Liberation Mono",monospace}
.inner{max-width:1240px;margin:0 auto;padding:0 24px}
header{background:linear-gradient(120deg,#0f172a,#1e293b);color:#f8fafc;padding:26px 0 22px}
header h1{margin:2px 0 8px;font-size:26px;font-weight:650;letter-spacing:-.01em}
header .eyebrow{font-size:12px;text-transform:uppercase;letter-spacing:.12em;color:#94a3b8}
header .meta{display:flex;flex-wrap:wrap;gap:6px 22px;color:#cbd5e1;font-size:13px}
header code{color:#e2e8f0}
nav{background:#fff;border-bottom:1px solid #e2e8f0;position:sticky;top:0;z-index:2}
nav .inner{display:flex;flex-wrap:wrap;gap:2px 18px;padding-top:9px;padding-bottom:9px}
nav a{color:#334155;text-decoration:none;font-size:13px}
nav a:hover{color:#2563eb}
main{max-width:1240px;margin:0 auto;padding:18px 24px 8px;display:grid;
grid-template-columns:1fr 1fr;gap:18px}
section{background:#fff;border:1px solid #e2e8f0;border-radius:12px;padding:18px 20px 16px;
min-width:0}
section.wide{grid-column:1 / -1}
section#headline{background:none;border:0;padding:0}
h2{margin:0 0 2px;font-size:17px;font-weight:650;color:#0f172a}
h3{margin:18px 0 8px;font-size:14px;font-weight:650;color:#0f172a}
h3:first-child{margin-top:6px}
h3 .count{display:inline-block;min-width:22px;padding:0 7px;margin-left:4px;border-radius:10px;
background:#f1f5f9;color:#475569;font-size:12px;text-align:center}
p.note{margin:0 0 10px;color:#64748b;font-size:13px}
p.quiet{color:#64748b;margin:6px 0}
#headline h2{display:none}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(170px,1fr));gap:12px}
.card{border:1px solid #e2e8f0;border-top:3px solid #cbd5e1;border-radius:10px;
padding:11px 14px 12px;background:#fff}
.card.alert{border-top-color:#dc2626}
.card .label{font-size:11.5px;text-transform:uppercase;letter-spacing:.06em;color:#64748b}
.card .value{font-size:23px;font-weight:650;color:#0f172a;font-variant-numeric:tabular-nums;
margin-top:2px;white-space:nowrap}
.card .sub{font-size:12.5px;color:#64748b;min-height:1em}
.chart+.chart{margin-top:14px}
.legend{display:flex;flex-wrap:wrap;gap:4px 16px;margin:4px 0 4px;font-size:12.5px;
color:#334155}
.key{display:inline-flex;align-items:center;gap:6px}
svg.plot{display:block;width:100%;height:auto;overflow:visible}
svg.plot text{font-size:11.5px;fill:#64748b;font-variant-numeric:tabular-nums}
svg.plot text.strong{fill:#334155;font-weight:600}
svg.plot text.bar-label{fill:#1f2937;font-size:12px}
svg.plot text.mark-count{font-size:11px;font-weight:700}
svg.plot .hover{fill:#0f172a;fill-opacity:0}
svg.plot .hover:hover{fill-opacity:.05}
svg.plot .marker{cursor:help}
svg.plot .bar:hover rect{opacity:.8}
.table-wrap{max-height:360px;overflow:auto;border:1px solid #f1f5f9;border-radius:8px}
table{border-collapse:collapse;width:100%;font-size:12.5px}
th{position:sticky;top:0;background:#f8fafc;text-align:left;color:#475569;font-weight:600;
padding:7px 9px;border-bottom:1px solid #e2e8f0;white-space:nowrap}
td{padding:5px 9px;border-bottom:1px solid #f1f5f9;white-space:nowrap}
.num{text-align:right;font-variant-numeric:tabular-nums}
td.neg{color:#b91c1c}
tbody tr:nth-child(even){background:#fcfcfd}
tbody tr:hover{background:#f1f5f9}
.badge{display:inline-block;min-width:24px;padding:1px 8px;border-radius:10px;font-weight:600;
text-align:center}
.badge.ok{background:#dcfce7;color:#166534}
.badge.bad{background:#fee2e2;color:#991b1b}
footer{color:#64748b;font-size:12px;padding:8px 0 28px}
footer code{font-size:11px;word-break:break-all}
@media (max-width:900px){main{grid-template-columns:1fr}section.half{grid-column:1 / -1}}
@media print{nav{display:none}body{background:#fff}section{break-inside:avoid}}
"""
