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
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, BinaryIO, Literal, Self

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
        while len(out.members) < max_members or max_members <= 0:
            raw = self._file.readline()
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
            if self._trailer_seen:
                out.issues.append(Issue("", "after_trailer", "content after the trailer line", self._where(self._line)))
                continue
            self._member_line(raw, out)
        return out

    def _member_line(self, raw: bytes, out: Chunk) -> None:
        source = self._where(self._line)
        if not raw.strip():
            self._sha.update(raw)
            self._body_lines += 1
            out.issues.append(Issue("", "blank_line", "blank line", source))
            return
        try:
            member = SnapshotMember.model_validate_json(raw)
        except ValidationError as exc:
            if self._trailer(raw, source, out):
                return
            self._sha.update(raw)
            self._body_lines += 1
            out.issues.extend(issues_from_validation(exc, source))
            return
        self._sha.update(raw)
        self._body_lines += 1
        version = member.version or self.version
        if version > self.version:
            out.issues.append(
                Issue(
                    "version", "bad_version", f"member version {version} is above the snapshot's {self.version}", source
                )
            )
            return
        out.members.append(
            (
                member.member_id,
                member.tier,
                member.main_card_kind(self.created),
                member.next_tier,
                member.next_tier_from.isoformat() if member.next_tier_from else None,
                member.birthday,
                member.points_balance,
                member.rebate_balance,
                version,
            )
        )
        out.member_lines.append(self._line)
        for index, card in enumerate(member.cards):
            out.cards.append(
                (
                    bytes.fromhex(card.card_hash),
                    member.member_id,
                    card.kind,
                    card.state,
                    card.valid_from.isoformat(),
                    card.valid_until.isoformat() if card.valid_until else None,
                )
            )
            out.card_where.append((self._line, index))

    def _trailer(self, raw: bytes, source: str, out: Chunk) -> bool:
        """Whether ``raw`` is the trailer line; checks it when it is."""
        try:
            data: Any = json.loads(raw)
        except ValueError:
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
