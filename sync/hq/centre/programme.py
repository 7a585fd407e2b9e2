"""The programme the member centre runs: the ``[centre]`` section of the live ruleset, and its calendar.

The live ruleset is the newest version of ``[centre] ruleset`` in head
office's rules directory (the one lanes price with after ``lane-hq rules
publish``).  Every date here is the programme's local date in the ruleset's
time zone: a "day" for same-day spend, claims and jobs is the stores' day,
not UTC's.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import TYPE_CHECKING
from zoneinfo import ZoneInfo

from agent.errors import LaneError
from agent.money import parse_money, parse_rate
from agent.ruleset import Ruleset
from agent.ruleset_schema import Centre
from sync.hq.audit import RulesetLibrary

if TYPE_CHECKING:
    from sync.hq.db import HqDatabase


class ProgrammeError(LaneError):
    """No programme to run: no ``[centre] ruleset`` configured, or no version of it in the rules directory."""

    code = "no_programme"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True, slots=True)
class Programme:
    """One ruleset's programme and calendar; immutable."""

    ruleset: Ruleset

    @property
    def centre(self) -> Centre:
        return self.ruleset.centre

    @property
    def tz(self) -> ZoneInfo:
        return self.ruleset.timezone

    @property
    def tiers(self) -> tuple[str, ...]:
        """The ladder, lowest first (the order of ``[[tiers]]`` in the file)."""
        return self.ruleset.tiers

    def rank(self, tier: str | None) -> int:
        """A tier's place on the ladder (0 lowest); -1 for a tier this programme does not have."""
        return self.tiers.index(tier) if tier in self.tiers else -1

    def local_date(self, at: dt.datetime) -> dt.date:
        """The programme's date at the moment ``at`` (aware)."""
        return at.astimezone(self.tz).date()

    def day_start(self, day: dt.date) -> dt.datetime:
        """The first moment of ``day`` in the programme's zone, in UTC."""
        return dt.datetime.combine(day, dt.time(), self.tz).astimezone(dt.UTC)

    def day_range(self, first: dt.date, last: dt.date) -> tuple[dt.datetime, dt.datetime]:
        """``[start of first, start of the day after last)`` in UTC: the half-open span of those days."""
        return self.day_start(first), self.day_start(last + dt.timedelta(days=1))

    def card_fee_fen(self) -> int:
        return parse_money(self.centre.card_fee)

    def rebate_rate(self) -> int | None:
        """The rebate rate in the engine's fixed point (``agent.money.parse_rate``: 10,000 = 1), or None."""
        return None if self.centre.rebate is None else parse_rate(self.centre.rebate.rate)


def live_programme(library: RulesetLibrary, ruleset_id: str | None) -> Programme:
    """The programme of the newest version of ``ruleset_id``; ProgrammeError when there is none."""
    if ruleset_id is None:
        raise ProgrammeError("[centre] ruleset is not set: name the ruleset whose [centre] section head office runs")
    ruleset = library.newest(ruleset_id)
    if ruleset is None:
        raise ProgrammeError(f"no version of ruleset {ruleset_id!r} is in the rules directory")
    return Programme(ruleset)


def add_months(day: dt.date, months: int) -> dt.date:
    """``day`` plus ``months`` calendar months; the 31st becomes the month's last day where it has none."""
    index = day.year * 12 + day.month - 1 + months
    year, month = divmod(index, 12)
    month += 1
    for last in (31, 30, 29, 28):
        try:
            return dt.date(year, month, min(day.day, last))
        except ValueError:
            continue
    raise AssertionError("unreachable")  # pragma: no cover


def add_years(day: dt.date, years: int) -> dt.date:
    """``day`` plus ``years``; 29 February becomes 28 February in a common year."""
    return add_months(day, 12 * years)


@dataclass(frozen=True, slots=True)
class JobContext:
    """What a batch job gets: the database, the programme, the day it runs for, and who it is in the ledger."""

    db: HqDatabase
    programme: Programme
    day: dt.date
    now: dt.datetime
    actor: str = "job"  # as the ledger and the audit name it: "job:<name>"
