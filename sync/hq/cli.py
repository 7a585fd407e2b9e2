"""``lane-hq``: head office's command line.

Exit codes: 0 success, 1 invalid input or an audit mismatch, 2 usage error,
78 (EX_CONFIG) for ``run`` with an invalid configuration or ruleset directory.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from agent.cli import EXIT_INVALID, check_rules, quiet_broken_pipe
from agent.errors import InputError, Issue
from agent.logs import setup_logging
from agent.ruleset import load_ruleset
from sync.hq.audit import RulesetLibrary, audit_sale
from sync.hq.config import DEFAULT_PATH, HqConfig, load_hq_config

EXIT_CONFIG = 78


def _load_for_run(path: str) -> tuple[HqConfig, RulesetLibrary]:
    """The configuration, its rulesets and its secrets, all checked before anything opens."""
    config = load_hq_config(path)
    library = RulesetLibrary.load(config.rules.directory)
    name = config.broker.password_env
    if name is not None and config.password() is None:
        raise InputError(
            [Issue("broker.password_env", "env_unset", f"environment variable {name} is not set")],
            what="configuration",
        )
    return config, library


def _cmd_run(args: argparse.Namespace) -> int:
    try:
        config, library = _load_for_run(args.config)
    except InputError as exc:
        print(f"lane-hq: invalid {exc.what}:", file=sys.stderr)
        for issue in exc.issues:
            print(f"  {issue}", file=sys.stderr)
        return EXIT_CONFIG
    setup_logging(config.logging.level)
    import asyncio  # noqa: PLC0415 - only the daemon needs the event loop and the server stack

    from sync.hq.server import serve  # noqa: PLC0415

    asyncio.run(serve(config, library))
    return 0


def _cmd_audit(args: argparse.Namespace) -> int:
    ruleset = load_ruleset(args.rules)
    mismatched = 0
    for path in args.sales:
        try:
            sale = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError([Issue("", "unreadable", str(exc), path)], what="sale") from exc
        if not isinstance(sale, dict):
            raise InputError([Issue("", "bad_sale", "a sale file is a JSON object", path)], what="sale")
        differences = audit_sale(ruleset, sale)
        if differences:
            mismatched += 1
            print(f"{path}: MISMATCH ({len(differences)} value(s))")
            for diff in differences:
                print(f"  {diff.path}: lane reported {diff.reported!r}, re-priced {diff.expected!r}")
        else:
            print(f"{path}: ok")
    return EXIT_INVALID if mismatched else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lane-hq", description="Head office of the lane membership agents")
    sub = parser.add_subparsers(dest="command", required=True)
    rules = sub.add_parser("rules", help="ruleset tools")
    rules_sub = rules.add_subparsers(dest="rules_command", required=True)
    check = rules_sub.add_parser("check", help="validate ruleset files")
    check.add_argument("files", nargs="+", metavar="FILE")
    run = sub.add_parser("run", help="run head office: journal ingest, audit, HTTP API")
    run.add_argument("--config", default=str(DEFAULT_PATH), metavar="FILE", help=f"default {DEFAULT_PATH}")
    audit = sub.add_parser("audit", help="re-price reported sales and list every difference")
    audit.add_argument("--rules", required=True, metavar="FILE", help="the ruleset version the lane reported")
    audit.add_argument("sales", nargs="+", metavar="SALE", help="JSON: {basket, member, result}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lane-hq`` console script."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "rules":
            return check_rules(args.files)
        if args.command == "run":
            return _cmd_run(args)
        return _cmd_audit(args)
    except InputError as exc:
        print(f"lane-hq: invalid {exc.what}:", file=sys.stderr)
        for issue in exc.issues:
            print(f"  {issue}", file=sys.stderr)
        return EXIT_INVALID
    except BrokenPipeError:
        quiet_broken_pipe()
        return 0


if __name__ == "__main__":
    sys.exit(main())
