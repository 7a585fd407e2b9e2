"""What-if: replay a period's sales against a draft ruleset and compare, rule by rule, with the live one.

A manager asks what a promotion would have cost: every sale journalled in
the period (programme-local dates, optionally one store) is priced again,
exactly as the audit re-prices a lane's journal body (``sync.hq.audit``: the
POS request, the member state the lane priced with, the sale's moment), once
with the **live** ruleset and once with the **draft**.  The engine names the
rule behind every discount and every point (``PricedLine.discounts`` and
``points_detail``); they are summed per rule id for both, with the number of
sales and lines each rule touched, and the difference draft - live.

Decisions (the issue is silent on them):

* "Live" is the ruleset a manager would replace: the newest version of
  ``[centre] ruleset`` in the rules directory (or of the draft's own id when
  no programme is configured), not the version each sale reports.  A period
  priced under older versions is compared as if today's rules had applied;
  ``reported`` gives what the lanes actually recorded, for the same sales.
* Tenders follow the new amount due.  A lane's sale lists tenders that pay
  exactly what was due, so a draft that changes a price would make almost
  every sale's tenders fit no longer.  The customer is taken to spend the
  same points, rebate money, stored value and coupons, and to pay the rest
  as before: the cash and bank-card tenders are resized in proportion to
  what they paid (a cash tender is added when there was none).  Points then
  follow what is paid in earning tenders, as at the till.  A sale whose
  balance tenders no longer fit (rebate money above the new amount due, a
  tender the draft does not take, ...) is counted under its reason and left
  out of the comparison on both sides, so that the two sides always cover
  the same sales.
* Every sale entry counts, returned or voided later or not: the comparison
  is of what the till gives at the sale.

Memory is bounded: entries are read from one consistent snapshot in chunks
(``SaleReader``; a server-side cursor on PostgreSQL), priced and dropped;
only the per-rule figures and a few example entry ids per failure are kept.
Measured with two-line 888 mall baskets on one core (a shared two-core
machine): 1.4-2.2 s per 10,000 sales on SQLite and on PostgreSQL, about
half of it the engine and a third reading the bodies; the peak of Python
allocations ~5 MB for 20,000 sales and for 80,000 alike (chunks of 500).
The report also names what else than rules the draft changes
(``settings_changed``: tenders, exclusions, earning tenders, ...).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Iterable, Iterator, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, NamedTuple, Self

from pydantic import BaseModel, ConfigDict
from sqlalchemy import Connection, Select, select

from agent.basket import Basket, Member, Tender, parse_member
from agent.engine import PricedBasket, price
from agent.errors import InputError, Issue, TenderError
from agent.money import allocate, format_fen
from agent.pos_models import SaleIn
from agent.ruleset import Rule, Ruleset, Text, parse_ruleset
from sync.hq.audit import RulesetLibrary
from sync.hq.centre.programme import Programme, ProgrammeError
from sync.hq.db import HqDatabase
from sync.hq.schema import journal_entries, sales

#: sale entries read, priced and dropped at a time
CHUNK = 500
#: the longest period one replay covers
MAX_DAYS = 366
#: entry ids kept per failure reason, to look at
MAX_EXAMPLES = 5
# What a ruleset sets beside its rules that changes prices or points (a draft may change them too).
_SETTINGS = (
    "timezone",
    "tiers",
    "discount_exclusion",
    "points_exclusion",
    "points_rounding",
    "earning_tenders",
    "tenders",
)
# The tenders that pay "the rest": resized to the new amount due.  Points, rebate money, stored
# value and coupons are what the customer chose to spend and are kept as they were.
_SETTLING = ("cash", "bank_card")
_EXCEEDS = "tenders_exceed_due"


# --- inputs -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Period:
    """Programme-local days ``first`` to ``last`` inclusive, of every store or one."""

    first: dt.date
    last: dt.date
    store: str | None = None


def check_period(first: dt.date, last: dt.date, store: str | None = None) -> Period:
    """The period, or InputError when it runs backwards or is longer than MAX_DAYS."""
    issues: list[Issue] = []
    if last < first:
        issues.append(Issue("to", "period_reversed", f"{last} is before {first}"))
    elif (last - first).days + 1 > MAX_DAYS:
        issues.append(Issue("to", "period_too_long", f"at most {MAX_DAYS} days at a time"))
    if store is not None and not store:
        issues.append(Issue("store", "empty", "a store id, or none for every store"))
    if issues:
        raise InputError(issues, what="period")
    return Period(first, last, store)


def parse_draft(text: str, source: str = "draft") -> Ruleset:
    """The draft ruleset, validated as ``lane-hq rules check`` does; RulesetError lists every problem."""
    return parse_ruleset(text, source=source)


def live_ruleset(library: RulesetLibrary, configured: str | None, draft: Ruleset) -> Ruleset:
    """The ruleset the draft would replace: the newest version of ``[centre] ruleset``, else of the draft's id."""
    ruleset_id = configured or draft.id
    found = library.newest(ruleset_id)
    if found is None:
        raise ProgrammeError(f"no version of ruleset {ruleset_id!r} is in the rules directory: nothing to compare with")
    return found


