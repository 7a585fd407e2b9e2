"""Audit re-pricing of journal sales (sync/hq/audit.py): the same engine, the version the lane reported."""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest
from conftest import MEMBER_DAY, REPO_ROOT

from agent.basket import parse_member
from agent.engine import price
from agent.pos_models import SaleIn
from agent.render import to_wire
from agent.ruleset import load_ruleset
from sync.hq.audit import RulesetLibrary, audit_journal_sale
from sync.hq.auditor import audit_rows

RULES = REPO_ROOT / "config" / "rules"


def _sale_body(at: dt.datetime = MEMBER_DAY) -> dict[str, Any]:
    """A sale journal body as agent/service.py writes it: the POS request, the member state, the result."""
    ruleset = load_ruleset(RULES / "888-mall.toml")
    request = {
        "sale_id": "S-1",
        "member_id": "M000124",
        "lines": [
            {"line_id": "1", "sku": "6901234567892", "category": "womenswear", "qty": "1", "unit_price": "1000.00"},
            {"line_id": "2", "sku": "69000012", "category": "fresh", "qty": "0.356", "unit_price": "45.80"},
        ],
        "tenders": [{"kind": "cash", "amount": "849.62"}],
    }
    member_doc = {"member_id": "M000124", "tier": "gold", "points_balance": 500, "rebate_balance": "0.00"}
    basket = dataclasses.replace(SaleIn.model_validate_json(json.dumps(request)).to_basket(), at=at)
    result = to_wire(price(basket, parse_member(member_doc), ruleset, at))
    return {
        "v": 1,
        "kind": "sale",
        "store": "s1",
        "lane": "l1",
        "rules": {"id": ruleset.id, "version": ruleset.version, "digest": ruleset.digest},
        "sale_id": "S-1",
        "request": request,
        "member": member_doc,
        "result": json.loads(json.dumps(result)),
    }


@pytest.fixture(scope="module")
def library() -> RulesetLibrary:
    return RulesetLibrary.load(RULES)


def test_the_library_holds_every_shipped_ruleset(library: RulesetLibrary) -> None:
    assert len(library) == len(list(RULES.glob("*.toml")))


def test_an_honest_sale_re_prices_exactly(library: RulesetLibrary) -> None:
    body = _sale_body()
    assert float(body["result"]["totals"]["discount"]) > 0  # the sample earns a discount worth auditing
    assert audit_journal_sale(library, MEMBER_DAY, body) == ("ok", [])


def test_a_tampered_discount_is_a_mismatch_naming_the_value(library: RulesetLibrary) -> None:
    body = _sale_body()
    tampered = copy.deepcopy(body)
    tampered["result"]["totals"]["discount"] = "999.00"
    status, differences = audit_journal_sale(library, MEMBER_DAY, tampered)
    assert status == "mismatch"
    assert [(d.path, d.reported, d.expected) for d in differences] == [
        ("totals.discount", "999.00", body["result"]["totals"]["discount"])
    ]


def test_points_inflated_by_a_lane_are_caught(library: RulesetLibrary) -> None:
    body = _sale_body()
    body["result"]["totals"]["points"] += 100
    status, differences = audit_journal_sale(library, MEMBER_DAY, body)
    assert status == "mismatch"
    assert "totals.points" in [d.path for d in differences]


def test_another_moment_prices_differently_and_is_a_mismatch(library: RulesetLibrary) -> None:
    # The 888 mall's member day is the 10th: the same basket on the 11th gets another discount.
    body = _sale_body()
    status, _ = audit_journal_sale(library, MEMBER_DAY + dt.timedelta(days=1), body)
    assert status == "mismatch"


def test_an_unknown_version_or_another_text_of_it_is_unknown_rules(library: RulesetLibrary) -> None:
    body = _sale_body()
    body["rules"]["version"] = "1999.01"
    assert audit_journal_sale(library, MEMBER_DAY, body) == ("unknown_rules", [])
    body = _sale_body()
    body["rules"]["digest"] = "0" * 64
    assert audit_journal_sale(library, MEMBER_DAY, body) == ("unknown_rules", [])


def test_a_request_that_cannot_be_parsed_again_is_unreadable(library: RulesetLibrary) -> None:
    body = _sale_body()
    body["request"]["lines"][0]["qty"] = "a lot"
    status, differences = audit_journal_sale(library, MEMBER_DAY, body)
    assert status == "unreadable"
    assert differences[0].path == "request"


def test_audit_rows_give_json_details_per_entry(library: RulesetLibrary) -> None:
    good, bad = _sale_body(), _sale_body()
    bad["result"]["totals"]["net"] = "0.01"
    rows = [
        ("e1", MEMBER_DAY.isoformat(), "888-mall", "x", "d", good),
        ("e2", MEMBER_DAY, "888-mall", "x", "d", bad),
    ]
    results = audit_rows(library, rows)
    assert [(r[0], r[1]) for r in results] == [("e1", "ok"), ("e2", "mismatch")]
    assert json.loads(results[1][2])[0]["path"] == "totals.net"


def test_a_ruleset_directory_with_a_broken_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "broken.toml").write_text("id = ", encoding="utf-8")
    with pytest.raises(Exception, match="ruleset"):
        RulesetLibrary.load(tmp_path)
