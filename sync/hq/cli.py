"""``lane-hq``: head office's command line.

Exit codes: 0 success, 1 invalid input or an audit mismatch, 2 usage error.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from agent.cli import EXIT_INVALID, check_rules, quiet_broken_pipe
from agent.errors import InputError, Issue
from agent.ruleset import load_ruleset
from sync.hq.audit import audit_sale


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
