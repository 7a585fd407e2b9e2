#!/usr/bin/env python3
"""Scan a lane's database and logs for personal data: phone numbers, ID numbers, raw card numbers, names.

    python3 scripts/pii_scan.py --db /var/lib/lane/lane.db --logs /var/log/lane-agent.log \\
        [--logs DIR ...] [--known known.txt] [--config /etc/lane-agent/lane.toml] [--json]

A lane keeps a minimal projection of head office's member table (member ids,
tiers, balances, card *hashes*) and masks card numbers in its logs; this
check shows that nothing more is left behind.  Standard library only, so it
runs on a lane without the project's virtualenv.

What is read:

* the database through SQLite, read-only (``mode=ro``): every text, blob and
  large integer cell of every table (``sqlite_schema`` included), with the
  committed frames of the ``-wal`` seen as SQLite sees them;
* the raw bytes of the database, its ``-wal`` and ``-journal``: a deleted row
  lingers in a free page, in a page's free space or in an old page version in
  the WAL until overwritten, where SQL no longer shows it.  A value the SQL
  pass already reported is not reported again from the raw bytes.  (A value
  split across two overflow pages of a deleted row is out of reach.)
* log files and directories of them: plain text or JSON lines, gzip, bzip2
  or xz rotations (recognised by their first bytes).  Export journald first:
  ``journalctl -u lane-agent -o cat > lane-agent.log``.

What is looked for:

* ``phone``: mainland China mobile numbers, 11 digits starting 1[3-9] that are
  no part of a longer digit run, also as ``138 1234 5678``, ``+86 …``;
* ``id``: resident ID numbers, 17 digits and a digit or X with a valid ISO
  7064 MOD 11-2 check character and a real birth date (``--id15``: the old
  15-digit form too, by its birth date alone);
* ``card``: Luhn-valid runs of 13-19 digits, also grouped as printed
  (``6200 1234 5678 0001``), whose first digit is an ISO/IEC 7812 bank or
  merchandising one (2-6), which is no valid EAN-13/GTIN-14 barcode and no
  fraction of a decimal number.  ``--config`` adds the lane's own card format
  (the devices' ``member_prefixes`` and ``luhn``): runs of ``--card-length``
  digits starting with such a prefix are cards even without a Luhn digit;
* ``--known FILE``: values head office knows exist (one per line; ``#``
  comments): names, phones, ID numbers, card numbers, e-mail addresses.  A
  digit value is found with or without spaces and dashes between its digits;
  a name as text, JSON-escaped (``\\u5f20``), percent- or ``\\x``-escaped and as
  UTF-8 (or, in a UTF-16 database, UTF-16) bytes; a Latin name in any case and
  with any of `` /._,-`` between its words (``ZHANG/WEI`` on a track 1).

Digits run through ASCII and full-width (``１３８…``) forms alike.  Nothing
found is ever printed: a finding shows its file, where in it (table, column
and rowid, or log line, or byte offset and page), its kind and a masked value
(``138****5678``, ``6200 **** **** 0001``, ``张*``).

Exit status: 0 clean, 1 personal data found, 2 usage error or an input that
could not be read in full (the scan is then incomplete, not clean).
"""

from __future__ import annotations

import argparse
import bz2
import datetime as dt
import gzip
import io
import json
import lzma
import re
import sqlite3
import struct
import sys
import time
import tomllib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

EXIT_CLEAN, EXIT_FOUND, EXIT_USAGE = 0, 1, 2
CHUNK = 8 << 20  # bytes read at a time from logs and raw files
OVERLAP = 512  # raw chunks overlap by this much, so a value on a chunk boundary is still seen whole
BATCH_ROWS = 2000  # rows of a table scanned as one text, attributed to cells only when something is found
SQLITE_MAGIC = b"SQLite format 3\x00"
WAL_HEADER, WAL_FRAME_HEADER = 32, 24
MIN_KNOWN_DIGITS = 6  # shorter digit values would be found everywhere
MIN_PATTERN_DIGITS = 11  # the shortest pattern (a mobile number)

# --- the checks ------------------------------------------------------------------------------------

# Full-width digits (an input method in full-width mode) and X, mapped one to one so positions hold.
_WIDE: dict[int, str] = {
    **{0xFF10 + i: str(i) for i in range(10)},
    0xFF38: "X",
    0xFF58: "x",
    0xFF0D: "-",
    0x3000: " ",
}
_WIDE_DIGIT = re.compile("[\uff10-\uff19]")
_ANY_DIGIT = re.compile(r"[0-9\uff10-\uff19]")
_SEPARATOR = re.compile(r"[ -]")
_HEX = frozenset("0123456789abcdefABCDEF")
_HEX_LETTERS = frozenset("abcdefABCDEF")
_UUID_CHARS = frozenset("-abcdefABCDEF")
_UUID = re.compile(r"[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}")
_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_ID_CHECK = "10X98765432"
_WORD_SEPARATORS = r"[\s/._,\-]*"


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def gtin_ok(digits: str) -> bool:
    """The GS1 check digit (EAN-8/13, UPC-A, GTIN-14): weights 3, 1, 3, … from the right, check excluded."""
    body, check = digits[:-1], ord(digits[-1]) - 48
    total = sum((ord(ch) - 48) * (3 if i % 2 == 0 else 1) for i, ch in enumerate(reversed(body)))
    return (10 - total % 10) % 10 == check


