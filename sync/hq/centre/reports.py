"""The member centre's reports: what the programme costs, who is leaving, how the lanes are doing.

Each report is a query over head office's tables on one consistent read (a
``Connection`` from ``HqDatabase.reading()``), in SQLAlchemy Core for
PostgreSQL and SQLite alike.  Every date is the programme's local date
(``Programme.local_date``): a sale at 23:30 in Shanghai is on that day, not
on UTC's.  Money is integer fen inside; output (``Report.records``, CSV)
writes it as decimal strings.  No report holds personal data: the churn list
names members by id only.

Periods bucket a date range by day, ISO week (Monday first) or calendar
month; a bucket is named by its first day, and the first and last buckets
may be cut by the range.  Figures that need a local date per row (sales,
lanes' ledger rows) are bucketed in Python while the rows stream from the
database in chunks (a server-side cursor on PostgreSQL), so one code path
serves both engines; reading a month of a large chain's sales is the cost
of a report, not of ingest.

What each figure means is in docs/member-centre.md ("Reports").
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import itertools
import re
import statistics
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from typing import Any, Literal

import orjson
from sqlalchemy import Connection, Select, func, select, union

from agent.errors import LaneError
from agent.money import format_fen, parse_money
from sync.hq.centre.programme import Programme
from sync.hq.centre.spend import member_days
from sync.hq.schema import (
    AUDIT_STATUSES,
    centre_ledger,
    journal_entries,
    lane_cursors,
    lane_states,
    member_changes,
    member_profiles,
    members,
    points_ledger,
    returns,
    sale_claims,
    sales,
    tier_history,
    voids,
)

Period = Literal["day", "week", "month"]
PERIODS: tuple[Period, ...] = ("day", "week", "month")
Kind = Literal["text", "int", "money", "date", "decimal"]

#: The longest range a report reads: three years of day buckets (and of sales to stream).
MAX_RANGE_DAYS = 3 * 366
#: The churn warning reads at least this much history to find a member's usual interval.
CHURN_HISTORY_DAYS = 365
#: A member needs this many visit days before it has a usual interval (two gaps, one median).
CHURN_MIN_VISITS = 3
#: The latest audit findings listed.
MISMATCHES_LISTED = 100
_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")  # fromisoformat alone also takes 20261210 and 2026-W50-1
_STREAM = 2000  # rows fetched per round trip while streaming
_IDS = 900  # ids per IN (...) list: under SQLite's bound-parameter limit


class ReportError(LaneError):
    """A report that does not exist, or parameters it cannot take (the API answers 404 / 422 with the code)."""

    code = "report_error"

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class Column:
    """One column: its key (CSV header, JSON field), a label for people, and how its values are written."""

    key: str
    label: str
    kind: Kind = "int"


@dataclass(frozen=True, slots=True)
class Report:
    """A report's result: internal values (money in fen, dates as ``date``), written out by ``records``."""

    name: str
    title: str
    columns: tuple[Column, ...]
    rows: list[tuple[Any, ...]]
    first: dt.date | None = None
    last: dt.date | None = None
    period: Period | None = None

    def records(self) -> list[dict[str, Any]]:
        """The rows as JSON-ready dicts: money as decimal strings, dates ISO, counts as integers."""
        return [
            {column.key: output_value(column, value) for column, value in zip(self.columns, row, strict=True)}
            for row in self.rows
        ]

    def column(self, key: str) -> list[Any]:
        """The internal values of one column (tests and charts)."""
        index = [column.key for column in self.columns].index(key)
        return [row[index] for row in self.rows]

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "title": self.title,
            "from": None if self.first is None else self.first.isoformat(),
            "to": None if self.last is None else self.last.isoformat(),
            "period": self.period,
            "columns": [{"key": c.key, "label": c.label, "kind": c.kind} for c in self.columns],
            "rows": self.records(),
        }


def output_value(column: Column, value: Any) -> Any:
    """One value as JSON carries it (None stays None)."""
    if value is None:
        return None
    if column.kind == "money":
        return format_fen(int(value))
    if column.kind == "date":
        return value.isoformat() if isinstance(value, dt.date) else str(value)
    if column.kind == "int":
        return int(value)
    return str(value)


