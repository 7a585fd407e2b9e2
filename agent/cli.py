"""``lane-agent``: the lane daemon's command line (technicians' tools).

Exit codes: 0 success, 1 an input was invalid (every problem printed to
stderr with file, key and reason), 2 a usage error (argparse's own), 3 the
lane's store failed (damaged database, full disk, locked); ``run`` exits 78
(EX_CONFIG) for an invalid configuration or ruleset and 4 when it cannot
listen on its address (``agent/run_cli.py``); ``doctor`` exits 0 all ok, 1
warnings only, 2 a check failed, 78 an invalid configuration
(``agent/doctor_cli.py``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from agent.basket import Member, parse_basket, parse_member
from agent.config_cli import add_config_parser, run_config
from agent.devices_cli import add_devices_parsers, run_devices, run_probe
from agent.doctor_cli import add_doctor_parser, run_doctor
from agent.engine import price
from agent.errors import InputError, Issue
from agent.render import explain, to_wire
from agent.ruleset import load_ruleset
from agent.run_cli import add_run_parser, run_daemon
from agent.store_cli import add_members_parser, run_members

EXIT_INVALID = 1


def _read_json(path: str, what: str) -> Any:
    try:
        with Path(path).open(encoding="utf-8") as handle:
            return json.load(handle)
    except OSError as exc:
        raise InputError([Issue("", "unreadable", str(exc), path)], what=what) from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError([Issue("", "json_syntax", str(exc), path)], what=what) from exc


def _parse_at(text: str) -> dt.datetime:
    try:
        at = dt.datetime.fromisoformat(text)
    except ValueError as exc:
        raise InputError([Issue("--at", "bad_time", f"{text!r} is not an ISO 8601 time")], what="option") from exc
    if at.utcoffset() is None:
        raise InputError([Issue("--at", "time_required", "give a UTC offset, e.g. +08:00")], what="option")
    return at


def check_rules(paths: Sequence[str]) -> int:
    """Validate ruleset files; print one line per file and every problem found."""
    failed = 0
    for path in paths:
        try:
            ruleset = load_ruleset(path)
        except InputError as exc:
            failed += 1
            print(f"{path}: INVALID", file=sys.stderr)
            for issue in exc.issues:
                print(f"  {issue}", file=sys.stderr)
            continue
        print(f"{path}: ok  {ruleset.id} {ruleset.version}  {len(ruleset.rules)} rules  sha256 {ruleset.digest[:12]}")
    return EXIT_INVALID if failed else 0


def _cmd_price(args: argparse.Namespace) -> int:
    ruleset = load_ruleset(args.rules)
    basket = parse_basket(_read_json(args.basket, "basket"), source=args.basket)
    member: Member | None = None
    if args.member:
        member = parse_member(_read_json(args.member, "member"), source=args.member)
    at = _parse_at(args.at) if args.at else None
    if at is None and basket.at is None:
        at = dt.datetime.now(ruleset.timezone)
    priced = price(basket, member, ruleset, at)
    if args.explain:
        print(explain(priced, lang=args.lang))
    else:
        print(json.dumps(to_wire(priced), ensure_ascii=False, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lane-agent", description="Checkout-lane membership agent")
    sub = parser.add_subparsers(dest="command", required=True)
    add_config_parser(sub)
    add_members_parser(sub)
    add_run_parser(sub)
    add_devices_parsers(sub)
    add_doctor_parser(sub)

    rules = sub.add_parser("rules", help="ruleset tools")
    rules_sub = rules.add_subparsers(dest="rules_command", required=True)
    check = rules_sub.add_parser("check", help="validate ruleset files")
    check.add_argument("files", nargs="+", metavar="FILE")

    price_cmd = sub.add_parser("price", help="price a basket file and explain the result")
    price_cmd.add_argument("--rules", required=True, metavar="FILE", help="ruleset TOML")
    price_cmd.add_argument("--basket", required=True, metavar="FILE", help="basket JSON (the POST /v1/price body)")
    price_cmd.add_argument("--member", metavar="FILE", help="member state JSON; omit for a guest")
    price_cmd.add_argument("--at", metavar="ISO", help="local time with offset; default: the basket's, else now")
    price_cmd.add_argument("--explain", action="store_true", help="a cashier's table instead of JSON")
    price_cmd.add_argument("--lang", choices=["zh-CN", "en"], default="zh-CN", help="language of --explain")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lane-agent`` console script."""
    args = build_parser().parse_args(argv)
    try:
        commands = {
            "rules": lambda: check_rules(args.files),
            "config": lambda: run_config(args),
            "members": lambda: run_members(args),
            "run": lambda: run_daemon(args),
            "devices": lambda: run_devices(args),
            "probe": lambda: run_probe(args),
            "doctor": lambda: run_doctor(args),
            "price": lambda: _cmd_price(args),
        }
        return commands[args.command]()
    except InputError as exc:
        print(f"lane-agent: invalid {exc.what}:", file=sys.stderr)
        for issue in exc.issues:
            print(f"  {issue}", file=sys.stderr)
        return EXIT_INVALID
    except BrokenPipeError:
        quiet_broken_pipe()
        return 0


def quiet_broken_pipe() -> None:
    """The reader of our output went away (``| head``): not an error; silence the final flush."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


if __name__ == "__main__":
    sys.exit(main())