def _birth_date_ok(text: str) -> bool:
    try:
        born = dt.date(int(text[:4]), int(text[4:6]), int(text[6:8]))
    except ValueError:
        return False
    return dt.date(1900, 1, 1) <= born <= dt.datetime.now(dt.UTC).date()


def id18_ok(value: str) -> bool:
    """A resident ID number: region 11-82, birth date, sequence, ISO 7064 MOD 11-2 check character."""
    if len(value) != 18 or not value[:17].isdigit() or not ("11" <= value[:2] <= "82"):
        return False
    total = sum((ord(ch) - 48) * w for ch, w in zip(value[:17], _ID_WEIGHTS, strict=True))
    return _ID_CHECK[total % 11] == value[17].upper() and _birth_date_ok(value[6:14])


def id15_ok(value: str) -> bool:
    """The old 15-digit form (no check character): region and a 19YYMMDD birth date."""
    return len(value) == 15 and value.isdigit() and "11" <= value[:2] <= "82" and _birth_date_ok("19" + value[6:12])


def phone_ok(digits: str) -> bool:
    return len(digits) == 11 and digits[0] == "1" and digits[1] in "3456789"


def bank_card_ok(digits: str) -> bool:
    """A raw card number by its form alone (see the module docstring for what is excluded and why)."""
    n = len(digits)
    if not 13 <= n <= 19 or not luhn_ok(digits):
        return False
    first = digits[0]
    # ISO/IEC 7812 major industry identifier: 3 travel, 4-5 banking, 6 merchandising and banking
    # (UnionPay 62); 2 only in Mastercard's 2221-2720.  Epoch timestamps in ms or us start with 1.
    if first == "2":
        if not "2221" <= digits[:4] <= "2720":
            return False
    elif first not in "3456":
        return False
    # A Chinese product's EAN-13 starts 69 and passes Luhn one time in ten.
    return not (n in (13, 14) and gtin_ok(digits))


@dataclass(frozen=True)
class CardFormat:
    """The lane's own card numbers: prefixes, lengths, and whether they carry a Luhn digit."""

    prefixes: tuple[str, ...] = ()
    lengths: frozenset[int] = frozenset(range(12, 20))
    luhn: bool = False

    def matches(self, digits: str) -> bool:
        if not self.prefixes or len(digits) not in self.lengths or not digits.startswith(self.prefixes):
            return False
        if len(digits) == 13 and 13 not in self.lengths - frozenset(range(12, 20)) and gtin_ok(digits):
            return False  # a barcode, unless the programme's cards are explicitly 13 digits
        return not self.luhn or luhn_ok(digits)


def mask(kind: str, value: str) -> str:
    """What may be printed of a finding: never enough to be the value."""
    digits = "".join(ch for ch in value if ch.isdigit() or ch in "Xx")
    if kind == "phone":
        digits = digits[-11:]
        return f"{digits[:3]}****{digits[-4:]}"
    if kind == "id":
        return digits[:3] + "*" * (len(digits) - 7) + digits[-4:]
    if kind == "card" and len(digits) >= 12:
        # Keep the printed grouping: "6200 **** **** 0001".
        keep = set(range(4)) | set(range(len(digits) - 4, len(digits)))
        out, i = [], 0
        for ch in value:
            if ch.isdigit():
                out.append(ch if i in keep else "*")
                i += 1
            elif ch in " -":
                out.append(ch)
        return "".join(out)
    if kind in ("card", "number"):
        return digits[:2] + "*" * max(len(digits) - 4, 1) + digits[-2:]
    return value[:1] + "*"


@dataclass(frozen=True, slots=True)
class Hit:
    pos: int
    kind: str
    key: str  # the canonical value: compared and counted, never printed
    masked: str