def to_csv(report: Report) -> str:
    """The report as CSV (RFC 4180: CRLF line ends, quotes where needed), a header row of column keys first."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow([column.key for column in report.columns])
    for record in report.records():
        writer.writerow(["" if value is None else value for value in record.values()])
    return out.getvalue()


@dataclass(frozen=True, slots=True)
class Query:
    """What a report is asked for: the local days ``first``..``last``, the period, and the moment it is read."""

    first: dt.date
    last: dt.date
    period: Period = "day"
    now: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))
    churn_factor: float = 3.0


def make_query(
    programme: Programme,
    now: dt.datetime,
    *,
    first: str | dt.date | None = None,
    last: str | dt.date | None = None,
    period: str | None = None,
    churn_factor: float = 3.0,
) -> Query:
    """A checked ``Query``; the default range is the 30 days ending today (local), by day.

    Raises ReportError ``bad_date``, ``bad_period``, ``bad_range`` or ``range_too_long``.
    """
    to_day = _day("to", last) if last is not None else programme.local_date(now)
    from_day = _day("from", first) if first is not None else to_day - dt.timedelta(days=29)
    if from_day > to_day:
        raise ReportError("bad_range", f"from {from_day} is after to {to_day}")
    if (to_day - from_day).days + 1 > MAX_RANGE_DAYS:
        raise ReportError("range_too_long", f"a report covers at most {MAX_RANGE_DAYS} days")
    chosen = period or "day"
    for candidate in PERIODS:
        if candidate == chosen:
            return Query(from_day, to_day, candidate, now, churn_factor)
    raise ReportError("bad_period", f"period {chosen[:20]!r}: one of {', '.join(PERIODS)}")


def _day(name: str, value: str | dt.date) -> dt.date:
    if isinstance(value, dt.date):
        return value
    if _DATE.fullmatch(value):
        try:
            return dt.date.fromisoformat(value)
        except ValueError:  # 2026-02-30
            pass
    raise ReportError("bad_date", f"{name}: {value[:40]!r} is not a date (YYYY-MM-DD)")


# --- periods -----------------------------------------------------------------------------------


def period_start(day: dt.date, period: Period) -> dt.date:
    """The first day of the period ``day`` falls in (a week starts on Monday)."""
    if period == "week":
        return day - dt.timedelta(days=day.weekday())
    if period == "month":
        return day.replace(day=1)
    return day


def _following(start: dt.date, period: Period) -> dt.date:
    if period == "week":
        return start + dt.timedelta(days=7)
    if period == "month":
        return (start.replace(day=28) + dt.timedelta(days=4)).replace(day=1)
    return start + dt.timedelta(days=1)


def period_starts(first: dt.date, last: dt.date, period: Period) -> list[dt.date]:
    """Every period's first day from the one holding ``first`` to the one holding ``last``."""
    out, start = [], period_start(first, period)
    while start <= last:
        out.append(start)
        start = _following(start, period)
    return out


# --- helpers -------------------------------------------------------------------------------------


def _stream(conn: Connection, query: Select[Any]) -> Iterator[Any]:
    """The rows of ``query``, fetched ``_STREAM`` at a time (a server-side cursor on PostgreSQL)."""
    result = conn.execute(query.execution_options(yield_per=_STREAM))
    for part in result.partitions():
        yield from part


def _chunks(ids: Iterable[str]) -> Iterator[list[str]]:
    ordered = sorted(set(ids))
    for start in range(0, len(ordered), _IDS):
        yield ordered[start : start + _IDS]


def _share(part: int, whole: int) -> Decimal:
    """``part`` of ``whole`` in percent, one decimal, rounded half up (exact: no float)."""
    if whole == 0:
        return Decimal("0.0")
    return (Decimal(100 * part) / Decimal(whole)).quantize(Decimal("0.1"), rounding=ROUND_HALF_UP)


def _gone(conn: Connection, ids: Iterable[str], today: dt.date) -> set[str]:
    """Of ``ids``, the members who left: their profile is cancelled, or their latest tier decision terminated them."""
    p, t = member_profiles.c, tier_history.c
    out: set[str] = set()
    for chunk in _chunks(ids):
        out.update(conn.execute(select(p.member_id).where(p.member_id.in_(chunk), p.status == "cancelled")).scalars())
        latest = (
            select(t.member_id, func.max(t.id).label("last_id")).where(t.member_id.in_(chunk)).group_by(t.member_id)
        ).subquery()
        ended = select(t.member_id).join(latest, latest.c.last_id == t.id)
        out.update(conn.execute(ended.where(t.kind == "terminate", t.effective_from <= today)).scalars())
    return out


# --- members over time ------------------------------------------------------------------------

