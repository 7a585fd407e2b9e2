"""The command lines as a technician runs them: real processes, real files, exit codes and messages.

``lane-agent`` and ``lane-hq`` are run as ``python -m`` with this interpreter,
so the tests need nothing installed on PATH.  Errors must name the file, the
key and the reason, exit 1, and never show a Python traceback.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO_ROOT, RULES_888

from agent.basket import parse_basket, parse_member
from agent.engine import price
from agent.render import to_wire
from agent.ruleset import load_ruleset

SHIPPED = sorted((REPO_ROOT / "config" / "rules").glob("*.toml"))

# A gold member on the 888 mall's member day (the 10th): a regular-priced coat and marked-down shoes.
BASKET: dict[str, Any] = {
    "lines": [
        {"line_id": "1", "sku": "6920000000011", "category": "womenswear", "qty": "1", "unit_price": "1000.00"},
        {
            "line_id": "2",
            "sku": "6920000000028",
            "category": "shoes",
            "qty": "1",
            "unit_price": "600.00",
            "regular_price": "800.00",
        },
        {"line_id": "3", "sku": "6920000000035", "category": "fresh", "qty": "0.356", "unit_price": "45.80"},
        {
            "line_id": "4",
            "sku": "6920000000042",
            "category": "toys",
            "qty": "2",
            "unit_price": "59.90",
            "flags": ["non_member_counter", "no_points_event"],
        },
    ],
    "coupons": [],
    "tenders": [],
    "at": "2026-12-10T14:05:00+08:00",
}
GOLD: dict[str, Any] = {
    "member_id": "M000102",
    "tier": "gold",
    "card_kind": "standard",
    "birthday": "08-02",
    "points_balance": 15800,
    "rebate_balance": "150.00",
}


def run(module: str, *args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", module, *map(str, args)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, **(env or {})},
    )
    assert "Traceback" not in result.stderr, result.stderr
    assert "Traceback" not in result.stdout, result.stdout
    return result


def lane(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return run("agent.cli", *args, env=env)


def hq(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return run("sync.hq.cli", *args)


def write_json(path: Path, doc: object) -> Path:
    path.write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")
    return path


@pytest.fixture
def basket_file(tmp_path: Path) -> Path:
    return write_json(tmp_path / "basket.json", BASKET)


@pytest.fixture
def gold_file(tmp_path: Path) -> Path:
    return write_json(tmp_path / "member-gold.json", GOLD)


def fen(text: str) -> int:
    return int(Decimal(text) * 100)


# --- rules check ---------------------------------------------------------------------------------


@pytest.mark.parametrize("module", ["agent.cli", "sync.hq.cli"])
def test_rules_check_accepts_the_shipped_programmes(module: str) -> None:
    assert len(SHIPPED) >= 1
    result = run(module, "rules", "check", *SHIPPED)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert len(lines) == len(SHIPPED)
    for path, line in zip(SHIPPED, lines, strict=True):
        digest = hashlib.sha256(path.read_text(encoding="utf-8").encode()).hexdigest()
        assert line.startswith(f"{path}: ok"), line
        assert digest[:12] in line


BAD_RULES = """\
[ruleset]
id = "bad-mall"
version = "1"
name = { zh-CN = "坏", en = "Bad" }

[[tiers]]
id = "vip"
label = { zh-CN = "VIP", en = "VIP" }

[[rules]]
id = "member-day"
kind = "percent"
label = { zh-CN = "会员日", en = "Member day" }
rate = "0.95"
[rules.when]
tiers = ["platinum"]