class SaleEntry(NamedTuple):
    """A sale journal entry to replay, with what its lane recorded."""

    entry_id: str
    at: dt.datetime  # the entry's moment with the lane's offset, as the audit prices it
    body: str  # the journal body, JSON text
    gross_fen: int
    discount_fen: int
    net_fen: int
    points: int


# --- the figures --------------------------------------------------------------------------


@dataclass(slots=True)
class Tally:
    """One rule's effect under one ruleset: discount given, points issued, sales and lines touched."""

    discount_fen: int = 0
    points: int = 0
    sales: int = 0
    lines: int = 0

    def doc(self) -> dict[str, Any]:
        return {
            "discount": format_fen(self.discount_fen),
            "points": self.points,
            "sales": self.sales,
            "lines": self.lines,
        }


@dataclass(slots=True)
class Totals:
    """Money and points over the sales compared."""

    sales: int = 0
    gross_fen: int = 0
    discount_fen: int = 0
    net_fen: int = 0
    points: int = 0

    def add(self, gross_fen: int, discount_fen: int, net_fen: int, points: int) -> None:
        self.sales += 1
        self.gross_fen += gross_fen
        self.discount_fen += discount_fen
        self.net_fen += net_fen
        self.points += points

    def doc(self) -> dict[str, Any]:
        return {
            "sales": self.sales,
            "gross": format_fen(self.gross_fen),
            "discount": format_fen(self.discount_fen),
            "net": format_fen(self.net_fen),
            "points": self.points,
        }


@dataclass(slots=True)
class _Side:
    """What one ruleset gave over the sales compared."""

    rules: dict[str, Tally] = field(default_factory=dict)
    totals: Totals = field(default_factory=Totals)

    def add(self, priced: PricedBasket) -> None:
        rules = self.rules
        touched: set[str] = set()
        for line in priced.lines:
            on_line: set[str] = set()
            for discount in line.discounts:
                tally = rules.get(discount.rule_id) or rules.setdefault(discount.rule_id, Tally())
                tally.discount_fen += discount.amount_fen
                on_line.add(discount.rule_id)
            for points in line.points_detail:
                tally = rules.get(points.rule_id) or rules.setdefault(points.rule_id, Tally())
                tally.points += points.points
                on_line.add(points.rule_id)
            for rule_id in on_line:
                rules[rule_id].lines += 1
            touched |= on_line
        for rule_id in touched:
            rules[rule_id].sales += 1
        self.totals.add(priced.gross_fen, priced.discount_fen, priced.net_fen, priced.points)


@dataclass(frozen=True, slots=True)
class RuleRow:
    """One rule of either ruleset: what it gave live and under the draft."""

    rule_id: str
    label: Text
    kind: str
    stage: str
    status: str  # unchanged, changed, added (draft only), removed (live only)
    live: Tally
    draft: Tally

    @property
    def discount_delta_fen(self) -> int:
        return self.draft.discount_fen - self.live.discount_fen

    @property
    def points_delta(self) -> int:
        return self.draft.points - self.live.points

    def doc(self) -> dict[str, Any]:
        return {
            "rule": self.rule_id,
            "label": {"zh-CN": self.label.zh_cn, "en": self.label.en},
            "kind": self.kind,
            "stage": self.stage,
            "status": self.status,
            "live": self.live.doc(),
            "draft": self.draft.doc(),
            "delta": {"discount": format_fen(self.discount_delta_fen), "points": self.points_delta},
        }