MEMBER_COLUMNS = (
    Column("period", "period (first day)", "date"),
    Column("new", "new members"),
    Column("active", "active (bought)"),
    Column("churned", "churned (cancelled or terminated)"),
    Column("total", "members at period end"),
)


def _registered() -> tuple[Any, Any]:
    """The join that gives each member's registration time, and that time's expression.

    A member registered at the service desk has ``member_profiles.registered_at``;
    one that came by import or from a lane's sale has its first change instead.
    """
    mc, p = member_changes.c, member_profiles.c
    first_change = select(mc.member_id, func.min(mc.at).label("first_at")).group_by(mc.member_id).subquery()
    source = members.outerjoin(member_profiles, p.member_id == members.c.member_id).outerjoin(
        first_change, first_change.c.member_id == members.c.member_id
    )
    return source, func.coalesce(p.registered_at, first_change.c.first_at)


def members_report(conn: Connection, programme: Programme, q: Query) -> Report:
    """Per period: members registered, members who bought, members who left, and members at its end."""
    start, end = programme.day_range(q.first, q.last)
    starts = period_starts(q.first, q.last, q.period)
    source, registered = _registered()
    m, p, t = members.c, member_profiles.c, tier_history.c
    new: Counter[dt.date] = Counter()
    in_range = select(m.member_id, registered).select_from(source).where(registered >= start, registered < end)
    for _member_id, at in _stream(conn, in_range):
        new[period_start(programme.local_date(at), q.period)] += 1
    before = int(conn.execute(select(func.count()).select_from(source).where(registered < start)).scalar_one())

    active: dict[dt.date, set[str]] = defaultdict(set)
    s, c = sales.c, sale_claims.c
    bought = select(s.member_id, s.at_utc).where(s.member_id.is_not(None), s.at_utc >= start, s.at_utc < end)
    claimed = (
        select(c.member_id, s.at_utc)
        .join_from(sale_claims, sales, s.entry_id == c.entry_id)
        .where(s.at_utc >= start, s.at_utc < end)
    )
    for query in (bought, claimed):
        for member_id, at in _stream(conn, query):
            active[period_start(programme.local_date(at), q.period)].add(member_id)

    left: dict[dt.date, set[str]] = defaultdict(set)
    cancelled = select(p.member_id, p.cancelled_at).where(p.cancelled_at >= start, p.cancelled_at < end)
    for member_id, at in _stream(conn, cancelled):
        left[period_start(programme.local_date(at), q.period)].add(member_id)
    ended = select(t.member_id, t.effective_from).where(
        t.kind == "terminate", t.effective_from >= q.first, t.effective_from <= q.last
    )
    for member_id, day in _stream(conn, ended):
        left[period_start(day, q.period)].add(member_id)
    gone_before = union(
        select(p.member_id).where(p.cancelled_at < start),
        select(t.member_id).where(t.kind == "terminate", t.effective_from < q.first),
    ).subquery()
    total = before - int(conn.execute(select(func.count()).select_from(gone_before)).scalar_one())

    rows: list[tuple[Any, ...]] = []
    for bucket in starts:
        total += new[bucket] - len(left[bucket])
        rows.append((bucket, new[bucket], len(active[bucket]), len(left[bucket]), total))
    return Report("members", "Members over time", MEMBER_COLUMNS, rows, q.first, q.last, q.period)


# --- tier distribution ------------------------------------------------------------------------

TIER_COLUMNS = (
    Column("tier", "tier", "text"),
    Column("label", "label", "text"),
    Column("label_zh", "label (zh-CN)", "text"),
    Column("members", "members"),
    Column("share", "share (%)", "decimal"),
)


def tiers_report(conn: Connection, programme: Programme, q: Query) -> Report:
    """Members by the tier they hold now, in the ladder's order (tiers the programme lacks last).

    Members who left (cancelled, or terminated by their latest tier decision) are not counted.
    """
    m = members.c
    counts = {tier: int(n) for tier, n in conn.execute(select(m.tier, func.count()).group_by(m.tier))}
    today = programme.local_date(q.now)
    gone = _gone(conn, _left_ids(conn), today)
    if gone:
        for chunk in _chunks(gone):
            for tier, n in conn.execute(select(m.tier, func.count()).where(m.member_id.in_(chunk)).group_by(m.tier)):
                counts[tier] -= int(n)
    ladder = list(programme.tiers) + sorted(set(counts) - set(programme.tiers))
    whole = sum(counts.values())
    rows: list[tuple[Any, ...]] = []
    for tier in ladder:
        label = programme.ruleset.tier_labels.get(tier)
        n = counts.get(tier, 0)
        rows.append((tier, label.en if label else tier, label.zh_cn if label else tier, n, _share(n, whole)))
    return Report("tiers", "Tier distribution now", TIER_COLUMNS, rows, None, today, None)


