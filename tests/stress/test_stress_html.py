"""The stress report for people: the HTML section with its plot of the cascade rounds."""

from __future__ import annotations

import re

from clearing.backoffice.stress_report import cascade_svg, stress_document, stress_html
from clearing.domain.stress import DEFAULT_CASCADE, StressReport, run_scenario
from clearing.domain.stress_scenarios import custom_scenario
from tests.stress.books import AT, BTC_PERP, D, account, book, cascade, held, market


def spiral() -> StressReport:
    accounts = [
        account("alice", {"USDC": "100000"}, held(BTC_PERP, "10", "100000")),
        account("bob", {"USDC": "100000", "ETH": "10"}, held(BTC_PERP, "10", "100000")),
        account("carol", {"USDC": "120000"}, held(BTC_PERP, "10", "100000")),
        account("mm", {"USDC": "10000000"}, held(BTC_PERP, "-30", "100000")),
    ]
    at_market = market({"BTC": "100000", "ETH": "3000"}, {"BTC-PERP": ("100000", None)})
    result = run_scenario(book(accounts, at_market), custom_scenario({"BTC": D("-0.10")}),
                          D("50000"), cascade(BTC="36000000", ETH="1000000"))
    return StressReport(AT, D("50000"), DEFAULT_CASCADE, 4, 4, (result,))


def test_the_section_shows_the_verdict_the_rounds_and_the_feedback_loop() -> None:
    report = spiral()
    (result,) = report.scenarios
    assert result.cascade_rounds == 2
    page = stress_html(report)
    assert "insufficient" in page and "Cover-2 needed" in page
    assert "Cross-margin sales" in page  # bob's ETH, sold for a BTC loss
    assert page.count('<svg class="plot"') == 1
    svg = cascade_svg(result)
    # before, the shock and two rounds, for BTC and ETH; a bar per round with close-outs
    assert len(re.findall(r"<circle ", svg)) == 4 * 2
    assert len(re.findall(r'<rect x="[^"]*" y="[^"]*" width="[^"]*" height="[^"]*" '
                          r'fill="#dc2626"', svg)) == 2
    assert "round 2" in svg and "insurance fund left" in svg


def test_the_json_document_carries_every_round_and_the_verdict() -> None:
    document = stress_document(spiral())
    (scenario,) = document["scenarios"]
    # bob's ETH keeps him standing at the shock; alice's close-out takes him down.
    assert [r["accounts_liquidated"] for r in scenario["rounds"]] == [
        [], ["alice"], ["bob", "carol"]]
    (sale,) = scenario["collateral_sales"]
    assert (sale["account_id"], sale["asset"], sale["amount"], sale["loss_underlying"],
            sale["cross_margin"]) == ("bob", "ETH", "10", "BTC", True)
    assert scenario["rounds"][2]["cross_margin_sold_usd"] == {"ETH": sale["proceeds"]}
    assert document["verdict"]["verdict"] == "insufficient"
    assert {a["account_id"] for a in scenario["accounts"]} == {"alice", "bob", "carol"}