@dataclass
class Known:
    """The ``--known`` values, ready to be looked for."""

    digits: dict[int, dict[str, str]] = field(default_factory=dict)  # length -> value -> kind
    texts: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, path: Path) -> Known:
        known = cls()
        for number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
            value = line.strip()
            if not value or value.startswith("#"):
                continue
            compact = re.sub(r"[\s\-+()]", "", value).translate(_WIDE)
            if re.fullmatch(r"[0-9]+[Xx]?", compact):
                compact = compact.upper()
                if len(compact) == 13 and compact.startswith("86") and phone_ok(compact[2:]):
                    compact = compact[2:]
                if len(compact) < MIN_KNOWN_DIGITS:
                    known.skipped.append(f"line {number}: fewer than {MIN_KNOWN_DIGITS} digits")
                    continue
                known.digits.setdefault(len(compact), {})[compact] = _kind_of_digits(compact)
            elif len(value) < 2:
                known.skipped.append(f"line {number}: a one-character value")
            else:
                known.texts.append(value)
        return known

    @property
    def min_digits(self) -> int:
        return min(self.digits, default=MIN_PATTERN_DIGITS)


def _kind_of_digits(value: str) -> str:
    if phone_ok(value):
        return "phone"
    if id18_ok(value) or id15_ok(value):
        return "id"
    if 12 <= len(value) <= 19 and value.isdigit():
        return "card"
    return "number"


def _text_fragment(value: str) -> str:
    if value.isascii():
        words = [w for w in re.split(_WORD_SEPARATORS.replace("*", "+"), value) if w]
        body = _WORD_SEPARATORS.join(re.escape(w) for w in words)
        return rf"(?<![A-Za-z])(?i:{body})(?![A-Za-z])"
    # A CJK name may have been typed with a space between its characters.
    return r"\s?".join(re.escape(ch) for ch in value if not ch.isspace())


def _unescape_json(text: str) -> str:
    out = re.sub(r"\\u([0-9a-fA-F]{4})", lambda m: chr(int(m[1], 16)), text)
    return out.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _unescape_runs(text: str) -> str:
    # Decode each run of %XX or \xXX as one byte string, so a multi-byte UTF-8 character comes out whole.
    def run(m: re.Match[str]) -> str:
        raw = bytes.fromhex(re.sub(r"\\x|%", "", m[0]))
        return raw.decode("utf-8", "replace")

    return re.sub(r"(?:%[0-9A-Fa-f]{2})+|(?:\\x[0-9A-Fa-f]{2})+", run, text)


# Each pattern starts with a literal, which the regex engine searches for quickly.
_ESCAPES = (
    (re.compile(r"\\u[0-9a-fA-F]{4}(?:\\u[0-9a-fA-F]{4})*"), _unescape_json),
    (re.compile(r"%[0-9A-Fa-f]{2}(?:%[0-9A-Fa-f]{2})+"), _unescape_runs),
    (re.compile(r"\\x[0-9A-Fa-f]{2}(?:\\x[0-9A-Fa-f]{2})+"), _unescape_runs),
)
_VIEW_MARGIN = 64