def _left_ids(conn: Connection) -> set[str]:
    """Members who may have left: a cancelled profile or any termination (``_gone`` decides)."""
    p, t = member_profiles.c, tier_history.c
    ids = set(conn.execute(select(p.member_id).where(p.status == "cancelled")).scalars())
    ids.update(conn.execute(select(t.member_id).where(t.kind == "terminate").distinct()).scalars())
    return ids


# --- points -------------------------------------------------------------------------------------

POINTS_COLUMNS = (
    Column("period", "period (first day)", "date"),
    Column("issued", "issued at tills"),
    Column("claimed", "claimed later"),
    Column("redeemed", "redeemed"),
    Column("returned", "taken back by returns"),
    Column("voided", "taken back by voids (net)"),
    Column("expired", "expired"),
    Column("adjusted", "adjusted by staff"),
    Column("net", "net movement"),
)
# Where each ledger kind lands, and its sign as a figure (redemptions are negative rows, shown positive).
_LANE_KINDS = {"earn": ("issued", 1), "redeem": ("redeemed", -1), "return": ("returned", -1), "void": ("voided", -1)}
_CENTRE_KINDS = {"claim": ("claimed", 1), "expire": ("expired", -1), "adjust": ("adjusted", 1)}


def points_report(conn: Connection, programme: Programme, q: Query) -> Report:
    """Per period: points issued, claimed, redeemed, taken back, expired and adjusted; ``net`` is the signed sum.

    Lanes' rows (``points_ledger``) by the local date of the entry; head office's
    (``centre_ledger``) by their business day.  Imports (balances seeded from a
    file) and rebate credits (money, not points) are left out.
    """
    start, end = programme.day_range(q.first, q.last)
    figures: dict[dt.date, Counter[str]] = defaultdict(Counter)
    p, cl = points_ledger.c, centre_ledger.c
    lane_rows = select(p.kind, p.at_utc, p.points).where(p.at_utc >= start, p.at_utc < end, p.points != 0)
    for kind, at, points in _stream(conn, lane_rows):
        if kind in _LANE_KINDS:
            bucket = figures[period_start(programme.local_date(at), q.period)]
            name, sign = _LANE_KINDS[kind]
            bucket[name] += sign * int(points)
            bucket["net"] += int(points)
    centre_rows = (
        select(cl.on_date, cl.kind, func.sum(cl.points))
        .where(cl.on_date >= q.first, cl.on_date <= q.last, cl.kind.in_(list(_CENTRE_KINDS)))
        .group_by(cl.on_date, cl.kind)
    )
    for day, kind, points in conn.execute(centre_rows):
        bucket = figures[period_start(day, q.period)]
        name, sign = _CENTRE_KINDS[kind]
        bucket[name] += sign * int(points)
        bucket["net"] += int(points)
    keys = [column.key for column in POINTS_COLUMNS[1:]]
    rows = [(bucket, *(figures[bucket][key] for key in keys)) for bucket in period_starts(q.first, q.last, q.period)]
    return Report("points", "Points issued, redeemed, expired", POINTS_COLUMNS, rows, q.first, q.last, q.period)


# --- spend ---------------------------------------------------------------------------------------

_SPEND = (
    Column("sales", "sales"),
    Column("member_sales", "member sales"),
    Column("gross", "gross", "money"),
    Column("discount", "discount", "money"),
    Column("net", "net sales", "money"),
    Column("member_net", "members' net", "money"),
    Column("refunded", "refunded (returns, voids)", "money"),
    Column("net_after_refunds", "net after refunds", "money"),
)
STORE_COLUMNS = (Column("store", "store", "text"), *_SPEND)
LANE_COLUMNS = (Column("store", "store", "text"), Column("lane", "lane", "text"), *_SPEND)