@dataclass(frozen=True, slots=True)
class FailureRow:
    """Sales left out of the comparison for one reason: ``ruleset`` is live, draft or journal (unreadable)."""

    ruleset: str
    reason: str
    sales: int
    examples: tuple[str, ...]

    def doc(self) -> dict[str, Any]:
        return {"ruleset": self.ruleset, "reason": self.reason, "sales": self.sales, "examples": list(self.examples)}


@dataclass(frozen=True, slots=True)
class WhatIfReport:
    """The replay's answer; ``doc()`` is its JSON (money as decimal strings)."""

    period: Period
    timezone: str
    live: Ruleset
    draft: Ruleset
    read: int  # sale entries in the period
    rules: tuple[RuleRow, ...]
    live_totals: Totals
    draft_totals: Totals
    reported: Totals  # what the lanes recorded for the sales compared
    failures: tuple[FailureRow, ...]
    settings_changed: tuple[str, ...] = ()  # what else than rules the draft changes (tenders, exclusions, ...)

    @property
    def compared(self) -> int:
        return self.live_totals.sales

    def doc(self) -> dict[str, Any]:
        live, draft = self.live_totals, self.draft_totals
        return {
            "period": {
                "from": self.period.first.isoformat(),
                "to": self.period.last.isoformat(),
                "store": self.period.store,
                "timezone": self.timezone,
            },
            "live": {"id": self.live.id, "version": self.live.version, "digest": self.live.digest},
            "draft": {"id": self.draft.id, "version": self.draft.version, "digest": self.draft.digest},
            "sales": {"read": self.read, "compared": self.compared, "left_out": self.read - self.compared},
            "totals": {
                "live": live.doc(),
                "draft": draft.doc(),
                "delta": {
                    "gross": format_fen(draft.gross_fen - live.gross_fen),
                    "discount": format_fen(draft.discount_fen - live.discount_fen),
                    "net": format_fen(draft.net_fen - live.net_fen),
                    "points": draft.points - live.points,
                },
                "reported": self.reported.doc(),
            },
            "settings_changed": list(self.settings_changed),
            "rules": [row.doc() for row in self.rules],
            "failures": [row.doc() for row in self.failures],
        }


# --- pricing one sale -----------------------------------------------------------------------


