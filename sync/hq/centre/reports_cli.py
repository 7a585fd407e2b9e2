"""``lane-hq reports [NAME]``: the member centre's reports on the command line, as a table or CSV.

``lane-hq reports`` lists them; ``lane-hq reports NAME [--from D] [--to D]
[--period day|week|month] [--csv]`` prints one (dates are the programme's
local dates; default the 30 days ending today).  The same queries as
``GET /v1/reports/{name}`` (sync/hq/centre/reports.py), read in one
consistent transaction.

Exit codes as the rest of ``lane-hq``: 0 printed, 1 bad parameters (a bad
date or range), 2 usage, 3 the database failed, 78 an invalid configuration
or no programme (``[centre] ruleset``).
"""

from __future__ import annotations

import argparse
import sys
import unicodedata
from collections.abc import Sequence

from sqlalchemy.exc import SQLAlchemyError

from agent.errors import ConfigError, InputError
from sync.hq.audit import RulesetLibrary
from sync.hq.centre.programme import Programme, ProgrammeError, live_programme
from sync.hq.centre.reports import PERIODS, REPORTS, Report, ReportError, make_query, run_report, to_csv
from sync.hq.config import DEFAULT_PATH, HqConfig, load_hq_config
from sync.hq.db import HqDatabase
from sync.hq.schema import SchemaError

EXIT_INVALID = 1
EXIT_DATABASE = 3
EXIT_CONFIG = 78


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``reports`` to ``lane-hq``'s subcommands."""
    parser = sub.add_parser("reports", help="the member centre's reports: members, tiers, points, spend, churn, lanes")
    parser.add_argument("name", nargs="?", choices=list(REPORTS), metavar="NAME", help="the report (none: list them)")
    parser.add_argument("--from", dest="first", metavar="YYYY-MM-DD", help="first local date (default: 29 days ago)")
    parser.add_argument("--to", dest="last", metavar="YYYY-MM-DD", help="last local date (default: today)")
    parser.add_argument("--period", choices=PERIODS, help="bucket by day, week or month (default day)")
    parser.add_argument("--csv", action="store_true", help="print CSV (RFC 4180, a header row) instead of a table")
    config_help = f"head office's configuration (default {DEFAULT_PATH})"
    parser.add_argument("--config", default=str(DEFAULT_PATH), metavar="FILE", help=config_help)


def _width(text: str) -> int:
    """Terminal cells: CJK characters (tier labels, categories) take two."""
    return sum(2 if unicodedata.east_asian_width(char) in "WF" else 1 for char in text)


def table(report: Report) -> str:
    """The report as an aligned text table: numbers right, text left, ``-`` for no value."""
    records = report.records()
    heads = [column.key for column in report.columns]
    cells = [["-" if value is None else str(value) for value in record.values()] for record in records]
    widths = [max([_width(head)] + [_width(row[i]) for row in cells]) for i, head in enumerate(heads)]
    right = [column.kind in {"int", "money", "decimal"} for column in report.columns]

    def line(values: Sequence[str]) -> str:
        parts = []
        for value, width, numeric in zip(values, widths, right, strict=True):
            gap = " " * (width - _width(value))
            parts.append(gap + value if numeric else value + gap)
        return "  ".join(parts).rstrip()

    span = ""
    if report.first is not None and report.last is not None:
        span = f" {report.first} .. {report.last}" + ("" if report.period is None else f" by {report.period}")
    elif report.last is not None:
        span = f" as of {report.last}"
    out = [f"{report.title}{span}", line(heads), line(["-" * width for width in widths])]
    out.extend(line(row) for row in cells)
    if not cells:
        out.append("(no data)")
    return "\n".join(out)


def _listing() -> int:
    width = max(len(name) for name in REPORTS)
    for spec in REPORTS.values():
        print(f"{spec.name:<{width}}  {spec.description}")
    return 0


class _ExitError(Exception):
    """The command stops with this exit code and message (on stderr)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.exit_code = code
        self.message = message


def _issues(exc: ConfigError | InputError) -> str:
    return "\n".join([f"lane-hq: invalid {exc.what}:", *(f"  {issue}" for issue in exc.issues)])


def _programme(config: HqConfig) -> Programme:
    try:
        return live_programme(RulesetLibrary.load(config.rules.directory), config.centre.ruleset)
    except InputError as exc:
        raise _ExitError(EXIT_CONFIG, _issues(exc)) from None
    except ProgrammeError as exc:
        raise _ExitError(EXIT_CONFIG, f"lane-hq: {exc.message}") from None


def _read(config: HqConfig, programme: Programme, args: argparse.Namespace) -> Report:
    try:
        db = HqDatabase.open(config.database.url)
    except (SchemaError, SQLAlchemyError) as exc:
        raise _ExitError(EXIT_DATABASE, f"lane-hq: the database failed: {exc}") from None
    try:
        factor = config.centre.churn_factor
        query = make_query(
            programme, db.now(), first=args.first, last=args.last, period=args.period, churn_factor=factor
        )
        with db.reading() as conn:
            return run_report(conn, programme, args.name, query)
    except ReportError as exc:
        raise _ExitError(EXIT_INVALID, f"lane-hq: {exc.message} [{exc.code}]") from None
    except SQLAlchemyError as exc:
        raise _ExitError(EXIT_DATABASE, f"lane-hq: the database failed: {exc}") from None
    finally:
        db.close()


def run(args: argparse.Namespace) -> int:
    """``lane-hq reports …``; the exit code."""
    if args.name is None:
        return _listing()
    try:
        try:
            config = load_hq_config(args.config)
        except ConfigError as exc:
            raise _ExitError(EXIT_CONFIG, _issues(exc)) from None
        report = _read(config, _programme(config), args)
    except _ExitError as exc:
        print(exc.message, file=sys.stderr)
        return exc.exit_code
    sys.stdout.write(to_csv(report) if args.csv else table(report) + "\n")
    return 0
