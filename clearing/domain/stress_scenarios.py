"""Stress scenarios as data: the shipped ones, and the file format users add their own in.

A scenario is a set of instantaneous relative moves of the underlyings' index prices (every
instrument on an underlying, and the collateral in that asset, move with it) and a factor
that multiplies every implied volatility. An underlying the scenario does not name does not
move. `clearing stress` and the daily `stress` job run them; see `stress` for what a run does
with them.

The shipped scenarios
---------------------
Historical ones replay a real day as moves. The figures are approximate, rounded, from public
daily closes (UTC close to UTC close, as CoinMarketCap publishes them) and, for the intraday
variant, from the widely reported intraday lows on large spot venues; they are calibrations,
not audited market data. The volatility multipliers are calibration choices that approximate
the implied volatility spikes of those days (BTC at-the-money implied volatility roughly
doubled to tripled within days in March 2020, and roughly doubled intraday in May 2021), not
measured figures.

- `covid-2020-03-12` ("Black Thursday"): BTC closed about 7,911 on 11 March 2020 and about
  4,971 on 12 March, -37% close to close (some venues' closes show -39%; BitMEX traded near
  3,800 early on 13 March, about -50% from the high); ETH about -42% close to close
  (about 195 to 112). Volatility x 2.5.
- `china-2021-05-19`: BTC about 42,900 to 37,000 close to close on 19 May 2021, -14%; ETH
  about 3,380 to 2,460, -27%. Volatility x 1.5.
- `china-2021-05-19-intraday`: the same day from the high to the intraday low: BTC about
  43,000 to 30,000 (-30%), ETH about 3,400 to 1,900 (-44%). Volatility x 2.

Hypothetical ones:

- `crash-30`: every underlying -30%, volatility doubled.
- `rally-30`: every underlying +30%, volatility doubled (the shorts' turn).
- `decouple-btc-down`: BTC -20% while ETH rises +10%, volatility x 1.5: a long-ETH /
  short-BTC spread book, or ETH positions collateralised in BTC, lose on both legs.
- `decouple-eth-down`: ETH -25% while BTC rises +5%, volatility x 1.5.

A scenario that moves "every underlying" names BTC and ETH, the underlyings this ledger lists.

The file format (`clearing stress --scenarios FILE`)
----------------------------------------------------
JSON (`.json`) or TOML (any other suffix, e.g. `.toml`), a list of scenarios under the key
`scenario` (or `scenarios`). Each scenario:

- `name` (required): letters, digits and `._-`, at most 64 characters, unique, and not the
  name of a shipped scenario;
- `moves` (required): a table underlying -> relative move, as a number (`-0.35`) or a string
  (`"-0.35"` or `"-35%"`); a move must be above -100% and at most +1000%;
- `vol` (optional, default 1): the factor every implied volatility is multiplied by, as a
  number or a string, or a table underlying -> factor (an underlying not in it keeps 1);
  factors are positive, at most 20;
- `description` (optional): free text shown with the results.

TOML:

    [[scenario]]
    name = "eth-hack"
    description = "ETH -35% on a protocol failure while BTC holds"
    moves = { ETH = "-35%", BTC = 0 }
    vol = { ETH = 2.5, BTC = 1.2 }

JSON:

    {"scenarios": [{"name": "eth-hack", "moves": {"ETH": "-0.35"}, "vol": 2.5}]}

Nothing else is accepted: an unknown key is refused with the scenario and key named.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

from clearing.domain.instruments import UNDERLYINGS

D = Decimal
ONE = Decimal(1)
HISTORICAL = "historical"
HYPOTHETICAL = "hypothetical"
CUSTOM = "custom"
CUSTOM_NAME = "custom"
"""The name of the scenario built from `--shock` options."""
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MOVE_MIN = Decimal("-1")
"""A move must be above -100%: a price stays positive."""
MOVE_MAX = Decimal("10")
VOL_FACTOR_MAX = Decimal("20")
SCENARIOS_PER_FILE_MAX = 200
SCENARIO_KEYS = frozenset({"name", "description", "moves", "vol"})


@dataclass(frozen=True)
class Scenario:
    """Instantaneous moves of the underlyings (relative: -0.3 is -30%) and volatility factors.

    `vol_factor` multiplies every implied volatility; `vol_factors` overrides it per
    underlying."""

    name: str
    description: str
    moves: Mapping[str, Decimal]
    vol_factor: Decimal = ONE
    vol_factors: Mapping[str, Decimal] = field(default_factory=dict)
    kind: str = HYPOTHETICAL

    def move_of(self, underlying: str) -> Decimal:
        return self.moves.get(underlying, Decimal(0))

    def vol_factor_of(self, underlying: str) -> Decimal:
        return self.vol_factors.get(underlying, self.vol_factor)

    def with_vol_factor(self, factor: Decimal) -> Scenario:
        """The same moves with every volatility multiplied by `factor` instead."""
        return Scenario(self.name, self.description, self.moves, factor, {}, self.kind)


def _both(move: str) -> dict[str, Decimal]:
    return {u: D(move) for u in UNDERLYINGS}


SHIPPED: tuple[Scenario, ...] = (
    Scenario("covid-2020-03-12", "Black Thursday, 12 March 2020, close to close: BTC -37%, "
             "ETH -42%, implied volatility x 2.5",
             {"BTC": D("-0.37"), "ETH": D("-0.42")}, D("2.5"), kind=HISTORICAL),
    Scenario("china-2021-05-19", "19 May 2021, close to close: BTC -14%, ETH -27%, implied "
             "volatility x 1.5", {"BTC": D("-0.14"), "ETH": D("-0.27")}, D("1.5"),
             kind=HISTORICAL),
    Scenario("china-2021-05-19-intraday", "19 May 2021, high to intraday low: BTC -30%, "
             "ETH -44%, implied volatility x 2", {"BTC": D("-0.30"), "ETH": D("-0.44")},
             D("2"), kind=HISTORICAL),
    Scenario("crash-30", "Every underlying -30%, implied volatility doubled",
             _both("-0.30"), D("2")),
    Scenario("rally-30", "Every underlying +30%, implied volatility doubled",
             _both("0.30"), D("2")),
    Scenario("decouple-btc-down", "BTC -20% while ETH rises +10%, implied volatility x 1.5",
             {"BTC": D("-0.20"), "ETH": D("0.10")}, D("1.5")),
    Scenario("decouple-eth-down", "ETH -25% while BTC rises +5%, implied volatility x 1.5",
             {"BTC": D("0.05"), "ETH": D("-0.25")}, D("1.5")),
)
SHIPPED_NAMES = tuple(s.name for s in SHIPPED)


class ScenarioError(ValueError):
    """A scenario that cannot be used: where (file, scenario), which field, and why."""

    def __init__(self, source: str, field: str, reason: str):
        super().__init__(f"{source}: {field}: {reason}")
        self.source = source
        self.field = field
        self.reason = reason


class UnknownScenario(LookupError):
    def __init__(self, name: str, known: Sequence[str]):
        super().__init__(f"unknown stress scenario {name!r} (known: {', '.join(known)})")
        self.name = name


def parse_move(text: str | float | int | Decimal, source: str = "--shock",
               field_name: str = "move") -> Decimal:
    """A relative move: `-0.3`, `"-0.3"` or `"-30%"`; above -100%, at most +1000%."""
    value = _number(text, source, field_name, percent=True)
    if not MOVE_MIN < value <= MOVE_MAX:
        raise ScenarioError(source, field_name, f"{_show(text)} must be above -100% and at "
                                                f"most +1000%")
    return value


def parse_vol_factor(text: str | float | int | Decimal, source: str = "--vol-shock",
                     field_name: str = "vol") -> Decimal:
    value = _number(text, source, field_name, percent=False)
    if not 0 < value <= VOL_FACTOR_MAX:
        raise ScenarioError(source, field_name, f"{_show(text)} must be above 0 and at most "
                                                f"{VOL_FACTOR_MAX}")
    return value


def _show(value: object) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def _number(text: object, source: str, field_name: str, *, percent: bool) -> Decimal:
    if isinstance(text, bool) or not isinstance(text, str | int | float | Decimal):
        raise ScenarioError(source, field_name, f"{_show(text)} is not a number")
    raw = str(text).strip()
    scale = ONE
    if percent and raw.endswith("%"):
        raw, scale = raw[:-1].strip(), D("0.01")
    try:
        value = Decimal(raw) * scale
    except InvalidOperation:
        raise ScenarioError(source, field_name, f"{_show(text)} is not a number") from None
    if not value.is_finite():
        raise ScenarioError(source, field_name, f"{_show(text)} is not a finite number")
    return value


def _underlying(name: object, source: str, field_name: str) -> str:
    if name not in UNDERLYINGS:
        raise ScenarioError(source, field_name, f"{name!r} is not an underlying (known: "
                                                f"{', '.join(UNDERLYINGS)})")
    return str(name)


def custom_scenario(shocks: Mapping[str, Decimal], vol_factor: Decimal = ONE) -> Scenario:
    """The scenario `--shock U=MOVE ... [--vol-shock F]` describes."""
    for underlying in shocks:
        _underlying(underlying, "--shock", underlying)
    moves = ", ".join(f"{u} {m * 100:+.4g}%" for u, m in sorted(shocks.items()))
    return Scenario(CUSTOM_NAME, f"{moves}, implied volatility x {vol_factor}",
                    dict(shocks), vol_factor, kind=CUSTOM)


def parse_scenario_text(text: str, source: str, is_json: bool) -> list[Scenario]:
    """The scenarios of a file's text (JSON or TOML); `source` names the file in errors."""
    try:
        document = json.loads(text, parse_float=Decimal) if is_json else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ScenarioError(source, "file", f"not valid {'JSON' if is_json else 'TOML'}: "
                                            f"{exc}") from None
    return parse_scenario_document(document, source)


