"""``lane-hq whatif``: what a draft ruleset would have given over a period, rule by rule, against the live one.

    lane-hq whatif --draft FILE --from 2026-12-01 --to 2026-12-31 [--store S] [--json] [--config FILE]

Prints one row per rule of either ruleset (discount given and points issued,
live, draft and the difference), then the totals; ``--json`` prints the
report as the HTTP API answers it (sync/hq/centre/whatif_api.py).  The
replay is read-only.  Exit codes as the rest of ``lane-hq``: 0 done, 1 an
invalid draft or period, 3 the database failed, 78 an invalid configuration
or no live ruleset to compare with.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError

from agent.errors import ConfigError, InputError, Issue, RulesetError
from agent.money import format_fen
from agent.ruleset import Ruleset
from sync.hq.audit import RulesetLibrary
from sync.hq.centre.programme import ProgrammeError
from sync.hq.centre.whatif import Period, RuleRow, WhatIfReport, check_period, live_ruleset, parse_draft, replay
from sync.hq.config import DEFAULT_PATH, HqConfig, load_hq_config
from sync.hq.db import HqDatabase
from sync.hq.schema import SchemaError

EXIT_INVALID = 1
EXIT_DATABASE = 3
EXIT_CONFIG = 78

_LABEL_WIDTH = 24


def _date(text: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date (YYYY-MM-DD)") from None


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``whatif`` to ``lane-hq``'s subcommands."""
    whatif = sub.add_parser(
        "whatif", help="replay a period's sales against a draft ruleset: per rule, discount and points vs live"
    )
    whatif.add_argument("--draft", required=True, type=Path, metavar="FILE", help="the draft ruleset (TOML)")
    whatif.add_argument("--from", dest="first", required=True, type=_date, metavar="DATE", help="first day")
    whatif.add_argument("--to", dest="last", required=True, type=_date, metavar="DATE", help="last day, included")
    whatif.add_argument("--store", metavar="STORE", help="one store only (default: every store)")
    whatif.add_argument("--lang", choices=("zh-CN", "en"), default="zh-CN", help="language of the rules' labels")
    whatif.add_argument("--json", action="store_true", help="print the report as JSON")
    whatif.add_argument(
        "--config",
        default=str(DEFAULT_PATH),
        metavar="FILE",
        help=f"head office's configuration (default {DEFAULT_PATH})",
    )


# --- the table ----------------------------------------------------------------------------


def _width(text: str) -> int:
    """Terminal cells: CJK characters take two."""
    return sum(2 if ord(ch) >= 0x1100 else 1 for ch in text)


def _cut(text: str, width: int) -> str:
    if _width(text) <= width:
        return text
    out = ""
    for ch in text:
        if _width(out + ch) > width - 1:
            break
        out += ch
    return out + "~"


def _pad(text: str, width: int, *, right: bool = False) -> str:
    gap = " " * max(0, width - _width(text))
    return gap + text if right else text + gap


def _signed_fen(fen: int) -> str:
    return ("+" if fen > 0 else "") + format_fen(fen)


def _signed(points: int) -> str:
    return f"{points:+d}" if points else "0"


_HEAD = ("rule", "label", "live disc.", "draft disc.", "Δ disc.", "live pts", "draft pts", "Δ pts", "")
_NUMERIC = (False, False, True, True, True, True, True, True, False)


def _cells(row: RuleRow, lang: str) -> tuple[str, ...]:
    label = row.label.zh_cn if lang == "zh-CN" else row.label.en
    note = "" if row.status == "unchanged" else row.status
    return (
        row.rule_id,
        _cut(label, _LABEL_WIDTH),
        format_fen(row.live.discount_fen),
        format_fen(row.draft.discount_fen),
        _signed_fen(row.discount_delta_fen),
        str(row.live.points),
        str(row.draft.points),
        _signed(row.points_delta),
        note,
    )


def _describe(ruleset: Ruleset) -> str:
    return f"{ruleset.id} {ruleset.version}"


