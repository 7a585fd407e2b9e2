"""``lane-hq``: head office's command line.

Exit codes: 0 success, 1 invalid input or an audit mismatch, 2 usage error,
78 (EX_CONFIG) for ``run`` with an invalid configuration or ruleset directory
(and ``lanes token`` without a lanes' secret; see sync/hq/certs_cli.py).
``rules publish``: 1 invalid ruleset, 3 broker unreachable, 78 configuration
or signing key (sync/hq/rules_publish.py).
"""

from __future__ import annotations

import argparse
import json
import ssl
import sys
from collections.abc import Sequence
from pathlib import Path

from agent.cli import EXIT_INVALID, check_rules, quiet_broken_pipe
from agent.errors import InputError, Issue
from agent.logs import setup_logging
from agent.ruleset import load_ruleset
from sync.hq import certs_cli, members_cli, rules_publish
from sync.hq.audit import RulesetLibrary, audit_sale
from sync.hq.centre import jobs_cli, reports_cli, whatif_cli
from sync.hq.config import DEFAULT_PATH, HqConfig, load_hq_config
from sync.hq.lane_api import check_snapshot_directory

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
    if config.api.tls_cert_file is not None and config.api.tls_key_file is not None:
        # Loaded here so that a missing or mismatched file is a configuration error, not a crash of the API task.
        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
                config.api.tls_cert_file, config.api.tls_key_file
            )
        except OSError as exc:  # ssl.SSLError included
            message = f"cannot load the HTTPS certificate and key: {exc}"
            raise InputError([Issue("api.tls_cert_file", "tls_unusable", message)], what="configuration") from exc
    issues = check_snapshot_directory(config, path) + _check_centre(config, library)
    if issues:
        raise InputError(issues, what="configuration")
    return config, library


def _check_centre(config: HqConfig, library: RulesetLibrary) -> list[Issue]:
    """The member centre's programme and secrets: named ones must be there, before anything opens."""
    centre, issues = config.centre, []
    if centre.ruleset is not None and library.newest(centre.ruleset) is None:
        message = f"no version of ruleset {centre.ruleset!r} is in rules.directory"
        issues.append(Issue("centre.ruleset", "unknown_ruleset", message))
    named_key = centre.personal_data_key_env or centre.personal_data_key_file
    key = config.personal_data_key()
    if named_key is not None and (key is None or len(key) < 16):
        message = f"{named_key} holds no personal-data key ('hex:' or 'base64:', at least 16 bytes)"
        issues.append(Issue("centre.personal_data_key", "key_unusable", str(message)))
    named_secret = centre.staff_secret_env or centre.staff_secret_file
    if named_secret is not None and config.staff_secret() is None:
        issues.append(Issue("centre.staff_secret", "secret_unset", f"{named_secret} holds no staff secret"))
    return issues


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


def _cmd_rules(args: argparse.Namespace) -> int:
    signing = {"keygen": rules_publish.cmd_keygen, "publish": rules_publish.cmd_publish}.get(args.rules_command)
    return check_rules(args.files) if signing is None else signing(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lane-hq", description="Head office of the lane membership agents")
    sub = parser.add_subparsers(dest="command", required=True)
    rules = sub.add_parser("rules", help="ruleset tools")
    rules_sub = rules.add_subparsers(dest="rules_command", required=True)
    check = rules_sub.add_parser("check", help="validate ruleset files")
    check.add_argument("files", nargs="+", metavar="FILE")
    rules_publish.add_rules_parsers(rules_sub)
    run = sub.add_parser("run", help="run head office: journal ingest, audit, HTTP API")
    run.add_argument("--config", default=str(DEFAULT_PATH), metavar="FILE", help=f"default {DEFAULT_PATH}")
    audit = sub.add_parser("audit", help="re-price reported sales and list every difference")
    audit.add_argument("--rules", required=True, metavar="FILE", help="the ruleset version the lane reported")
    audit.add_argument("sales", nargs="+", metavar="SALE", help="JSON: {basket, member, result}")
    certs_cli.add_parsers(sub)
    members_cli.add_parsers(sub)
    reports_cli.add_parsers(sub)
    jobs_cli.add_parsers(sub)
    whatif_cli.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:  # noqa: PLR0911 - one return per command
    """Entry point of the ``lane-hq`` console script."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "rules":
            return _cmd_rules(args)
        if args.command == "run":
            return _cmd_run(args)
        if args.command in {"certs", "lanes"}:
            return certs_cli.run(args)
        if args.command == "reports":
            return reports_cli.run(args)
        if args.command == "jobs":
            return jobs_cli.run(args)
        if args.command == "whatif":
            return whatif_cli.run(args)
        return members_cli.run(args) if args.command in {"members", "cards", "staff"} else _cmd_audit(args)
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
