"""``lane-hq members …``, ``lane-hq cards …``, ``lane-hq staff …``: head office's members by hand (docs/head-office.md).

Each command opens the database of ``--config``, makes its change in one
transaction (an import: one per 5,000 members) and prints what it did.  A
running ``lane-hq run`` announces the new member version and hot list to the
lanes within ``members.notify_interval_seconds``.  Card numbers are hashed
with the configuration's card key and never printed -- except by ``cards
issue`` and ``cards replace``, which print the new card's number once for the
desk to put on the card; hashes are shown cut short, numbers masked.

The service desk's commands (docs/member-centre.md) run through
``sync.hq.centre.registry``: ``members register|update|cancel|find|claim|audit``,
``members show --personal``, ``cards issue|replace|lost``.  Each is recorded in
``centre_audit`` under ``--staff NAME`` (default ``cli:<login name>``).
Personal data given as options is visible to other users of the machine
(``ps``) and in the shell's history: prefer ``--json FILE`` (or ``-``, stdin).
Nothing here prints personal data except ``members show --personal``.

``staff token NAME`` prints the bearer credentials (``NAME:TOKEN``) of a
staff member for the desk's HTTP API, from ``[centre] staff_secret_*``.

Exit codes as the rest of ``lane-hq``: 0 done (or nothing to change), 1 bad
input or a refusal (an invalid file, an unknown member or card, a balance
that would go below zero, a receipt outside the claim window, …), 3 the
database failed, 78 an invalid configuration, no card key, no personal-data
key, no staff secret, or no programme.
"""

from __future__ import annotations

import argparse
import datetime as dt
import getpass
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from agent.errors import ConfigError, InputError
from agent.money import format_fen, parse_money
from agent.snapshot import card_hash
from sync.hq.audit import RulesetLibrary
from sync.hq.centre import registry
from sync.hq.centre.claims import Receipt
from sync.hq.centre.pii import PersonalDataError
from sync.hq.centre.programme import ProgrammeError
from sync.hq.centre.staff import bearer_value, check_name
from sync.hq.config import DEFAULT_PATH, HqConfig, load_hq_config
from sync.hq.db import HqDatabase
from sync.hq.members import Change, Member, MemberError, masked
from sync.hq.schema import SchemaError

EXIT_INVALID = 1
EXIT_DATABASE = 3
EXIT_CONFIG = 78

# lane-hq cards ACTION: the state it sets (``lost`` goes through the service desk, audited).
CARD_ACTIONS = {"lost": "lost", "block": "cancelled", "restore": "active"}
# The personal-data options of register / update, as the API names the fields.
_PROFILE_OPTIONS = ("name", "phone", "id_number", "address", "email", "birthday")


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


def _sale(text: str) -> Receipt:
    parts = text.split("/")
    if len(parts) != 3 or not all(parts):
        raise argparse.ArgumentTypeError(f"{text!r}: STORE/LANE/SALE_ID, as printed on the receipt")
    return Receipt(store=parts[0], lane=parts[1], sale_id=parts[2])


def _entry(text: str) -> Receipt:
    return Receipt(entry_id=text)


def _default_staff() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (OSError, KeyError):  # no login name (a container without a passwd entry)
        return "cli"


def _card_choice(parser: argparse.ArgumentParser) -> None:
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("card", nargs="?", metavar="CARD", help="the card number (hashed with the card key)")
    which.add_argument("--hash", dest="card_hash", metavar="HEX", help="the card's hash instead of its number")


def _profile_options(parser: argparse.ArgumentParser) -> None:
    for name in _PROFILE_OPTIONS:
        flag = "--" + name.replace("_", "-")
        what = "MM-DD" if name == "birthday" else name.replace("_", " ")
        parser.add_argument(flag, dest=name, metavar=what.upper().replace(" ", "_"), help=f"the member's {what}")
    parser.add_argument(
        "--json",
        dest="json_file",
        metavar="FILE",
        help="the fields as a JSON object (as the API takes them; not seen by `ps`); '-' reads stdin",
    )