class Detector:
    """Finds personal data in text; ``raw=True`` for bytes decoded as Latin-1 (UTF-8 text shows as mojibake)."""

    def __init__(self, known: Known, card_format: CardFormat, *, id15: bool = False) -> None:
        self.known = known
        self.card_format = card_format
        self.id15 = id15
        low = min(MIN_PATTERN_DIGITS, known.min_digits)
        # Digits, with a space or dash allowed only before a group of three or more (as cards and phones
        # are printed): a date ("2024-01-01", two of them side by side in a raw record) is no candidate.
        # The lookbehind makes a short run cost one step per digit, not a retry from each of them.
        self._run = re.compile(rf"(?<![0-9])[0-9](?:[0-9]|[ -](?=[0-9]{{3}})){{{low - 1},}}")
        self._text: re.Pattern[str] | None = None
        self._raw_text: re.Pattern[str] | None = None
        if known.texts:
            values = sorted(known.texts, key=len, reverse=True)
            self._text_values = values
            self._text = re.compile("|".join(f"({_text_fragment(v)})" for v in values))
            mojibake = [re.escape(v.encode("utf-8").decode("latin-1")) for v in values if not v.isascii()]
            if mojibake:
                self._raw_text = re.compile("|".join(f"({m})" for m in mojibake))
                self._raw_values = [v for v in values if not v.isascii()]

    def hits(self, text: str, *, raw: bool = False, views: bool = True) -> list[Hit]:
        found: list[Hit] = []
        if _ANY_DIGIT.search(text) is not None:
            plain = text.translate(_WIDE) if _WIDE_DIGIT.search(text) else text
            for match in self._run.finditer(plain):
                found.extend(self._digit_hits(plain, match))
        if self._text is not None:
            for match in self._text.finditer(text):
                value = self._text_values[match.lastindex - 1]  # type: ignore[operator]
                found.append(Hit(match.start(), _text_kind(value), value, mask("name", value)))
        if raw and self._raw_text is not None:
            for match in self._raw_text.finditer(text):
                value = self._raw_values[match.lastindex - 1]  # type: ignore[operator]
                found.append(Hit(match.start(), _text_kind(value), value, mask("name", value)))
        if views:
            for pattern, decode in _ESCAPES:
                for match in pattern.finditer(text):
                    # The escapes and a little around them (a name half escaped), within their line.
                    at, end = match.start(), match.end()
                    start = max(at - _VIEW_MARGIN, text.rfind("\n", 0, at) + 1)
                    stop = text.find("\n", end, end + _VIEW_MARGIN)
                    view = decode(text[start : end + _VIEW_MARGIN if stop < 0 else stop])
                    found.extend(Hit(at, h.kind, h.key, h.masked) for h in self.hits(view, raw=raw, views=False))
        return found

    def _digit_hits(self, text: str, match: re.Match[str]) -> list[Hit]:
        run, start, end = match.group(), match.start(), match.end()
        ends_in_x = end < len(text) and text[end] in "Xx" and not (end + 1 < len(text) and text[end + 1].isalnum())
        found = self._known_hits(run, start, ends_in_x)
        if not self._pattern_context_ok(text, start, end):
            return found
        groups = _SEPARATOR.split(run)
        seps = _SEPARATOR.findall(run)
        if len(groups) == 1:  # the common case: one plain run of digits
            hit = self._classify(groups, ends_in_x)
            return found if hit is None else [*found, Hit(start, hit[0], hit[1], mask(hit[0], hit[1]))]
        # Runs of groups, longest first: "6200 1234 5678 0001" is one card, not also a shorter one in it.
        taken = [False] * len(groups)
        for size in range(min(5, len(groups)), 0, -1):
            for i in range(len(groups) - size + 1):
                j = i + size
                if any(taken[i:j]) or len(set(seps[i : j - 1])) > 1:
                    continue
                hit = self._classify(groups[i:j], ends_in_x and j == len(groups))
                if hit is not None:
                    kind, digits = hit
                    shown = seps[i].join(groups[i:j]) if size > 1 else digits
                    found.append(Hit(start, kind, digits, mask(kind, shown)))
                    taken[i:j] = [True] * size
        return found

    def _known_hits(self, run: str, start: int, ends_in_x: bool) -> list[Hit]:
        if not self.known.digits:
            return []
        # Where each digit of the run is, so a value found in the digits is shown as printed.
        where = [i for i, ch in enumerate(run) if ch not in " -"]
        full = "".join(run[i] for i in where)
        if ends_in_x:
            full += "X"
            run += "X"
            where.append(len(run) - 1)
        found = []
        for length, values in self.known.digits.items():
            for s in range(len(full) - length + 1):
                kind = values.get(full[s : s + length])
                if kind is not None:
                    shown = run[where[s] : where[s + length - 1] + 1]
                    found.append(Hit(start, kind, full[s : s + length], mask(kind, shown)))
        return found

    @staticmethod
    def _pattern_context_ok(text: str, start: int, end: int) -> bool:
        # The fraction of a decimal number (a float's repr has 17 digits) is no card or phone.
        if start >= 2 and text[start - 1] == "." and text[start - 2].isdigit():
            return False
        # Digits in a UUID (a journal entry's id, a request id) are hex digits that happen to be decimal.
        if (start > 0 and text[start - 1] in _UUID_CHARS) or (end < len(text) and text[end] in _UUID_CHARS):
            near = text[max(start - 36, 0) : end + 36]
            offset = max(start - 36, 0)
            if any(m.start() + offset < end and m.end() + offset > start for m in _UUID.finditer(near)):
                return False
        # Digits inside a long hex token (a digest, a hash key) are hex, not a number.
        before = start > 0 and text[start - 1] in _HEX_LETTERS
        after = end < len(text) and text[end] in _HEX_LETTERS
        if before or after:
            left, right = start, end
            while left > 0 and text[left - 1] in _HEX:
                left -= 1
            while right < len(text) and text[right] in _HEX:
                right += 1
            if right - left >= 16 and _SEPARATOR.search(text, start, end) is None:
                return False
        return True

    def _classify(self, groups: list[str], x_follows: bool) -> tuple[str, str] | None:
        """``(kind, value)`` for a window of a run's digit groups, or None."""
        if len(groups) == 1:
            return self._plain(groups[0], x_follows)
        digits = "".join(groups)
        sizes = [len(g) for g in groups]
        if sizes in ([3, 4, 4], [2, 3, 4, 4]):  # 138 1234 5678, 86 138 1234 5678
            phone = digits[-11:]
            return ("phone", phone) if phone_ok(phone) and (len(digits) == 11 or digits[:2] == "86") else None
        if sizes == [6, 8, 4] and id18_ok(digits):  # 110105 19491231 0021
            return "id", digits
        # As cards are printed: 4-4-4-4, 4-4-4-4-3, 4-6-5 (groups of 4-6, the last 3-7).
        shaped = 4 <= sizes[0] <= 6 and all(4 <= s <= 6 for s in sizes[1:-1]) and 3 <= sizes[-1] <= 7
        if shaped and (self.card_format.matches(digits) or bank_card_ok(digits)):
            return "card", digits
        return None

    def _plain(self, digits: str, x_follows: bool) -> tuple[str, str] | None:
        n = len(digits)
        if phone_ok(digits):
            return "phone", digits
        if n == 13 and digits.startswith("86") and phone_ok(digits[2:]):
            return "phone", digits[2:]
        candidate = digits + "X" if n == 17 and x_follows else digits
        if id18_ok(candidate) or (n == 15 and self.id15 and id15_ok(digits)):
            return "id", candidate
        if self.card_format.matches(digits) or bank_card_ok(digits):
            return "card", digits
        return None


