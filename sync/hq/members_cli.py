"""``lane-hq members …`` and ``lane-hq cards …``: head office's member table by hand (docs/head-office.md).

Each command opens the database of ``--config``, makes its change in one
transaction (an import: one per 5,000 members) and prints what it did.  A
running ``lane-hq run`` announces the new member version and hot list to the
lanes within ``members.notify_interval_seconds``.  Card numbers are hashed
with the configuration's card key and never printed; hashes are shown cut
short.

Exit codes as the rest of ``lane-hq``: 0 done (or nothing to change), 1 bad
input (an invalid file, an unknown member or card, a balance that would go
below zero), 3 the database failed, 78 an invalid configuration or no card key.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError

from agent.errors import ConfigError, InputError
from agent.money import format_fen, parse_money
from agent.snapshot import card_hash
from sync.hq.config import DEFAULT_PATH, HqConfig, load_hq_config
from sync.hq.db import HqDatabase
from sync.hq.members import Change, Member, MemberError, masked
from sync.hq.schema import SchemaError

EXIT_INVALID = 1
EXIT_DATABASE = 3
EXIT_CONFIG = 78

# lane-hq cards ACTION: the state it sets.
CARD_ACTIONS = {"lost": "lost", "block": "cancelled", "restore": "active"}


class _CommandError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.exit_code = code
        self.message = message


def _date(text: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date (YYYY-MM-DD)") from None


def _points(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of points") from None


def _money(text: str) -> int:
    try:
        return parse_money(text, allow_negative=True)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``members`` and ``cards`` to ``lane-hq``'s subcommands."""
    config_help = f"head office's configuration (default {DEFAULT_PATH})"
    group = sub.add_parser("members", help="head office's member table: import, show, tiers, adjustments")
    cmds = group.add_subparsers(dest="members_command", required=True)
    imp = cmds.add_parser("import", help="seed or update members from a member-snapshot file")
    imp.add_argument("file", type=Path, metavar="FILE", help="member-snapshot JSON Lines (docs/member-snapshot.md)")
    show = cmds.add_parser("show", help="a member's tier, balances, cards (hashes cut short) and latest changes")
    show.add_argument("member_id", metavar="MEMBER_ID")
    tier = cmds.add_parser("set-tier", help="set the tier in force, and the next tier change")
    tier.add_argument("member_id", metavar="MEMBER_ID")
    tier.add_argument("tier", metavar="TIER")
    tier.add_argument("--next", dest="next_tier", metavar="TIER", help="the next tier (with --from)")
    tier.add_argument("--from", dest="next_from", type=_date, metavar="DATE", help="the day it takes effect")
    tier.add_argument("--reason", default="tier set", help="recorded with the change")
    adjust = cmds.add_parser("adjust", help="move a member's points and rebate balances by hand")
    adjust.add_argument("member_id", metavar="MEMBER_ID")
    adjust.add_argument("--points", type=_points, default=0, metavar="N", help="points to add (negative: take)")
    adjust.add_argument("--rebate", type=_money, default=0, metavar="X.XX", help="rebate money to add, e.g. -5.00")
    adjust.add_argument("--reason", required=True, help="why (kept with the change)")
    cards = sub.add_parser("cards", help="mark a card lost, block it (cancelled) or restore it (active)")
    cards.add_argument("action", choices=sorted(CARD_ACTIONS), help="lost, block (cancelled) or restore (active)")
    which = cards.add_mutually_exclusive_group(required=True)
    which.add_argument("card", nargs="?", metavar="CARD", help="the card number (hashed with the card key)")
    which.add_argument("--hash", dest="card_hash", metavar="HEX", help="the card's hash instead of its number")
    cards.add_argument("--reason", help="recorded with the change (default: the action)")
    for parser in (imp, show, tier, adjust, cards):
        parser.add_argument("--config", default=str(DEFAULT_PATH), metavar="FILE", help=config_help)


def _card_key(config: HqConfig) -> bytes:
    key = config.card_key()
    if key is None:
        message = "the configuration has no members.card_hash_key (or card_hash_key_env): card numbers cannot be hashed"
        raise _CommandError(EXIT_CONFIG, message)
    return key