def _add_member_parsers(cmds: argparse._SubParsersAction[argparse.ArgumentParser]) -> list[argparse.ArgumentParser]:
    imp = cmds.add_parser("import", help="seed or update members from a member-snapshot file")
    imp.add_argument("file", type=Path, metavar="FILE", help="member-snapshot JSON Lines (docs/member-snapshot.md)")
    show = cmds.add_parser("show", help="a member's tier, balances, cards (hashes cut short) and latest changes")
    show.add_argument("member_id", metavar="MEMBER_ID")
    show.add_argument("--personal", action="store_true", help="decrypt and print the personal data (audited)")
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
    register = cmds.add_parser("register", help="register a member at the service desk (personal data encrypted)")
    _profile_options(register)
    register.add_argument("--consent", action="store_true", help="the member consents to marketing")
    register.add_argument("--store", help="the store the member registers at")
    register.add_argument("--member-id", dest="member_id", help="default: head office numbers the member")
    register.add_argument("--receipt", dest="receipts", type=_entry, action="append", default=[], metavar="ENTRY_ID")
    register.add_argument(
        "--sale", dest="receipts", type=_sale, action="append", metavar="STORE/LANE/SALE_ID", help="a receipt"
    )
    register.add_argument("--join-fee-paid", action="store_true", help="the join fee was paid instead of receipts")
    update = cmds.add_parser("update", help="change a member's personal data (only what is given)")
    update.add_argument("member_id", metavar="MEMBER_ID")
    _profile_options(update)
    update.add_argument("--consent", choices=("yes", "no"), help="marketing consent")
    update.add_argument("--clear", action="append", default=[], metavar="FIELD", help="clear an optional field")
    cancel = cmds.add_parser("cancel", help="cancel a membership: every card cancelled (hot list at once)")
    cancel.add_argument("member_id", metavar="MEMBER_ID")
    cancel.add_argument("--reason", required=True, help="why (kept in the audit)")
    find = cmds.add_parser("find", help="members by phone number, ID number or card")
    how = find.add_mutually_exclusive_group(required=True)
    how.add_argument("--phone", help="a phone number (any format)")
    how.add_argument("--id-number", dest="id_number", help="an ID number")
    how.add_argument("--card", help="a card number (hashed with the card key)")
    how.add_argument("--hash", dest="card_hash", metavar="HEX", help="a card's hash")
    claim = cmds.add_parser("claim", help="a late point claim (补积分): attach a guest's receipt to a member")
    claim.add_argument("member_id", metavar="MEMBER_ID")
    receipt = claim.add_mutually_exclusive_group(required=True)
    receipt.add_argument("--entry", dest="receipt", type=_entry, metavar="ENTRY_ID", help="the journal entry id")
    receipt.add_argument("--sale", dest="receipt", type=_sale, metavar="STORE/LANE/SALE_ID", help="from the receipt")
    audit = cmds.add_parser("audit", help="who did what to a member at the desk, newest first")
    audit.add_argument("member_id", metavar="MEMBER_ID")
    audit.add_argument("--limit", type=int, default=50, metavar="N", help="at most this many (default 50)")
    desk = [show, register, update, cancel, find, claim, audit]
    for parser in desk:
        parser.add_argument("--staff", default=_default_staff(), metavar="NAME", help="who acts (kept in the audit)")
    return [imp, tier, adjust, *desk]


def _add_card_parsers(cmds: argparse._SubParsersAction[argparse.ArgumentParser]) -> list[argparse.ArgumentParser]:
    parsers = []
    for action, state in CARD_ACTIONS.items():
        parser = cmds.add_parser(action, help=f"set a card {state}")
        _card_choice(parser)
        parser.add_argument("--reason", help="recorded with the change (default: the action)")
        parsers.append(parser)
    issue = cmds.add_parser("issue", help="issue a card (valid from tomorrow); prints its number, once")
    issue.add_argument("member_id", metavar="MEMBER_ID")
    issue.add_argument("--number", help="a pre-printed card's number (default: a new number)")
    issue.add_argument("--family", metavar="HOLDER", help="a family card on the same account, for this holder")
    issue.add_argument("--kind", help="one of the ruleset's card_kinds (default: the first)")
    replace = cmds.add_parser("replace", help="replace a card with a new number (the old one void at once)")
    _card_choice(replace)
    replace.add_argument("--number", help="the new card's pre-printed number (default: a new number)")
    replace.add_argument("--kind", help="default: the old card's kind")
    replace.add_argument("--reason", default="replacement card", help="recorded with the change")
    for parser in (parsers[0], issue, replace):
        parser.add_argument("--staff", default=_default_staff(), metavar="NAME", help="who acts (kept in the audit)")
    return [*parsers, issue, replace]


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``members``, ``cards`` and ``staff`` to ``lane-hq``'s subcommands."""
    config_help = f"head office's configuration (default {DEFAULT_PATH})"
    group = sub.add_parser(
        "members", help="members: register, update, cancel, find, claims, import, tiers, adjustments"
    )
    members = _add_member_parsers(group.add_subparsers(dest="members_command", required=True))
    cards_group = sub.add_parser("cards", help="cards: issue, replace, report lost, block (cancelled), restore")
    cards = _add_card_parsers(cards_group.add_subparsers(dest="cards_command", required=True))
    staff = sub.add_parser("staff", help="staff tokens for the service desk's HTTP API")
    token = staff.add_subparsers(dest="staff_command", required=True).add_parser(
        "token", help="print NAME:TOKEN for 'Authorization: Bearer NAME:TOKEN'"
    )
    token.add_argument("name", metavar="NAME", help="the staff member's name, as the audit will show it")
    for parser in (*members, *cards, token):
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