def _text_kind(value: str) -> str:
    return "email" if "@" in value else "name"


# --- findings ----------------------------------------------------------------------------------


@dataclass
class Finding:
    file: str
    where: str
    kind: str
    masked: str
    source: str  # sql, raw, log
    count: int = 1

    def line(self) -> str:
        more = f" (and {self.count - 1} more in this file)" if self.count > 1 else ""
        return f"{self.file}: {self.where}: {self.kind} {self.masked}{more}"


@dataclass
class Report:
    findings: list[Finding] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    bytes: int = 0


def _dedup(hits: Iterable[Hit]) -> dict[str, Hit]:
    """One hit per value (its first), keyed by the value: a pattern and the known list may both find it."""
    out: dict[str, Hit] = {}
    for hit in sorted(hits, key=lambda h: h.pos):
        out.setdefault(hit.key.upper(), hit)
    return out


# --- the database ----------------------------------------------------------------------------


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _open_read_only(path: Path, report: Report) -> sqlite3.Connection:
    uri = path.resolve().as_uri() + "?mode=ro"
    try:
        conn = sqlite3.connect(uri, uri=True)
        conn.execute("SELECT count(*) FROM sqlite_schema").fetchone()
    except sqlite3.OperationalError as exc:
        # A WAL database in a directory this user cannot write (no -shm to create): read the file as it
        # stands.  Committed frames still in the -wal are then out of the SQL pass (the raw pass reads them).
        report.warnings.append(f"{path}: read-only open failed ({exc}); reading it as immutable, without its -wal")
        conn = sqlite3.connect(uri + "&immutable=1", uri=True)
    return conn


def _cell_text(value: object) -> tuple[str, bool] | None:
    if isinstance(value, str):
        return value, False
    if isinstance(value, bytes):
        return value.decode("latin-1"), True
    if isinstance(value, int) and abs(value) >= 10**5:
        return str(value), False
    return None


def scan_sql(path: Path, detector: Detector, report: Report) -> set[str]:
    """Every cell of every table; returns the values found, for the raw pass to skip."""
    seen: set[str] = set()
    conn = _open_read_only(path, report)
    try:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_schema WHERE type = 'table' ORDER BY name")]
        for table in ["sqlite_schema", *tables]:
            try:
                seen |= _scan_table(conn, path, table, detector, report)
            except sqlite3.Error as exc:  # a virtual table of a module this Python lacks, say
                report.warnings.append(f"{path}: table {table} not read by SQL ({exc}); its raw bytes are scanned")
    finally:
        conn.close()
    return seen


def _scan_table(conn: sqlite3.Connection, path: Path, table: str, detector: Detector, report: Report) -> set[str]:
    """One table: screened fast (SQLite joins each row's cells into one value), cells looked at only on a hit."""
    info = conn.execute(f"PRAGMA table_xinfo({_quote(table)})").fetchall()
    columns = [row[1] for row in info if row[6] in (0, 2, 3)]  # hidden columns of virtual tables left out
    keys = [row[1] for row in sorted(info, key=lambda r: r[5]) if row[5] > 0]
    try:
        conn.execute(f"SELECT rowid FROM {_quote(table)} LIMIT 0")  # noqa: S608 - names quoted
        ident = ["rowid"]
    except sqlite3.OperationalError:
        ident = keys  # a WITHOUT ROWID table: its primary key names a row
    if not columns or not ident:
        return set()
    # Text, numbers and blobs alike as bytes (|| gives text: the whole is cast back, so a binary blob
    # is never decoded as UTF-8 by sqlite3), NUL between cells so no value runs into the next.
    joined = " || x'00' || ".join(f"CAST(ifnull({_quote(c)}, '') AS BLOB)" for c in columns)
    names = ", ".join(_quote(c) for c in ident)
    cursor = conn.execute(f"SELECT {names}, CAST({joined} AS BLOB) FROM {_quote(table)}")  # noqa: S608 - names quoted
    seen: set[str] = set()
    ordinal = 0
    while rows := cursor.fetchmany(BATCH_ROWS):
        if detector.hits(b"\x00".join(row[-1] for row in rows).decode("utf-8", "replace")):
            for number, row in enumerate(rows, ordinal + 1):
                if detector.hits(row[-1].decode("utf-8", "replace")):
                    seen |= _scan_row(
                        conn, path, table, columns, ident, row[:-1], ordinal=number, detector=detector, report=report
                    )
        ordinal += len(rows)
    return seen