def _spend_rows(conn: Connection, programme: Programme, q: Query, *, by_lane: bool) -> list[tuple[Any, ...]]:
    start, end = programme.day_range(q.first, q.last)
    s = sales.c
    keys = (s.store, s.lane) if by_lane else (s.store,)
    figures: dict[tuple[str, ...], list[int]] = defaultdict(lambda: [0] * 7)
    member = s.member_id.is_not(None)
    grouped = (
        select(
            *keys,
            func.count(),
            func.count().filter(member),
            func.coalesce(func.sum(s.gross_fen), 0),
            func.coalesce(func.sum(s.discount_fen), 0),
            func.coalesce(func.sum(s.net_fen), 0),
            func.coalesce(func.sum(s.net_fen).filter(member), 0),
        )
        .where(s.at_utc >= start, s.at_utc < end)
        .group_by(*keys)
    )
    width = len(keys)
    for row in conn.execute(grouped):
        figures[tuple(row[:width])][:6] = [int(value) for value in row[width:]]
    for table in (returns, voids):
        c = table.c
        refund_keys = (c.store, c.lane) if by_lane else (c.store,)
        refunded = (
            select(*refund_keys, func.coalesce(func.sum(c.refund_fen), 0))
            .where(c.at_utc >= start, c.at_utc < end)
            .group_by(*refund_keys)
        )
        for row in conn.execute(refunded):
            figures[tuple(row[:width])][6] += int(row[width])
    return [(*key, *values, values[4] - values[6]) for key, values in sorted(figures.items())]


def spend_by_store(conn: Connection, programme: Programme, q: Query) -> Report:
    """Per store over the range: sales, money (members' share apart), refunds and what is left after them."""
    rows = _spend_rows(conn, programme, q, by_lane=False)
    return Report("spend_by_store", "Spend by store", STORE_COLUMNS, rows, q.first, q.last)


def spend_by_lane(conn: Connection, programme: Programme, q: Query) -> Report:
    """The same per lane."""
    rows = _spend_rows(conn, programme, q, by_lane=True)
    return Report("spend_by_lane", "Spend by lane", LANE_COLUMNS, rows, q.first, q.last)


CATEGORY_COLUMNS = (
    Column("category", "category", "text"),
    Column("lines", "sale lines"),
    Column("gross", "gross", "money"),
    Column("discount", "discount", "money"),
    Column("net", "net sales", "money"),
    Column("refunded", "refunded (returns, voids)", "money"),
    Column("net_after_refunds", "net after refunds", "money"),
)
_UNKNOWN_CATEGORY = "(unknown)"


def _money(value: object) -> int:
    try:
        return parse_money(value, allow_negative=True)
    except ValueError:
        return 0


def _line_categories(body: Mapping[str, Any]) -> dict[str, str]:
    """line_id -> category of a sale body: the priced result's lines, else the POS request's."""
    out: dict[str, str] = {}
    for source in (body.get("request"), body.get("result")):
        lines = source.get("lines") if isinstance(source, Mapping) else None
        for line in lines if isinstance(lines, list) else []:
            if isinstance(line, Mapping) and isinstance(line.get("category"), str):
                out[str(line.get("line_id"))] = line["category"]
    return out


def _priced_lines(body: Mapping[str, Any]) -> Iterator[tuple[str, int, int, int]]:
    """(category, gross, discount, net) of each priced line of a sale body."""
    result = body.get("result")
    lines = result.get("lines") if isinstance(result, Mapping) else None
    categories = _line_categories(body)
    for line in lines if isinstance(lines, list) else []:
        if not isinstance(line, Mapping):
            continue
        category = categories.get(str(line.get("line_id")), _UNKNOWN_CATEGORY)
        yield category, _money(line.get("gross")), _money(line.get("discount")), _money(line.get("net"))


def _loads(body: str) -> Mapping[str, Any]:
    doc = orjson.loads(body)
    return doc if isinstance(doc, Mapping) else {}


