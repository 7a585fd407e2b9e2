"""`make demo` (scripts/demo.py) explains every shipped sample scenario."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_demo_explains_every_sample_scenario_then_runs_a_store_that_syncs() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "demo.py")],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
        env={**os.environ, "DURATION": "9"},
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    titles = [
        scenario["title_en"]
        for path in sorted((ROOT / "config" / "samples").glob("*/scenarios.json"))
        for scenario in json.loads(path.read_text(encoding="utf-8"))
    ]
    assert len(titles) >= 15
    for title in titles:
        assert title in done.stdout
    # Every scenario either prices (and shows its totals) or is refused with a reason.
    shown = done.stdout.count("\n--- ")
    priced = done.stdout.count("(saved ")
    refused = done.stdout.count("refused: ")
    assert shown == len(titles) == priced + refused
    assert f"priced {priced} sample baskets" in done.stdout
    # The store: three lanes sold through a broker outage, and head office holds every sale once.
    out = done.stdout
    assert "broker stopped: the lanes keep selling offline" in out
    assert "broker back; backlogs to drain" in out
    assert "each lane took them from head office's snapshot over HTTP" in out
    # The card reported lost at head office mid-run: every lane refuses it, each within seconds.
    assert "reported lost (lane-hq cards lost)" in out
    refusals = re.findall(r"(lane-0\d) refuses the lost card (\d+\.\d+) s after head office's change", out)
    assert [name for name, _ in refusals] == ["lane-01", "lane-02", "lane-03"], out
    assert all(float(seconds) < 5 for _, seconds in refusals), refusals
    rows = [line.split() for line in out.splitlines() if line.startswith("  lane-0")]
    assert [row[0] for row in rows] == ["lane-01", "lane-02", "lane-03"]
    versions = set()
    for name, sold, at_hq, _net, _discount, _points, backlog, _lag, dups, dead, audit, member_version in rows:
        assert int(sold) > 0, name
        assert int(at_hq) == int(sold), name
        assert (int(backlog), int(dead), int(audit)) == (0, 0, 0), name
        assert int(dups) >= 0
        versions.add(int(member_version))
    # Every lane's cache converged on head office's one version (the import, the sales' balances, the loss).
    assert len(versions) == 1, versions
    assert "head office dashboard: http://127.0.0.1:" in out


def test_demo_runs_a_lane_agent_and_plays_a_till() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "demo_lane.py")],
        capture_output=True,
        text=True,
        timeout=90,
        cwd=ROOT,
        env={**os.environ, "LANE_HOLD": "0"},
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "magstripe member.identified: M000888" in out
    assert "magstripe card.rejected: REFUSED [lost]" in out
    assert "magstripe card.rejected: REFUSED [unreadable]" in out
    assert "ic        card.rejected: REFUSED [not_yet_valid]" in out
    assert "coupon.scanned: CPN20261201" in out
    assert "Idempotent-Replay: true" in out
    assert "other body: sale_conflict" in out
    assert "journal: last seq 4" in out  # sale, return, guest sale, void: the retry wrote nothing
    assert "lane agent stopped (exit 0)" in out