def _scan_row(
    conn: sqlite3.Connection,
    path: Path,
    table: str,
    columns: list[str],
    ident: list[str],
    key: tuple[Any, ...],
    *,
    ordinal: int,
    detector: Detector,
    report: Report,
) -> set[str]:
    """The cells of one row the screen flagged, each reported with its column."""
    where = " AND ".join(f"{_quote(c)} IS ?" for c in ident)
    selected = ", ".join(_quote(c) for c in columns)
    values = conn.execute(f"SELECT {selected} FROM {_quote(table)} WHERE {where}", key).fetchone()  # noqa: S608
    if values is None:  # gone since the screen read it (a live lane)
        return set()
    cells = []
    for column, value in zip(columns, values, strict=True):
        cell = _cell_text(value)
        if cell is not None:
            cells.append((column, _dedup(detector.hits(cell[0], raw=cell[1]))))
    tainted = {column for column, found in cells if found}
    if ident == ["rowid"]:
        row_name = f"rowid {key[0]}"
    elif tainted & set(ident) or not all(isinstance(k, str | int) for k in key):
        row_name = f"row {ordinal} in primary-key order"
    else:
        row_name = ", ".join(f"{c} {k!r}" for c, k in zip(ident, key, strict=True))
    seen: set[str] = set()
    for column, found in cells:
        for value, hit in found.items():
            seen.add(value)
            spot = f"table {table}, column {column}, {row_name}"
            report.findings.append(Finding(str(path), spot, hit.kind, hit.masked, "sql"))
    return seen


# --- raw bytes -------------------------------------------------------------------------------------


@dataclass
class _Layout:
    """Where a byte offset of a database, WAL or journal file lies, for the finding's text."""

    path: Path
    kind: str  # db, wal, journal
    page_size: int
    free_pages: frozenset[int] = frozenset()

    def where(self, offset: int) -> str:
        if self.kind == "db" and self.page_size:
            page = offset // self.page_size + 1
            state = "a free page" if page in self.free_pages else "a deleted cell or free space"
            return f"raw bytes at offset {offset}, page {page} ({state}, not visible to SQL)"
        if self.kind == "wal" and self.page_size and offset >= WAL_HEADER:
            frame = (offset - WAL_HEADER) // (self.page_size + WAL_FRAME_HEADER)
            with self.path.open("rb") as handle:
                handle.seek(WAL_HEADER + frame * (self.page_size + WAL_FRAME_HEADER))
                head = handle.read(4)
            page = struct.unpack(">I", head)[0] if len(head) == 4 else 0
            return f"raw bytes at offset {offset}, WAL frame {frame + 1} (page {page}; an old or uncheckpointed page)"
        return f"raw bytes at offset {offset} (not visible to SQL)"