def _show(member: Member, changes: list[tuple[int, dt.datetime, str]]) -> None:
    nxt = "" if member.next_tier is None else f" (next: {member.next_tier} from {member.next_tier_from})"
    print(f"member {member.member_id}: tier {member.tier}{nxt}")
    print(
        f"  points {member.points_balance}, rebate {format_fen(member.rebate_fen)}"
        f", birthday {member.birthday or '-'}, card kind {member.card_kind or '(from its cards)'}"
    )
    at = member.updated_at.isoformat() if member.updated_at else "-"
    print(f"  member version {member.version} ({at})")
    print(f"  cards ({len(member.cards)}):")
    for card in sorted(member.cards.values(), key=lambda card: card.valid_from):
        until = card.valid_until.isoformat() if card.valid_until else "no expiry"
        print(f"    {masked(card.card_hash)}  {card.kind}  {card.state}  {card.valid_from} .. {until}  v{card.version}")
    print("  latest changes:")
    for version, when, reason in changes:
        print(f"    v{version}  {when.isoformat()}  {reason}")


def _changed(change: Change | None, what: str) -> None:
    if change is None:
        print(f"{what}: already so; nothing changed")
    else:
        print(f"{what} (member version {change.version})")


def _members(db: HqDatabase, config: HqConfig, args: argparse.Namespace) -> int:
    command = args.members_command
    table = db.members
    if command == "import":
        result = table.import_members(args.file, _card_key(config))
        print(
            f"imported {result.path}: {result.members} members ({result.cards} cards), {result.changed} changed, "
            f"{result.unchanged} unchanged; member version {result.head}"
        )
        return 0
    if command == "show":
        found = table.get(args.member_id)
        if found is None:
            raise MemberError("unknown_member", f"member {args.member_id!r} is not in head office's member table")
        _show(*found)
        return 0
    if command == "set-tier":
        change = table.set_tier(args.member_id, args.tier, args.next_tier, args.next_from, args.reason)
        nxt = "" if args.next_tier is None else f", next {args.next_tier} from {args.next_from}"
        _changed(change, f"{args.member_id}: tier {args.tier}{nxt}")
        return 0
    change = table.adjust(args.member_id, args.points, args.rebate, args.reason)
    found = table.get(args.member_id)
    now = "" if found is None else f" -> {found[0].points_balance} points, {format_fen(found[0].rebate_fen)} rebate"
    _changed(change, f"{args.member_id}: {args.points:+d} points, {format_fen(args.rebate)} rebate{now}")
    return 0


def _cards(db: HqDatabase, config: HqConfig, args: argparse.Namespace) -> int:
    if args.card_hash is not None:
        digest = args.card_hash.strip().lower()
    else:
        try:
            digest = card_hash(_card_key(config), args.card).hex()
        except ValueError as exc:  # not a card number; the message never repeats it
            raise MemberError("bad_card_number", str(exc)) from None
    state = CARD_ACTIONS[args.action]
    change = db.members.set_card_state(digest, state, args.reason or f"card {args.action}")
    owner = f" (member {change.member_id})" if change is not None else ""
    _changed(change, f"card {masked(digest)}{owner}: {state}")
    return 0


def _guarded(db: HqDatabase, config: HqConfig, args: argparse.Namespace) -> int:
    try:
        return _members(db, config, args) if args.command == "members" else _cards(db, config, args)
    except _CommandError as exc:
        print(f"lane-hq: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except MemberError as exc:
        print(f"lane-hq: {exc.message} [{exc.code}]", file=sys.stderr)
        return EXIT_INVALID
    except InputError as exc:
        print(f"lane-hq: invalid {exc.what}; nothing changed:", file=sys.stderr)
        for issue in exc.issues:
            print(f"  {issue}", file=sys.stderr)
        return EXIT_INVALID
    except SQLAlchemyError as exc:
        print(f"lane-hq: the database failed: {exc}", file=sys.stderr)
        return EXIT_DATABASE


def run(args: argparse.Namespace) -> int:
    """``lane-hq members …`` / ``lane-hq cards …``; the exit code."""
    try:
        config = load_hq_config(args.config)
    except ConfigError as exc:
        print(f"lane-hq: invalid {exc.what}:", file=sys.stderr)
        for issue in exc.issues:
            print(f"  {issue}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        db = HqDatabase.open(config.database.url)
    except (SchemaError, SQLAlchemyError) as exc:
        print(f"lane-hq: the database failed: {exc}", file=sys.stderr)
        return EXIT_DATABASE
    try:
        return _guarded(db, config, args)
    finally:
        db.close()