def spend_by_category(conn: Connection, programme: Programme, q: Query) -> Report:
    """Per category (from the sales' journal bodies): lines, money, and refunds of returns and voids.

    A return refunds the lines it names at the refund the lane gave; a void
    refunds every line of its sale at its net.  Lines whose sale carries no
    category count as ``(unknown)``.
    """
    start, end = programme.day_range(q.first, q.last)
    figures: dict[str, list[int]] = defaultdict(lambda: [0] * 5)
    s, j = sales.c, journal_entries.c
    bodies = (
        select(j.body)
        .join_from(sales, journal_entries, j.id == s.entry_id)
        .where(s.at_utc >= start, s.at_utc < end)
        .order_by(s.at_utc, s.entry_id)
    )
    for (body,) in _stream(conn, bodies):
        for category, gross, discount, net in _priced_lines(_loads(body)):
            cell = figures[category]
            cell[0] += 1
            cell[1] += gross
            cell[2] += discount
            cell[3] += net
    sale_entry = journal_entries.alias("sale_entry")
    own = journal_entries.alias("own_entry")
    for table in (returns, voids):
        c = table.c
        refunds = (
            select(own.c.body, sale_entry.c.body)
            .join_from(table, own, own.c.id == c.entry_id)
            .join(sale_entry, sale_entry.c.id == c.sale_entry_id)
            .where(c.at_utc >= start, c.at_utc < end)
        )
        for body, sale_body in _stream(conn, refunds):
            sale = _loads(sale_body)
            if table is voids:
                for category, _gross, _discount, net in _priced_lines(sale):
                    figures[category][4] += net
                continue
            categories = _line_categories(sale)
            lines = _loads(body).get("lines")
            for line in lines if isinstance(lines, list) else []:
                if isinstance(line, Mapping):
                    category = categories.get(str(line.get("line_id")), _UNKNOWN_CATEGORY)
                    figures[category][4] += _money(line.get("refund"))
    rows = [(name, *values, values[3] - values[4]) for name, values in sorted(figures.items())]
    return Report("spend_by_category", "Spend by category", CATEGORY_COLUMNS, rows, q.first, q.last)


# --- churn warning -------------------------------------------------------------------------------

CHURN_COLUMNS = (
    Column("member_id", "member", "text"),
    Column("tier", "tier", "text"),
    Column("visits", "visit days"),
    Column("last_visit", "last visit", "date"),
    Column("days_quiet", "days quiet"),
    Column("usual_interval_days", "usual gap (days)", "decimal"),
    Column("ratio", "× usual gap", "decimal"),
)


def churn_report(conn: Connection, programme: Programme, q: Query) -> Report:
    """Members quiet for more than ``churn_factor`` times their usual interval, as of ``last``; most overdue first.

    A member's usual interval is the median gap between its visit days (days
    with a sale, its claimed receipts included) over the range or the year
    ending on ``last``, whichever is longer; it needs ``CHURN_MIN_VISITS``
    visit days.  Members who left are not listed.  Member ids only.
    """
    first = min(q.first, q.last - dt.timedelta(days=CHURN_HISTORY_DAYS - 1))
    found: list[tuple[str, int, dt.date, int, Decimal, Decimal]] = []
    for member_id, days in member_days(conn, programme, first, q.last).items():
        visits = sorted(days.visits)
        if len(visits) < CHURN_MIN_VISITS:
            continue
        usual = Decimal(statistics.median((b - a).days for a, b in itertools.pairwise(visits)))
        quiet = (q.last - visits[-1]).days
        if quiet > Decimal(str(q.churn_factor)) * usual:
            ratio = (Decimal(quiet) / usual).quantize(Decimal("0.1"), rounding=ROUND_HALF_UP)
            found.append((member_id, len(visits), visits[-1], quiet, usual.normalize(), ratio))
    ids = [row[0] for row in found]
    gone = _gone(conn, ids, q.last)
    m = members.c
    tiers: dict[str, str] = {}
    for chunk in _chunks(ids):
        pairs = conn.execute(select(m.member_id, m.tier).where(m.member_id.in_(chunk)))
        tiers.update((member_id, tier) for member_id, tier in pairs)
    rows: list[tuple[Any, ...]] = [
        (member_id, tiers[member_id], visits, last, quiet, _plain(usual), ratio)
        for member_id, visits, last, quiet, usual, ratio in sorted(found, key=lambda row: (-row[5], row[0]))
        if member_id in tiers and member_id not in gone
    ]
    return Report("churn", "Churn warning", CHURN_COLUMNS, rows, first, q.last)


def _plain(value: Decimal) -> Decimal:
    """A Decimal without an exponent (``Decimal('1E+1')`` -> ``10``)."""
    return value.quantize(Decimal(1)) if value == value.to_integral_value() else value


# --- lanes ---------------------------------------------------------------------------------------