def parse_scenario_document(document: Any, source: str) -> list[Scenario]:
    if not isinstance(document, dict):
        raise ScenarioError(source, "file", "must be a table with a list under 'scenario'")
    keys = [k for k in ("scenario", "scenarios") if k in document]
    extra = sorted(set(document) - {"scenario", "scenarios"})
    if len(keys) != 1 or extra:
        raise ScenarioError(source, "file", "must hold exactly one key, 'scenario' or "
                                            f"'scenarios' (found: {', '.join(document)})")
    items = document[keys[0]]
    if not isinstance(items, list) or not items:
        raise ScenarioError(source, keys[0], "must be a non-empty list of scenarios")
    if len(items) > SCENARIOS_PER_FILE_MAX:
        raise ScenarioError(source, keys[0], f"at most {SCENARIOS_PER_FILE_MAX} scenarios")
    found: list[Scenario] = []
    for number, item in enumerate(items, start=1):
        scenario = _parse_one(item, f"{source}: scenario {number}")
        if scenario.name in SHIPPED_NAMES or scenario.name == CUSTOM_NAME:
            raise ScenarioError(f"{source}: scenario {number}", "name",
                                f"{scenario.name!r} is a shipped scenario's name; choose "
                                "another")
        if any(s.name == scenario.name for s in found):
            raise ScenarioError(f"{source}: scenario {number}", "name",
                                f"{scenario.name!r} appears twice")
        found.append(scenario)
    return found