def _show_profile(view: registry.MemberView, personal: registry.Personal | None) -> None:
    if view.status is None:
        print("  profile: none at head office (imported)")
    else:
        registered = view.registered_at.isoformat() if view.registered_at else "-"
        consent = "yes" if view.marketing_consent else "no"
        print(
            f"  profile: {view.status}, registered {registered} at {view.registered_store or '-'}"
            f", marketing consent {consent}, on file: {', '.join(view.on_file) or '-'}"
        )
    issued = [card for card in view.cards if card.number_masked is not None]
    for card in issued:
        extra = f", replaces {masked(card.replaces)}" if card.replaces else ""
        print(
            f"    {card.number_masked}  {card.role} card issued {card.issued_on}, fee {format_fen(card.fee_fen)}{extra}"
        )
    if personal is not None:
        print("  personal data (this viewing is recorded):")
        for name in registry.ENCRYPTED_FIELDS:
            print(f"    {name}: {getattr(personal, name) or '-'}")
        for number, holder in personal.holders.items():
            print(f"    family card {number}: {holder}")


def _changed(change: Change | None, what: str) -> None:
    if change is None:
        print(f"{what}: already so; nothing changed")
    else:
        print(f"{what} (member version {change.version})")


def _table_commands(db: HqDatabase, config: HqConfig, args: argparse.Namespace) -> int:
    """``members import | set-tier | adjust``: the member table itself (no programme needed)."""
    command = args.members_command
    table = db.members
    if command == "import":
        result = table.import_members(args.file, _card_key(config))
        print(
            f"imported {result.path}: {result.members} members ({result.cards} cards), {result.changed} changed, "
            f"{result.unchanged} unchanged; member version {result.head}"
        )
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


def _fields(args: argparse.Namespace) -> dict[str, Any]:
    """The personal-data fields given as options or in ``--json``."""
    given: dict[str, Any] = {}
    if args.json_file is not None:
        try:
            text = sys.stdin.read() if args.json_file == "-" else Path(args.json_file).read_text(encoding="utf-8")
            document = json.loads(text)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise MemberError(
                "bad_json", f"--json {args.json_file}: not readable JSON ({type(exc).__name__})"
            ) from None
        allowed = {*_PROFILE_OPTIONS, "marketing_consent"}
        if not isinstance(document, dict) or set(document) - allowed:
            raise MemberError("bad_json", f"--json: an object with some of {', '.join(sorted(allowed))}")
        given.update(document)
    for name in _PROFILE_OPTIONS:
        if getattr(args, name) is not None:
            given[name] = getattr(args, name)
    return given


def _register(desk: registry.ServiceDesk, args: argparse.Namespace) -> int:
    fields = _fields(args)
    if not isinstance(fields.get("name"), str) or not isinstance(fields.get("phone"), str):
        raise MemberError("bad_registration", "a registration gives at least the name and the phone number")
    done = desk.register(
        args.staff,
        registry.Registration(
            name=fields["name"],
            phone=fields["phone"],
            id_number=fields.get("id_number"),
            address=fields.get("address"),
            email=fields.get("email"),
            birthday=fields.get("birthday"),
            marketing_consent=bool(args.consent or fields.get("marketing_consent") is True),
            store=args.store,
            member_id=args.member_id,
            receipts=tuple(args.receipts),
            pay_join_fee=args.join_fee_paid,
        ),
    )
    receipts = f", {len(done.receipts)} receipt(s) attached" if done.receipts else ""
    print(f"registered member {done.member_id} as {done.tier} ({done.why}){receipts}; member version {done.version}")
    return 0


