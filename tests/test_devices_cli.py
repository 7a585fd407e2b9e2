"""``lane-agent devices`` and ``lane-agent probe``: what a technician sees, card numbers masked."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import REPO_ROOT
from lane_harness import Lane


def lane_agent(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
        check=False,
    )


def test_devices_lists_readers_and_says_what_it_could_not_see() -> None:
    result = lane_agent("devices", "--json")
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    assert set(found) == {"inputs", "readers", "notes"}
    # This machine has no /dev/input (no uinput either), and pcscd with the vpcd reader when the IC tests run.
    if not Path("/dev/input").is_dir():
        assert any("/dev/input" in note for note in found["notes"])
    for reader in found["readers"]:
        assert set(reader) == {"name", "card_present", "atr"}
    text = lane_agent("devices")
    assert text.returncode == 0
    assert "Input devices" in text.stdout
    assert "PC/SC readers" in text.stdout


def test_probe_prints_decoded_reads_with_numbers_masked(tmp_path: Path) -> None:
    steps = (
        '  { after_s = 0.1, swipe = "%B6200123456780001^MEMBER/TEST^2712101?;6200123456780001=2712101?" },\n'
        '  { after_s = 0.1, swipe = "%B62001234" },\n'
        '  { after_s = 0.1, scan = "CPN20260042" },\n'
    )
    lane = Lane(
        tmp_path / "lane", extra_config=f'\n[[devices]]\nname = "demo"\ntype = "simulated"\nsteps = [\n{steps}]\n'
    )
    result = lane_agent("probe", "--config", str(lane.config_path), "--seconds", "3")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any("demo: card read (magstripe): ************0001 expiry 2712" in line for line in lines), lines
    assert any("demo: Unreadable" in line and "source='magstripe'" in line for line in lines), lines
    assert any("demo: CouponScan" in line and "CPN20260042" in line for line in lines), lines
    assert "6200123456780001" not in result.stdout


def test_probe_without_devices_says_so(tmp_path: Path) -> None:
    lane = Lane(tmp_path / "lane")
    result = lane_agent("probe", "--config", str(lane.config_path), "--seconds", "1")
    assert result.returncode == 1
    assert "no devices configured" in result.stderr
