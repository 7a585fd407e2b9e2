"""The member centre's reports (sync/hq/centre/reports.py), their CSV, CLI and HTTP API, and the dashboard.

The report tests build a small mall of their own on a real SQLite file and a
real PostgreSQL database: members imported, sales priced by the engine and
ingested through ``HqDatabase.apply_batch`` (a return, a void, a redemption,
a sale a lane mispriced), centre-ledger movements, a termination and a
cancellation, lanes' states; each expected figure is summed from the journal
bodies the test made, never from the database.  The dashboard test serves
head office's API over HTTP (uvicorn, in process) on the demo database of
scripts/dashboard_screenshot.py and opens ``/centre`` in Debian's headless
Chromium, reading the DOM it renders.
"""

from __future__ import annotations

import csv
import datetime as dt
import gzip
import io
import subprocess
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from decimal import Decimal
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import REPO_ROOT
from sqlalchemy import insert
from test_hq_members import KEY, seed_file

from agent.money import parse_money
from agent.ruleset import Ruleset, load_ruleset
from scripts import dashboard_screenshot as demo
from sync.hq.audit import RulesetLibrary
from sync.hq.auditor import audit_rows
from sync.hq.centre import reports
from sync.hq.centre.programme import Programme
from sync.hq.db import HqDatabase
from sync.hq.members import Movement
from sync.hq.schema import member_profiles, tier_history

pytestmark = pytest.mark.timeout(300)

FIRST, LAST = dt.date(2026, 11, 30), dt.date(2026, 12, 27)  # four ISO weeks, Monday to Sunday
WEEKS = [dt.date(2026, 11, 30), dt.date(2026, 12, 7), dt.date(2026, 12, 14), dt.date(2026, 12, 21)]
ODD_CATEGORY = 'wine, "spirits"'  # a comma and quotes: CSV must quote it


def local(day: dt.date, hour: int, minute: int = 0, programme: Programme | None = None) -> dt.datetime:
    tz = dt.timezone(dt.timedelta(hours=8)) if programme is None else programme.tz
    return dt.datetime.combine(day, dt.time(hour, minute), tz)


