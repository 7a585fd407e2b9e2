"""``make bench``'s suite: it runs a real benchmark, reads its JSON into the one table, saves and compares runs.

One smoke run of the fastest benchmark (``bench.member_scaling --quick``: two
real lanes over HTTP, about 10 s) through ``python -m bench.suite``; the other
benchmarks are not tests and are not run here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.suite import EXTRACT, STEPS, at_least, at_most

REPO = Path(__file__).resolve().parent.parent


def suite(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bench.suite", *args], cwd=REPO, capture_output=True, text=True, check=False, timeout=110
    )


def test_every_benchmark_of_make_bench_has_its_rows() -> None:
    assert [step.name for step in STEPS] == list(EXTRACT)
    for step in STEPS:
        assert (REPO / "bench" / f"{step.name}.py").is_file()


@pytest.mark.parametrize(
    ("check", "value", "target", "met", "status"),
    [
        (at_least, 1_666, 5_000, False, "not met: 67% short"),
        (at_least, 5_000, 5_000, True, "met"),
        (at_most, 1.72, 1.0, False, "not met: 72% over"),
        (at_most, 1.84, 2.0, True, "met"),
    ],
)
def test_how_a_missed_target_is_worded(check, value, target, met, status) -> None:
    assert check(value, target) == (met, status)


@pytest.mark.timeout(120)
def test_a_quick_run_writes_the_table_and_json_and_compares(tmp_path: Path) -> None:
    done = suite("--quick", "--only", "member_scaling", "--results", str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    saved = sorted(p.name for p in tmp_path.glob("*.json"))
    assert "latest-suite.json" in saved
    assert any(name.startswith("suite-") and name.endswith("-quick.json") for name in saved)
    results = json.loads((tmp_path / "latest-suite.json").read_text(encoding="utf-8"))
    assert results["quick"] is True
    assert results["machine"]["cpus_online"] >= 1
    assert results["machine"]["libraries"]["httpx"]
    step = results["steps"]["member_scaling"]
    assert step["exit_code"] == 0
    sizes = [size["members"] for size in step["results"]["sizes"]]
    assert sizes == [2_000, 20_000]
    keys = {figure["key"]: figure for figure in results["figures"]}
    price = keys["member_scaling.price_20000.p99_ms"]
    assert price["value"] == step["results"]["sizes"][1]["figures"]["price"]["p99_ms"]
    assert price["value"] > 0
    assert keys["member_scaling.price_2000.p99_ms"]["ratio"] == 1.0
    assert "POST /v1/price, member basket, 20,000 members" in done.stdout
    assert "same-run reference" in done.stdout

    shown = suite("--show", str(tmp_path / "latest-suite.json"))
    assert shown.returncode == 0
    assert shown.stdout.strip() in done.stdout

    compared = suite("--compare", str(tmp_path / "latest-suite.json"), str(tmp_path / "latest-suite.json"))
    assert compared.returncode == 0
    row = next(line for line in compared.stdout.splitlines() if "POST /v1/price, member basket, 20,000" in line)
    assert "1.00x" in row