LANE_STATE_COLUMNS = (
    Column("store", "store", "text"),
    Column("lane", "lane", "text"),
    Column("state", "state", "text"),
    Column("backlog", "backlog"),
    Column("behind", "not yet here"),
    Column("last_received_at", "last batch", "text"),
    Column("quiet_seconds", "quiet (s)"),
    Column("lag_seconds", "sync lag (s)", "decimal"),
    Column("state_at", "state reported", "text"),
)


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def lanes_report(conn: Connection, programme: Programme, q: Query) -> Report:  # noqa: ARG001 - one signature for all
    """Every lane heard from: online or offline, its backlog, how far head office is behind it, and the sync lag.

    ``backlog`` and the lane's own last seq come from its latest retained state
    (an offline lane's will carries none); ``behind`` is that seq less head
    office's cursor; ``lag_seconds`` is how long the newest entry took from the
    lane's sale to head office's commit; ``quiet_seconds`` how long since the
    lane was last heard (a batch or a state).
    """
    lanes: dict[tuple[str, str], dict[str, Any]] = {}
    c, j, st = lane_cursors.c, journal_entries.c, lane_states.c
    positions = (
        select(c.store, c.lane, c.last_seq, c.updated_at, j.at_utc, j.received_at)
        .select_from(lane_cursors)
        .outerjoin(
            journal_entries, (j.store == c.store) & (j.lane == c.lane) & (j.epoch == c.epoch) & (j.seq == c.last_seq)
        )
        .order_by(c.updated_at)
    )
    for store, lane, last_seq, updated_at, at_utc, received_at in conn.execute(positions):
        lag = None if at_utc is None else Decimal((received_at - at_utc).total_seconds()).quantize(Decimal("0.1"))
        lanes[store, lane] = {"hq_seq": int(last_seq), "received": updated_at, "lag": lag}  # latest epoch wins
    for store, lane, state, info, updated_at in conn.execute(
        select(st.store, st.lane, st.state, st.info, st.updated_at)
    ):
        doc = lanes.setdefault((store, lane), {})
        try:
            details = orjson.loads(info)
        except orjson.JSONDecodeError:
            details = {}
        doc.update(state=state, state_at=updated_at, info=details if isinstance(details, dict) else {})
    rows: list[tuple[Any, ...]] = []
    for (store, lane), doc in sorted(lanes.items()):
        info = doc.get("info", {})
        lane_seq, hq_seq = _int_or_none(info.get("last_seq")), doc.get("hq_seq")
        behind = None if lane_seq is None else max(0, lane_seq - (hq_seq or 0))
        heard = [at for at in (doc.get("received"), doc.get("state_at")) if at is not None]
        quiet = None if not heard else max(0, int((q.now - max(heard)).total_seconds()))
        received, state_at = doc.get("received"), doc.get("state_at")
        rows.append(
            (
                store,
                lane,
                doc.get("state", "unknown"),
                _int_or_none(info.get("backlog")),
                behind,
                None if received is None else received.isoformat(timespec="seconds"),
                quiet,
                doc.get("lag"),
                None if state_at is None else state_at.isoformat(timespec="seconds"),
            )
        )
    return Report("lanes", "Lanes: online, backlog, sync lag", LANE_STATE_COLUMNS, rows)


# --- audit ---------------------------------------------------------------------------------------

AUDIT_COLUMNS = (Column("status", "audit status", "text"), Column("sales", "sales"))
MISMATCH_COLUMNS = (
    Column("at", "sale time (lane)", "text"),
    Column("store", "store", "text"),
    Column("lane", "lane", "text"),
    Column("sale_id", "sale", "text"),
    Column("status", "status", "text"),
    Column("differences", "differences"),
    Column("first_difference", "first difference", "text"),
)


def audit_report(conn: Connection, programme: Programme, q: Query) -> Report:
    """The range's sales by audit status (``pending``: not re-priced yet)."""
    start, end = programme.day_range(q.first, q.last)
    s = sales.c
    counts = {
        status or "pending": int(n)
        for status, n in conn.execute(
            select(s.audit_status, func.count()).where(s.at_utc >= start, s.at_utc < end).group_by(s.audit_status)
        )
    }
    rows: list[tuple[Any, ...]] = [(status, counts.get(status, 0)) for status in (*AUDIT_STATUSES, "pending")]
    return Report("audit", "Audit of lanes' pricing", AUDIT_COLUMNS, rows, q.first, q.last)


def mismatches_report(conn: Connection, programme: Programme, q: Query) -> Report:
    """The latest sales of the range the audit did not find as reported (mismatch, unknown rules, unreadable)."""
    start, end = programme.day_range(q.first, q.last)
    s = sales.c
    latest = (
        select(s.at, s.store, s.lane, s.sale_id, s.audit_status, s.audit_detail)
        .where(s.at_utc >= start, s.at_utc < end, s.audit_status.in_([x for x in AUDIT_STATUSES if x != "ok"]))
        .order_by(s.at_utc.desc(), s.entry_id)
        .limit(MISMATCHES_LISTED)
    )
    rows: list[tuple[Any, ...]] = []
    for at, store, lane, sale_id, status, detail in conn.execute(latest):
        try:
            found = orjson.loads(detail or "[]")
        except orjson.JSONDecodeError:
            found = []
        found = found if isinstance(found, list) else []
        first = found[0].get("path") if found and isinstance(found[0], dict) else None
        rows.append((at, store, lane, sale_id, status, len(found), first))
    return Report("audit_mismatches", "Latest audit mismatches", MISMATCH_COLUMNS, rows, q.first, q.last)


