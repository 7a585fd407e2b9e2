"""``lane-hq certs …`` and ``lane-hq lanes token``: enrolling a lane (docs/security.md).

``certs init-ca DIR`` makes the chain CA once; ``certs issue-broker`` the
broker's (or the HTTPS API's) server certificate; ``certs issue-hq`` head
office's client certificate; ``certs issue STORE LANE`` a lane's, and with
``--acl`` its stanza in the broker's ACL file.  ``lanes token STORE LANE``
prints the lane's bearer token for head office's HTTP API.

Exit codes as the rest of ``lane-hq``: 0 done, 1 a CA, certificate or ACL file
cannot be used, 2 usage (a malformed store or lane id among them), 78 an
invalid configuration or no lanes' secret in it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pydantic import TypeAdapter, ValidationError

from agent.config import Ident, StoreIdent
from agent.errors import ConfigError
from agent.topics import DEFAULT_ROOT, check_root
from sync.hq import certs
from sync.hq.config import DEFAULT_PATH, load_hq_config
from sync.lane_auth import lane_token

EXIT_INVALID = 1
EXIT_USAGE = 2
EXIT_CONFIG = 78

_STORE: TypeAdapter[str] = TypeAdapter(StoreIdent)
_LANE: TypeAdapter[str] = TypeAdapter(Ident)
RELOAD_HINT = "systemctl reload mosquitto  (or: kill -HUP $(cat /run/mosquitto/mosquitto.pid))"


def _days(text: str) -> int:
    try:
        days = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of days") from None
    if not 1 <= days <= 36_500:
        raise argparse.ArgumentTypeError("1 to 36500 days")
    return days


def _root(text: str) -> str:
    try:
        return check_root(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``certs`` and ``lanes`` to ``lane-hq``'s subcommands."""
    group = sub.add_parser("certs", help="the chain's PKI for the broker's mutual TLS, and its per-lane ACL")
    cmds = group.add_subparsers(dest="certs_command", required=True)

    init = cmds.add_parser("init-ca", help="create the chain CA: DIR/ca.pem and DIR/ca.key (0600)")
    init.add_argument("directory", type=Path, metavar="DIR")
    init.add_argument("--name", default="lane membership chain CA", help="the CA's common name")
    init.add_argument("--days", type=_days, default=3650, help="validity (default 3650)")

    broker = cmds.add_parser("issue-broker", help="a server certificate for the broker (or head office's HTTPS)")
    broker.add_argument("directory", type=Path, metavar="DIR", help="the CA's directory")
    broker.add_argument("--host", action="append", required=True, metavar="NAME_OR_IP", help="repeat for each name")
    broker.add_argument("--out", type=Path, metavar="OUTDIR", help="default: DIR")
    broker.add_argument("--name", default="broker", help="files NAME.pem and NAME.key (default broker)")
    broker.add_argument("--days", type=_days, default=825, help="validity (default 825)")

    hq = cmds.add_parser("issue-hq", help=f"head office's client certificate (CN {certs.HQ_USER})")
    hq.add_argument("--ca", type=Path, required=True, metavar="DIR", help="the CA's directory")
    hq.add_argument("--out", type=Path, required=True, metavar="OUTDIR")
    hq.add_argument("--cn", default=certs.HQ_USER, help=f"its common name, the broker user (default {certs.HQ_USER})")
    hq.add_argument("--days", type=_days, default=825, help="validity (default 825)")

    issue = cmds.add_parser("issue", help="a lane's client certificate (CN lane-STORE-LANE), optionally its ACL")
    issue.add_argument("store", metavar="STORE")
    issue.add_argument("lane", metavar="LANE")
    issue.add_argument("--ca", type=Path, required=True, metavar="DIR", help="the CA's directory")
    issue.add_argument("--out", type=Path, required=True, metavar="OUTDIR", help="gets the key, certificate, ca.pem")
    issue.add_argument("--days", type=_days, default=730, help="validity (default 730)")
    issue.add_argument("--acl", type=Path, metavar="FILE", help="add or replace the lane's stanza in this ACL file")
    issue.add_argument("--topic-root", type=_root, default=DEFAULT_ROOT, help=f"default {DEFAULT_ROOT}")

    lanes = sub.add_parser("lanes", help="lanes' credentials for head office's HTTP API")
    lanes_cmds = lanes.add_subparsers(dest="lanes_command", required=True)
    token = lanes_cmds.add_parser("token", help="print a lane's API token (its sync.hq_token)")
    token.add_argument("store", metavar="STORE")
    token.add_argument("lane", metavar="LANE")
    token.add_argument("--config", default=str(DEFAULT_PATH), metavar="FILE", help=f"default {DEFAULT_PATH}")