[[rules]]
id = "xmas"
kind = "spend_off"
label = { zh-CN = "满减", en = "Xmas" }
off = "50.00"
"""


def test_rules_check_reports_every_problem_with_file_key_and_reason(tmp_path: Path) -> None:
    # The very example docs/rules.md gives: an undeclared tier and a spend_off without threshold, both reported.
    bad = tmp_path / "bad.toml"
    bad.write_text(BAD_RULES, encoding="utf-8")
    result = lane("rules", "check", RULES_888, bad)
    assert result.returncode == 1
    assert f"{RULES_888}: ok" in result.stdout  # the good file is still checked and reported
    errors = result.stderr.splitlines()
    assert errors[0] == f"{bad}: INVALID"
    assert any(
        f"{bad}: rules[0].when.tiers:" in line and "'platinum'" in line and "[unknown_tier]" in line for line in errors
    ), errors
    assert any(f"{bad}: rules[1]:" in line and "'threshold'" in line and "(rule 'xmas')" in line for line in errors), (
        errors
    )


@pytest.mark.parametrize(
    ("content", "code"),
    [('[ruleset]\nid = "unterminated\n', "toml_syntax"), (None, "unreadable")],
    ids=["syntax", "missing"],
)
def test_rules_check_on_a_broken_or_missing_file(tmp_path: Path, content: str | None, code: str) -> None:
    path = tmp_path / "rules.toml"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    result = hq("rules", "check", path)
    assert result.returncode == 1
    assert f"{path}: INVALID" in result.stderr
    assert f"[{code}]" in result.stderr


def test_a_usage_error_exits_2() -> None:
    assert lane().returncode == 2
    assert lane("price", "--basket", "x.json").returncode == 2


# --- price -----------------------------------------------------------------------------------------------


def test_price_prints_the_priced_basket_as_json(basket_file: Path, gold_file: Path) -> None:
    result = lane("price", "--rules", RULES_888, "--basket", basket_file, "--member", gold_file)
    assert result.returncode == 0, result.stderr
    wire = json.loads(result.stdout)
    lines, totals = wire["lines"], wire["totals"]
    assert [line["line_id"] for line in lines] == ["1", "2", "3", "4"]
    assert fen(totals["gross"]) == sum(fen(line["gross"]) for line in lines)
    assert fen(totals["net"]) == sum(fen(line["net"]) for line in lines)
    assert fen(totals["discount"]) == fen(totals["gross"]) - fen(totals["net"])
    assert totals["points"] == sum(line["points"] for line in lines)
    for line in lines:
        assert fen(line["net"]) == fen(line["gross"]) - sum(fen(d["amount"]) for d in line["discounts"])
    # Gold, regular price, the 10th: 88折 then 95折 on top (seed 004): 1000.00 -> 880.00 -> 836.00.
    assert [(d["rule"], d["amount"]) for d in lines[0]["discounts"]] == [
        ("tier-rate", "120.00"),
        ("member-day", "44.00"),
    ]
    assert lines[0]["net"] == "836.00"
    # The non-member counter gives no discount and the no-points event no points, and the result says why.
    assert lines[3]["discounts"] == []
    assert lines[3]["points"] == 0
    assert lines[3]["excluded"] == {"discounts": "flag:non_member_counter", "points": "flag:no_points_event"}
    # What the command prints is exactly what the engine answers in process.
    ruleset = load_ruleset(RULES_888)
    assert wire == to_wire(price(parse_basket(BASKET), parse_member(GOLD), ruleset))


def test_price_at_overrides_the_baskets_time(basket_file: Path, gold_file: Path) -> None:
    result = lane(
        "price", "--rules", RULES_888, "--basket", basket_file, "--member", gold_file, "--at", "2026-12-11T10:00+08:00"
    )
    assert result.returncode == 0, result.stderr
    first = json.loads(result.stdout)["lines"][0]
    assert [(d["rule"], d["amount"]) for d in first["discounts"]] == [("tier-rate", "120.00")]


def test_price_for_a_guest_gives_no_member_discount_and_no_points(basket_file: Path) -> None:
    result = lane("price", "--rules", RULES_888, "--basket", basket_file)
    assert result.returncode == 0, result.stderr
    wire = json.loads(result.stdout)
    assert wire["member"] is None
    assert wire["totals"]["points"] == 0
    assert wire["totals"]["discount"] == "0.00"


@pytest.mark.parametrize(("lang", "label"), [("zh-CN", "会员折扣"), ("en", "Member discount")])
def test_explain_names_every_rule_behind_a_discount_or_point(
    basket_file: Path, gold_file: Path, lang: str, label: str
) -> None:
    result = lane(
        "price", "--rules", RULES_888, "--basket", basket_file, "--member", gold_file, "--explain", "--lang", lang
    )
    assert result.returncode == 0, result.stderr
    for rule_id in ("tier-rate", "member-day", "earn-base"):
        assert rule_id in result.stdout
    assert label in result.stdout
    assert "836.00" in result.stdout
    assert "non_member_counter" in result.stdout
    with pytest.raises(json.JSONDecodeError):
        json.loads(result.stdout)


def test_price_output_does_not_depend_on_the_hash_seed(basket_file: Path, gold_file: Path) -> None:
    outputs = {
        lane(
            "price", "--rules", RULES_888, "--basket", basket_file, "--member", gold_file, env={"PYTHONHASHSEED": seed}
        ).stdout
        for seed in ("0", "1", "2", "12345")
    }
    assert len(outputs) == 1


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('{"lines": [', ["basket.json", "[json_syntax]"]),
        ("\ufeff{}", ["basket.json", "[json_syntax]"]),
        ("[]", ["basket.json", "[model_type]"]),
        (
            json.dumps({**BASKET, "lines": [{**BASKET["lines"][0], "qty": 1.5, "unit_price": "-1"}]}),
            ["basket.json: lines[0].qty:", "basket.json: lines[0].unit_price:", "decimal string", "negative"],
        ),
    ],
    ids=["truncated", "bom", "not-an-object", "bad-fields"],
)
def test_a_malformed_basket_file_exits_1_with_a_clear_message(
    tmp_path: Path, gold_file: Path, content: str, expected: list[str]
) -> None:
    path = tmp_path / "basket.json"
    path.write_text(content, encoding="utf-8")
    result = lane("price", "--rules", RULES_888, "--basket", path, "--member", gold_file)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith("lane-agent: invalid basket:")
    for text in expected:
        assert text in result.stderr


def test_a_malformed_member_or_time_or_missing_file_exits_1(tmp_path: Path, basket_file: Path) -> None:
    member = write_json(tmp_path / "member.json", {**GOLD, "birthday": "02-30"})
    result = lane("price", "--rules", RULES_888, "--basket", basket_file, "--member", member)
    assert result.returncode == 1
    assert f"{member}: birthday:" in result.stderr

    result = lane("price", "--rules", RULES_888, "--basket", basket_file, "--at", "2026-12-10T14:05")
    assert result.returncode == 1
    assert "--at" in result.stderr

    result = lane("price", "--rules", RULES_888, "--basket", tmp_path / "nowhere.json")
    assert result.returncode == 1
    assert "nowhere.json" in result.stderr
    assert "[unreadable]" in result.stderr

    bad_rules = tmp_path / "bad.toml"
    bad_rules.write_text(BAD_RULES, encoding="utf-8")
    result = lane("price", "--rules", bad_rules, "--basket", basket_file)
    assert result.returncode == 1
    assert result.stderr.startswith("lane-agent: invalid ruleset:")
    assert f"{bad_rules}: rules[" in result.stderr


def test_tenders_that_do_not_fit_exit_1_with_every_problem(tmp_path: Path, gold_file: Path) -> None:
    doc = {**BASKET, "tenders": [{"kind": "points", "points": 100}, {"kind": "rebate", "amount": "9999.00"}]}
    result = lane(
        "price", "--rules", RULES_888, "--basket", write_json(tmp_path / "b.json", doc), "--member", gold_file
    )
    assert result.returncode == 1
    assert "tenders[0]: " in result.stderr
    assert "[tender_not_accepted]" in result.stderr
    assert "tenders[1].amount: " in result.stderr
    assert "[rebate_insufficient]" in result.stderr


# --- head office audit -------------------------------------------------------------------------------------


def honest_sale() -> dict[str, Any]:
    ruleset = load_ruleset(RULES_888)
    result = to_wire(price(parse_basket(BASKET), parse_member(GOLD), ruleset))
    return {"basket": BASKET, "member": GOLD, "result": result}


def test_audit_accepts_an_honest_sale(tmp_path: Path) -> None:
    sale = write_json(tmp_path / "sale.json", honest_sale())
    result = hq("audit", "--rules", RULES_888, sale)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == f"{sale}: ok"


def test_audit_accepts_what_the_lane_command_printed(tmp_path: Path, basket_file: Path, gold_file: Path) -> None:
    printed = lane("price", "--rules", RULES_888, "--basket", basket_file, "--member", gold_file)
    sale = write_json(tmp_path / "sale.json", {"basket": BASKET, "member": GOLD, "result": json.loads(printed.stdout)})
    result = hq("audit", "--rules", RULES_888, sale)
    assert result.returncode == 0, result.stdout


@pytest.mark.parametrize(
    ("tamper", "path", "reported", "expected"),
    [
        (lambda r: r["lines"][0].update(net="736.00"), "lines[0].net", "'736.00'", "'836.00'"),
        (lambda r: r["totals"].update(points=r["totals"]["points"] + 500), "totals.points", None, None),
        (lambda r: r["lines"][1]["discounts"].pop(), "lines[1].discounts", None, None),
        (lambda r: r.update(rules={"id": "888-mall", "version": "2025.1"}), "rules.version", "'2025.1'", None),
    ],
    ids=["line-net", "total-points", "dropped-discount", "other-version"],
)
def test_audit_flags_a_tampered_sale(
    tmp_path: Path, tamper: Any, path: str, reported: str | None, expected: str | None
) -> None:
    honest = write_json(tmp_path / "honest.json", honest_sale())
    doc = honest_sale()
    tamper(doc["result"])
    tampered = write_json(tmp_path / "tampered.json", doc)
    result = hq("audit", "--rules", RULES_888, honest, tampered)
    assert result.returncode == 1
    out = result.stdout.splitlines()
    assert f"{honest}: ok" in out
    assert any(line.startswith(f"{tampered}: MISMATCH") for line in out), out
    differences = [line.strip() for line in out if line.startswith("  ")]
    assert any(line.startswith(f"{path}") for line in differences), differences
    if reported is not None:
        assert any(f"lane reported {reported}" in line for line in differences if line.startswith(path))
    if expected is not None:
        assert any(f"re-priced {expected}" in line for line in differences if line.startswith(path))


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("not json", "[unreadable]"),
        ("[1, 2]", "[bad_sale]"),
        (json.dumps({"basket": {**BASKET, "lines": []}, "member": None, "result": {}}), "sale.basket: lines:"),
        (json.dumps({"basket": {k: v for k, v in BASKET.items() if k != "at"}, "result": {}}), "[time_required]"),
    ],
    ids=["not-json", "not-an-object", "bad-basket", "no-time"],
)
def test_audit_of_a_malformed_sale_exits_1_with_a_clear_message(tmp_path: Path, content: str, expected: str) -> None:
    sale = tmp_path / "sale.json"
    sale.write_text(content, encoding="utf-8")
    result = hq("audit", "--rules", RULES_888, sale)
    assert result.returncode == 1
    assert result.stderr.startswith("lane-hq: invalid")
    assert expected in result.stderr