class _SaleBody(BaseModel):
    """The parts of a sale's journal body a replay needs; the lane's result (most of the text) is skipped."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    request: SaleIn
    member: Any = None


def _parse(entry: SaleEntry) -> tuple[Basket, Member | None]:
    """The sale's basket at its moment and the member state it was priced with (as sync.hq.audit reads them).

    The POS request is validated from JSON text, as the audit does, in one
    pass over the body (twice the speed of decoding it whole first).
    """
    body = _SaleBody.model_validate_json(entry.body)
    basket = dataclasses.replace(body.request.to_basket(), at=entry.at)
    member = None if body.member is None else parse_member(body.member, source="sale.member")
    return basket, member


def _resized(tenders: tuple[Tender, ...], rest_fen: int) -> tuple[Tender, ...]:
    """``tenders`` with the cash and bank-card ones paying ``rest_fen`` between them, in proportion as before."""
    fixed = [t for t in tenders if t.kind not in _SETTLING]
    money = [t for t in tenders if t.kind in _SETTLING]
    if rest_fen == 0:
        return tuple(fixed)
    if not money:
        return (*fixed, Tender("cash", rest_fen))
    parts = iter(allocate(rest_fen, [t.amount_fen or 0 for t in money]))
    out: list[Tender] = []
    for tender in tenders:
        if tender.kind not in _SETTLING:
            out.append(tender)
            continue
        part = next(parts)
        if part:
            out.append(dataclasses.replace(tender, amount_fen=part))
    return tuple(out)


def price_sale(basket: Basket, member: Member | None, ruleset: Ruleset) -> PricedBasket:
    """``basket`` priced under ``ruleset``, its cash and bank-card tenders following the amount due.

    Raises TenderError when the other tenders do not fit (and InputError for an
    inconsistent request), as the engine does.
    """
    tenders = basket.tenders
    try:
        priced = price(basket, member, ruleset)
    except TenderError as exc:
        if any(issue.code != _EXCEEDS for issue in exc.issues):
            raise
        priced = None
    if priced is not None and (priced.unpaid_fen == 0 or not tenders):
        return priced  # the tenders still pay exactly what is due: the common case, one engine call
    if priced is not None:
        rest = priced.unpaid_fen + sum(t.amount_fen or 0 for t in tenders if t.kind in _SETTLING)
    else:
        # The amount due went down below the tenders: what the balance tenders leave to pay.
        fixed = tuple(t for t in tenders if t.kind not in _SETTLING)
        rest = price(dataclasses.replace(basket, tenders=fixed), member, ruleset).unpaid_fen
    return price(dataclasses.replace(basket, tenders=_resized(tenders, rest)), member, ruleset)


def _failure_reason(exc: InputError) -> str:
    return exc.issues[0].code if exc.issues else exc.code


def _same_rule(left: Rule, right: Rule) -> bool:
    # A rule's place in the order (and so its bit) moves when another rule is added or removed.
    return dataclasses.replace(left, order=0, bit=1) == dataclasses.replace(right, order=0, bit=1)


@dataclass(slots=True)
class _Failed:
    sales: int = 0
    examples: list[str] = field(default_factory=list)


# --- the replay ---------------------------------------------------------------------------


class WhatIf:
    """Accumulates the comparison sale by sale; pure (no I/O), so the API can run it on a worker thread."""

    def __init__(self, live: Ruleset, draft: Ruleset, period: Period) -> None:
        self.live = live
        self.draft = draft
        self.period = period
        self.read = 0
        self._live = _Side()
        self._draft = _Side()
        self._reported = Totals()
        self._failures: dict[tuple[str, str], _Failed] = {}  # by (ruleset, reason)

    def _fail(self, ruleset: str, reason: str, entry_id: str) -> None:
        found = self._failures.get((ruleset, reason)) or self._failures.setdefault((ruleset, reason), _Failed())
        found.sales += 1
        examples = found.examples
        # The smallest ids, whatever order entries arrive in: the same period gives the same report.
        if len(examples) < MAX_EXAMPLES or entry_id < examples[-1]:
            examples.append(entry_id)
            examples.sort()
            del examples[MAX_EXAMPLES:]

    def _price(
        self, ruleset: Ruleset, side: str, basket: Basket, member: Member | None, entry_id: str
    ) -> PricedBasket | None:
        try:
            return price_sale(basket, member, ruleset)
        except InputError as exc:  # TenderError included
            self._fail(side, _failure_reason(exc), entry_id)
            return None

    def add(self, entry: SaleEntry) -> None:
        """Price one sale under both rulesets and count it (or its failure)."""
        self.read += 1
        try:
            basket, member = _parse(entry)
        except (ValueError, InputError):  # pydantic's ValidationError is a ValueError
            self._fail("journal", "unreadable", entry.entry_id)
            return
        live = self._price(self.live, "live", basket, member, entry.entry_id)
        draft = self._price(self.draft, "draft", basket, member, entry.entry_id)
        if live is None or draft is None:
            return
        self._live.add(live)
        self._draft.add(draft)
        self._reported.add(entry.gross_fen, entry.discount_fen, entry.net_fen, entry.points)

    def add_all(self, entries: Iterable[SaleEntry]) -> None:
        for entry in entries:
            self.add(entry)

    def _rows(self) -> tuple[RuleRow, ...]:
        live_rules = {rule.id: rule for rule in self.live.rules}
        draft_rules = {rule.id: rule for rule in self.draft.rules}
        ordered = [*live_rules, *(rule_id for rule_id in draft_rules if rule_id not in live_rules)]
        rows = []
        for rule_id in ordered:
            old, new = live_rules.get(rule_id), draft_rules.get(rule_id)
            shown = new or old
            assert shown is not None
            if old is None:
                status = "added"
            elif new is None:
                status = "removed"
            else:
                status = "unchanged" if _same_rule(old, new) else "changed"
            rows.append(
                RuleRow(
                    rule_id,
                    shown.label,
                    shown.kind,
                    shown.stage,
                    status,
                    dataclasses.replace(self._live.rules.get(rule_id) or Tally()),
                    dataclasses.replace(self._draft.rules.get(rule_id) or Tally()),
                )
            )
        return tuple(rows)

    def report(self) -> WhatIfReport:
        """The comparison so far."""
        failures = tuple(
            FailureRow(ruleset, reason, failed.sales, tuple(failed.examples))
            for (ruleset, reason), failed in sorted(self._failures.items())
        )
        return WhatIfReport(
            period=self.period,
            timezone=self.live.timezone.key,
            live=self.live,
            draft=self.draft,
            read=self.read,
            rules=self._rows(),
            live_totals=dataclasses.replace(self._live.totals),
            draft_totals=dataclasses.replace(self._draft.totals),
            reported=dataclasses.replace(self._reported),
            failures=failures,
            settings_changed=tuple(name for name in _SETTINGS if getattr(self.live, name) != getattr(self.draft, name)),
        )


# --- reading the journal ------------------------------------------------------------------


def sale_query(start: dt.datetime, end: dt.datetime, store: str | None) -> Select[Any]:
    """The sale entries of ``[start, end)`` (UTC), of ``store`` or all.

    No ORDER BY: the figures are sums, so any order gives the same report,
    and the database streams one pass over the period instead of sorting it.
    """
    s, j = sales.c, journal_entries.c
    query = (
        select(s.entry_id, j.at, j.body, s.gross_fen, s.discount_fen, s.net_fen, s.points_earned)
        .select_from(sales.join(journal_entries, j.id == s.entry_id))
        .where(s.at_utc >= start, s.at_utc < end)
    )
    return query if store is None else query.where(s.store == store)


def _entry(row: Any) -> SaleEntry:
    entry_id, at, body, gross, discount, net, points = row
    return SaleEntry(entry_id, dt.datetime.fromisoformat(at), body, int(gross), int(discount), int(net), int(points))


class SaleReader:
    """The sale entries of a period from one consistent read, ``chunk`` at a time.

    Every call must come from the database's owner thread (the API calls it
    through ``DbOwner.call``); ``close()`` ends the read transaction and is
    safe to call twice.  Also a context manager and an iterator of chunks.
    """

    def __init__(self, db: HqDatabase, live: Ruleset, period: Period, chunk: int = CHUNK) -> None:
        start, end = Programme(live).day_range(period.first, period.last)
        self._stack = ExitStack()
        try:
            conn: Connection = self._stack.enter_context(db.reading())
            # yield_per: a server-side cursor on PostgreSQL, fetchmany on SQLite; never the whole period at once.
            result = conn.execute(sale_query(start, end, period.store).execution_options(yield_per=chunk))
            self._chunks: Iterator[Any] | None = iter(result.partitions(chunk))
        except BaseException:
            self._stack.close()
            raise

    def next_chunk(self) -> list[SaleEntry]:
        """The next entries; an empty list at the end (the read is closed then)."""
        if self._chunks is None:
            return []
        try:
            rows = next(self._chunks, None)
        except BaseException:
            self.close()
            raise
        if rows is None:
            self.close()
            return []
        return [_entry(row) for row in rows]

    def close(self) -> None:
        self._chunks = None
        self._stack.close()

    def __iter__(self) -> Iterator[list[SaleEntry]]:
        while chunk := self.next_chunk():
            yield chunk

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def replay(db: HqDatabase, live: Ruleset, draft: Ruleset, period: Period, *, chunk: int = CHUNK) -> WhatIfReport:
    """Replay ``period`` against ``draft`` and ``live`` on this thread (the command line's way)."""
    whatif = WhatIf(live, draft, period)
    with SaleReader(db, live, period, chunk) as reader:
        for entries in reader:
            whatif.add_all(entries)
    return whatif.report()


def issues_doc(issues: Iterable[Issue]) -> list[Mapping[str, str]]:
    """Issues as the API lists them."""
    return [{"field": i.field, "code": i.code, "message": i.message} for i in issues]