def render(report: WhatIfReport, lang: str = "zh-CN") -> str:
    """The report as a table for a terminal."""
    period = report.period
    where = "every store" if period.store is None else f"store {period.store}"
    live, draft = report.live_totals, report.draft_totals
    lines = [
        f"what-if {period.first} .. {period.last} ({report.timezone}), {where}",
        f"live {_describe(report.live)}  vs  draft {_describe(report.draft)}",
        f"sales: {report.read} in the period, {report.compared} compared, {report.read - report.compared} left out",
    ]
    if report.settings_changed:
        lines.append(f"the draft also changes: {', '.join(report.settings_changed)}")
    lines.append("")
    rows = [_HEAD, *(_cells(row, lang) for row in report.rules)]
    total = (
        "total",
        "",
        format_fen(live.discount_fen),
        format_fen(draft.discount_fen),
        _signed_fen(draft.discount_fen - live.discount_fen),
        str(live.points),
        str(draft.points),
        _signed(draft.points - live.points),
        "",
    )
    widths = [max(_width(cells[i]) for cells in [*rows, total]) for i in range(len(_HEAD))]

    def line(cells: tuple[str, ...]) -> str:
        padded = (_pad(cell, widths[i], right=_NUMERIC[i]) for i, cell in enumerate(cells))
        return "  ".join(padded).rstrip()

    lines.append(line(_HEAD))
    lines.append("-" * (sum(widths) + 2 * (len(widths) - 1)))
    lines.extend(line(cells) for cells in rows[1:])
    lines.append("-" * (sum(widths) + 2 * (len(widths) - 1)))
    lines.append(line(total))
    lines.append("")
    for name, totals in (("live", live), ("draft", draft), ("reported", report.reported)):
        lines.append(
            f"{_pad(name, 9)} gross {format_fen(totals.gross_fen)}  discount {format_fen(totals.discount_fen)}"
            f"  net {format_fen(totals.net_fen)}  points {totals.points}"
        )
    lines.append(
        f"{_pad('Δ', 9)} net {_signed_fen(draft.net_fen - live.net_fen)}  points {_signed(draft.points - live.points)}"
    )
    if report.failures:
        lines.append("")
        lines.append("left out of the comparison:")
        for failure in report.failures:
            lines.append(
                f"  {failure.ruleset}: {failure.reason}: {failure.sales} sale(s), e.g. {', '.join(failure.examples)}"
            )
    return "\n".join(lines)


# --- the command --------------------------------------------------------------------------


class _CommandError(Exception):
    def __init__(self, code: int, message: str, issues: tuple[Issue, ...] = ()) -> None:
        super().__init__(message)
        self.exit_code = code
        self.message = message
        self.issues = issues


def _inputs(args: argparse.Namespace) -> tuple[HqConfig, Ruleset, Ruleset, Period]:
    """The configuration, the live and draft rulesets and the period, every one checked."""
    try:
        config = load_hq_config(args.config)
        library = RulesetLibrary.load(config.rules.directory)
    except ConfigError as exc:
        raise _CommandError(EXIT_CONFIG, f"invalid {exc.what}:", exc.issues) from None
    except InputError as exc:  # a ruleset of the rules directory
        raise _CommandError(EXIT_CONFIG, f"invalid {exc.what} in rules.directory:", exc.issues) from None
    try:
        text = args.draft.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise _CommandError(EXIT_INVALID, f"cannot read the draft {args.draft}: {exc}") from None
    try:
        draft = parse_draft(text, source=str(args.draft))
        period = check_period(args.first, args.last, args.store)
        live = live_ruleset(library, config.centre.ruleset, draft)
    except RulesetError as exc:
        raise _CommandError(EXIT_INVALID, "invalid draft ruleset; nothing replayed:", exc.issues) from None
    except InputError as exc:
        raise _CommandError(EXIT_INVALID, f"invalid {exc.what}:", exc.issues) from None
    except ProgrammeError as exc:
        raise _CommandError(EXIT_CONFIG, exc.message) from None
    return config, live, draft, period


def _replay(args: argparse.Namespace) -> WhatIfReport:
    config, live, draft, period = _inputs(args)
    try:
        db = HqDatabase.open(config.database.url)
    except (SchemaError, SQLAlchemyError) as exc:
        raise _CommandError(EXIT_DATABASE, f"the database failed: {exc}") from None
    try:
        return replay(db, live, draft, period)
    except SQLAlchemyError as exc:
        raise _CommandError(EXIT_DATABASE, f"the database failed: {exc}") from None
    finally:
        db.close()


def run(args: argparse.Namespace) -> int:
    """``lane-hq whatif …``; the exit code."""
    started = time.monotonic()
    try:
        report = _replay(args)
    except _CommandError as exc:
        print(f"lane-hq: {exc.message}", file=sys.stderr)
        for issue in exc.issues:
            print(f"  {issue}", file=sys.stderr)
        return exc.exit_code
    if args.json:
        print(json.dumps(report.doc(), ensure_ascii=False, indent=2))
    else:
        print(render(report, args.lang))
        print(f"\nreplayed {report.read} sale(s) in {time.monotonic() - started:.1f} s")
    return 0
