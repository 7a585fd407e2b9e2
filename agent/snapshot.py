"""Member snapshot files: the format head office writes and the lane imports.

JSON Lines (docs/member-snapshot.md): a header line, one line per member with
its cards, and a trailer with the member count and the SHA-256 of every byte
before it, so that a truncated or altered file is refused as a whole.  Card
numbers travel only as keyed hashes (``card_hash``); head office and the lanes
share the key and the normalisation below.

This module is pure (no database): it parses and validates a file in chunks,
turning each member line into the rows the store inserts, and it writes files
in the same format for head office and tests.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import os
import re
import time
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, BinaryIO, Literal, Self, TypeGuard

import orjson
from pydantic import (
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    field_validator,
    model_validator,
)

from agent.basket import Code, issues_from_validation
from agent.errors import InputError, Issue
from agent.money import format_fen, parse_money

FORMAT_VERSION = 1
KIND = "member-snapshot"
CARD_STATES = ("active", "lost", "replaced", "expired", "cancelled")
MAX_ISSUES = 100
MIN_KEY_BYTES = 16

_KEY_CHECK_MESSAGE = b"lane-membership card key check v1"
_SEPARATORS = re.compile(r"[\s\-]+")
_CARD_NUMBER = re.compile(r"[0-9A-Z]{4,64}")
_BIRTHDAY = re.compile(r"[0-9]{2}-[0-9]{2}")

CardState = Literal["active", "lost", "replaced", "expired", "cancelled"]
MemberRow = tuple[str, str, str, str | None, str | None, str | None, int, int, int]
CardRow = tuple[bytes, str, str, str, str, str | None]


# --- card numbers -------------------------------------------------------------


def normalise_card_number(text: str) -> str:
    """The canonical form of a card number before hashing.

    NFKC (full-width digits typed through an IME become ASCII), spaces and
    hyphens removed, letters upper-cased; what remains must be 4-64 ASCII
    letters or digits.  Raises ``ValueError`` otherwise.
    """
    canonical = _SEPARATORS.sub("", unicodedata.normalize("NFKC", text)).upper()
    if not _CARD_NUMBER.fullmatch(canonical):
        raise ValueError("a card number is 4-64 letters or digits (spaces and hyphens are ignored)")
    return canonical


def card_hash(card_key: bytes, number: str) -> bytes:
    """HMAC-SHA256(card_key, normalised card number): the only form of a card number the lane keeps."""
    if len(card_key) < MIN_KEY_BYTES:
        raise ValueError(f"the card key must be at least {MIN_KEY_BYTES} bytes")
    return hmac.new(card_key, normalise_card_number(number).encode("ascii"), hashlib.sha256).digest()


def key_check(card_key: bytes) -> str:
    """A short public fingerprint of the card key, so a snapshot hashed with another key is refused."""
    return hmac.new(card_key, _KEY_CHECK_MESSAGE, hashlib.sha256).hexdigest()[:16]


# --- line models --------------------------------------------------------------

SnapshotMoney = Annotated[int, BeforeValidator(parse_money), PlainSerializer(format_fen, return_type=str)]
Hex64 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class _Line(BaseModel):
    # strict: a JSON "12" is not a points balance, a number is not money.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class SnapshotHeader(_Line):
    """The first line: what the file is, which member-table version, which card key."""

    v: Literal[1]
    kind: Literal["member-snapshot"]
    version: int = Field(ge=1, le=2**62, description="head office's member-table version")
    created: AwareDatetime
    key_check: Annotated[str, Field(pattern=r"^[0-9a-f]{16}$")]


class SnapshotCard(_Line):
    """One card of a member: its keyed hash, kind, state and validity dates."""

    card_hash: Hex64
    kind: Code
    state: CardState
    valid_from: dt.date = Field(description="first day the card may be used (issue date + 1)")
    valid_until: dt.date | None = Field(default=None, description="last day; null: no expiry")

    @model_validator(mode="after")
    def _dates(self) -> SnapshotCard:
        if self.valid_until is not None and self.valid_until < self.valid_from:
            raise ValueError("valid_until is before valid_from")
        return self


class SnapshotMember(_Line):
    """One member line: the lane's whole (minimal) knowledge of a member."""

    member_id: Code
    tier: Code
    card_kind: Code | None = Field(default=None, description="kind when identified by id; default: from the cards")
    next_tier: Code | None = None
    next_tier_from: dt.date | None = None
    birthday: str | None = Field(default=None, description="MM-DD")
    points_balance: int = Field(ge=0, le=10**12)
    rebate_balance: SnapshotMoney
    version: int | None = Field(default=None, ge=1, le=2**62, description="default: the snapshot's version")
    cards: tuple[SnapshotCard, ...] = Field(default=(), max_length=64)

    @field_validator("birthday")
    @classmethod
    def _month_day(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not _BIRTHDAY.fullmatch(value):
            raise ValueError("birthday is month-day, 'MM-DD'")
        try:
            dt.date(2000, int(value[:2]), int(value[3:]))  # a leap year: 02-29 is a birthday
        except ValueError as exc:
            raise ValueError(f"{value!r} is not a calendar month-day") from exc
        return value

    def main_card_kind(self, day: dt.date) -> str:
        """The kind used when the member is identified by id rather than by a card.

        ``card_kind`` when head office gives it; else the kind of the newest
        active card valid on ``day`` (the snapshot's date), else of any active
        card, else of the first card, else "standard".
        """
        if self.card_kind is not None:
            return self.card_kind
        active = [card for card in self.cards if card.state == "active"]
        valid = [c for c in active if c.valid_from <= day and (c.valid_until is None or day <= c.valid_until)]
        if valid or active:
            return max(valid or active, key=lambda card: card.valid_from).kind
        return self.cards[0].kind if self.cards else "standard"

    @model_validator(mode="after")
    def _next_tier_pair(self) -> SnapshotMember:
        if (self.next_tier is None) != (self.next_tier_from is None):
            raise ValueError("give both 'next_tier' and 'next_tier_from', or neither")
        return self


class SnapshotTrailer(_Line):
    """The last line: how many member lines, and the SHA-256 of every byte before this line."""

    kind: Literal["end"]
    count: int = Field(ge=0)
    sha256: Hex64


# --- the fast check -------------------------------------------------------------
# A million member lines through pydantic took 13 s of a 28 s import.  Most lines of a real file
# are valid, so each line is first parsed with orjson and checked by hand against the same rules
# as SnapshotMember; a line that passes gives exactly the rows the model would.  Anything the
# fast check does not accept (a problem, or merely something unusual) goes to pydantic, which
# decides and words the report as before: the fast path may be stricter than the models, never
# more lenient (tests/test_snapshot_fast.py compares the two on mutated lines).

_MEMBER_FIELDS = frozenset(SnapshotMember.model_fields)
_CARD_FIELDS = frozenset(SnapshotCard.model_fields)
_CARD_STATE_SET = frozenset(CARD_STATES)
_MAX_CODE = 64
_MAX_CARDS = 64
_MAX_POINTS = 10**12
_MAX_VERSION = 2**62
_ISO_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_REBATE = re.compile(r"[0-9]{1,11}(?:\.[0-9]{1,2})?")
# Every 'MM-DD' of a leap year: exactly what SnapshotMember._month_day accepts.
_MONTH_DAYS = frozenset((dt.date(2000, 1, 1) + dt.timedelta(days=n)).strftime("%m-%d") for n in range(366))
_KNOWN_DATES_MAX = 4096


class _FastCheck:
    """The hand-written check of member lines; remembers the date strings it has accepted (a few hundred)."""

    def __init__(self) -> None:
        self._dates: set[str] = set()

    def date(self, text: object) -> TypeGuard[str]:
        """Whether ``text`` is an ISO date ``YYYY-MM-DD`` as pydantic takes it (remembering it when it is)."""
        if type(text) is not str:
            return False
        if text in self._dates:
            return True
        if not _ISO_DATE.fullmatch(text):
            return False
        try:
            dt.date.fromisoformat(text)
        except ValueError:
            return False
        if len(self._dates) < _KNOWN_DATES_MAX:
            self._dates.add(text)
        return True

    def member(  # noqa: C901, PLR0911, PLR0912, PLR0915
        self, raw: bytes, day: str, default_version: int
    ) -> tuple[MemberRow, list[CardRow]] | None:
        """The rows of a line that passes every check of SnapshotMember, or None to let pydantic decide.

        ``day`` is the snapshot's date, ISO; ``default_version`` the version of a line without one.
        Written flat, locals over calls: it runs once per member, a million times per import.
        """
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return None
        if type(data) is not dict or not data.keys() <= _MEMBER_FIELDS:
            return None
        try:
            member_id, tier, points, rebate = (
                data["member_id"],
                data["tier"],
                data["points_balance"],
                data["rebate_balance"],
            )
        except KeyError:
            return None
        get = data.get
        if type(member_id) is not str or not 0 < len(member_id) <= _MAX_CODE:
            return None
        if type(tier) is not str or not 0 < len(tier) <= _MAX_CODE:
            return None
        if type(points) is not int or not 0 <= points <= _MAX_POINTS:
            return None
        # parse_money's rules, narrowed: no sign, at most 11 digits before the point, so always in range.
        if type(rebate) is not str or not _REBATE.fullmatch(rebate):
            return None
        dot = rebate.find(".")
        if dot < 0:
            fen = int(rebate) * 100
        else:
            fen = int(rebate[:dot] + rebate[dot + 1 :]) * (10 if len(rebate) - dot == 2 else 1)
        card_kind, next_tier, next_tier_from = get("card_kind"), get("next_tier"), get("next_tier_from")
        if card_kind is not None and (type(card_kind) is not str or not 0 < len(card_kind) <= _MAX_CODE):
            return None
        if next_tier is None:
            if next_tier_from is not None:
                return None
        elif type(next_tier) is not str or not 0 < len(next_tier) <= _MAX_CODE or not self.date(next_tier_from):
            return None
        birthday, version = get("birthday"), get("version")
        if birthday is not None and (type(birthday) is not str or birthday not in _MONTH_DAYS):
            return None
        if version is not None and (type(version) is not int or not 1 <= version <= _MAX_VERSION):
            return None
        cards = get("cards", ())
        if type(cards) is not list:
            if cards != ():
                return None
        elif len(cards) > _MAX_CARDS:
            return None
        dates = self._dates
        rows: list[CardRow] = []
        # SnapshotMember.main_card_kind, in the same pass: the first active card with the latest
        # valid_from among those valid on the day, else among all active ones.
        newest_valid: CardRow | None = None
        newest_active: CardRow | None = None
        for card in cards:
            if type(card) is not dict or not card.keys() <= _CARD_FIELDS:
                return None
            try:
                hex_hash, kind, state, valid_from = card["card_hash"], card["kind"], card["state"], card["valid_from"]
            except KeyError:
                return None
            valid_until = card.get("valid_until")
            # 64 lower-case hex digits: what fromhex reads as 32 bytes and hex() writes back the same.
            if type(hex_hash) is not str:
                return None
            try:
                digest = bytes.fromhex(hex_hash)
            except ValueError:
                return None
            if len(digest) != 32 or digest.hex() != hex_hash:
                return None
            if type(kind) is not str or not 0 < len(kind) <= _MAX_CODE:
                return None
            if type(state) is not str or state not in _CARD_STATE_SET:
                return None
            if type(valid_from) is not str or (valid_from not in dates and not self.date(valid_from)):
                return None
            until: str | None = None
            if valid_until is not None:
                if type(valid_until) is not str or (valid_until not in dates and not self.date(valid_until)):
                    return None
                if valid_until < valid_from:  # ISO dates of four-digit years: text order is date order
                    return None
                until = valid_until
            row = (digest, member_id, kind, state, valid_from, until)
            rows.append(row)
            if state == "active":
                if newest_active is None or valid_from > newest_active[4]:
                    newest_active = row
                valid_on_day = valid_from <= day and (until is None or day <= until)
                if valid_on_day and (newest_valid is None or valid_from > newest_valid[4]):
                    newest_valid = row
        if card_kind is None:
            chosen = newest_valid or newest_active or (rows[0] if rows else None)
            card_kind = chosen[2] if chosen else "standard"
        member = (
            member_id,
            tier,
            card_kind,
            next_tier,
            next_tier_from,
            birthday,
            points,
            fen,
            version or default_version,
        )
        return member, rows


def _model_rows(member: SnapshotMember, day: dt.date, default_version: int) -> tuple[MemberRow, list[CardRow]]:
    """The rows of a member line pydantic accepted."""
    row = (
        member.member_id,
        member.tier,
        member.main_card_kind(day),
        member.next_tier,
        member.next_tier_from.isoformat() if member.next_tier_from else None,
        member.birthday,
        member.points_balance,
        member.rebate_balance,
        member.version or default_version,
    )
    cards: list[CardRow] = [
        (
            bytes.fromhex(card.card_hash),
            member.member_id,
            card.kind,
            card.state,
            card.valid_from.isoformat(),
            card.valid_until.isoformat() if card.valid_until else None,
        )
        for card in member.cards
    ]
    return row, cards


# --- reading --------------------------------------------------------------------


class IssueList:
    """Collects issues up to a cap, counting the rest, so a garbage file cannot exhaust memory."""

    def __init__(self, limit: int = MAX_ISSUES) -> None:
        self.limit = limit
        self.items: list[Issue] = []
        self.dropped = 0

    def add(self, issue: Issue) -> None:
        if len(self.items) < self.limit:
            self.items.append(issue)
        else:
            self.dropped += 1

    def extend(self, issues: Iterable[Issue]) -> None:
        for issue in issues:
            self.add(issue)

    def __bool__(self) -> bool:
        return bool(self.items)

    def report(self) -> list[Issue]:
        """The issues in file order (duplicates are found after the lines they repeat), then the overflow."""
        ordered = sorted(self.items, key=_line_number)
        if not self.dropped:
            return ordered
        return [*ordered, Issue("", "too_many_problems", f"and {self.dropped} more problem(s) not listed")]


def _line_number(issue: Issue) -> int:
    _, _, line = issue.source.rpartition(":")
    return int(line) if line.isdigit() else 0


@dataclass(slots=True)
class Chunk:
    """Rows from a run of member lines, with each row's line number for error reports."""

    members: list[MemberRow] = field(default_factory=list)
    member_lines: list[int] = field(default_factory=list)
    cards: list[CardRow] = field(default_factory=list)
    card_where: list[tuple[int, int]] = field(default_factory=list)  # (line, index in the member's cards)
    issues: list[Issue] = field(default_factory=list)
    done: bool = False


class SnapshotReader:
    """Reads a snapshot file chunk by chunk; blocking, so the store runs it in a worker thread.

    ``header()`` first (raises InputError when the file is not a usable
    snapshot at all), then ``chunk()`` until ``done``; the last chunk carries
    the trailer's findings (count, checksum, truncation).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.name = str(path)
        self._file: BinaryIO | None = None
        self._sha = hashlib.sha256()
        self._line = 0
        self._body_lines = 0
        self._trailer_seen = False
        self._fast = _FastCheck()
        # Seconds to sleep every 256 lines, 0 for never: see ``chunk``.
        self.gil_pause = 0.0
        self.version = 0
        self.created = dt.date.min

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _where(self, line: int) -> str:
        return f"{self.name}:{line}"

    def header(self, card_key: bytes) -> SnapshotHeader:
        """Open the file and validate its first line against the store's card key."""
        try:
            self._file = self.path.open("rb")
        except OSError as exc:
            raise InputError([Issue("", "unreadable", str(exc), self.name)], what="member snapshot") from exc
        raw = self._file.readline()
        self._line = 1
        source = self._where(1)
        if not raw:
            raise InputError([Issue("", "empty_file", "the file is empty", source)], what="member snapshot")
        self._sha.update(raw)
        try:
            header = SnapshotHeader.model_validate_json(raw)
        except ValidationError as exc:
            issues = issues_from_validation(exc, source)
            raise InputError(
                [Issue("", "bad_header", f"not a {KIND} v{FORMAT_VERSION} header line", source), *issues],
                what="member snapshot",
            ) from exc
        if header.key_check != key_check(card_key):
            raise InputError(
                [
                    Issue(
                        "key_check",
                        "card_key_mismatch",
                        "the snapshot's card hashes were made with another card key than this lane's",
                        source,
                    )
                ],
                what="member snapshot",
            )
        self.version = header.version
        self.created = header.created.date()
        return header

    def chunk(self, max_members: int) -> Chunk:
        """Parse up to ``max_members`` member lines (or the rest of the file)."""
        if self._file is None:
            raise RuntimeError("header() first")
        out = Chunk()
        day, version = self.created.isoformat(), self.version
        # Bound methods and lists in locals: this loop runs once per line of a million-line file.
        readline, update, fast = self._file.readline, self._sha.update, self._fast.member
        members, member_lines, cards, card_where = out.members, out.member_lines, out.cards, out.card_where
        limit = max_members if max_members > 0 else -1
        pause = self.gil_pause
        while len(members) != limit:
            if pause and not self._line & 0xFF:
                # Reading holds the GIL for as long as it runs.  A thread waiting for it otherwise
                # gets it only when the interpreter's switch interval (5 ms) forces a hand-over,
                # which a store inserting in parallel needs several times a chunk, and a sale
                # several times a commit.  A short sleep hands it over at once.
                time.sleep(pause)
            raw = readline()
            if not raw:
                if not self._trailer_seen:
                    out.issues.append(
                        Issue(
                            "",
                            "truncated",
                            f"no trailer line after {self._body_lines} member line(s): the file is truncated",
                            self._where(self._line + 1),
                        )
                    )
                out.done = True
                return out
            self._line += 1
            line = self._line
            if self._trailer_seen:
                out.issues.append(Issue("", "after_trailer", "content after the trailer line", self._where(line)))
                continue
            rows = fast(raw, day, version)
            if rows is None and (rows := self._checked_by_model(raw, out)) is None:
                continue
            update(raw)
            self._body_lines += 1
            row, row_cards = rows
            if row[8] > version:
                message = f"member version {row[8]} is above the snapshot's {version}"
                out.issues.append(Issue("version", "bad_version", message, self._where(line)))
                continue
            members.append(row)
            member_lines.append(line)
            if row_cards:
                cards += row_cards
                card_where += [(line, index) for index in range(len(row_cards))]
        return out

    def _checked_by_model(self, raw: bytes, out: Chunk) -> tuple[MemberRow, list[CardRow]] | None:
        """A line the fast check passed on: its rows if pydantic accepts it, else None with its issues recorded."""
        source = self._where(self._line)
        if not raw.strip():
            self._sha.update(raw)
            self._body_lines += 1
            out.issues.append(Issue("", "blank_line", "blank line", source))
            return None
        try:
            member = SnapshotMember.model_validate_json(raw)
        except ValidationError as exc:
            if not self._trailer(raw, source, out):
                self._sha.update(raw)
                self._body_lines += 1
                out.issues.extend(issues_from_validation(exc, source))
            return None
        return _model_rows(member, self.created, self.version)

    def _trailer(self, raw: bytes, source: str, out: Chunk) -> bool:
        """Whether ``raw`` is the trailer line; checks it when it is."""
        try:
            data: Any = json.loads(raw)
        except (ValueError, RecursionError):  # RecursionError: nested deeper than the interpreter's stack
            return False
        if not isinstance(data, dict) or data.get("kind") != "end":
            return False
        self._trailer_seen = True
        try:
            trailer = SnapshotTrailer.model_validate(data)
        except ValidationError as exc:
            out.issues.extend(issues_from_validation(exc, source))
            return True
        if trailer.count != self._body_lines:
            out.issues.append(
                Issue(
                    "count",
                    "count_mismatch",
                    f"the trailer counts {trailer.count} member lines, the file has {self._body_lines}",
                    source,
                )
            )
        if not hmac.compare_digest(trailer.sha256, self._sha.hexdigest()):
            out.issues.append(
                Issue(
                    "sha256",
                    "checksum_mismatch",
                    "the lines before the trailer do not match its sha256: altered",
                    source,
                )
            )
        return True


# --- writing --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WrittenSnapshot:
    path: Path
    version: int
    members: int
    cards: int
    sha256: str


def write_snapshot(
    path: str | os.PathLike[str],
    members: Iterable[SnapshotMember],
    *,
    version: int,
    card_key: bytes,
    created: dt.datetime | None = None,
) -> WrittenSnapshot:
    """Write a snapshot file (head office's side, and tests); atomically replaces ``path``."""
    target = Path(path)
    tmp = target.with_name(target.name + ".tmp")
    created = created or dt.datetime.now(dt.UTC)
    header = SnapshotHeader(
        v=1, kind="member-snapshot", version=version, created=created, key_check=key_check(card_key)
    )
    sha = hashlib.sha256()
    count = cards = 0
    with tmp.open("wb") as handle:
        line = header.model_dump_json().encode() + b"\n"
        sha.update(line)
        handle.write(line)
        for member in members:
            line = member.model_dump_json(exclude_none=True).encode() + b"\n"
            sha.update(line)
            handle.write(line)
            count += 1
            cards += len(member.cards)
        trailer = SnapshotTrailer(kind="end", count=count, sha256=sha.hexdigest())
        handle.write(trailer.model_dump_json().encode() + b"\n")
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(target)
    return WrittenSnapshot(target, version, count, cards, sha.hexdigest())


# --- member deltas (docs/downlink.md, "Deltas") -----------------------------------
# Kept apart from the snapshot reader above, which it reuses: the member lines and the trailer are
# the snapshot's; only the header differs, and a page is small enough to be checked whole in memory.

DELTA_KIND = "member-delta"


class DeltaHeader(_Line):
    """The first line of a page of changes: every member whose last change is in ``(from, to]``."""

    v: Literal[1]
    kind: Literal["member-delta"]
    from_: int = Field(alias="from", ge=0, le=2**62, description="the lane's version the page starts after")
    to: int = Field(ge=0, le=2**62, description="the last line's version, or head when there are no lines")
    head: int = Field(ge=0, le=2**62, description="head office's member version when the page was made")
    created: AwareDatetime
    key_check: Annotated[str, Field(pattern=r"^[0-9a-f]{16}$")]

    @model_validator(mode="after")
    def _range(self) -> DeltaHeader:
        if not self.from_ <= self.to <= self.head:
            raise ValueError(f"from {self.from_}, to {self.to}, head {self.head}: need from <= to <= head")
        return self


@dataclass(frozen=True, slots=True)
class MemberDelta:
    """A checked page of member changes, as rows for the store (``MemberRow``/``CardRow`` as in a snapshot)."""

    source: str
    header: DeltaHeader
    members: tuple[MemberRow, ...]
    cards: tuple[CardRow, ...]


class DeltaReader(SnapshotReader):
    """A member-delta page: the snapshot reader with the delta's header line (``delta_header()`` first)."""

    def delta_header(self, card_key: bytes) -> DeltaHeader:
        """Open the file and validate its first line (a ``member-delta`` header) against the card key."""
        what = "member delta"
        try:
            self._file = self.path.open("rb")
        except OSError as exc:
            raise InputError([Issue("", "unreadable", str(exc), self.name)], what=what) from exc
        raw = self._file.readline()
        self._line = 1
        source = self._where(1)
        if not raw:
            raise InputError([Issue("", "empty_file", "the file is empty", source)], what=what)
        self._sha.update(raw)
        try:
            header = DeltaHeader.model_validate_json(raw)
        except ValidationError as exc:
            issues = issues_from_validation(exc, source)
            raise InputError(
                [Issue("", "bad_header", f"not a {DELTA_KIND} v{FORMAT_VERSION} header line", source), *issues],
                what=what,
            ) from exc
        if header.key_check != key_check(card_key):
            message = "the delta's card hashes were made with another card key than this lane's"
            raise InputError([Issue("key_check", "card_key_mismatch", message, source)], what=what)
        # Member lines are checked against the page's upper bound; a line without "version" is at it.
        self.version = header.to
        self.created = header.created.date()
        return header


def read_delta(path: str | os.PathLike[str], card_key: bytes) -> MemberDelta:
    """Read and check a whole member-delta page (blocking); InputError lists every problem found.

    On top of the snapshot's line checks: each member's version is in
    ``(from, to]`` and the lines are in version order; no member appears
    twice, nor a card twice on one line (on two lines, it moved); ``to`` is
    the last line's version, or ``head`` when the page has no lines.
    """
    with DeltaReader(path) as reader:
        header = reader.delta_header(card_key)
        chunk = reader.chunk(0)
    issues = IssueList()
    issues.extend(chunk.issues)
    where = reader._where  # noqa: SLF001 - the same reader's own source format
    previous = header.from_
    first_line: dict[str, int] = {}
    for row, line in zip(chunk.members, chunk.member_lines, strict=True):
        member_id, version = row[0], row[8]
        if version <= header.from_:
            message = f"member version {version} is not above the page's 'from' ({header.from_})"
            issues.add(Issue("version", "bad_version", message, where(line)))
        elif version < previous:
            message = f"member version {version} comes after version {previous}: lines are in version order"
            issues.add(Issue("version", "unordered", message, where(line)))
        previous = max(previous, version)
        if member_id in first_line:
            message = f"member {member_id!r} appears on line {first_line[member_id]} too"
            issues.add(Issue("member_id", "duplicate_member", message, where(line)))
        else:
            first_line[member_id] = line
    # A card on two lines of a page is a card that moved (the later line wins, as the lines apply in order);
    # twice on one line it is an error.
    seen: set[tuple[bytes, int]] = set()
    for card, (line, index) in zip(chunk.cards, chunk.card_where, strict=True):
        if (card[0], line) in seen:
            message = f"card {card[0].hex()[:12]}… is given twice on this line"
            issues.add(Issue(f"cards[{index}].card_hash", "duplicate_card", message, where(line)))
        seen.add((card[0], line))
    expected = chunk.members[-1][8] if chunk.members else header.head
    if not issues and header.to != expected:
        given = "the last line's version" if chunk.members else "head"
        message = f"'to' is {header.to}, but {given} is {expected}"
        issues.add(Issue("to", "bad_range", message, where(1)))
    if issues:
        raise InputError(issues.report(), what="member delta")
    return MemberDelta(reader.name, header, tuple(chunk.members), tuple(chunk.cards))


def write_delta(
    path: str | os.PathLike[str],
    members: Iterable[SnapshotMember],
    *,
    after: int,
    head: int,
    card_key: bytes,
    to: int | None = None,
    created: dt.datetime | None = None,
) -> Path:
    """Write a member-delta page (head office's side, and tests); ``to`` defaults as the contract says."""
    listed = list(members)
    if to is None:
        to = max((m.version or 0 for m in listed), default=head) if listed else head
    header = DeltaHeader.model_validate(
        {
            "v": 1,
            "kind": DELTA_KIND,
            "from": after,
            "to": to,
            "head": head,
            "created": created or dt.datetime.now(dt.UTC),
            "key_check": key_check(card_key),
        }
    )
    lines = [header.model_dump_json(by_alias=True).encode() + b"\n"]
    lines += [member.model_dump_json(exclude_none=True).encode() + b"\n" for member in listed]
    body = b"".join(lines)
    trailer = SnapshotTrailer(kind="end", count=len(listed), sha256=hashlib.sha256(body).hexdigest())
    target = Path(path)
    target.write_bytes(body + trailer.model_dump_json().encode() + b"\n")
    return target