@dataclass
class Expected:
    """What the scenario's own bodies add up to, for the days FIRST..LAST."""

    spend: dict[tuple[str, str], Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    categories: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    points: Counter[str] = field(default_factory=Counter)
    tampered_sale: str = ""


class Mall:
    """The test's head office: a clock it sets, three lanes, the programme, and the expected figures."""

    def __init__(self, url: str, tmp: Path) -> None:
        self.ruleset: Ruleset = load_ruleset(demo.demo_rules(tmp / "rules"))
        self.programme = Programme(self.ruleset)
        self.clock = demo.Clock(local(dt.date(2026, 11, 15), 9))
        self.db = HqDatabase.open(url, now=self.clock)
        self.feeds = {key: demo.LaneFeed(*key) for key in (("s01", "l01"), ("s01", "l02"), ("s02", "l01"))}
        self.tmp = tmp
        self.expected = Expected()
        self.count = 0

    def at(self, moment: dt.datetime) -> None:
        self.clock.at = moment.astimezone(dt.UTC)

    def send(self, feed: demo.LaneFeed, kind: str, body: dict[str, Any], at: dt.datetime) -> Any:
        entry = feed.add(kind, body, at, self.ruleset.version)
        self.at(at + dt.timedelta(seconds=30))  # arrives half a minute after the sale: the sync lag
        feed.flush(self.db)
        return entry

    def sale(
        self,
        lane: tuple[str, str],
        at: dt.datetime,
        member: str | None,
        *,
        tier: str = "gold",
        points: int = 0,
        lines: list[dict[str, Any]] | None = None,
        tamper: bool = False,
    ) -> tuple[Any, dict[str, Any]]:
        self.count += 1
        lines = lines or [
            demo.product_line(1, demo.PRODUCTS[0]),  # womenswear 399.00
            demo.product_line(2, demo.PRODUCTS[5]),  # fresh, marked down
        ]
        doc = None if member is None else demo.member_doc(member, tier, points=5000, rebate_fen=0)
        body = demo.sale_body(
            self.ruleset,
            sale_id=f"S{self.count:04d}",
            store=lane[0],
            lane=lane[1],
            at=at,
            lines=lines,
            member=doc,
            points=points,
        )
        if tamper:
            body["result"]["totals"]["points"] += 5
            self.expected.tampered_sale = body["sale_id"]
        entry = self.send(self.feeds[lane], "sale", body, at)
        if FIRST <= self.programme.local_date(at) <= LAST:
            self._count_sale(lane, body, member is not None)
        return entry, body

    def _count_sale(self, lane: tuple[str, str], body: dict[str, Any], is_member: bool) -> None:
        totals = body["result"]["totals"]
        cell = self.expected.spend[lane]
        cell["sales"] += 1
        cell["member_sales"] += int(is_member)
        cell["gross"] += parse_money(totals["gross"])
        cell["discount"] += parse_money(totals["discount"])
        cell["net"] += parse_money(totals["net"])
        cell["member_net"] += parse_money(totals["net"]) if is_member else 0
        for line in body["result"]["lines"]:
            category = self.expected.categories[line["category"]]
            category["lines"] += 1
            category["gross"] += parse_money(line["gross"])
            category["discount"] += parse_money(line["discount"])
            category["net"] += parse_money(line["net"])
        if is_member:
            self.expected.points["issued"] += totals["points"]
            spent = sum(t["points"] or 0 for t in body["result"]["tenders"] if t["kind"] == "points")
            self.expected.points["redeemed"] += spent

    def give_back(self, lane: tuple[str, str], entry: Any, sale: dict[str, Any], at: dt.datetime, kind: str) -> None:
        """A return of the sale's last line, or a void of the whole sale."""
        if kind == "return":
            line = sale["result"]["lines"][-1]
            body = demo.return_body(entry.id, sale, f"R{self.count:04d}", [line["line_id"]], at)
            self.expected.categories[line["category"]]["refunded"] += parse_money(line["net"])
            if sale["member"] is not None:
                self.expected.points["returned"] += body["points_reversed"]
        else:
            body = demo.void_body(entry.id, sale, at)
            for line in sale["result"]["lines"]:
                self.expected.categories[line["category"]]["refunded"] += parse_money(line["net"])
            if sale["member"] is not None:
                self.expected.points["voided"] += body["points_reversed"] - body["points_restored"]
        self.expected.spend[lane]["refunded"] += parse_money(body["refund"])
        self.send(self.feeds[lane], kind, body, at)

    def query(self, period: reports.Period = "week", churn_factor: float = 3.0) -> reports.Query:
        now = local(LAST, 23, 0)
        return reports.make_query(self.programme, now, first=FIRST, last=LAST, period=period, churn_factor=churn_factor)

    def report(self, name: str, period: reports.Period = "week") -> reports.Report:
        with self.db.reading() as conn:
            return reports.run_report(conn, self.programme, name, self.query(period))


def build_mall(url: str, tmp: Path) -> Mall:
    mall = Mall(url, tmp)
    db, day = mall.db, dt.timedelta(days=1)
    # Before the range: four members imported (all gold in the file), then tiers of their own.
    db.members.import_members(seed_file(tmp / "seed.jsonl", 4, points=5000), KEY)
    db.members.set_tier("M0002", "vip", None, None, "vip")
    # M0006 is imported before the range, but registered at the desk (its profile) in the week of 12-14.
    mall.at(local(dt.date(2026, 12, 1), 9))
    db.members.import_members(seed_file(tmp / "m6.jsonl", 1, first=6), KEY)
    db.members.set_tier("M0006", "points_card", None, None, "points card")
    with db.transaction() as conn:
        at = local(dt.date(2026, 12, 16), 11).astimezone(dt.UTC)
        conn.execute(
            insert(member_profiles).values(
                member_id="M0006", status="active", marketing_consent=0, registered_at=at, updated_at=at
            )
        )
    mall.at(local(dt.date(2026, 12, 8), 9))
    db.members.import_members(seed_file(tmp / "m5.jsonl", 1, first=5), KEY)
    db.members.set_tier("M0005", "points_card", None, None, "points card")

    regular, quiet, other = ("s01", "l01"), ("s01", "l02"), ("s02", "l01")
    # Outside the range by minutes of local time (23:50 the night before, 00:10 the morning after).
    mall.sale(other, local(FIRST - day, 23, 50), None)
    # M0001 comes every third day; on 12-09 it pays 300 points.
    for n in range(10):
        when = FIRST + n * 3 * day
        mall.sale(regular, local(when, 11), "M0001", points=300 if when == dt.date(2026, 12, 9) else 0)
    # M0002 came every other day, then stopped after 12-06: the churn warning's member.
    for n in range(4):
        entry, body = mall.sale(quiet, local(FIRST + 2 * n * day, 15), "M0002", tier="vip")
        if n == 2:
            mall.give_back(quiet, entry, body, local(FIRST + 2 * n * day, 17), "return")
    # M0004 too, but it cancels (not listed: it left); M0003 once, then terminated.
    for n in range(3):
        mall.sale(quiet, local(FIRST + n * day, 16), "M0004")
    mall.sale(quiet, local(FIRST + day, 18), "M0003", tamper=True)
    # M0005 (points card) twice; the second sale is voided.
    mall.sale(quiet, local(dt.date(2026, 12, 10), 12), "M0005", tier="points_card")
    entry, body = mall.sale(quiet, local(dt.date(2026, 12, 20), 12), "M0005", tier="points_card")
    mall.give_back(quiet, entry, body, local(dt.date(2026, 12, 20), 12, 5), "void")
    # Guests, one buying a category whose name needs quoting in CSV.
    for when in (dt.date(2026, 12, 5), dt.date(2026, 12, 12)):
        mall.sale(other, local(when, 19), None)
    odd = [{"line_id": "1", "sku": "6900000000098", "category": ODD_CATEGORY, "qty": "1", "unit_price": "58.00"}]
    mall.sale(other, local(LAST, 23, 30), None, lines=odd)
    mall.sale(other, local(LAST + day, 0, 10), None)

    # Head office's movements (what the jobs and staff write through members.record_movements).
    mall.at(local(dt.date(2026, 12, 10), 8))
    db.members.record_movements(
        [
            Movement("rebate:2026-12-10:M0001", "M0001", "rebate_credit", 0, 1234, dt.date(2026, 12, 10), "job", "r"),
            Movement("rebate:2026-12-10:M0002", "M0002", "rebate_credit", 0, 100, dt.date(2026, 12, 10), "job", "r"),
        ]
    )
    db.members.record_movements(
        [Movement("expire:2026-12-15:M0001", "M0001", "expire", -100, 0, dt.date(2026, 12, 15), "job", "lapsed")]
    )
    mall.expected.points["expired"] += 100
    mall.at(local(dt.date(2026, 12, 20), 10))  # adjust() counts on the UTC date of head office's clock
    db.members.adjust("M0002", 50, 0, "goodwill", actor="staff:test")
    mall.expected.points["adjusted"] += 50
    with db.transaction() as conn:
        # The tiers job's termination and the desk's cancellation, written as those modules write them.
        conn.execute(
            insert(tier_history).values(
                key="terminate:M0003",
                member_id="M0003",
                kind="terminate",
                from_tier="gold",
                to_tier=None,
                effective_from=dt.date(2026, 12, 10),
                decided_on=dt.date(2026, 12, 9),
                reason="inactive",
                at_utc=mall.clock.at,
            )
        )
        at = local(dt.date(2026, 12, 23), 14).astimezone(dt.UTC)
        conn.execute(
            insert(member_profiles).values(
                member_id="M0004",
                status="cancelled",
                marketing_consent=0,
                registered_at=at - dt.timedelta(days=500),
                updated_at=at,
                cancelled_at=at,
            )
        )
    regular_feed = mall.feeds[regular]
    db.record_state("s01", "l01", 3, "online", {"backlog": 2, "last_seq": regular_feed.seq + 2})
    db.record_state("s02", "l01", 2, "offline", {})
    library = RulesetLibrary([mall.ruleset])
    db.record_audits(audit_rows(library, db.unaudited_sales(1000)))
    return mall


@pytest.fixture
def mall(db_url: str, tmp_path: Path) -> Any:
    built = build_mall(db_url, tmp_path)
    try:
        yield built
    finally:
        built.db.close()


# --- (1) the figures ---------------------------------------------------------------------------


def test_members_over_time_count_new_active_churned_and_members_by_week(mall: Mall) -> None:
    report = mall.report("members")
    assert report.column("period") == WEEKS
    assert report.column("new") == [0, 1, 1, 0]  # M0005 imported 12-08; M0006 by its profile, 12-16
    assert report.column("active") == [4, 2, 2, 1]  # guests never count
    assert report.column("churned") == [0, 1, 0, 1]  # M0003 terminated 12-10; M0004 cancelled 12-23
    assert report.column("total") == [4, 4, 5, 4]
    by_month = mall.report("members", "month")
    assert by_month.column("period") == [dt.date(2026, 11, 1), dt.date(2026, 12, 1)]
    assert by_month.column("active") == [3, 5]  # 11-30: M0001, M0002, M0004; December: all five who bought
    assert sum(by_month.column("new")) == 2
    by_day = mall.report("members", "day")
    assert len(by_day.rows) == 28
    assert by_day.rows[0][:3] == (FIRST, 0, 3)


def test_tier_distribution_counts_the_members_who_have_not_left(mall: Mall) -> None:
    report = mall.report("tiers")
    assert [(row[0], row[3]) for row in report.rows] == [("points_card", 2), ("vip", 1), ("gold", 1)]
    assert report.column("share") == [Decimal("50.0"), Decimal("25.0"), Decimal("25.0")]
    assert report.records()[0]["label"] == "Points card"


def test_points_report_adds_up_the_ledger_of_the_range(mall: Mall) -> None:
    report = mall.report("points")
    totals = {column.key: sum(report.column(column.key)) for column in report.columns[1:]}
    expected = mall.expected.points
    assert totals["issued"] == expected["issued"] > 0
    assert totals["redeemed"] == expected["redeemed"] == 300
    assert totals["returned"] == expected["returned"] > 0
    assert totals["voided"] == expected["voided"] > 0
    assert totals["expired"] == 100
    assert totals["adjusted"] == 50
    assert totals["claimed"] == 0
    assert totals["net"] == (
        totals["issued"]
        + totals["claimed"]
        + totals["adjusted"]
        - totals["redeemed"]
        - totals["returned"]
        - totals["voided"]
        - totals["expired"]
    )
    redeemed_week = report.column("redeemed")
    assert redeemed_week == [0, 300, 0, 0]  # 12-09 is in the week of 12-07


def test_spend_by_store_lane_and_category_match_the_bodies(mall: Mall) -> None:
    keys = ("sales", "member_sales", "gross", "discount", "net", "member_net", "refunded")
    expected = mall.expected.spend
    lanes = mall.report("spend_by_lane")
    assert [(row[0], row[1]) for row in lanes.rows] == sorted(expected)
    for row in lanes.records():
        cell = expected[row["store"], row["lane"]]
        assert {key: row[key] for key in keys} == {
            key: cell[key] if key in {"sales", "member_sales"} else _money(cell[key]) for key in keys
        }
        assert row["net_after_refunds"] == _money(cell["net"] - cell["refunded"])
    stores = {row[0]: row for row in mall.report("spend_by_store").rows}
    assert stores["s01"][1] == expected["s01", "l01"]["sales"] + expected["s01", "l02"]["sales"]
    assert stores["s02"][5] == expected["s02", "l01"]["net"]
    assert stores["s02"][1] == 3  # 12-05, 12-12, 12-27 23:30; not the two minutes outside the range

    categories = mall.report("spend_by_category")
    found = {row[0]: dict(zip([c.key for c in categories.columns], row, strict=True)) for row in categories.rows}
    assert set(found) == set(mall.expected.categories)
    for name, cell in mall.expected.categories.items():
        assert found[name]["lines"] == cell["lines"]
        assert found[name]["net"] == cell["net"]
        assert found[name]["refunded"] == cell["refunded"]
    # Every line's net adds up to the sales' net, and the refunds to the returns' and voids'.
    assert sum(categories.column("net")) == sum(cell["net"] for cell in expected.values())
    assert sum(categories.column("refunded")) == sum(cell["refunded"] for cell in expected.values())


def _money(fen: int) -> str:
    return reports.output_value(reports.Column("x", "x", "money"), fen)  # type: ignore[no-any-return]


def test_churn_warning_lists_the_member_gone_quiet_not_the_regular_nor_those_who_left(mall: Mall) -> None:
    report = mall.report("churn")
    assert report.column("member_id") == ["M0002"]
    [row] = report.records()
    assert row == {
        "member_id": "M0002",
        "tier": "vip",
        "visits": 4,
        "last_visit": "2026-12-06",
        "days_quiet": 21,
        "usual_interval_days": "2",
        "ratio": "10.5",
    }
    # Even at the lowest factor the regular member (every third day, seen on the last day) is not listed.
    with mall.db.reading() as conn:
        strict = reports.run_report(conn, mall.programme, "churn", mall.query(churn_factor=1.0))
    assert "M0001" not in strict.column("member_id")
    # 21 quiet days are 10.5 times M0002's two-day habit: a churn factor of 11 lists nobody.
    with mall.db.reading() as conn:
        lenient = reports.run_report(conn, mall.programme, "churn", mall.query(churn_factor=11.0))
    assert lenient.rows == []


def test_lanes_audit_and_rebates(mall: Mall) -> None:
    lanes = {(row["store"], row["lane"]): row for row in mall.report("lanes").records()}
    assert lanes["s01", "l01"]["state"] == "online"
    assert lanes["s01", "l01"]["backlog"] == 2
    assert lanes["s01", "l01"]["behind"] == 2
    assert lanes["s01", "l01"]["lag_seconds"] == "30.0"
    assert lanes["s02", "l01"]["state"] == "offline"
    assert lanes["s02", "l01"]["backlog"] is None
    assert lanes["s01", "l02"]["state"] == "unknown"  # no state message from it

    audit = dict(mall.report("audit").rows)
    in_range = sum(cell["sales"] for cell in mall.expected.spend.values())
    assert audit == {"ok": in_range - 1, "mismatch": 1, "unknown_rules": 0, "unreadable": 0, "pending": 0}
    [mismatch] = mall.report("audit_mismatches").records()
    assert mismatch["sale_id"] == mall.expected.tampered_sale
    assert mismatch["status"] == "mismatch"
    assert mismatch["first_difference"] == "totals.points"

    assert mall.report("rebates").records() == [{"settlement_date": "2026-12-10", "members": 2, "rebate": "13.34"}]


def test_bad_parameters_are_refused_with_a_code(mall: Mall) -> None:
    now = local(LAST, 12)
    cases: tuple[tuple[dict[str, Any], str], ...] = (
        ({"first": "2026-13-01"}, "bad_date"),
        ({"first": "20261201"}, "bad_date"),
        ({"first": "2026-W50-1"}, "bad_date"),
        ({"first": "2026-12-10", "last": "2026-12-01"}, "bad_range"),
        ({"first": "2020-01-01", "last": "2026-12-01"}, "range_too_long"),
        ({"period": "year"}, "bad_period"),
    )
    for kwargs, code in cases:
        with pytest.raises(reports.ReportError) as caught:
            reports.make_query(mall.programme, now, **kwargs)
        assert caught.value.code == code
    default = reports.make_query(mall.programme, now)
    assert (default.first, default.last, default.period) == (LAST - dt.timedelta(days=29), LAST, "day")
    with mall.db.reading() as conn, pytest.raises(reports.ReportError) as caught:
        reports.run_report(conn, mall.programme, "nope", default)
    assert caught.value.code == "unknown_report"


# --- (2) CSV ---------------------------------------------------------------------------------------


def test_csv_parses_back_to_the_same_rows(mall: Mall) -> None:
    for name in reports.REPORTS:
        report = mall.report(name)
        text = reports.to_csv(report)
        assert text.endswith("\r\n")
        parsed = list(csv.reader(io.StringIO(text, newline="")))
        assert parsed[0] == [column.key for column in report.columns]
        assert parsed[1:] == [["" if v is None else str(v) for v in record.values()] for record in report.records()]
        assert len(parsed) == len(report.rows) + 1
    categories = reports.to_csv(mall.report("spend_by_category"))
    assert '"wine, ""spirits"""' in categories  # quoted as RFC 4180 says
    assert ODD_CATEGORY in [row[0] for row in csv.reader(io.StringIO(categories, newline=""))]


def test_cli_prints_the_report_as_csv_and_as_a_table(tmp_path: Path) -> None:
    # The same queries as above (both engines); here the command around them, on SQLite.
    db_url = f"sqlite:///{tmp_path}/hq.db"
    mall = build_mall(db_url, tmp_path)
    mall.db.close()
    config = tmp_path / "hq.toml"
    config.write_text(demo.hq_config_text(db_url, tmp_path / "rules", 8780), encoding="utf-8")
    base = [sys.executable, "-m", "sync.hq.cli", "reports"]
    span = ["--from", FIRST.isoformat(), "--to", LAST.isoformat(), "--config", str(config)]
    done = subprocess.run([*base, "spend_by_lane", *span, "--csv"], capture_output=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    rows = list(csv.DictReader(io.StringIO(done.stdout.decode("utf-8"), newline="")))
    assert [(row["store"], row["lane"], int(row["sales"])) for row in rows] == [
        (store, lane, cell["sales"]) for (store, lane), cell in sorted(mall.expected.spend.items())
    ]
    shown = subprocess.run([*base, "churn", *span], capture_output=True, text=True, timeout=60, check=False)
    assert shown.returncode == 0, shown.stderr
    assert "M0002" in shown.stdout
    assert "M0001" not in shown.stdout
    bad = subprocess.run(
        [*base, "members", "--from", "2026-12-40", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert bad.returncode == 1
    assert "bad_date" in bad.stderr
    listed = subprocess.run(base, capture_output=True, text=True, timeout=60, check=False)
    assert listed.returncode == 0
    assert all(name in listed.stdout for name in reports.REPORTS)


# --- (3) the dashboard in a real browser -------------------------------------------------------------


class _Dom(HTMLParser):
    """Each element with an id: its attributes and whether it contains plotly's SVG (class main-svg)."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[tuple[str, str | None]] = []
        self.found: dict[str, dict[str, Any]] = {}
        self.text: dict[str, list[str]] = defaultdict(list)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        doc = dict(attrs)
        ident = doc.get("id")
        if ident:
            self.found[ident] = {**doc, "svg": False, "tag": tag}
        if "main-svg" in (doc.get("class") or "").split():
            for _, open_id in self.stack:
                if open_id:
                    self.found[open_id]["svg"] = True
        if tag not in {"br", "img", "input", "meta", "link", "path", "rect", "line", "circle", "stop"}:
            self.stack.append((tag, ident))

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        doc = dict(attrs)
        if "main-svg" in (doc.get("class") or "").split():
            for _, open_id in self.stack:
                if open_id:
                    self.found[open_id]["svg"] = True

    def handle_endtag(self, tag: str) -> None:
        for index in range(len(self.stack) - 1, -1, -1):
            if self.stack[index][0] == tag:
                del self.stack[index:]
                return

    def handle_data(self, data: str) -> None:
        for _, open_id in self.stack:
            if open_id:
                self.text[open_id].append(data)


CHARTS = (
    "chart-members",
    "chart-tiers",
    "chart-points",
    "chart-spend-store",
    "chart-spend-lane",
    "chart-spend-category",
    "chart-rebates",
)
TABLES = ("table-churn", "table-lanes", "table-mismatches")


def _rendered(dom: _Dom, ident: str) -> str:
    return str(dom.found[ident].get("data-rendered"))


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory: pytest.TempPathFactory) -> Any:
    work = tmp_path_factory.mktemp("dashboard")
    url = f"sqlite:///{work}/hq.db"
    built = demo.build_demo_database(url, work / "rules", days=21, last=dt.date(2026, 12, 20))
    with demo.served(url, work / "rules") as base:
        yield base, built


def test_the_dashboard_renders_every_chart_with_data_in_headless_chromium(dashboard: Any) -> None:
    base, built = dashboard
    page = f"{base}/centre?from={built.first}&to={built.last}&period=day"
    dom = _Dom()
    dom.feed(demo.dump_dom(page))
    for ident in CHARTS:
        rendered = _rendered(dom, ident)
        count = rendered.split()[0]
        assert rendered.endswith(("point", "points")), (ident, rendered)
        assert count.isdigit(), (ident, rendered)
        assert int(count) > 0, (ident, rendered)
        assert dom.found[ident]["svg"], f"{ident}: no plotly SVG"
    assert int(_rendered(dom, "chart-members").split()[0]) == 21 * 4  # four series, a point a day
    assert int(_rendered(dom, "chart-spend-lane").split()[0]) == 5  # the demo's five lanes
    assert _rendered(dom, "table-lanes") == "5 rows"
    assert _rendered(dom, "tiles-audit") == "5 rows"
    assert _rendered(dom, "table-mismatches").endswith(" rows")  # the demo's mispriced sales
    assert _rendered(dom, "table-churn") in {"no data"} | {f"{n} rows" for n in range(1, 200)}


def test_a_range_without_data_shows_no_data_rather_than_a_broken_chart(dashboard: Any) -> None:
    base, _ = dashboard
    dom = _Dom()
    dom.feed(demo.dump_dom(f"{base}/centre?from=2020-01-01&to=2020-01-31&period=week"))
    for ident in CHARTS:
        if ident == "chart-tiers":  # today's tiers do not depend on the range
            assert _rendered(dom, ident).endswith("points")
            continue
        assert _rendered(dom, ident) == "no data", ident
        assert not dom.found[ident]["svg"], ident
        assert "No data for this period" in "".join(dom.text[ident])
    assert _rendered(dom, "table-churn") == "no data"
    assert _rendered(dom, "table-mismatches") == "no data"


def test_the_api_serves_reports_csv_errors_and_plotly_from_the_installed_package(dashboard: Any) -> None:
    base, built = dashboard
    span = {"from": built.first.isoformat(), "to": built.last.isoformat()}
    with httpx.Client(base_url=base, timeout=30) as http:
        listing = http.get("/v1/reports").json()
        assert [entry["name"] for entry in listing["reports"]] == list(reports.REPORTS)
        assert listing["programme"]["ruleset"] == "888-mall"
        doc = http.get("/v1/reports/spend_by_lane", params=span).json()
        assert doc["from"] == span["from"]
        assert len(doc["rows"]) == 5
        assert all(isinstance(row["net"], str) for row in doc["rows"])  # money as decimal strings
        answer = http.get("/v1/reports/spend_by_lane", params={**span, "format": "csv"})
        assert answer.status_code == 200
        assert answer.headers["content-type"] == "text/csv; charset=utf-8"
        assert answer.headers["content-disposition"] == (
            f'attachment; filename="spend_by_lane_{span["from"]}_{span["to"]}.csv"'
        )
        assert list(csv.DictReader(io.StringIO(answer.text, newline=""))) == [
            {key: "" if value is None else str(value) for key, value in row.items()} for row in doc["rows"]
        ]
        for path, params, status, code in (
            ("/v1/reports/nope", {}, 404, "unknown_report"),
            ("/v1/reports/members", {"from": "2026-02-30"}, 422, "bad_date"),
            ("/v1/reports/members", {"period": "year"}, 422, "bad_period"),
            ("/v1/reports/members", {"from": "2026-12-20", "to": "2026-12-01"}, 422, "bad_range"),
            ("/v1/reports/members", {"format": "xml"}, 422, "bad_format"),
        ):
            refused = http.get(path, params=params)
            assert refused.status_code == status, path
            assert refused.json()["error"]["code"] == code

        page = http.get("/centre")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert '<script src="centre/plotly.min.js"></script>' in page.text
        assert len(page.content) < 40_000  # the page only: no library inlined into it

        plotly = http.get("/centre/plotly.min.js", headers={"Accept-Encoding": "identity"})
        assert plotly.status_code == 200
        assert plotly.headers["content-type"] == "text/javascript; charset=utf-8"
        assert "max-age" in plotly.headers["cache-control"]
        assert plotly.content.startswith(b"/**\n* plotly.js v")
        with http.stream("GET", "/centre/plotly.min.js", headers={"Accept-Encoding": "gzip"}) as zipped:
            assert zipped.headers["content-encoding"] == "gzip"
            body = b"".join(zipped.iter_raw())
        assert gzip.decompress(body) == plotly.content
        assert len(body) < len(plotly.content) / 2
        again = http.get("/centre/plotly.min.js", headers={"If-None-Match": plotly.headers["etag"]})
        assert again.status_code == 304


def test_plotly_is_not_copied_into_the_repository() -> None:
    copies = [
        path
        for path in REPO_ROOT.rglob("*.js")
        if ".venv" not in path.parts and "node_modules" not in path.parts and path.stat().st_size > 100_000
    ]
    assert copies == []
    page = (REPO_ROOT / "sync" / "hq" / "centre" / "dashboard.html").read_text(encoding="utf-8")
    assert "Plotly.newPlot" in page
    assert "http://" not in page
    assert "https://" not in page  # nothing fetched from elsewhere