def _update(desk: registry.ServiceDesk, args: argparse.Namespace) -> int:
    changes = _fields(args)
    for name in args.clear:
        changes[name] = None
    if args.consent is not None:
        changes["marketing_consent"] = args.consent == "yes"
    done = desk.update_profile(args.staff, args.member_id, changes)
    version = "" if done.version is None else f"; member version {done.version}"
    print(f"member {done.member_id}: {', '.join(done.fields)} updated{version}")
    return 0


def _show_command(desk: registry.ServiceDesk, db: HqDatabase, _config: HqConfig, args: argparse.Namespace) -> int:
    found = db.members.get(args.member_id)
    if found is None:
        raise MemberError("unknown_member", f"member {args.member_id!r} is not in head office's member table")
    _show(*found)
    view = desk.view(args.member_id)
    if view is not None:
        _show_profile(view, desk.personal_data(args.staff, args.member_id) if args.personal else None)
    return 0


def _cancel(desk: registry.ServiceDesk, _db: HqDatabase, _config: HqConfig, args: argparse.Namespace) -> int:
    cancelled = desk.cancel(args.staff, args.member_id, args.reason)
    if cancelled is None:
        print(f"member {args.member_id}: cancelled already; nothing changed")
    else:
        print(
            f"member {args.member_id}: cancelled, {cancelled.cards_cancelled} card(s) cancelled"
            f" (member version {cancelled.version})"
        )
    return 0


def _find(desk: registry.ServiceDesk, _db: HqDatabase, config: HqConfig, args: argparse.Namespace) -> int:
    card = args.card_hash if args.card is None else _hash(config, args.card)
    found = desk.find(args.staff, phone=args.phone, id_number=args.id_number, card=card)
    for member in found:
        print(f"{member.member_id}  {member.status or 'no profile'}  {member.tier}")
    if not found:
        print("no member found")
    return 0 if found else EXIT_INVALID


def _claim(desk: registry.ServiceDesk, _db: HqDatabase, _config: HqConfig, args: argparse.Namespace) -> int:
    claimed = desk.claim(args.staff, args.member_id, args.receipt)
    print(
        f"member {claimed.member_id}: sale {claimed.store}/{claimed.lane}/{claimed.sale_id} of {claimed.sale_day}"
        f" claimed, {claimed.points:+d} points -> {claimed.points_balance} points"
    )
    return 0


def _audit(desk: registry.ServiceDesk, _db: HqDatabase, _config: HqConfig, args: argparse.Namespace) -> int:
    for entry in desk.audit_trail(args.member_id, args.limit):
        card = f" card {masked(entry.card_hash)}" if entry.card_hash else ""
        detail = json.dumps(entry.detail, sort_keys=True, ensure_ascii=False)
        print(f"{entry.at.isoformat()}  {entry.actor}  {entry.action}{card}  {entry.reason}  {detail}")
    return 0


_DESK_COMMANDS = {
    "show": _show_command,
    "register": lambda desk, _db, _config, args: _register(desk, args),
    "update": lambda desk, _db, _config, args: _update(desk, args),
    "cancel": _cancel,
    "find": _find,
    "claim": _claim,
    "audit": _audit,
}


def _desk(db: HqDatabase, config: HqConfig) -> registry.ServiceDesk:
    try:
        library = RulesetLibrary.load(config.rules.directory)
    except InputError as exc:
        raise _CommandError(EXIT_CONFIG, f"the rules directory has invalid rulesets: {exc}") from None
    return registry.ServiceDesk.from_config(db, config, library)


def _hash(config: HqConfig, number: str) -> str:
    try:
        return card_hash(_card_key(config), number).hex()
    except ValueError as exc:  # not a card number; the message never repeats it
        raise MemberError("bad_card_number", str(exc)) from None


def _issued(card: registry.IssuedCard, what: str) -> None:
    until = card.valid_until.isoformat() if card.valid_until else "no expiry"
    fee = f", fee {format_fen(card.fee_fen)}" if card.fee_fen else ""
    print(f"{what} for member {card.member_id}: {card.kind} {card.role} card, valid {card.valid_from} .. {until}{fee}")
    # The one place a card number is printed in full: the desk puts it on the card.
    print(f"  card number: {card.number}")
    print(f"  card hash: {masked(card.card_hash)} (member version {card.version})")