def _lane_ids(store: str, lane: str) -> str | None:
    """None when both ids are valid lane-config ids, else what is wrong (as the lane's config says it)."""
    for what, adapter, value in (("store", _STORE, store), ("lane", _LANE, lane)):
        try:
            adapter.validate_python(value)
        except ValidationError as exc:
            return f"invalid {what} id {value!r}: {exc.errors()[0]['msg']}"
    return None


def _expiry(issued: certs.Issued) -> str:
    return issued.not_after.strftime("%Y-%m-%dT%H:%M:%SZ")


def _print_issued(issued: certs.Issued) -> None:
    print(f"issued {issued.common_name}")
    print(f"  certificate {issued.cert_file}")
    print(f"  key         {issued.key_file} (0600)")
    print(f"  expires     {_expiry(issued)}")


def _issue_lane(args: argparse.Namespace) -> int:
    problem = _lane_ids(args.store, args.lane)
    if problem is not None:
        print(f"lane-hq: {problem}", file=sys.stderr)
        return EXIT_USAGE
    user = certs.lane_user(args.store, args.lane)
    issued = certs.issue_client(args.ca, user, out=args.out, days=args.days)
    _print_issued(issued)
    print(f"  CA          {args.out / certs.CA_CERT}")
    print("  on the lane: [sync] tls_ca_file, tls_cert_file, tls_key_file name these three files")
    if args.acl is not None:
        new_file = not args.acl.exists()
        outcome = certs.update_acl(args.acl, user, certs.lane_stanza(args.store, args.lane, args.topic_root))
        print(f"ACL {args.acl}: stanza of {user} {outcome}")
        if new_file:
            # The broker re-reads the file as user mosquitto: a new root-owned 0640 file would be unreadable to it.
            print(f"  a new file (0640): add head office's stanza (acl.example), chown root:mosquitto {args.acl}")
        if outcome != "unchanged":
            print(f"  reload the broker to apply it: {RELOAD_HINT}")
    return 0


def _lane_token(args: argparse.Namespace) -> int:
    problem = _lane_ids(args.store, args.lane)
    if problem is not None:
        print(f"lane-hq: {problem}", file=sys.stderr)
        return EXIT_USAGE
    try:
        config = load_hq_config(args.config)
    except ConfigError as exc:
        print(f"lane-hq: invalid {exc.what}:", file=sys.stderr)
        for issue in exc.issues:
            print(f"  {issue}", file=sys.stderr)
        return EXIT_CONFIG
    secret = config.lane_auth_secret()
    if secret is None:
        print(
            f"lane-hq: {args.config}: no lanes' secret: set lanes.auth_secret_env or auth_secret_file", file=sys.stderr
        )
        return EXIT_CONFIG
    print(lane_token(secret, args.store, args.lane))
    return 0


def run(args: argparse.Namespace) -> int:
    """Run a ``certs`` or ``lanes`` subcommand."""
    try:
        if args.command == "lanes":
            return _lane_token(args)
        if args.certs_command == "init-ca":
            issued = certs.init_ca(args.directory, name=args.name, days=args.days)
            _print_issued(issued)
            print("  keep ca.key offline: whoever holds it can enrol lanes")
            return 0
        if args.certs_command == "issue-broker":
            out = args.directory if args.out is None else args.out
            _print_issued(certs.issue_server(args.directory, args.host, out=out, name=args.name, days=args.days))
            return 0
        if args.certs_command == "issue-hq":
            _print_issued(certs.issue_client(args.ca, args.cn, out=args.out, days=args.days))
            return 0
        return _issue_lane(args)
    except certs.PkiError as exc:
        print(f"lane-hq: {exc}", file=sys.stderr)
        return EXIT_INVALID
