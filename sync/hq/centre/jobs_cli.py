"""``lane-hq jobs …``: the member centre's batch jobs by hand or from cron (docs/member-centre.md "Jobs").

``jobs run NAME --date D`` runs one job for day D (default: today in the
programme's zone) and prints what it did; ``jobs due --date D`` runs every
job due on D, in order; ``jobs list`` shows the latest runs.  A job writes
only keyed rows, so running one again for a day prints zeros and changes
nothing.  The programme is the ``[centre]`` section of the newest version of
``[centre] ruleset`` in ``rules.directory``.

Exit codes as the rest of ``lane-hq``: 0 done, 1 an unknown job, no
programme, or a change refused; 3 the database failed; 78 an invalid
configuration or rules directory.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from collections.abc import Callable

from sqlalchemy.exc import SQLAlchemyError

from agent.errors import InputError
from sync.hq.audit import RulesetLibrary
from sync.hq.centre import jobs
from sync.hq.centre.programme import JobContext, ProgrammeError, live_programme
from sync.hq.config import DEFAULT_PATH, HqConfig, load_hq_config
from sync.hq.db import HqDatabase
from sync.hq.members import MemberError
from sync.hq.schema import SchemaError

EXIT_INVALID = 1
EXIT_DATABASE = 3
EXIT_CONFIG = 78


def _date(text: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date (YYYY-MM-DD)") from None


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``jobs`` to ``lane-hq``'s subcommands."""
    group = sub.add_parser("jobs", help="the member centre's batch jobs: run one, run those due, list runs")
    cmds = group.add_subparsers(dest="jobs_command", required=True)
    run = cmds.add_parser("run", help=f"run one job for a day ({', '.join(jobs.JOBS)})")
    run.add_argument("name", metavar="NAME", help="; ".join(f"{job.name}: {job.help}" for job in jobs.JOBS.values()))
    due = cmds.add_parser("due", help="run every job due on a day, in order")
    for parser in (run, due):
        parser.add_argument("--date", type=_date, metavar="YYYY-MM-DD", help="the day (default: today, local)")
    listing = cmds.add_parser("list", help="the latest job runs, newest day first")
    listing.add_argument("--limit", type=int, default=50, metavar="N", help="at most this many (default 50)")
    for parser in (run, due, listing):
        parser.add_argument(
            "--config",
            default=str(DEFAULT_PATH),
            metavar="FILE",
            help=f"head office's configuration (default {DEFAULT_PATH})",
        )


def _summary(result: jobs.JobResult) -> str:
    done = " ".join(f"{key}={value}" for key, value in sorted(result.summary.items()))
    again = "" if result.runs == 1 else f", run {result.runs} for this day"
    return f"{result.job} {result.day.isoformat()}: {done or 'nothing to do'}{again}"


def _context(db: HqDatabase, config: HqConfig, day: dt.date | None) -> JobContext:
    library = RulesetLibrary.load(config.rules.directory)
    programme = live_programme(library, config.centre.ruleset)
    now = db.now()
    return JobContext(db, programme, day or programme.local_date(now), now)


def _list(db: HqDatabase, limit: int) -> int:
    runs = jobs.recent_runs(db, limit)
    if not runs:
        print("no job has run yet")
    for run in runs:
        summary = run["summary"]
        done = " ".join(f"{k}={v}" for k, v in sorted(summary.items())) if isinstance(summary, dict) else ""
        print(f"{run['day']}  {run['job']:<10} runs={run['runs']}  finished {run['finished_at']}  {done}")
    return 0


def _commands(db: HqDatabase, config: HqConfig, args: argparse.Namespace) -> int:
    if args.jobs_command == "list":
        return _list(db, args.limit)
    ctx = _context(db, config, args.date)
    if args.jobs_command == "run":
        print(_summary(jobs.run_job(ctx, args.name)))
        return 0
    results = jobs.run_due(ctx)
    if not results:
        print(f"no job is due on {ctx.day.isoformat()}")
    for result in results:
        print(_summary(result))
    return 0


def _guarded(fn: Callable[[], int]) -> int:
    try:
        return fn()
    except (jobs.JobError, ProgrammeError, MemberError) as exc:
        print(f"lane-hq: {exc.message} [{exc.code}]", file=sys.stderr)
        return EXIT_INVALID
    except InputError as exc:  # the rules directory holds a file that does not validate
        print(f"lane-hq: invalid {exc.what}:", file=sys.stderr)
        for issue in exc.issues:
            print(f"  {issue}", file=sys.stderr)
        return EXIT_CONFIG
    except (SchemaError, SQLAlchemyError) as exc:
        print(f"lane-hq: the database failed: {exc}", file=sys.stderr)
        return EXIT_DATABASE


def run(args: argparse.Namespace) -> int:
    """``lane-hq jobs …``; the exit code."""
    if args.jobs_command == "run" and args.name not in jobs.JOBS:
        print(f"lane-hq: no job {args.name!r}: one of {', '.join(jobs.JOBS)} [unknown_job]", file=sys.stderr)
        return EXIT_INVALID
    try:
        config = load_hq_config(args.config)
    except InputError as exc:
        print(f"lane-hq: invalid {exc.what}:", file=sys.stderr)
        for issue in exc.issues:
            print(f"  {issue}", file=sys.stderr)
        return EXIT_CONFIG

    def work() -> int:
        db = HqDatabase.open(config.database.url)
        try:
            return _commands(db, config, args)
        finally:
            db.close()

    return _guarded(work)
