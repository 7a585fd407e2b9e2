"""What-if (sync/hq/centre/whatif.py, whatif_cli.py, whatif_api.py): a draft ruleset replayed over a period.

A few days of real 888 mall sales (tests/test_hq_db.py's journal bodies,
priced by the engine as a lane prices them) are ingested into head office's
database, on SQLite and on PostgreSQL: VIP, gold and points-card members and
guests, on the member day (the 10th) and on ordinary days, one VIP sale paid
partly with rebate money, a second store, and sales just outside the period
in local time.  The expected figures are computed here, independently, by
pricing each sale with ``agent.engine.price`` under both rulesets (the rest
of the bill paid in cash, as the module documents), never as constants.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import MEMBER_DAY, REPO_ROOT, RULES_888
from fastapi import FastAPI
from test_hq_db import LANE, MEMBER, RULESET, STORE, batch_of, raw, sale_body

from agent.basket import Tender, parse_member
from agent.engine import price
from agent.errors import InputError, RulesetError
from agent.money import format_fen, parse_money
from agent.pos_models import SaleIn
from agent.ruleset import Ruleset, parse_ruleset
from sync.hq.audit import RulesetLibrary
from sync.hq.centre import whatif_api
from sync.hq.centre.programme import ProgrammeError
from sync.hq.centre.staff import bearer_value
from sync.hq.centre.whatif import (
    Period,
    SaleEntry,
    WhatIf,
    WhatIfReport,
    check_period,
    live_ruleset,
    parse_draft,
    price_sale,
    replay,
)
from sync.hq.config import parse_hq_config
from sync.hq.db import HqDatabase
from sync.hq.owner import DbOwner
from sync.wire import RawEntry

SHANGHAI = dt.timezone(dt.timedelta(hours=8))
LIVE_TEXT = RULES_888.read_text(encoding="utf-8")
GOLD = {**MEMBER, "member_id": "M0002", "tier": "gold", "rebate_balance": "0.00"}
POINTS_CARD = {**MEMBER, "member_id": "M0003", "tier": "points_card", "rebate_balance": "0.00"}
SHOPPERS: tuple[dict[str, Any] | None, ...] = (MEMBER, GOLD, POINTS_CARD, None)
# The period: 9-11 December (the 10th is the member day).  Just outside it, in Shanghai time: a sale a
# minute before midnight on the 8th, and one ten minutes past midnight on the 12th (still the 11th in UTC).
IN_PERIOD = (
    dt.datetime(2026, 12, 9, 11, 0, tzinfo=SHANGHAI),
    MEMBER_DAY,
    dt.datetime(2026, 12, 11, 23, 30, tzinfo=SHANGHAI),
)
OUTSIDE = (dt.datetime(2026, 12, 8, 23, 59, tzinfo=SHANGHAI), dt.datetime(2026, 12, 12, 0, 10, tzinfo=SHANGHAI))
PERIOD = Period(dt.date(2026, 12, 9), dt.date(2026, 12, 11))
STORE_2 = "s02"
REBATE_FEN = 10_000
STAFF_SECRET = "desk-secret-for-the-tests"


# --- drafts: the live file, edited as a manager would ----------------------------------------


def _edit(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, old
    return text.replace(old, new)


def _draft_version(text: str) -> str:
    return _edit(text, 'version = "2026.11.1"', 'version = "2026.12.draft"')


IDENTICAL = _draft_version(LIVE_TEXT)
VIP_85 = _edit(IDENTICAL, 'rates = { vip = "0.90", gold = "0.88" }', 'rates = { vip = "0.85", gold = "0.88" }')
DOUBLE_POINTS = (
    IDENTICAL
    + """