# --- rebates -------------------------------------------------------------------------------------

REBATE_COLUMNS = (
    Column("settlement_date", "settlement date", "date"),
    Column("members", "members credited"),
    Column("rebate", "rebate money credited", "money"),
)


def rebates_report(conn: Connection, programme: Programme, q: Query) -> Report:  # noqa: ARG001 - one signature for all
    """Rebate money credited on each settlement date of the range (the rebates job's ledger rows)."""
    cl = centre_ledger.c
    grouped = (
        select(cl.on_date, func.count(cl.member_id.distinct()), func.coalesce(func.sum(cl.rebate_fen), 0))
        .where(cl.kind == "rebate_credit", cl.on_date >= q.first, cl.on_date <= q.last)
        .group_by(cl.on_date)
        .order_by(cl.on_date)
    )
    rows: list[tuple[Any, ...]] = [(day, int(n), int(fen)) for day, n, fen in conn.execute(grouped)]
    return Report("rebates", "Rebates credited", REBATE_COLUMNS, rows, q.first, q.last)


# --- the registry --------------------------------------------------------------------------------

Builder = Callable[[Connection, Programme, Query], Report]


@dataclass(frozen=True, slots=True)
class ReportSpec:
    """A report as listed: its name, title, what it is, which parameters it reads, and its query."""

    name: str
    title: str
    description: str
    uses: tuple[str, ...]
    build: Builder


REPORTS: dict[str, ReportSpec] = {
    spec.name: spec
    for spec in (
        ReportSpec(
            "members",
            "Members over time",
            "per period: new, active (bought), churned (cancelled or terminated), members at the period's end",
            ("from", "to", "period"),
            members_report,
        ),
        ReportSpec(
            "tiers", "Tier distribution now", "members by tier today (members who left excluded)", (), tiers_report
        ),
        ReportSpec(
            "points",
            "Points issued, redeemed, expired",
            "per period: points issued, claimed, redeemed, taken back, expired, adjusted",
            ("from", "to", "period"),
            points_report,
        ),
        ReportSpec(
            "spend_by_store", "Spend by store", "sales, discounts, refunds per store", ("from", "to"), spend_by_store
        ),
        ReportSpec(
            "spend_by_lane", "Spend by lane", "sales, discounts, refunds per lane", ("from", "to"), spend_by_lane
        ),
        ReportSpec(
            "spend_by_category",
            "Spend by category",
            "sale lines, discounts, refunds per category (from the sales' journal bodies)",
            ("from", "to"),
            spend_by_category,
        ),
        ReportSpec(
            "churn",
            "Churn warning",
            "members quiet for more than churn_factor times their usual interval as of 'to' (member ids only)",
            ("to",),
            churn_report,
        ),
        ReportSpec("lanes", "Lanes", "online/offline, backlog, entries behind, sync lag", (), lanes_report),
        ReportSpec("audit", "Audit", "the range's sales by audit status", ("from", "to"), audit_report),
        ReportSpec(
            "audit_mismatches",
            "Audit mismatches",
            f"the latest {MISMATCHES_LISTED} sales the audit did not find as reported",
            ("from", "to"),
            mismatches_report,
        ),
        ReportSpec("rebates", "Rebates credited", "rebate money per settlement date", ("from", "to"), rebates_report),
    )
}


def run_report(conn: Connection, programme: Programme, name: str, query: Query) -> Report:
    """Report ``name`` for ``query``; ReportError ``unknown_report`` for a name not in ``REPORTS``."""
    spec = REPORTS.get(name)
    if spec is None:
        raise ReportError("unknown_report", f"no report {name[:60]!r}: one of {', '.join(REPORTS)}")
    return spec.build(conn, programme, query)


def catalogue() -> list[dict[str, Any]]:
    """The reports as ``GET /v1/reports`` lists them."""
    return [
        {
            "name": spec.name,
            "title": spec.title,
            "description": spec.description,
            "parameters": list(spec.uses),
            "href": f"/v1/reports/{spec.name}",
        }
        for spec in REPORTS.values()
    ]
