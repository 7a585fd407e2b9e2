"""The short fault soak (tests/soak.py) in make test: nothing lost, nothing doubled, balances equal the journals.

``soak.run`` raises SoakError itself when head office and the lanes' journals
disagree; this test also checks that the faults really happened, so a soak
in which nothing broke cannot pass.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import soak
import sqlalchemy as sa

pytestmark = pytest.mark.timeout(900)


def test_the_short_soak_loses_and_doubles_nothing_through_kills_outages_and_a_full_disk(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    plan = soak.SHORT
    report = soak.run(plan, tmp_path / "soak")
    # The counts show in make test's output (as the fuzzers' summaries do), capture or not.
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if capture is not None and reporter is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line("\n" + "\n".join(report.lines()))
    assert (report.duplicates, report.lost, report.unexpected, report.pii_findings) == (0, 0, 0, 0)
    # The faults happened, and the lanes felt them.
    faults = report.faults
    assert (faults.lane_kills, faults.hq_kills, faults.broker_restarts, faults.hq_outages, faults.disk_fulls) == (
        plan.lane_kills,
        plan.hq_kills,
        plan.broker_restarts,
        plan.hq_outages,
        plan.disk_fulls,
    )
    assert report.tills.disk_full >= plan.disk_fulls  # sales were refused with 507 while the disk was full
    assert faults.backlog_peak > 0  # sales queued on the lanes while head office was away
    assert report.tills.retries > 0  # tills found their lane killed and asked again
    # Selling went on throughout, and no request failed for any reason but the faults.
    assert report.told_sales > 200
    assert report.told_returns > 0
    assert report.told_voids > 0
    assert report.hq_entries == report.told_sales + report.told_returns + report.told_voids
    assert not report.tills.server_errors
    assert not report.tills.refused
    assert report.members_checked == plan.members


def _execute(db_url: str, sql: str) -> None:
    engine = sa.create_engine(db_url)
    try:
        with engine.begin() as conn:
            assert conn.execute(sa.text(sql)).rowcount == 1
    finally:
        engine.dispose()


def _a_point_too_many(db_url: str, tills: list[soak.Till]) -> None:
    _execute(db_url, "UPDATE members SET points_balance = points_balance + 1 WHERE member_id = 'M90000'")


def _a_fen_too_many(db_url: str, tills: list[soak.Till]) -> None:
    _execute(db_url, "UPDATE sales SET net_fen = net_fen + 1 WHERE entry_id = (SELECT min(entry_id) FROM sales)")


def _a_sale_never_journalled(db_url: str, tills: list[soak.Till]) -> None:
    tills[0].sold.append("lane-01-S999999")


@pytest.mark.parametrize(
    ("tamper", "caught"),
    [
        (_a_point_too_many, r"M90000: head office's balance \(\d+, 10000000\), want \(\d+, 10000000\)"),
        (_a_fen_too_many, r"head office's net_fen is \d+, the journals add up to \d+"),
        (_a_sale_never_journalled, r"lane-01: 1 sales told committed are not in the journal"),
    ],
)
def test_the_soak_catches_a_balance_a_total_or_a_sale_that_is_off(
    tmp_path: Path, tamper: Callable[[str, list[soak.Till]], None], caught: str
) -> None:
    with pytest.raises(soak.SoakError, match=caught):
        soak.run(soak.CALM, tmp_path / "soak", tamper=tamper)