[[rules]]
id = "member-day-double-points"
kind = "points_multiplier"
label = { zh-CN = "会员日双倍积分", en = "Double points on member day" }
factor = "2"
[rules.when]
days_of_month = [10]
"""
)
_MEMBER_DAY_RULE = IDENTICAL[IDENTICAL.index('[[rules]]\nid = "member-day"') :]
_MEMBER_DAY_RULE = _MEMBER_DAY_RULE[: _MEMBER_DAY_RULE.index("[[rules]]", 1)]
NO_MEMBER_DAY = _edit(IDENTICAL, _MEMBER_DAY_RULE, "")
NO_REBATE = _edit(IDENTICAL, '不得兑取现金".\naccepted = true', '不得兑取现金".\naccepted = false')
INVALID = _edit(
    IDENTICAL,
    'rate = "0.95"\n[rules.when]\ntiers = ["vip", "gold"]',
    'rate = "1.50"\n[rules.when]\ntiers = ["vip", "gold"]',
)


def test_the_drafts_say_what_they_should() -> None:
    # The edits above are plain text: check each made the change meant, and only that.
    live, vip85 = parse_ruleset(LIVE_TEXT), parse_ruleset(VIP_85)
    assert {r.id: r.rates for r in vip85.rules}["tier-rate"]["vip"] == 8500
    assert {r.id for r in parse_ruleset(NO_MEMBER_DAY).rules} == {r.id for r in live.rules} - {"member-day"}
    assert {r.id for r in parse_ruleset(DOUBLE_POINTS).rules} == {r.id for r in live.rules} | {
        "member-day-double-points"
    }
    assert live.tenders.rebate_accepted
    assert not parse_ruleset(NO_REBATE).tenders.rebate_accepted
    assert parse_ruleset(IDENTICAL).rules == live.rules


# --- the journal ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Sold:
    """A sale ingested: its journal body, moment and store."""

    body: dict[str, Any]
    at: dt.datetime
    store: str


def _ingest(db: HqDatabase) -> list[Sold]:
    sold: list[Sold] = []
    for store, moments in ((STORE, (*IN_PERIOD, *OUTSIDE)), (STORE_2, (MEMBER_DAY,))):
        entries: list[RawEntry] = []
        for at in moments:
            for shopper in SHOPPERS:
                sold.append(
                    Sold(
                        sale_body(f"S{len(entries) + 1:05d}", member=shopper, variant=len(sold), at=at, store=store),
                        at,
                        store,
                    )
                )
                entries.append(raw(len(entries) + 1, "sale", sold[-1].body, at=at))
            if store == STORE:
                body = sale_body(f"S{len(entries) + 1:05d}", rebate_fen=REBATE_FEN, variant=len(sold), at=at)
                sold.append(Sold(body, at, store))
                entries.append(raw(len(entries) + 1, "sale", body, at=at))
        applied = db.apply_batch(batch_of(entries, store=store), f"retail/{store}/{LANE}/journal")
        assert applied.sales_applied == len(entries)
    return sold


@pytest.fixture
def journal(db: HqDatabase) -> list[Sold]:
    return _ingest(db)


def _in(period: Period, sold: list[Sold]) -> list[Sold]:
    return [
        s
        for s in sold
        if period.first <= s.at.astimezone(SHANGHAI).date() <= period.last
        and (period.store is None or period.store == s.store)
    ]


def _priced_as_the_customer_pays(ruleset: Ruleset, sale: Sold) -> Any:
    """The sale under ``ruleset``: the same rebate money, the rest of the new amount due in cash."""
    request = sale.body["request"]
    member = None if sale.body["member"] is None else parse_member(sale.body["member"])
    basket = dataclasses.replace(SaleIn.model_validate(request).to_basket(), tenders=())
    due = price(basket, member, ruleset, sale.at).net_fen
    rebate = sum(parse_money(t["amount"]) for t in request["tenders"] if t["kind"] == "rebate")
    tenders = ((Tender("rebate", rebate),) if rebate else ()) + (Tender("cash", due - rebate),)
    priced = price(dataclasses.replace(basket, tenders=tenders), member, ruleset, sale.at)
    assert priced.unpaid_fen == 0
    return priced


def _expected(ruleset: Ruleset, sales: list[Sold]) -> dict[str, tuple[int, int, int]]:
    """Per rule: (discount fen, points, sales touched), summed sale by sale."""
    discount: dict[str, int] = defaultdict(int)
    points: dict[str, int] = defaultdict(int)
    touched: dict[str, int] = defaultdict(int)
    for sale in sales:
        priced = _priced_as_the_customer_pays(ruleset, sale)
        rules: set[str] = set()
        for line in priced.lines:
            for d in line.discounts:
                discount[d.rule_id] += d.amount_fen
                rules.add(d.rule_id)
            for p in line.points_detail:
                points[p.rule_id] += p.points
                rules.add(p.rule_id)
        for rule_id in rules:
            touched[rule_id] += 1
    return {rule_id: (discount[rule_id], points[rule_id], touched[rule_id]) for rule_id in touched}


def _run(db: HqDatabase, draft_text: str, period: Period = PERIOD, **kw: Any) -> WhatIfReport:
    draft = parse_draft(draft_text)
    live = live_ruleset(RulesetLibrary([RULESET]), "888-mall", draft)
    return replay(db, live, draft, period, **kw)


def _rows(report: WhatIfReport) -> dict[str, Any]:
    return {row.rule_id: row for row in report.rules}


def _figures(report: WhatIfReport, side: str) -> dict[str, tuple[int, int, int]]:
    out = {}
    for row in report.rules:
        tally = getattr(row, side)
        if tally.sales:
            out[row.rule_id] = (tally.discount_fen, tally.points, tally.sales)
    return out


# --- the replay ----------------------------------------------------------------------------


def test_an_identical_draft_reports_no_difference_for_any_rule(db: HqDatabase, journal: list[Sold]) -> None:
    report = _run(db, IDENTICAL)
    in_period = _in(PERIOD, journal)
    assert report.read == report.compared == len(in_period) == 3 * 5 + 4
    assert report.failures == ()
    assert report.settings_changed == ()
    assert report.live.version == "2026.11.1"
    assert report.draft.version == "2026.12.draft"
    assert [row.rule_id for row in report.rules] == [rule.id for rule in RULESET.rules]
    for row in report.rules:
        assert row.status == "unchanged"
        assert row.live == row.draft
        assert (row.discount_delta_fen, row.points_delta) == (0, 0)
    assert report.live_totals == report.draft_totals
    # The lanes priced with this very version: re-pricing live gives what they recorded.
    assert report.reported == report.live_totals
    assert _figures(report, "live") == _expected(RULESET, in_period)
    # Every discount and point belongs to a rule.
    assert sum(row.live.discount_fen for row in report.rules) == report.live_totals.discount_fen > 0
    assert sum(row.live.points for row in report.rules) == report.live_totals.points > 0
    doc = report.doc()
    assert {row["delta"]["discount"] for row in doc["rules"]} == {"0.00"}
    assert doc["totals"]["delta"] == {"gross": "0.00", "discount": "0.00", "net": "0.00", "points": 0}


def test_a_deeper_vip_rate_costs_the_sum_of_each_sales_difference(db: HqDatabase, journal: list[Sold]) -> None:
    report = _run(db, VIP_85)
    in_period = _in(PERIOD, journal)
    draft = parse_ruleset(VIP_85)
    live_expected, draft_expected = _expected(RULESET, in_period), _expected(draft, in_period)
    assert report.failures == ()  # the rebate sale fits: less cash, the same rebate money
    assert _figures(report, "live") == live_expected
    assert _figures(report, "draft") == draft_expected
    rows = _rows(report)
    tier_rate = rows["tier-rate"]
    assert tier_rate.status == "changed"
    per_sale = 0
    for sale in in_period:
        by_rule = [
            sum(
                d.amount_fen
                for line in _priced_as_the_customer_pays(r, sale).lines
                for d in line.discounts
                if d.rule_id == "tier-rate"
            )
            for r in (RULESET, draft)
        ]
        per_sale += by_rule[1] - by_rule[0]
    assert tier_rate.discount_delta_fen == per_sale > 0
    # The member day's 5% is taken of what the tier rate leaves: it gives a little less on VIP sales.
    assert rows["member-day"].status == "unchanged"
    assert rows["member-day"].discount_delta_fen < 0
    # Paying less, VIP members earn fewer points.
    assert rows["earn-base"].points_delta == draft_expected["earn-base"][1] - live_expected["earn-base"][1] < 0
    live, new = report.live_totals, report.draft_totals
    assert new.discount_fen - live.discount_fen == sum(row.discount_delta_fen for row in report.rules)
    assert new.gross_fen == live.gross_fen
    assert new.net_fen - live.net_fen == -(new.discount_fen - live.discount_fen)
    assert report.doc()["rules"][[r.rule_id for r in report.rules].index("tier-rate")]["delta"][
        "discount"
    ] == format_fen(per_sale)


def test_a_double_points_rule_reports_the_extra_points(db: HqDatabase, journal: list[Sold]) -> None:
    report = _run(db, DOUBLE_POINTS)
    in_period = _in(PERIOD, journal)
    expected = _expected(parse_ruleset(DOUBLE_POINTS), in_period)
    row = _rows(report)["member-day-double-points"]
    assert row.status == "added"
    assert (row.live.points, row.live.sales) == (0, 0)
    extra, touched = expected["member-day-double-points"][1], expected["member-day-double-points"][2]
    # Every member on the 10th (both stores; guests earn nothing), and nobody on the 9th or 11th.
    assert touched == sum(1 for s in in_period if s.at == MEMBER_DAY and s.body["member"] is not None) == 7
    assert (row.draft.points, row.draft.sales, row.points_delta) == (extra, touched, extra)
    assert extra > 0
    assert row.discount_delta_fen == 0
    # Points are rounded once per basket and apportioned back to the rules: the base rule's share moves by
    # rounding, and the report shows it as the engine gives it.
    live_base = _expected(RULESET, in_period)["earn-base"][1]
    base = _rows(report)["earn-base"]
    assert base.points_delta == expected["earn-base"][1] - live_base
    assert abs(base.points_delta) <= touched
    assert report.draft_totals.points - report.live_totals.points == extra + base.points_delta
    assert report.draft_totals.discount_fen == report.live_totals.discount_fen


def test_a_removed_rule_shows_its_live_discount_as_saved(db: HqDatabase, journal: list[Sold]) -> None:
    report = _run(db, NO_MEMBER_DAY)
    in_period = _in(PERIOD, journal)
    given = _expected(RULESET, in_period)["member-day"][0]
    row = _rows(report)["member-day"]
    assert row.status == "removed"
    assert row.live.discount_fen == given > 0
    assert (row.draft.discount_fen, row.draft.sales, row.discount_delta_fen) == (0, 0, -given)
    assert report.doc()["rules"][[r.rule_id for r in report.rules].index("member-day")]["delta"]["discount"] == (
        "-" + format_fen(given)
    )
    assert _rows(report)["tier-rate"].discount_delta_fen == 0
    assert report.live_totals.discount_fen - report.draft_totals.discount_fen == given


def test_sales_outside_the_period_or_the_store_are_not_counted(db: HqDatabase, journal: list[Sold]) -> None:
    for period in (
        PERIOD,
        Period(dt.date(2026, 12, 12), dt.date(2026, 12, 12)),  # ten past midnight: the 12th locally, the 11th in UTC
        Period(dt.date(2026, 12, 8), dt.date(2026, 12, 8)),
        Period(dt.date(2026, 12, 10), dt.date(2026, 12, 10), STORE_2),
        Period(dt.date(2026, 12, 9), dt.date(2026, 12, 9), STORE_2),
        Period(dt.date(2026, 11, 1), dt.date(2026, 11, 30)),
    ):
        report = _run(db, IDENTICAL, period)
        in_period = _in(period, journal)
        assert report.read == len(in_period), period
        assert _figures(report, "live") == _expected(RULESET, in_period), period
    assert _run(db, IDENTICAL, Period(dt.date(2026, 12, 12), dt.date(2026, 12, 12))).read == 5
    assert _run(db, IDENTICAL, Period(dt.date(2026, 12, 10), dt.date(2026, 12, 10), STORE_2)).read == 4
    assert _run(db, IDENTICAL, Period(dt.date(2026, 11, 1), dt.date(2026, 11, 30))).read == 0


def test_the_report_does_not_depend_on_the_chunk_size(db: HqDatabase, journal: list[Sold]) -> None:
    assert journal
    whole = _run(db, VIP_85, chunk=500).doc()
    assert _run(db, VIP_85, chunk=1).doc() == whole
    assert _run(db, VIP_85, chunk=4).doc() == whole


def test_sales_the_draft_cannot_price_are_counted_by_reason_and_left_out(db: HqDatabase, journal: list[Sold]) -> None:
    report = _run(db, NO_REBATE)
    in_period = _in(PERIOD, journal)
    with_rebate = [s for s in in_period if any(t["kind"] == "rebate" for t in s.body["request"]["tenders"])]
    assert len(with_rebate) == 3
    assert [(f.ruleset, f.reason, f.sales) for f in report.failures] == [("draft", "tender_not_accepted", 3)]
    assert report.settings_changed == ("tenders",)
    assert len(report.failures[0].examples) == 3
    assert report.read == len(in_period)
    assert report.compared == report.live_totals.sales == report.draft_totals.sales == len(in_period) - 3
    # The sales compared are the same on both sides, and nothing else changed for them.
    assert report.live_totals == report.draft_totals
    assert _figures(report, "live") == _expected(RULESET, [s for s in in_period if s not in with_rebate])
    doc = report.doc()
    assert doc["sales"] == {"read": len(in_period), "compared": len(in_period) - 3, "left_out": 3}


def test_fitting_the_tenders_keeps_the_balance_tenders_and_resizes_the_cash(journal: list[Sold]) -> None:
    sale = next(s for s in journal if any(t["kind"] == "rebate" for t in s.body["request"]["tenders"]))
    request = SaleIn.model_validate(sale.body["request"])
    basket = dataclasses.replace(request.to_basket(), at=sale.at)
    member = parse_member(sale.body["member"])
    draft = parse_ruleset(VIP_85)
    with pytest.raises(InputError) as raised:
        price(basket, member, draft)  # the cash the lane took is now more than is due
    assert raised.value.issues[0].code == "tenders_exceed_due"
    priced = price_sale(basket, member, draft)
    assert [(t.kind, t.amount_fen) for t in priced.tenders] == [
        ("rebate", REBATE_FEN),
        ("cash", priced.net_fen - REBATE_FEN),
    ]
    assert priced.unpaid_fen == 0
    # A draft that costs the customer more: the cash grows.
    dearer = parse_ruleset(_edit(IDENTICAL, 'rates = { vip = "0.90"', 'rates = { vip = "0.95"'))
    more = price_sale(basket, member, dearer)
    assert more.net_fen > priced.net_fen
    assert [(t.kind, t.amount_fen) for t in more.tenders] == [
        ("rebate", REBATE_FEN),
        ("cash", more.net_fen - REBATE_FEN),
    ]
    # Rebate money above the new amount due does not fit: the engine's error, for the caller to count.
    generous = parse_ruleset(_edit(IDENTICAL, 'rates = { vip = "0.90"', 'rates = { vip = "0.05"'))
    with pytest.raises(InputError) as raised:
        price_sale(basket, member, generous)
    assert raised.value.issues[0].code == "tenders_exceed_due"


def test_an_invalid_draft_or_period_is_refused_with_the_problem_named() -> None:
    with pytest.raises(RulesetError) as raised:
        parse_draft(INVALID)
    assert [(i.field, i.code) for i in raised.value.issues] == [("rules[1]", "value_error")]
    assert "member-day" in raised.value.issues[0].message
    assert "1.50" in raised.value.issues[0].message
    with pytest.raises(RulesetError) as raised:
        parse_draft("[ruleset\nid =")
    assert raised.value.issues[0].code == "toml_syntax"
    with pytest.raises(InputError) as refused:
        check_period(dt.date(2026, 12, 11), dt.date(2026, 12, 9))
    assert refused.value.issues[0].code == "period_reversed"
    with pytest.raises(InputError) as refused:
        check_period(dt.date(2025, 1, 1), dt.date(2026, 12, 9))
    assert refused.value.issues[0].code == "period_too_long"
    assert check_period(dt.date(2026, 12, 9), dt.date(2026, 12, 11)) == PERIOD


def test_live_is_the_newest_version_of_the_configured_ruleset() -> None:
    newer = parse_ruleset(_edit(LIVE_TEXT, 'version = "2026.11.1"', 'version = "2026.11.10"'))
    older = parse_ruleset(_edit(LIVE_TEXT, 'version = "2026.11.1"', 'version = "2026.11.9"'))
    library = RulesetLibrary([RULESET, newer, older])
    other = parse_ruleset(_edit(IDENTICAL, 'id = "888-mall"', 'id = "888-mall-xmas"'))
    assert live_ruleset(library, "888-mall", other) is newer  # the draft may carry another id
    assert live_ruleset(library, None, parse_ruleset(IDENTICAL)) is newer
    with pytest.raises(ProgrammeError, match="888-mall-xmas"):
        live_ruleset(library, None, other)


def test_unreadable_entries_are_counted_not_fatal() -> None:
    whatif = WhatIf(RULESET, parse_ruleset(IDENTICAL), PERIOD)
    whatif.add(SaleEntry("e-1", MEMBER_DAY, '{"request": {"lines": []}}', 0, 0, 0, 0))
    whatif.add(SaleEntry("e-2", MEMBER_DAY, "not json", 0, 0, 0, 0))
    report = whatif.report()
    assert (report.read, report.compared) == (2, 0)
    assert [(f.ruleset, f.reason, f.sales, f.examples) for f in report.failures] == [
        ("journal", "unreadable", 2, ("e-1", "e-2"))
    ]


# --- lane-hq whatif ------------------------------------------------------------------------


def _config(tmp_path: Path, db_url: str) -> Path:
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "888-mall-2026.11.1.toml").write_text(LIVE_TEXT, encoding="utf-8")
    config = tmp_path / "hq.toml"
    config.write_text(
        f'[database]\nurl = "{db_url}"\n\n[rules]\ndirectory = "{rules}"\n\n[centre]\nruleset = "888-mall"\n',
        encoding="utf-8",
    )
    return config


def _cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sync.hq.cli", "whatif", *args, "--config", str(config)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_lane_hq_whatif_prints_the_table_and_json(
    db: HqDatabase, db_url: str, journal: list[Sold], tmp_path: Path
) -> None:
    assert journal
    config = _config(tmp_path, db_url)
    draft = tmp_path / "draft.toml"
    draft.write_text(VIP_85, encoding="utf-8")
    period = ("--from", "2026-12-09", "--to", "2026-12-11")
    expected = _run(db, VIP_85)
    shown = _cli(config, "--draft", str(draft), *period, "--lang", "en")
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert "live 888-mall 2026.11.1  vs  draft 888-mall 2026.12.draft" in shown.stdout
    assert f"sales: {expected.read} in the period, {expected.read} compared, 0 left out" in shown.stdout
    row = next(line for line in lines if line.startswith("tier-rate "))
    tier = _rows(expected)["tier-rate"]
    assert row.split()[-7:] == [
        format_fen(tier.live.discount_fen),
        format_fen(tier.draft.discount_fen),
        "+" + format_fen(tier.discount_delta_fen),
        str(tier.live.points),
        str(tier.draft.points),
        "0",
        "changed",
    ]
    total = next(line for line in lines if line.startswith("total "))
    live, new = expected.live_totals, expected.draft_totals
    assert total.split()[1:4] == [
        format_fen(live.discount_fen),
        format_fen(new.discount_fen),
        "+" + format_fen(new.discount_fen - live.discount_fen),
    ]
    assert "Member discount" in row
    as_json = _cli(config, "--draft", str(draft), *period, "--json")
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout) == expected.doc()
    one_store = _cli(
        config, "--draft", str(draft), "--from", "2026-12-10", "--to", "2026-12-10", "--store", STORE_2, "--json"
    )
    assert json.loads(one_store.stdout)["sales"]["read"] == 4
    # Refused: an invalid draft (the problem named, nothing replayed), a reversed period, no such ruleset.
    bad = tmp_path / "bad.toml"
    bad.write_text(INVALID, encoding="utf-8")
    refused = _cli(config, "--draft", str(bad), *period)
    assert refused.returncode == 1
    assert "rate 1.50 is above 1" in refused.stderr
    assert "member-day" in refused.stderr
    assert refused.stdout == ""
    backwards = _cli(config, "--draft", str(draft), "--from", "2026-12-11", "--to", "2026-12-09")
    assert (backwards.returncode, "period_reversed" in backwards.stderr) == (1, True)
    unconfigured = tmp_path / "other.toml"
    unconfigured.write_text(config.read_text(encoding="utf-8").replace('"888-mall"', '"kangcheng"'), encoding="utf-8")
    missing = _cli(unconfigured, "--draft", str(draft), *period)
    assert (missing.returncode, "kangcheng" in missing.stderr) == (78, True)


# --- POST /v1/centre/whatif -----------------------------------------------------------------


def test_the_api_answers_staff_with_the_report(db: HqDatabase, journal: list[Sold], tmp_path: Path) -> None:
    assert journal
    secret = tmp_path / "staff.secret"
    secret.write_text(STAFF_SECRET + "\n", encoding="utf-8")
    config = parse_hq_config(f'[centre]\nruleset = "888-mall"\nstaff_secret_file = "{secret}"\n')
    owner = DbOwner(db)
    app = FastAPI()
    app.include_router(whatif_api.router(config, owner, RulesetLibrary([RULESET])))
    staff = {"Authorization": f"Bearer {bearer_value(STAFF_SECRET.encode(), 'desk.anna')}"}
    body = {"draft": VIP_85, "from": "2026-12-09", "to": "2026-12-11"}
    expected = _run(db, VIP_85).doc()

    async def scenario() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://hq") as client:
            assert (await client.post("/v1/centre/whatif", json=body)).status_code == 401
            answer = await client.post("/v1/centre/whatif", json=body, headers=staff)
            assert answer.status_code == 200, answer.text
            assert answer.json() == expected
            store = await client.post(
                "/v1/centre/whatif",
                json={**body, "from": "2026-12-10", "to": "2026-12-10", "store": STORE_2},
                headers=staff,
            )
            assert store.json()["sales"]["read"] == 4
            invalid = await client.post("/v1/centre/whatif", json={**body, "draft": INVALID}, headers=staff)
            assert invalid.status_code == 422
            error = invalid.json()["error"]
            assert error["code"] == "invalid_ruleset"
            assert "member-day" in error["message"]
            assert [(i["field"], i["code"]) for i in error["issues"]] == [("rules[1]", "value_error")]
            toml = await client.post("/v1/centre/whatif", json={**body, "draft": "[ruleset\n"}, headers=staff)
            assert (toml.status_code, toml.json()["error"]["issues"][0]["code"]) == (422, "toml_syntax")
            backwards = await client.post("/v1/centre/whatif", json={**body, "from": "2026-12-12"}, headers=staff)
            assert (backwards.status_code, backwards.json()["error"]["code"]) == (422, "period_reversed")
            missing = await client.post("/v1/centre/whatif", json={"draft": VIP_85}, headers=staff)
            assert missing.status_code == 422
            assert {i["field"] for i in missing.json()["error"]["issues"]} == {"from", "to"}
            garbage = await client.post("/v1/centre/whatif", content=b"{", headers=staff)
            assert (garbage.status_code, garbage.json()["error"]["code"]) == (400, "json_syntax")

    try:
        asyncio.run(scenario())
    finally:
        owner.close()


def test_the_async_replay_reads_chunk_by_chunk_on_the_owner_thread(db: HqDatabase, journal: list[Sold]) -> None:
    assert journal
    owner = DbOwner(db)
    draft = parse_ruleset(DOUBLE_POINTS)
    expected = _run(db, DOUBLE_POINTS).doc()

    async def scenario() -> dict[str, Any]:
        report = await whatif_api.replay_async(owner, WhatIf(RULESET, draft, PERIOD), chunk=3)
        return report.doc()

    try:
        assert asyncio.run(scenario()) == expected
    finally:
        owner.close()