def _cards(db: HqDatabase, config: HqConfig, args: argparse.Namespace) -> int:
    command = args.cards_command
    if command == "issue":
        issued = _desk(db, config).issue_card(
            args.staff,
            args.member_id,
            number=args.number,
            role="owner" if args.family is None else "family",
            holder=args.family,
            kind=args.kind,
        )
        _issued(issued, "card issued")
        return 0
    digest = args.card_hash.strip().lower() if args.card_hash is not None else _hash(config, args.card)
    if command == "replace":
        issued = _desk(db, config).replace_card(
            args.staff, digest, number=args.number, kind=args.kind, reason=args.reason
        )
        _issued(issued, f"card {masked(digest)} replaced")
        return 0
    if command == "lost":
        lost = _desk(db, config).report_lost(args.staff, digest, args.reason or "card lost")
        change = None if lost.version is None else Change(lost.member_id, lost.version)
        _changed(change, f"card {masked(digest)} (member {lost.member_id}): lost")
        return 0
    state = CARD_ACTIONS[command]
    change = db.members.set_card_state(digest, state, args.reason or f"card {command}")
    owner = f" (member {change.member_id})" if change is not None else ""
    _changed(change, f"card {masked(digest)}{owner}: {state}")
    return 0


def _commands(db: HqDatabase, config: HqConfig, args: argparse.Namespace) -> int:
    if args.command == "cards":
        return _cards(db, config, args)
    if args.members_command in {"import", "set-tier", "adjust"}:
        return _table_commands(db, config, args)
    # The service desk's commands, through sync.hq.centre.registry (audited).
    command: Callable[[registry.ServiceDesk, HqDatabase, HqConfig, argparse.Namespace], int]
    command = _DESK_COMMANDS[args.members_command]
    return command(_desk(db, config), db, config, args)


def _guarded(db: HqDatabase, config: HqConfig, args: argparse.Namespace) -> int:
    try:
        return _commands(db, config, args)
    except _CommandError as exc:
        print(f"lane-hq: {exc.message}", file=sys.stderr)
        code = exc.exit_code
    except MemberError as exc:
        print(f"lane-hq: {exc.message} [{exc.code}]", file=sys.stderr)
        code = EXIT_INVALID
    except (registry.DeskConfigError, PersonalDataError, ProgrammeError) as exc:
        print(f"lane-hq: {exc} [{exc.code}]", file=sys.stderr)
        code = EXIT_CONFIG
    except InputError as exc:
        print(f"lane-hq: invalid {exc.what}; nothing changed:", file=sys.stderr)
        for issue in exc.issues:
            print(f"  {issue}", file=sys.stderr)
        code = EXIT_INVALID
    except SQLAlchemyError as exc:
        print(f"lane-hq: the database failed: {exc}", file=sys.stderr)
        code = EXIT_DATABASE
    return code


def _staff_token(config: HqConfig, name: str) -> int:
    secret = config.staff_secret()
    if secret is None:
        print("lane-hq: no [centre] staff_secret_env / staff_secret_file: staff tokens cannot be made", file=sys.stderr)
        return EXIT_CONFIG
    try:
        check_name(name)
    except ValueError as exc:
        print(f"lane-hq: {exc}", file=sys.stderr)
        return EXIT_INVALID
    print(bearer_value(secret, name))
    return 0


def run(args: argparse.Namespace) -> int:
    """``lane-hq members …`` / ``cards …`` / ``staff …``; the exit code."""
    try:
        config = load_hq_config(args.config)
    except ConfigError as exc:
        print(f"lane-hq: invalid {exc.what}:", file=sys.stderr)
        for issue in exc.issues:
            print(f"  {issue}", file=sys.stderr)
        return EXIT_CONFIG
    if args.command == "staff":
        return _staff_token(config, args.name)
    try:
        db = HqDatabase.open(config.database.url)
    except (SchemaError, SQLAlchemyError) as exc:
        print(f"lane-hq: the database failed: {exc}", file=sys.stderr)
        return EXIT_DATABASE
    try:
        return _guarded(db, config, args)
    finally:
        db.close()