def _db_layout(path: Path) -> tuple[_Layout, str]:
    """Page size, free-list pages and text encoding from the database header."""
    with path.open("rb") as handle:
        header = handle.read(100)
        if len(header) < 100:
            return _Layout(path, "db", 0), "utf-8"
        size = struct.unpack(">H", header[16:18])[0]
        page_size = 65536 if size == 1 else size
        encoding = {2: "utf-16-le", 3: "utf-16-be"}.get(struct.unpack(">I", header[56:60])[0], "utf-8")
        free: set[int] = set()
        trunk, budget = struct.unpack(">II", header[32:40])
        while trunk and trunk not in free and len(free) <= budget:  # a corrupt, looping list stops here
            free.add(trunk)
            handle.seek((trunk - 1) * page_size)
            page = handle.read(page_size)
            if len(page) < 8:
                break
            following, count = struct.unpack(">II", page[:8])
            count = min(count, (len(page) - 8) // 4)
            free.update(struct.unpack(f">{count}I", page[8 : 8 + 4 * count]))
            trunk = following
    return _Layout(path, "db", page_size, frozenset(free)), encoding


# Four full-width digits in UTF-8 (EF BC 90-99): a number typed in full-width mode.
_WIDE_UTF8 = re.compile(rb"(?:\xef\xbc[\x90-\x99]){4}")


def _raw_hits(data: bytes, encoding: str, detector: Detector) -> list[Hit]:
    hits = detector.hits(data.decode("latin-1"), raw=True)
    for match in _WIDE_UTF8.finditer(data):
        start = max(match.start() - 96, 0)
        window = data[start : match.end() + 96].decode("utf-8", "replace")
        hits.extend(Hit(start, h.kind, h.key, h.masked) for h in detector.hits(window, views=False))
    if encoding != "utf-8":  # a UTF-16 database: text at either byte alignment
        for shift in (0, 1):
            text = data[shift : len(data) - (len(data) - shift) % 2].decode(encoding, "replace")
            hits.extend(Hit(shift + 2 * h.pos, h.kind, h.key, h.masked) for h in detector.hits(text))
    return hits


def scan_raw(layout: _Layout, encoding: str, detector: Detector, skip: set[str], report: Report) -> None:
    """Every byte of a file; one finding per value not in ``skip``, with the number of places it lies."""
    places: dict[str, list[int]] = {}
    first: dict[str, Hit] = {}
    with layout.path.open("rb") as handle:
        base, tail = 0, b""
        while block := handle.read(CHUNK):
            report.bytes += len(block)
            data = tail + block
            for hit in _raw_hits(data, encoding, detector):
                key = hit.key.upper()
                if key not in skip:
                    first.setdefault(key, hit)
                    places.setdefault(key, []).append(base + hit.pos)
            # The chunks overlap, so a value across a boundary is seen whole (and maybe twice, counted once).
            tail = data[-OVERLAP:]
            base += len(data) - len(tail)
    for key, hit in first.items():
        offsets = sorted(set(places[key]))
        # Two offsets closer than a value's length are one place seen in two views (Latin-1, escapes).
        distinct = [o for i, o in enumerate(offsets) if i == 0 or o - offsets[i - 1] > _VIEW_MARGIN * 2]
        finding = Finding(str(layout.path), layout.where(offsets[0]), hit.kind, hit.masked, "raw")
        finding.count = len(distinct)
        report.findings.append(finding)


def scan_database(path: Path, detector: Detector, report: Report) -> None:
    with path.open("rb") as handle:
        magic = handle.read(16)
    if magic and magic != SQLITE_MAGIC:
        raise UsageError(f"--db {path}: not an SQLite database")
    report.files.append(str(path))
    seen = scan_sql(path, detector, report) if magic else set()
    layout, encoding = _db_layout(path)
    scan_raw(layout, encoding, detector, seen, report)
    for suffix, kind in (("-wal", "wal"), ("-journal", "journal")):
        side = path.with_name(path.name + suffix)
        if side.exists():
            report.files.append(str(side))
            scan_raw(_Layout(side, kind, layout.page_size), encoding, detector, seen, report)


# --- logs --------------------------------------------------------------------------------------------


def _open_log(path: Path) -> io.BufferedIOBase:
    with path.open("rb") as probe:
        magic = probe.read(6)
    if magic.startswith(b"\x1f\x8b"):
        return gzip.open(path, "rb")
    if magic.startswith(b"BZh"):
        return bz2.open(path, "rb")
    if magic.startswith(b"\xfd7zXZ"):
        return lzma.open(path, "rb")
    return path.open("rb")


def log_files(paths: Iterable[Path]) -> Iterator[Path]:
    for path in paths:
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file() and not p.is_symlink())
        else:
            yield path


def scan_log(path: Path, detector: Detector, report: Report) -> None:
    """A log, a few MiB of whole lines at a time; each finding names its line."""
    report.files.append(str(path))
    line_base = 1
    try:
        with _open_log(path) as handle:
            while True:
                block = handle.read(CHUNK)
                if not block:
                    break
                if not block.endswith(b"\n"):
                    block += handle.readline()
                report.bytes += len(block)
                text = block.decode("utf-8", "replace")
                _log_findings(path, text, line_base, detector, report)
                line_base += text.count("\n")
    except (OSError, EOFError, lzma.LZMAError) as exc:
        report.errors.append(f"{path}: could not be read to its end after line {line_base} ({exc})")


def _log_findings(path: Path, text: str, line_base: int, detector: Detector, report: Report) -> None:
    hits = detector.hits(text)
    if not hits:
        return
    by_line: dict[int, list[Hit]] = {}
    counted, line = 0, line_base
    for hit in sorted(hits, key=lambda h: h.pos):
        line += text.count("\n", counted, hit.pos)
        counted = hit.pos
        by_line.setdefault(line, []).append(hit)
    for number, line_hits in by_line.items():
        for hit in _dedup(line_hits).values():
            report.findings.append(Finding(str(path), f"line {number}", hit.kind, hit.masked, "log"))


# --- the command -----------------------------------------------------------------------------------


class UsageError(Exception):
    pass


def card_format_from(args: argparse.Namespace, config: dict[str, Any]) -> CardFormat:
    prefixes = list(args.card_prefix or [])
    luhn = bool(args.card_luhn)
    for device in config.get("devices", []) or []:
        if not isinstance(device, dict):
            continue
        for prefix in device.get("member_prefixes", []) or []:
            digits = str(prefix).removeprefix("M")
            if digits.isdigit():
                prefixes.append(digits)
        luhn = luhn or bool(device.get("luhn", False))
    lengths = frozenset(args.card_length) if args.card_length else frozenset(range(12, 20))
    return CardFormat(tuple(dict.fromkeys(prefixes)), lengths, luhn)


