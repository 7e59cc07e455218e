"""Scenarios as data: the shipped ones, and a user's file in JSON or TOML."""

from __future__ import annotations

from decimal import Decimal

import pytest

from clearing.domain.stress_scenarios import (
    SHIPPED,
    ScenarioError,
    UnknownScenario,
    choose,
    custom_scenario,
    parse_move,
    parse_scenario_text,
)

D = Decimal

TOML = """
[[scenario]]
name = "eth-hack"
description = "ETH -35% on a protocol failure while BTC holds"
moves = { ETH = "-35%", BTC = 0 }
vol = { ETH = 2.5, BTC = 1.2 }

[[scenario]]
name = "btc-halving-pump"
moves = { BTC = 0.25 }
vol = "1.5"
"""


def test_the_shipped_scenarios_are_the_documented_moves() -> None:
    by_name = {s.name: s for s in SHIPPED}
    black_thursday = by_name["covid-2020-03-12"]
    assert (black_thursday.move_of("BTC"), black_thursday.move_of("ETH")) == (D("-0.37"),
                                                                             D("-0.42"))
    assert black_thursday.vol_factor == D("2.5") and black_thursday.kind == "historical"
    may = by_name["china-2021-05-19"]
    assert (may.move_of("BTC"), may.vol_factor) == (D("-0.14"), D("1.5"))
    assert by_name["china-2021-05-19-intraday"].move_of("BTC") == D("-0.30")
    assert {by_name["crash-30"].move_of(u) for u in ("BTC", "ETH")} == {D("-0.30")}
    assert by_name["crash-30"].vol_factor == 2 and by_name["rally-30"].move_of("ETH") == D("0.3")
    decouple = by_name["decouple-btc-down"]
    assert (decouple.move_of("BTC"), decouple.move_of("ETH")) == (D("-0.20"), D("0.10"))
    assert len({s.name for s in SHIPPED}) == len(SHIPPED)


def test_a_toml_file_adds_scenarios() -> None:
    hack, pump = parse_scenario_text(TOML, "mine.toml", is_json=False)
    assert hack.moves == {"ETH": D("-0.35"), "BTC": D(0)}
    assert (hack.vol_factor_of("ETH"), hack.vol_factor_of("BTC")) == (D("2.5"), D("1.2"))
    assert pump.moves == {"BTC": D("0.25")} and pump.vol_factor_of("ETH") == D("1.5")
    assert [s.name for s in choose(["eth-hack", "crash-30"], [hack, pump])] == [
        "eth-hack", "crash-30"]
    assert len(choose([], [hack, pump])) == len(SHIPPED) + 2


def test_a_json_file_adds_scenarios_with_exact_decimals() -> None:
    (scenario,) = parse_scenario_text(
        '{"scenarios": [{"name": "x", "moves": {"BTC": -0.1}, "vol": 3}]}', "x.json",
        is_json=True)
    assert scenario.moves == {"BTC": D("-0.1")} and scenario.vol_factor == 3


@pytest.mark.parametrize(("text", "field", "reason"), [
    ('{"scenario": [{"name": "x", "moves": {"BTC": -1}}]}', "moves.BTC", "above -100%"),
    ('{"scenario": [{"name": "x", "moves": {"SOL": -0.1}}]}', "moves.SOL", "not an underlying"),
    ('{"scenario": [{"name": "x", "moves": {"BTC": "lots"}}]}', "moves.BTC", "not a number"),
    ('{"scenario": [{"name": "x", "moves": {"BTC": 0.1}, "vol": 0}]}', "vol", "above 0"),
    ('{"scenario": [{"name": "x", "moves": {"BTC": 0.1}, "shock": 1}]}', "shock",
     "unknown key"),
    ('{"scenario": [{"name": "crash-30", "moves": {"BTC": 0.1}}]}', "name", "shipped"),
    ('{"scenario": [{"name": "x", "moves": {"BTC": 0.1}}, {"name": "x", "moves": '
     '{"BTC": 0.2}}]}', "name", "twice"),
    ('{"scenario": [{"name": "x", "moves": {}}]}', "moves", "non-empty"),
    ('{"scenario": []}', "scenario", "non-empty"),
    ('{"other": []}', "file", "exactly one key"),
    ("{", "file", "not valid JSON"),
])
def test_a_bad_scenario_file_is_refused_with_the_field_and_the_reason(
    text: str, field: str, reason: str,
) -> None:
    with pytest.raises(ScenarioError) as refused:
        parse_scenario_text(text, "bad.json", is_json=True)
    assert refused.value.field == field and reason in refused.value.reason
    assert str(refused.value).startswith("bad.json")


def test_shocks_from_the_command_line() -> None:
    assert parse_move("-30%") == D("-0.30") and parse_move("0.05") == D("0.05")
    scenario = custom_scenario({"BTC": D("-0.3")}, D("2"))
    assert scenario.name == "custom" and scenario.move_of("ETH") == 0
    assert scenario.vol_factor_of("ETH") == 2
    with pytest.raises(ScenarioError):
        custom_scenario({"DOGE": D("-0.3")})
    with pytest.raises(UnknownScenario, match="crash-30"):
        choose(["crash-31"])
