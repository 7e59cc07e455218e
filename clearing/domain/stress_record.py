"""The daily `stress` job: every shipped scenario against the ledger as of the batch's time,
recorded as one `StressTestRecorded` fact with each scenario's headline figures.

The fact is for the audit trail only: it moves no money and no position, so no `evolve`
handler reads it and `clearing verify` is unaffected. Its content is a pure function of the
state the batch decides from (numpy is deterministic on one machine), so a rerun after a
crash decides the same fact under the same key and writes nothing new.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal

from clearing.domain.commands import NewFact
from clearing.domain.events import StressScenarioFigures, StressTestRecorded
from clearing.domain.ledger import LedgerState
from clearing.domain.stress import (
    DEFAULT_CASCADE,
    SUFFICIENT,
    CascadeParameters,
    ScenarioResult,
    StressReport,
    stress_test,
)
from clearing.domain.stress_scenarios import SHIPPED, Scenario

STRESS_STREAM = "stress-tests"


def scenario_figures(result: ScenarioResult) -> StressScenarioFigures:
    scenario = result.scenario
    cover = result.cover
    return StressScenarioFigures(
        scenario=scenario.name, moves=dict(scenario.moves), vol_factor=scenario.vol_factor,
        vol_factors=dict(scenario.vol_factors), final_prices=dict(result.final_prices),
        loss=result.loss_usd, accounts_below_maintenance=result.below_maintenance,
        accounts_liquidated=result.liquidated, accounts_bankrupt=result.bankrupt,
        cascade_rounds=result.cascade_rounds, converged=result.converged,
        deficit=result.deficit_usd, insurance_covered=result.insurance_paid_usd,
        auto_deleveraged=result.adl_usd, uncovered=result.uncovered_usd,
        cover_1=cover.cover_1, cover_2=cover.cover_2,
        cover_2_accounts=cover.cover_2_accounts, verdict=cover.verdict,
        shortfall=cover.shortfall)


def headline(report: StressReport, batch_id: str) -> StressTestRecorded:
    worst = report.worst
    cover_2 = worst.cover.cover_2 if worst is not None else Decimal("0.00")
    shortfall = worst.cover.shortfall if worst is not None else Decimal("0.00")
    return StressTestRecorded(
        batch_id=batch_id, insurance_fund=report.insurance_fund,
        depth_usd=dict(report.cascade.depth_usd),
        impact_coefficient=report.cascade.impact_coefficient, accounts=report.accounts,
        scenarios=tuple(scenario_figures(s) for s in report.scenarios),
        worst_scenario=None if worst is None else worst.scenario.name, cover_2=cover_2,
        verdict=SUFFICIENT if worst is None else worst.cover.verdict, shortfall=shortfall)


def decide_stress_record(state: LedgerState, at: datetime, batch_id: str,
                         scenarios: Sequence[Scenario] = SHIPPED,
                         cascade: CascadeParameters = DEFAULT_CASCADE) -> list[NewFact]:
    """The `stress` job's one fact."""
    report = stress_test(state, at, scenarios, cascade)
    return [NewFact(STRESS_STREAM, headline(report, batch_id), f"{batch_id}:recorded", at)]