def _parse_one(item: Any, where: str) -> Scenario:
    if not isinstance(item, dict):
        raise ScenarioError(where, "scenario", "must be a table")
    unknown = sorted(set(item) - SCENARIO_KEYS)
    if unknown:
        raise ScenarioError(where, unknown[0], f"unknown key (known: "
                                               f"{', '.join(sorted(SCENARIO_KEYS))})")
    name = item.get("name")
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise ScenarioError(where, "name", f"{name!r} must be 1-64 letters, digits and ._- "
                                           "starting with a letter or digit")
    where = f"{where} ({name})"
    moves_in = item.get("moves")
    if not isinstance(moves_in, dict) or not moves_in:
        raise ScenarioError(where, "moves", "must be a non-empty table underlying -> move")
    moves = {_underlying(u, where, f"moves.{u}"): parse_move(m, where, f"moves.{u}")
             for u, m in moves_in.items()}
    vol_in = item.get("vol", 1)
    vol_factor, vol_factors = ONE, {}
    if isinstance(vol_in, dict):
        vol_factors = {_underlying(u, where, f"vol.{u}"): parse_vol_factor(v, where, f"vol.{u}")
                       for u, v in vol_in.items()}
    else:
        vol_factor = parse_vol_factor(vol_in, where, "vol")
    description = item.get("description", "")
    if not isinstance(description, str):
        raise ScenarioError(where, "description", "must be text")
    return Scenario(name, description, moves, vol_factor, vol_factors, kind=CUSTOM)


def catalogue(extra: Sequence[Scenario] = ()) -> dict[str, Scenario]:
    """Every scenario by name: the shipped ones, then a file's."""
    return {s.name: s for s in (*SHIPPED, *extra)}


def choose(names: Sequence[str], extra: Sequence[Scenario] = ()) -> list[Scenario]:
    """The named scenarios, in the order given; every one when no name is given."""
    known = catalogue(extra)
    if not names:
        return list(known.values())
    chosen = []
    for name in names:
        if name not in known:
            raise UnknownScenario(name, list(known))
        chosen.append(known[name])
    return chosen