def load_config(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except OSError as exc:
        raise UsageError(f"--config {path}: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"--config {path}: not valid TOML ({exc})") from exc


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="pii_scan.py",
        description="Scan a lane's SQLite database (with its -wal and -journal) and logs for personal data.",
        epilog="Exit status: 0 clean, 1 personal data found, 2 usage error or incomplete scan.",
    )
    parser.add_argument("--db", type=Path, help="the lane's SQLite file (default: [store] path of --config)")
    parser.add_argument("--logs", type=Path, action="append", default=[], help="a log file or directory (repeatable)")
    parser.add_argument("--known", type=Path, action="append", default=[], help="known values, one per line")
    parser.add_argument("--config", type=Path, help="the lane's lane.toml: its card format and database path")
    parser.add_argument("--card-prefix", action="append", help="the programme's card numbers start with this")
    parser.add_argument("--card-length", type=int, action="append", help="the programme's card number length")
    parser.add_argument("--card-luhn", action="store_true", help="the programme's card numbers carry a Luhn digit")
    parser.add_argument("--id15", action="store_true", help="also look for the old 15-digit ID numbers")
    parser.add_argument("--json", action="store_true", help="one JSON document on stdout instead of lines")
    return parser.parse_args(argv)


def _database_of(args: argparse.Namespace, config: dict[str, Any]) -> Path | None:
    db: Path | None = args.db
    store = config.get("store")
    if db is None and isinstance(store, dict) and store.get("path"):
        db = Path(store["path"])
    if db is None and not args.logs:
        raise UsageError("nothing to scan: give --db, --logs, or a --config whose [store] names a path")
    if db is not None and not db.is_file():
        raise UsageError(f"--db {db}: no such file")
    return db


def _known_of(paths: list[Path]) -> Known:
    known = Known()
    for path in paths:
        try:
            more = Known.load(path)
        except OSError as exc:
            raise UsageError(f"--known {path}: {exc.strerror or exc}") from exc
        except UnicodeDecodeError as exc:
            raise UsageError(f"--known {path}: not UTF-8 text ({exc.reason})") from exc
        for length, values in more.digits.items():
            known.digits.setdefault(length, {}).update(values)
        known.texts.extend(more.texts)
        known.skipped.extend(f"{path} {s}" for s in more.skipped)
    return known


def run(args: argparse.Namespace) -> tuple[Report, float]:
    """The scan the arguments ask for: its report and how long it took (UsageError before anything is read)."""
    config = load_config(args.config)
    db = _database_of(args, config)
    for path in args.logs:
        if not path.exists():
            raise UsageError(f"--logs {path}: no such file or directory")
    known = _known_of(args.known)
    detector = Detector(known, card_format_from(args, config), id15=args.id15)
    report = Report(warnings=[f"known value ignored ({s})" for s in known.skipped])
    started = time.perf_counter()
    if db is not None:
        scan_database(db, detector, report)
    for path in log_files(args.logs):
        scan_log(path, detector, report)
    return report, time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        report, seconds = run(args)
    except UsageError as exc:
        print(f"pii_scan: {exc}", file=sys.stderr)
        return EXIT_USAGE
    megabytes = report.bytes / 1e6
    rate = megabytes / seconds if seconds > 0 else 0.0
    if args.json:
        document = {
            "clean": not report.findings and not report.errors,
            "findings": [
                {
                    "file": f.file,
                    "where": f.where,
                    "kind": f.kind,
                    "masked": f.masked,
                    "source": f.source,
                    "count": f.count,
                }
                for f in report.findings
            ],
            "errors": report.errors,
            "warnings": report.warnings,
            "scanned": {"files": report.files, "bytes": report.bytes, "seconds": round(seconds, 3)},
        }
        print(json.dumps(document, ensure_ascii=False, indent=2))
    else:
        for finding in report.findings:
            print(finding.line())
    for text in report.warnings:
        print(f"pii_scan: warning: {text}", file=sys.stderr)
    for text in report.errors:
        print(f"pii_scan: error: {text}", file=sys.stderr)
    verdict = f"{len(report.findings)} finding(s)" if report.findings else "clean"
    if report.errors and not report.findings:
        verdict = "incomplete"
    print(
        f"pii_scan: {len(report.files)} file(s), {megabytes:.1f} MB in {seconds:.2f} s ({rate:.0f} MB/s): {verdict}",
        file=sys.stderr,
    )
    if report.findings:
        return EXIT_FOUND
    return EXIT_USAGE if report.errors else EXIT_CLEAN


if __name__ == "__main__":
    sys.exit(main())
