"""Head office's member table (docs/downlink.md): one gapless member version, deltas, snapshots, the hot list.

Every committed change to a member (tier, a card, a balance moved by a lane's
batch, an adjustment, an import) takes the next **member version** from one
counter row (``UPDATE hq_counters ... RETURNING``).  The transaction that
takes a number holds that row's lock to its commit, so versions are gapless
and commit in order: a reader that sees version V sees every change up to V.
The number is taken as late as possible (after the member rows are read and
the new state computed), because every writer waits for that lock.

Lock order, everywhere: a lane's cursor row (``apply_batch``), then member
rows by ``member_id``, then the counter row.  Two writers therefore never wait
for each other in a cycle.

Each change leaves the member's row at its new version and a
``member_changes`` row with the member's line in the member-snapshot format
(docs/member-snapshot.md) as it is after the change.  A delta page is those
lines for the members whose *last* change is in a range; a snapshot is the
line of every member at one version.  Lines are built and validated by
``agent.snapshot.SnapshotMember``, the model lanes read them with, so head
office cannot send a line a lane would refuse.  Balances below zero (a lane
that spent offline more than head office had) or beyond the format's range
stay exact here and go to lanes clamped into the range.

Functions here take a SQLAlchemy ``Connection`` inside a transaction;
``MemberTable`` runs each operation in its own transaction, and is what
``HqDatabase.members`` is.  No I/O beyond the database and, for imports and
snapshots, files.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import re
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import orjson
from pydantic import ValidationError
from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    Table,
    Text,
    TypeDecorator,
    any_,
    bindparam,
    delete,
    func,
    literal,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite

from agent.basket import issues_from_validation
from agent.errors import InputError, Issue, LaneError
from agent.money import MAX_FEN, format_fen
from agent.snapshot import (
    CARD_STATES,
    IssueList,
    SnapshotMember,
    SnapshotReader,
    WrittenSnapshot,
    key_check,
)
from agent.snapshot import write_snapshot as write_snapshot_file
from sync.hq.facts import LedgerMove
from sync.hq.schema import (
    HOT_CARD_STATES,
    MEMBER_VERSION,
    centre_ledger,
    hq_counters,
    member_cards,
    member_changes,
    members,
)

log = logging.getLogger(__name__)

MAX_POINTS = 10**12  # the snapshot format's cap on a points balance
IMPORT_CHUNK = 5_000  # members per import transaction
SNAPSHOT_KEEP = 2  # snapshot files kept: the newest, and one a lane may still be downloading
SNAPSHOT_NAME = re.compile(r"members-([0-9]{1,19})\.jsonl")
_STREAM_ROWS = 2_000


class MemberError(LaneError):
    """An administrative change head office refuses: unknown member or card, a balance below zero, …"""

    code = "member_error"

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class AheadOfHeadError(LaneError):
    """A lane asked for changes after a version head office has not reached (docs/downlink.md)."""

    code = "ahead_of_head"

    def __init__(self, after: int, head: int) -> None:
        super().__init__(f"changes after version {after} were asked for; head office is at version {head}")
        self.after = after
        self.head = head


# --- the member as lanes see it ------------------------------------------------


@dataclass(frozen=True, slots=True)
class Card:
    """One card of a member.  ``version`` 0: changed in the transaction at hand (it gets the member's new one)."""

    card_hash: str
    kind: str
    state: str
    valid_from: dt.date
    valid_until: dt.date | None
    version: int
    changed_at: dt.datetime

    def content(self) -> tuple[str, str, str, dt.date, dt.date | None]:
        return (self.card_hash, self.kind, self.state, self.valid_from, self.valid_until)


@dataclass(slots=True)
class Member:
    """A member row and its cards; ``version`` 0 for a member not stored yet."""

    member_id: str
    tier: str
    next_tier: str | None
    next_tier_from: dt.date | None
    birthday: str | None
    card_kind: str | None
    points_balance: int
    rebate_fen: int
    version: int = 0
    updated_at: dt.datetime | None = None
    cards: dict[str, Card] = field(default_factory=dict)

    def content(self) -> tuple[Any, ...]:
        """Everything a lane sees of the member except versions: equal content, no change to record."""
        return (
            self.tier,
            self.next_tier,
            self.next_tier_from,
            self.birthday,
            self.card_kind,
            self.points_balance,
            self.rebate_fen,
            frozenset(card.content() for card in self.cards.values()),
        )


def member_line(member: Member, version: int) -> str:
    """The member's line (docs/member-snapshot.md) at ``version``, validated by the lanes' own model.

    Raises InputError when a field is not what lanes accept (a tier too long, a
    bad birthday): the change is refused before anything is written.
    """
    doc = {
        "member_id": member.member_id,
        "tier": member.tier,
        "card_kind": member.card_kind,
        "next_tier": member.next_tier,
        "next_tier_from": member.next_tier_from,
        "birthday": member.birthday,
        "points_balance": min(max(member.points_balance, 0), MAX_POINTS),
        "rebate_balance": format_fen(min(max(member.rebate_fen, 0), MAX_FEN)),
        "version": version,
        "cards": tuple(
            {
                "card_hash": card.card_hash,
                "kind": card.kind,
                "state": card.state,
                "valid_from": card.valid_from,
                "valid_until": card.valid_until,
            }
            for card in sorted(member.cards.values(), key=lambda card: card.card_hash)
        ),
    }
    try:
        return SnapshotMember.model_validate(doc).model_dump_json(exclude_none=True)
    except ValidationError as exc:
        raise InputError(issues_from_validation(exc, f"member {member.member_id}"), what="member") from exc


# --- SQL helpers ----------------------------------------------------------------


def _among(conn: Connection, column: ColumnElement[str], values: Iterable[str]) -> ColumnElement[bool]:
    """``column IN values``; on PostgreSQL ``= ANY(one array parameter)`` instead of a parameter per value."""
    values = list(values)
    if conn.dialect.name == "postgresql":
        return column == any_(literal(values, postgresql.ARRAY(Text)))
    return column.in_(values)


def _pg_type(table: Table, name: str, conn: Connection) -> str:
    kind = table.c[name].type
    base = kind.impl_instance if isinstance(kind, TypeDecorator) else kind
    return str(base.compile(dialect=conn.dialect))


def _recordset(conn: Connection, table: Table, names: Sequence[str]) -> str:
    """PostgreSQL: ``json_to_recordset(:rows) AS r(...)`` -- a batch of rows as one JSON parameter.

    As in ``sync.hq.db``: one orjson call builds it, and the server parses it,
    instead of psycopg handling a bind parameter per value under this process's GIL.
    """
    return f"json_to_recordset(CAST(:rows AS json)) AS r({', '.join(f'{n} {_pg_type(table, n, conn)}' for n in names)})"


def _insert_rows(conn: Connection, table: Table, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    if conn.dialect.name != "postgresql":
        conn.execute(table.insert(), rows)
        return
    names = list(rows[0])
    sql = f"INSERT INTO {table.name} ({', '.join(names)}) SELECT {', '.join(f'r.{n}' for n in names)} FROM "  # noqa: S608 - our own names
    conn.execute(text(sql + _recordset(conn, table, names)), {"rows": orjson.dumps(rows).decode()})


_MEMBER_COLUMNS = (
    "tier",
    "next_tier",
    "next_tier_from",
    "birthday",
    "card_kind",
    "points_balance",
    "rebate_fen",
    "version",
    "updated_at",
)


def _update_members(conn: Connection, rows: list[dict[str, Any]]) -> None:
    """Rewrite existing member rows (every column but the key), in one statement."""
    if not rows:
        return
    if conn.dialect.name == "postgresql":
        names = ["member_id", *_MEMBER_COLUMNS]
        sets = ", ".join(f"{n} = r.{n}" for n in _MEMBER_COLUMNS)
        sql = f"UPDATE members SET {sets} FROM {_recordset(conn, members, names)} WHERE members.member_id = r.member_id"  # noqa: S608
        conn.execute(text(sql), {"rows": orjson.dumps(rows).decode()})
        return
    stmt = (
        update(members)
        .where(members.c.member_id == bindparam("b_member_id"))
        .values({name: bindparam(f"b_{name}") for name in _MEMBER_COLUMNS})
    )
    conn.execute(stmt, [{f"b_{k}": v for k, v in row.items()} for row in rows])


def head_version(conn: Connection) -> int:
    """Head office's member version: every change up to it is committed."""
    c = hq_counters.c
    return int(conn.execute(select(c.value).where(c.name == MEMBER_VERSION)).scalar_one())


def take_versions(conn: Connection, count: int) -> range:
    """The next ``count`` member versions; the counter row stays locked until this transaction ends."""
    c = hq_counters.c
    stmt = update(hq_counters).where(c.name == MEMBER_VERSION).values(value=c.value + count).returning(c.value)
    top = int(conn.execute(stmt).scalar_one())
    return range(top - count + 1, top + 1)


def _load(conn: Connection, ids: Iterable[str], *, cards: bool = True) -> dict[str, Member]:
    """The members among ``ids`` that exist, their rows locked (in member_id order) until the transaction ends."""
    wanted = sorted(set(ids))
    if not wanted:
        return {}
    m = members.c
    query = select(members).where(_among(conn, m.member_id, wanted)).order_by(m.member_id).with_for_update()
    found = {
        row.member_id: Member(
            member_id=row.member_id,
            tier=row.tier,
            next_tier=row.next_tier,
            next_tier_from=row.next_tier_from,
            birthday=row.birthday,
            card_kind=row.card_kind,
            points_balance=int(row.points_balance),
            rebate_fen=int(row.rebate_fen),
            version=int(row.version),
            updated_at=row.updated_at,
        )
        for row in conn.execute(query).all()  # one fetch: row by row costs psycopg ~20 µs each
    }
    if cards and found:
        c = member_cards.c
        for row in conn.execute(select(member_cards).where(_among(conn, c.member_id, found))).all():
            found[row.member_id].cards[row.card_hash] = Card(
                card_hash=row.card_hash,
                kind=row.kind,
                state=row.state,
                valid_from=row.valid_from,
                valid_until=row.valid_until,
                version=int(row.version),
                changed_at=row.changed_at,
            )
    return found


@dataclass(slots=True)
class _Pending:
    member: Member
    reason: str
    is_new: bool = False
    cards_changed: bool = True


def _commit(conn: Connection, pending: Sequence[_Pending], now: dt.datetime) -> list[tuple[str, int]]:
    """Give each pending change its version and write it; ``(member_id, version)`` of each, in order."""
    if not pending:
        return []
    versions = take_versions(conn, len(pending))
    inserts: list[dict[str, Any]] = []
    updates: list[dict[str, Any]] = []
    card_rows: list[dict[str, Any]] = []
    change_rows: list[dict[str, Any]] = []
    rewrite: list[str] = []
    for change, version in zip(pending, versions, strict=True):
        member = change.member
        member.version, member.updated_at = version, now
        member.cards = {h: card if card.version else replace(card, version=version) for h, card in member.cards.items()}
        line = member_line(member, version)
        row = {"member_id": member.member_id, **{name: getattr(member, name) for name in _MEMBER_COLUMNS}}
        (inserts if change.is_new else updates).append(row)
        if change.cards_changed:
            rewrite.append(member.member_id)
            card_rows.extend(
                {
                    "card_hash": card.card_hash,
                    "member_id": member.member_id,
                    "kind": card.kind,
                    "state": card.state,
                    "valid_from": card.valid_from,
                    "valid_until": card.valid_until,
                    "version": card.version,
                    "changed_at": card.changed_at,
                }
                for card in member.cards.values()
            )
        change_rows.append(
            {"version": version, "member_id": member.member_id, "reason": change.reason, "line": line, "at": now}
        )
    _insert_rows(conn, members, inserts)
    _update_members(conn, updates)
    if rewrite:
        # A member's cards are rewritten whole: a card moved to another member is deleted here first.
        conn.execute(delete(member_cards).where(_among(conn, member_cards.c.member_id, rewrite)))
        _insert_rows(conn, member_cards, card_rows)
    _insert_rows(conn, member_changes, change_rows)
    return [(change.member.member_id, change.member.version) for change in pending]


# --- balances moved by the lanes' batches ------------------------------------------


@dataclass(frozen=True, slots=True)
class Moved:
    """What ``apply_movements`` did: the head version afterwards, members changed, members unknown here."""

    head: int
    changed: int
    unknown: int


def apply_movements(conn: Connection, movements: Iterable[LedgerMove], now: dt.datetime, source: str = "") -> Moved:
    """Add a batch's points-ledger movements to the balances of the members head office knows.

    Called by ``HqDatabase.apply_batch`` inside the batch's transaction, after
    its ledger rows are written: one new version (and change row) per member
    whose balances moved; members head office does not know are counted
    and left alone.  The ledger keeps every row either way.
    """
    totals: dict[str, list[int]] = {}
    kinds: dict[str, set[str]] = {}
    for move in movements:
        total = totals.setdefault(move.member_id, [0, 0])
        total[0] += move.points
        total[1] += move.rebate_fen
        kinds.setdefault(move.member_id, set()).add(move.kind)
    if not totals:
        return Moved(head_version(conn), 0, 0)
    known = _load(conn, totals)
    pending = []
    for member_id in sorted(known):
        points, rebate = totals[member_id]
        if not (points or rebate):  # moves that cancel out within the batch change nothing
            continue
        member = known[member_id]
        member.points_balance += points
        member.rebate_fen += rebate
        reason = f"journal {source}: " if source else "journal: "
        pending.append(_Pending(member, reason + "+".join(sorted(kinds[member_id])), cards_changed=False))
    unknown = len(totals) - len(known)
    done = _commit(conn, pending, now)
    return Moved(done[-1][1] if done else head_version(conn), len(done), unknown)


# --- the centre ledger: balances moved by head office itself -------------------------


@dataclass(frozen=True, slots=True)
class Movement:
    """One centre-ledger row to be: a balance movement no lane journal entry caused (docs/member-centre.md).

    ``key`` names the movement so that it happens once: a job run twice, a
    request retried, a claim made again all find their key taken.
    """

    key: str
    member_id: str
    kind: str  # adjust, claim, expire, rebate_credit, import (schema.CENTRE_LEDGER_KINDS)
    points: int
    rebate_fen: int
    on_date: dt.date
    actor: str
    reason: str
    ref: str | None = None


def _insert_new_keys(conn: Connection, rows: list[dict[str, Any]]) -> set[str]:
    """Insert the ledger rows whose key is not taken; the keys inserted."""
    if not rows:
        return set()
    if conn.dialect.name == "postgresql":
        # One JSON parameter for the whole batch, as _insert_rows: a bind parameter per value cost ~0.5 ms a row.
        names = list(rows[0])
        sql = (
            f"INSERT INTO centre_ledger ({', '.join(names)}) SELECT {', '.join(f'r.{n}' for n in names)} FROM "  # noqa: S608 - our own names
            + _recordset(conn, centre_ledger, names)
            + " ON CONFLICT (key) DO NOTHING RETURNING key"
        )
        return set(conn.execute(text(sql), {"rows": orjson.dumps(rows).decode()}).scalars())
    insert = sqlite.insert(centre_ledger)
    stmt = insert.on_conflict_do_nothing(index_elements=[centre_ledger.c.key]).returning(centre_ledger.c.key)
    taken: set[str] = set()
    for start in range(0, len(rows), 1000):  # SQLite's bound-parameter limit; RETURNING needs a row per execute
        taken.update(conn.execute(stmt.values(rows[start : start + 1000])).scalars())
    return taken


def record_movements(
    conn: Connection, movements: Sequence[Movement], now: dt.datetime, *, allow_negative: bool = False
) -> list[Movement]:
    """Write the movements whose key is new and move those members' balances; the movements written.

    The members' rows are locked first (member_id order, as everywhere), then
    the ledger rows are inserted -- so a concurrent batch of the same members
    waits at the member rows, never in a cycle -- then each member whose
    balances moved takes one new member version, which reaches the lanes.
    Raises MemberError for an unknown member, and for a balance taken below
    zero unless ``allow_negative`` (lanes' offline spending may have done so).
    """
    if not movements:
        return []
    state = _load(conn, {move.member_id for move in movements})
    unknown = sorted({move.member_id for move in movements} - set(state))
    if unknown:
        raise MemberError("unknown_member", f"member {unknown[0]!r} is not in head office's member table")
    rows = [
        {
            "key": move.key,
            "member_id": move.member_id,
            "kind": move.kind,
            "points": move.points,
            "rebate_fen": move.rebate_fen,
            "on_date": move.on_date,
            "at_utc": now,
            "actor": move.actor,
            "reason": move.reason,
            "ref": move.ref,
        }
        for move in movements
    ]
    taken = _insert_new_keys(conn, rows)
    written = [move for move in movements if move.key in taken]
    reasons: dict[str, set[str]] = {}
    for move in written:
        member = state[move.member_id]
        member.points_balance += move.points
        member.rebate_fen += move.rebate_fen
        reasons.setdefault(move.member_id, set()).add(move.kind)
    pending = []
    for member_id in sorted(reasons):
        member = state[member_id]
        if not allow_negative and (member.points_balance < 0 or member.rebate_fen < 0):
            raise MemberError(
                "negative_balance",
                f"member {member_id!r} would have {member.points_balance} points and "
                f"{format_fen(member.rebate_fen)} rebate: a balance may not go below zero",
            )
        if member.points_balance > MAX_POINTS or member.rebate_fen > MAX_FEN:
            raise MemberError("balance_too_large", f"member {member_id!r}: the balance would be out of range")
        kinds = "+".join(sorted(reasons[member_id]))
        pending.append(_Pending(member, f"centre: {kinds}", cards_changed=False))
    _commit(conn, pending, now)
    return written


# --- administration ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Change:
    """A committed change: the member and the version it took."""

    member_id: str
    version: int


def _one(conn: Connection, member_id: str) -> Member:
    found = _load(conn, [member_id]).get(member_id)
    if found is None:
        raise MemberError("unknown_member", f"member {member_id!r} is not in head office's member table")
    return found


def _reason(reason: str) -> str:
    reason = reason.strip()
    if not reason or len(reason) > 500 or "\x00" in reason:
        raise MemberError("bad_reason", "a reason is 1-500 characters of text")
    return reason


def set_card_state(conn: Connection, card_hash: str, state: str, reason: str, now: dt.datetime) -> Change | None:
    """Mark a card ``active``, ``lost``, ``replaced``, ``expired`` or ``cancelled``; None when it already is."""
    if state not in CARD_STATES:
        raise MemberError("bad_state", f"card state {state!r}: one of {', '.join(CARD_STATES)}")
    if not re.fullmatch(r"[0-9a-f]{64}", card_hash):
        raise MemberError("bad_card_hash", "a card hash is 64 lower-case hex digits")
    reason = _reason(reason)
    c = member_cards.c
    owner = conn.execute(select(c.member_id).where(c.card_hash == card_hash)).scalar()
    if owner is None:
        raise MemberError("unknown_card", f"card {card_hash[:12]}… is not in head office's member table")
    member = _one(conn, owner)
    card = member.cards.get(card_hash)
    if card is None:  # moved to another member between the two reads; the locked row says where
        raise MemberError("card_moved", f"card {card_hash[:12]}… changed hands meanwhile; try again")
    if card.state == state:
        return None
    member.cards[card_hash] = replace(card, state=state, version=0, changed_at=now)
    [(member_id, version)] = _commit(conn, [_Pending(member, reason)], now)
    return Change(member_id, version)


def set_tier(
    conn: Connection,
    member_id: str,
    tier: str,
    next_tier: str | None,
    next_tier_from: dt.date | None,
    reason: str,
    now: dt.datetime,
) -> Change | None:
    """Set the tier in force and the next change (both or neither); None when nothing changes."""
    if (next_tier is None) != (next_tier_from is None):
        raise MemberError("next_tier_pair", "give the next tier and the day it takes effect together, or neither")
    reason = _reason(reason)
    member = _one(conn, member_id)
    before = member.content()
    member.tier, member.next_tier, member.next_tier_from = tier, next_tier, next_tier_from
    if member.content() == before:
        return None
    [(_, version)] = _commit(conn, [_Pending(member, reason, cards_changed=False)], now)
    return Change(member_id, version)


def adjust(
    conn: Connection,
    member_id: str,
    points: int,
    rebate_fen: int,
    reason: str,
    now: dt.datetime,
    *,
    actor: str = "cli",
    on_date: dt.date | None = None,
    key: str | None = None,
) -> Change:
    """Add ``points`` and ``rebate_fen`` (either may be negative) to a member's balances: a centre-ledger row.

    ``key`` makes a retried request a no-op (default: a new one each call);
    ``on_date`` is the business day it counts on (default: UTC's date of ``now``).
    """
    reason = _reason(reason)
    if not (points or rebate_fen):
        raise MemberError("no_adjustment", "an adjustment moves points or rebate (or both)")
    move = Movement(
        key=key or f"adjust:{uuid.uuid4()}",
        member_id=member_id,
        kind="adjust",
        points=points,
        rebate_fen=rebate_fen,
        on_date=on_date or now.date(),
        actor=actor,
        reason=reason,
    )
    record_movements(conn, [move], now)
    return Change(member_id, _one(conn, member_id).version)


def get_member(conn: Connection, member_id: str) -> Member | None:
    """The member and its cards, or None (read only; no lock is kept)."""
    return _load(conn, [member_id]).get(member_id)


def recent_changes(conn: Connection, member_id: str, limit: int = 10) -> list[tuple[int, dt.datetime, str]]:
    """``(version, at, reason)`` of the member's latest changes, newest first."""
    c = member_changes.c
    query = select(c.version, c.at, c.reason).where(c.member_id == member_id).order_by(c.version.desc()).limit(limit)
    return [(int(version), at, reason) for version, at, reason in conn.execute(query)]


# --- importing a member-snapshot file --------------------------------------------------


@dataclass(frozen=True, slots=True)
class CheckedFile:
    """A snapshot file that passed every check: its member and card counts and the SHA-256 of its bytes."""

    path: Path
    members: int
    cards: int
    sha256: str


def _file_sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            sha.update(block)
    return sha.hexdigest()


def check_import_file(path: Path, card_key: bytes) -> CheckedFile:
    """Every check of ``agent.snapshot.SnapshotReader``, and no member or card twice; InputError listing all."""
    try:
        digest = _file_sha256(path)
    except OSError as exc:
        raise InputError([Issue("", "unreadable", str(exc), str(path))], what="member snapshot") from exc
    issues = IssueList()
    first_member: dict[str, int] = {}
    first_card: dict[bytes, tuple[int, str]] = {}
    count = cards = 0
    with SnapshotReader(path) as reader:
        reader.header(card_key)
        done = False
        while not done:
            chunk = reader.chunk(IMPORT_CHUNK)
            issues.extend(chunk.issues)
            done = chunk.done
            for row, line in zip(chunk.members, chunk.member_lines, strict=True):
                count += 1
                earlier = first_member.setdefault(row[0], line)
                if earlier != line:
                    message = f"member {row[0]!r} appears on an earlier line ({earlier})"
                    issues.add(Issue("member_id", "duplicate_member", message, f"{path}:{line}"))
            for card, (line, index) in zip(chunk.cards, chunk.card_where, strict=True):
                cards += 1
                seen = first_card.setdefault(card[0], (line, card[1]))
                if seen != (line, card[1]):
                    message = f"card {card[0].hex()[:12]}… was already given on line {seen[0]} (member {seen[1]!r})"
                    issues.add(Issue(f"cards[{index}].card_hash", "duplicate_card", message, f"{path}:{line}"))
    if issues:
        raise InputError(issues.report(), what="member snapshot")
    return CheckedFile(path, count, cards, digest)


def read_checked_file(checked: CheckedFile, chunk: int = IMPORT_CHUNK) -> Iterator[list[SnapshotMember]]:
    """The member lines of a checked file, ``chunk`` at a time; InputError at the end if it changed meanwhile."""
    sha = hashlib.sha256()
    changed = InputError(
        [Issue("", "file_changed", "the file changed while it was imported", str(checked.path))],
        what="member snapshot",
    )
    with checked.path.open("rb") as handle:
        sha.update(handle.readline())
        batch: list[SnapshotMember] = []
        for _ in range(checked.members):
            raw = handle.readline()
            sha.update(raw)
            try:
                batch.append(SnapshotMember.model_validate_json(raw))
            except ValidationError as exc:
                raise changed from exc
            if len(batch) == chunk:
                yield batch
                batch = []
        if batch:
            yield batch
        while block := handle.read(1 << 20):
            sha.update(block)
    if sha.hexdigest() != checked.sha256:
        raise changed


@dataclass(frozen=True, slots=True)
class ImportedChunk:
    changed: int
    unchanged: int
    head: int


def _from_line(line: SnapshotMember, now: dt.datetime) -> Member:
    return Member(
        member_id=line.member_id,
        tier=line.tier,
        next_tier=line.next_tier,
        next_tier_from=line.next_tier_from,
        birthday=line.birthday,
        card_kind=line.card_kind,
        points_balance=line.points_balance,
        rebate_fen=line.rebate_balance,
        cards={
            card.card_hash: Card(card.card_hash, card.kind, card.state, card.valid_from, card.valid_until, 0, now)
            for card in line.cards
        },
    )


def _import_ledger_rows(
    pending: Iterable[_Pending], before: Mapping[str, tuple[int, int]], now: dt.datetime, reason: str
) -> list[dict[str, Any]]:
    """The ledger rows of what an import did to balances (the file's balances become head office's).

    One row per member whose balances the import moved, so that every balance
    stays the sum of the member's ledger rows.
    """
    rows = []
    for change in pending:
        member = change.member
        points, rebate = before.get(member.member_id, (0, 0))
        if member.points_balance != points or member.rebate_fen != rebate:
            rows.append(
                {
                    "key": f"import:{member.version}",
                    "member_id": member.member_id,
                    "kind": "import",
                    "points": member.points_balance - points,
                    "rebate_fen": member.rebate_fen - rebate,
                    "on_date": now.date(),
                    "at_utc": now,
                    "actor": "import",
                    "reason": reason,
                    "ref": None,
                }
            )
    return rows


def import_chunk(conn: Connection, lines: Sequence[SnapshotMember], now: dt.datetime, reason: str) -> ImportedChunk:
    """Make head office's members match ``lines`` (tier, birthday, balances, cards exactly as given).

    A member whose content is already that is left alone; a card given for
    another member than the one holding it moves, and the member it leaves
    changes too (its line must not list the card any more).
    """
    ids = {line.member_id for line in lines}
    hashes = [card.card_hash for line in lines for card in line.cards]
    c = member_cards.c
    owners = dict(conn.execute(select(c.card_hash, c.member_id).where(_among(conn, c.card_hash, hashes))).all())
    state = _load(conn, ids | set(owners.values()))
    original = {member_id: member.content() for member_id, member in state.items()}
    stored = {card_hash: card for member in state.values() for card_hash, card in member.cards.items()}
    pending: dict[str, _Pending] = {}
    unchanged = 0
    for line in lines:
        new = _from_line(line, now)
        old = state.get(line.member_id)
        for card_hash, card in list(new.cards.items()):
            owner, previous = owners.get(card_hash), stored.get(card_hash)
            if previous is not None and previous.content() == card.content() and owner == line.member_id:
                new.cards[card_hash] = previous  # unchanged: keeps its version and the time of its state
            elif previous is not None and previous.state == card.state:
                new.cards[card_hash] = replace(card, changed_at=previous.changed_at)
            if owner is not None and owner != line.member_id:
                holder = state[owner]
                holder.cards.pop(card_hash, None)
                owners[card_hash] = line.member_id
                if owner not in pending:
                    pending[owner] = _Pending(holder, f"{reason}: card moved to {line.member_id}")
        state[line.member_id] = new
        if line.member_id in pending:
            pending[line.member_id].member = new
        elif old is None or original.get(line.member_id) != new.content():
            pending[line.member_id] = _Pending(new, reason, is_new=old is None)
        else:
            unchanged += 1
    done = _commit(conn, list(pending.values()), now)
    before = {member_id: (content[5], content[6]) for member_id, content in original.items()}
    _insert_rows(conn, centre_ledger, _import_ledger_rows(pending.values(), before, now, reason))
    return ImportedChunk(len(done), unchanged, done[-1][1] if done else head_version(conn))


# --- what lanes fetch ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DeltaPage:
    """Lines of the members whose last change is in ``(after, to]``, by version; ``head`` at the read."""

    after: int
    to: int
    head: int
    lines: list[str]


def delta_page(conn: Connection, after: int, limit: int) -> DeltaPage:
    """One page of changes after ``after`` (docs/downlink.md "Deltas"); the connection must be one consistent read."""
    head = head_version(conn)
    if after > head:
        raise AheadOfHeadError(after, head)
    m, ch = members.c, member_changes.c
    query = (
        select(m.version, ch.line)
        .join_from(members, member_changes, ch.version == m.version)
        .where(m.version > after)
        .order_by(m.version)
        .limit(limit)
    )
    rows = conn.execute(query).all()
    return DeltaPage(after, int(rows[-1][0]) if rows else head, head, [line for _, line in rows])


def encode_delta(page: DeltaPage, card_key: bytes, created: dt.datetime) -> bytes:
    """A delta page as lanes read it: header, member lines, trailer with their count and SHA-256."""
    header = {
        "v": 1,
        "kind": "member-delta",
        "from": page.after,
        "to": page.to,
        "head": page.head,
        "created": created.isoformat(),
        "key_check": key_check(card_key),
    }
    body = "".join([json.dumps(header, separators=(",", ":")) + "\n", *(line + "\n" for line in page.lines)])
    data = body.encode()
    trailer = {"kind": "end", "count": len(page.lines), "sha256": hashlib.sha256(data).hexdigest()}
    return data + json.dumps(trailer, separators=(",", ":")).encode() + b"\n"


def _hot_window(now: dt.datetime, days: int) -> ColumnElement[bool]:
    c = member_cards.c
    return c.state.in_(HOT_CARD_STATES) & (c.changed_at >= now - dt.timedelta(days=days))


@dataclass(frozen=True, slots=True)
class Hotlist:
    """The hot list at member version ``version``: card entries, newest change first."""

    version: int
    cards: list[dict[str, Any]]


def hotlist(conn: Connection, days: int, max_cards: int, now: dt.datetime) -> Hotlist:
    """Cards lost, replaced or cancelled in the last ``days``, newest first, at most ``max_cards``."""
    c = member_cards.c
    query = (
        select(c.card_hash, c.member_id, c.state, c.version)
        .where(_hot_window(now, days))
        .order_by(c.version.desc(), c.card_hash)
        .limit(max_cards)
    )
    cards = [
        {"card_hash": card_hash, "member_id": member_id, "state": state, "version": int(version)}
        for card_hash, member_id, state, version in conn.execute(query)
    ]
    return Hotlist(head_version(conn), cards)


def notice_state(conn: Connection, days: int, now: dt.datetime) -> tuple[int, tuple[int, int]]:
    """``(head version, hot-list fingerprint)``: two cheap reads the downlink polls.

    The fingerprint is the count and the highest version of the cards in the
    hot-list window: a card joining the list raises the highest version (its
    change is the newest), one leaving it (restored, aged out) lowers the count.
    """
    row = conn.execute(
        select(func.count(), func.coalesce(func.max(member_cards.c.version), 0)).where(_hot_window(now, days))
    ).one()
    return head_version(conn), (int(row[0]), int(row[1]))


# --- snapshot files ------------------------------------------------------------------


def snapshot_files(directory: Path) -> list[tuple[int, Path]]:
    """``(version, path)`` of the snapshot files in ``directory``, newest first."""
    try:
        paths = list(directory.iterdir())
    except FileNotFoundError:
        return []
    found = [(int(match[1]), path) for path in paths if (match := SNAPSHOT_NAME.fullmatch(path.name))]
    return sorted(found, reverse=True)


def newest_snapshot(directory: Path) -> tuple[int, Path] | None:
    files = snapshot_files(directory)
    return files[0] if files else None


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_snapshot(conn: Connection, directory: Path, card_key: bytes, now: dt.datetime) -> WrittenSnapshot | None:
    """Write ``members-{version}.jsonl`` from one consistent read; None when there are no members yet.

    ``conn`` must be one consistent read (REPEATABLE READ on PostgreSQL; one
    SQLite read transaction).  Rows are streamed, a few thousand at a time,
    into ``agent.snapshot.write_snapshot`` (temporary file, fsync, rename);
    the directory is fsynced and only the newest ``SNAPSHOT_KEEP`` files are kept.
    """
    head = head_version(conn)
    if head == 0:
        return None
    m, ch = members.c, member_changes.c
    query = select(ch.line).join_from(members, member_changes, ch.version == m.version).order_by(m.member_id)
    rows = conn.execute(query.execution_options(yield_per=_STREAM_ROWS))
    lines = (SnapshotMember.model_validate_json(line) for (line,) in rows)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"members-{head}.jsonl"
    # A unique name first: two head-office processes may share the directory.
    unique = directory / f".members-{head}-{uuid.uuid4().hex}.jsonl"
    try:
        written = write_snapshot_file(unique, lines, version=head, card_key=card_key, created=now)
        unique.replace(final)
    finally:
        unique.unlink(missing_ok=True)
        unique.with_name(unique.name + ".tmp").unlink(missing_ok=True)
    _fsync_directory(directory)
    for _, old in snapshot_files(directory)[SNAPSHOT_KEEP:]:
        old.unlink(missing_ok=True)
    log.info("member snapshot %s: %d members, %d cards", final, written.members, written.cards)
    return replace(written, path=final)


# --- bound to a database ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ImportResult:
    path: Path
    members: int
    cards: int
    changed: int
    unchanged: int
    head: int


class MemberTable:
    """The member table of one database; ``HqDatabase.members``.

    Every method runs its own transaction to its commit.  Like the rest of
    ``HqDatabase`` it is called from the database's owner thread, except
    ``write_snapshot``, which only reads, on a connection of its own, and may
    run on a worker thread (a million members take tens of seconds).
    """

    def __init__(self, engine: Engine, writer: Engine, now: Callable[[], dt.datetime]) -> None:
        self._engine = engine
        self._writer = writer
        self._now = now

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        """One consistent read: REPEATABLE READ on PostgreSQL; SQLite's read transaction is one already."""
        with self._engine.connect() as conn:
            if conn.dialect.name == "postgresql":
                conn.execution_options(isolation_level="REPEATABLE READ")
            with conn.begin():
                yield conn

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        with self._writer.begin() as conn:
            yield conn

    def head_version(self) -> int:
        with self._read() as conn:
            return head_version(conn)

    def delta_page(self, after: int, limit: int) -> DeltaPage:
        """Raises AheadOfHeadError when ``after`` is above head office's version."""
        with self._read() as conn:
            return delta_page(conn, after, limit)

    def hotlist(self, days: int, max_cards: int) -> Hotlist:
        with self._read() as conn:
            return hotlist(conn, days, max_cards, self._now())

    def notice_state(self, days: int) -> tuple[int, tuple[int, int]]:
        with self._read() as conn:
            return notice_state(conn, days, self._now())

    def get(self, member_id: str) -> tuple[Member, list[tuple[int, dt.datetime, str]]] | None:
        """The member, its cards and its latest changes, or None."""
        with self._read() as conn:
            member = get_member(conn, member_id)
            return None if member is None else (member, recent_changes(conn, member_id))

    def set_card_state(self, card_hash: str, state: str, reason: str) -> Change | None:
        with self._write() as conn:
            return set_card_state(conn, card_hash, state, reason, self._now())

    def set_tier(
        self, member_id: str, tier: str, next_tier: str | None, next_tier_from: dt.date | None, reason: str
    ) -> Change | None:
        with self._write() as conn:
            return set_tier(conn, member_id, tier, next_tier, next_tier_from, reason, self._now())

    def adjust(
        self, member_id: str, points: int, rebate_fen: int, reason: str, *, actor: str = "cli", key: str | None = None
    ) -> Change:
        with self._write() as conn:
            return adjust(conn, member_id, points, rebate_fen, reason, self._now(), actor=actor, key=key)

    def record_movements(self, movements: Sequence[Movement], *, allow_negative: bool = False) -> list[Movement]:
        with self._write() as conn:
            return record_movements(conn, movements, self._now(), allow_negative=allow_negative)

    def import_members(self, path: Path, card_key: bytes, reason: str = "import") -> ImportResult:
        """Seed or update head office's members from a member-snapshot file; InputError when it is invalid.

        The whole file is checked first (nothing is written if anything is
        wrong); then it is applied ``IMPORT_CHUNK`` members per transaction, so
        that ingest keeps going meanwhile.  The file's balances become head
        office's; its versions are ignored (head office numbers its own).
        """
        checked = check_import_file(path, card_key)
        changed = unchanged = 0
        head = self.head_version()
        for lines in read_checked_file(checked):
            with self._write() as conn:
                done = import_chunk(conn, lines, self._now(), reason)
            changed, unchanged, head = changed + done.changed, unchanged + done.unchanged, done.head
        return ImportResult(path, checked.members, checked.cards, changed, unchanged, head)

    def write_snapshot(self, directory: Path, card_key: bytes) -> WrittenSnapshot | None:
        """A snapshot file at the current head version (any thread; see the class docstring)."""
        with self._read() as conn:
            return write_snapshot(conn, directory, card_key, self._now())


def snapshot_version(directory: Path | None) -> int:
    """The version of the newest snapshot file in ``directory`` (0: none)."""
    newest = None if directory is None else newest_snapshot(directory)
    return 0 if newest is None else newest[0]


def masked(card_hash: str) -> str:
    """A card hash as logs and the command line show it."""
    return card_hash[:12] + "…"


def hotlist_payload(hot: Hotlist, at: dt.datetime) -> bytes:
    """The retained ``{root}/hq/hotlist`` message (docs/downlink.md)."""
    doc: Mapping[str, Any] = {
        "v": 1,
        "kind": "hotlist",
        "version": hot.version,
        "at": at.isoformat(),
        "cards": hot.cards,
    }
    return orjson.dumps(doc)


def members_payload(version: int, snapshot: int, at: dt.datetime) -> bytes:
    """The retained ``{root}/hq/members`` notice (docs/downlink.md)."""
    doc = {"v": 1, "kind": "members", "version": version, "at": at.isoformat(), "snapshot_version": snapshot}
    return orjson.dumps(doc)
