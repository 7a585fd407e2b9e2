"""IC member cards in APDUs: the commands, their answers, and the member file (pure, no I/O).

The IC driver (``drivers.ic``) hands ``read_card`` a ``transmit`` function
(command bytes in, response bytes out) and gets back what the card is:
``MemberFile`` (the member application answered), ``UidRead`` (no member
application, but the reader gave the contactless UID and the lane is
configured to accept it) or ``Invalid`` (a short reason code: never matched
to anyone).  Everything here is a pure function of the bytes the card sent,
so it is tested byte by byte, with garbage and truncation.

Commands (ISO/IEC 7816-4; PC/SC part 3 for the UID):

- ``SELECT`` by AID: ``00 A4 04 00 Lc <AID> 00``
- ``READ BINARY``: ``00 B0 P1 P2 Le``, offset = P1P2 (15 bits, P1 bit 8 clear)
- ``GET RESPONSE``: ``00 C0 00 00 Le`` (after ``61xx``: xx more bytes wait)
- ``GET DATA`` UID: ``FF CA 00 00 00`` (answered by the contactless reader itself)

``exchange`` follows the card's own hints: ``61xx`` is collected with GET
RESPONSE, ``6Cxx`` (wrong Le, xx is right) re-issues the command with Le=xx.

The member application
----------------------
AID ``F0 4C 41 4E 45 4D 42`` by default: ISO/IEC 7816-5 category ``F``
(proprietary, unregistered) followed by ASCII "LANEMB".  Configurable per
lane (``aid``).  Once selected, its transparent file holds one BER-TLV
template, optionally followed by padding::

    70 L                       member template (L: 1 byte < 0x80, or 81 xx, or 82 xx xx)
       5A    len  BCD digits   card number, required: packed BCD, 4-19 digits,
                               an odd count padded with a final F nibble (as EMV's PAN)
       5F24  03   YYMMDD       expiry date, optional: packed BCD, a real calendar date
       C0    01   kind         card kind, optional: 01 member, 02 staff, other values reserved
       ...                     any other tag: skipped, so issuers can add fields later
    00.. or FF..               padding to the end of the file (a fixed-size EF), ignored

Example (card 6200 1234 5678 0001, valid to 2027-12-31, a member card)::

    70 13 5A 08 62 00 12 34 56 78 00 01 5F 24 03 27 12 31 C0 01 01

Each known tag may appear once; a file of only ``00``/``FF`` is a blank
(unpersonalised) card.  ``parse_member_file`` never raises: any bytes give a
``MemberFile`` or an ``Invalid`` with a reason.

UID fallback
------------
A card without the member application (``6A82`` and kin to SELECT) may still
be a member's: programmes that issue plain contactless cards enrol them by
UID.  Where ``uid_fallback`` is on, ``GET DATA`` reads the UID and the card
number is ``"UID"`` + the UID in upper-case hex, e.g. ``UID04A1B2C3D4E5F6``;
head office's member table holds the card hash of exactly that text.  The
prefix keeps a UID from ever equalling a printed (all-digit) card number,
and is letters only because card numbers are normalised to ``[0-9A-Z]``
before hashing (``agent.snapshot.normalise_card_number``).  A 4-byte UID
starting ``08`` is a random ID (ISO/IEC 14443-3) that changes at every tap:
it is refused (``random_uid``) rather than enrolled as a number no card keeps.
"""

from __future__ import annotations

import datetime as dt
import enum
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from drivers.base import mask

DEFAULT_AID = bytes.fromhex("F04C414E454D42")
MEMBER_TEMPLATE = 0x70
TAG_CARD_NUMBER = 0x5A
TAG_EXPIRY = 0x5F24
TAG_KIND = 0xC0
MAX_OFFSET = 0x7FFF  # READ BINARY with P1 bit 8 clear: a 15-bit offset
MAX_SHORT_LE = 256  # short APDUs: Le 1-256 (256 written as 00)

# One command's answer may be chained at most this often, and this long: a card that
# keeps saying 61xx or 6Cxx must not keep the reader (and the lane) forever.
_MAX_ROUNDS = 16
_MAX_RESPONSE_BYTES = 4096
_PADDING = frozenset({0x00, 0xFF})

Transmit = Callable[[bytes], bytes]


class BadResponseError(ValueError):
    """The card's answer is not an APDU response (shorter than SW1 SW2), or chains without end."""


# --- commands -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Command:
    """A short command APDU; ``le`` is the number of bytes expected (1-256), or None for none."""

    cla: int
    ins: int
    p1: int
    p2: int
    data: bytes = b""
    le: int | None = None

    def __post_init__(self) -> None:
        for name in ("cla", "ins", "p1", "p2"):
            if not 0 <= getattr(self, name) <= 0xFF:
                raise ValueError(f"{name} must be one byte")
        if len(self.data) > 255:
            raise ValueError("short APDUs carry at most 255 data bytes")
        if self.le is not None and not 1 <= self.le <= MAX_SHORT_LE:
            raise ValueError("Le must be 1-256")

    def to_bytes(self) -> bytes:
        """The APDU as sent: header, then Lc and data if any, then Le if any (256 as 00)."""
        apdu = bytes((self.cla, self.ins, self.p1, self.p2))
        if self.data:
            apdu += bytes((len(self.data),)) + self.data
        if self.le is not None:
            apdu += bytes((self.le % MAX_SHORT_LE,))
        return apdu

    def with_le(self, le: int) -> Command:
        """The same command asking for ``le`` bytes (after a 6Cxx)."""
        return Command(self.cla, self.ins, self.p1, self.p2, self.data, le)


def select_aid(aid: bytes) -> Command:
    """SELECT by DF name (AID), first occurrence, FCI wanted: ``00 A4 04 00 Lc AID 00``."""
    if not 5 <= len(aid) <= 16:
        raise ValueError("an AID is 5-16 bytes")
    return Command(0x00, 0xA4, 0x04, 0x00, aid, MAX_SHORT_LE)


def read_binary(offset: int, le: int) -> Command:
    """READ BINARY of the selected file: ``00 B0 P1 P2 Le`` with a 15-bit offset."""
    if not 0 <= offset <= MAX_OFFSET:
        raise ValueError("READ BINARY offsets are 0-32767")
    return Command(0x00, 0xB0, offset >> 8, offset & 0xFF, le=le)


def get_response(le: int) -> Command:
    """GET RESPONSE: ``00 C0 00 00 Le``, after the card said 61xx."""
    return Command(0x00, 0xC0, 0x00, 0x00, le=le)


def get_uid() -> Command:
    """PC/SC part 3 GET DATA of the contactless UID: ``FF CA 00 00 00`` (the reader answers)."""
    return Command(0xFF, 0xCA, 0x00, 0x00, le=MAX_SHORT_LE)


_COMMAND_NAMES = {0xA4: "SELECT", 0xB0: "READ BINARY", 0xC0: "GET RESPONSE", 0xCA: "GET DATA (UID)"}


def command_name(apdu: bytes) -> str:
    """What a command APDU is, for logs and timeout reports (``"SELECT"``, ``"INS 84"``)."""
    if len(apdu) < 2:
        return "a malformed command"
    return _COMMAND_NAMES.get(apdu[1], f"INS {apdu[1]:02X}")


# --- responses ----------------------------------------------------------------


class Status(enum.Enum):
    """What a status word means to this driver."""

    OK = "ok"  # 9000
    END_OF_FILE = "end_of_file"  # 6282: fewer than Le bytes, the file ends
    BLOCKED = "blocked"  # 6283: the selected file / application is deactivated
    WARNING = "warning"  # other 62xx, 63xx
    MORE_DATA = "more_data"  # 61xx: xx bytes wait for GET RESPONSE
    WRONG_LE = "wrong_le"  # 6Cxx: re-issue with Le = xx
    WRONG_LENGTH = "wrong_length"  # 6700
    SECURITY = "security"  # 6982: security status not satisfied
    NOT_ALLOWED = "not_allowed"  # 6985, 6986: conditions not satisfied, no current EF
    FUNCTION_NOT_SUPPORTED = "function_not_supported"  # 6A81
    NOT_FOUND = "not_found"  # 6A82: file or application not found
    WRONG_P1P2 = "wrong_p1p2"  # 6A86, 6B00 (READ BINARY past the end of the file)
    INS_NOT_SUPPORTED = "ins_not_supported"  # 6D00
    CLA_NOT_SUPPORTED = "cla_not_supported"  # 6E00
    ERROR = "error"  # anything else


_STATUS_BY_SW = {
    0x9000: Status.OK,
    0x6282: Status.END_OF_FILE,
    0x6283: Status.BLOCKED,
    0x6700: Status.WRONG_LENGTH,
    0x6982: Status.SECURITY,
    0x6985: Status.NOT_ALLOWED,
    0x6986: Status.NOT_ALLOWED,
    0x6A81: Status.FUNCTION_NOT_SUPPORTED,
    0x6A82: Status.NOT_FOUND,
    0x6A86: Status.WRONG_P1P2,
    0x6B00: Status.WRONG_P1P2,
    0x6D00: Status.INS_NOT_SUPPORTED,
    0x6E00: Status.CLA_NOT_SUPPORTED,
}


@dataclass(frozen=True, slots=True)
class Response:
    """A response APDU: the data and the status word."""

    data: bytes = field(repr=False)  # may hold a card number
    sw1: int
    sw2: int

    @property
    def sw(self) -> int:
        return (self.sw1 << 8) | self.sw2

    @property
    def status(self) -> Status:
        known = _STATUS_BY_SW.get(self.sw)
        if known is not None:
            return known
        if self.sw1 == 0x61:
            return Status.MORE_DATA
        if self.sw1 == 0x6C:
            return Status.WRONG_LE
        if self.sw1 in {0x62, 0x63}:
            return Status.WARNING
        return Status.ERROR

    def __str__(self) -> str:
        return f"SW {self.sw:04X} ({self.status.value}, {len(self.data)} data bytes)"


def parse_response(raw: bytes) -> Response:
    """Split a response APDU into data and SW1 SW2; ``BadResponseError`` if it has fewer than 2 bytes."""
    if len(raw) < 2:
        raise BadResponseError(f"a response of {len(raw)} byte(s) has no status word")
    return Response(bytes(raw[:-2]), raw[-2], raw[-1])


def exchange(transmit: Transmit, command: Command) -> Response:
    """Send ``command`` and follow 61xx (GET RESPONSE) and 6Cxx (re-issue with Le=xx) to the final answer.

    Data from a 61xx chain is concatenated; the status word is the last one.
    Raises ``BadResponseError`` for a malformed answer or a chain longer than
    the card should need; whatever ``transmit`` raises passes through.
    """
    data = b""
    wrong_le_retried = False
    for _ in range(_MAX_ROUNDS):
        response = parse_response(transmit(command.to_bytes()))
        if response.status is Status.WRONG_LE and not wrong_le_retried:
            wrong_le_retried = True  # a second 6Cxx would only loop
            command = command.with_le(response.sw2 or MAX_SHORT_LE)
            continue
        data += response.data
        if len(data) > _MAX_RESPONSE_BYTES:
            raise BadResponseError(f"the answer grew past {_MAX_RESPONSE_BYTES} bytes")
        if response.status is Status.MORE_DATA:
            command = get_response(response.sw2 or MAX_SHORT_LE)
            continue
        return Response(data, response.sw1, response.sw2)
    raise BadResponseError(f"the answer did not end after {_MAX_ROUNDS} exchanges")


# --- what a card is -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MemberFile:
    """The member application's file: the card number, and what else the issuer wrote."""

    number: str = field(repr=False)
    expiry: str | None = None  # YYMMDD
    kind: int | None = None  # 01 member, 02 staff; others reserved

    @property
    def expiry_yymm(self) -> str | None:
        """The expiry as a magnetic stripe gives it (YYMM), for ``CardRead.expiry``."""
        return self.expiry[:4] if self.expiry is not None else None

    def __repr__(self) -> str:
        return f"MemberFile(number={mask(self.number)!r}, expiry={self.expiry!r}, kind={self.kind!r})"


@dataclass(frozen=True, slots=True)
class UidRead:
    """A card without the member application, known by its contactless UID."""

    uid: bytes = field(repr=False)

    @property
    def number(self) -> str:
        """The card number head office enrols such a card under: ``"UID"`` + upper-case hex."""
        return "UID" + self.uid.hex().upper()

    def __repr__(self) -> str:
        return f"UidRead(number={mask(self.number)!r})"


@dataclass(frozen=True, slots=True)
class Invalid:
    """Nothing to identify anyone by; ``reason`` is a short code, ``detail`` never holds card data."""

    reason: str
    detail: str = ""


CardOutcome = MemberFile | UidRead | Invalid


# --- the member file ----------------------------------------------------------


def _read_tag(data: bytes, at: int) -> tuple[int, int] | Invalid:
    first = data[at]
    if first & 0x1F != 0x1F:
        return first, at + 1
    if at + 1 >= len(data):
        return Invalid("truncated", f"tag at byte {at} cut short")
    second = data[at + 1]
    if second & 0x80:
        return Invalid("bad_tlv", f"tag at byte {at} is longer than 2 bytes")
    return (first << 8) | second, at + 2


def _read_length(data: bytes, at: int) -> tuple[int, int] | Invalid:
    if at >= len(data):
        return Invalid("truncated", f"length at byte {at} missing")
    first = data[at]
    if first < 0x80:
        return first, at + 1
    size = first & 0x7F
    if size not in {1, 2}:
        return Invalid("bad_tlv", f"length form {first:02X} at byte {at}")
    if at + 1 + size > len(data):
        return Invalid("truncated", f"length at byte {at} cut short")
    return int.from_bytes(data[at + 1 : at + 1 + size], "big"), at + 1 + size


def _read_tlv(data: bytes, at: int) -> tuple[int, bytes, int] | Invalid:
    """One BER-TLV object at ``at``: (tag, value, where the next one starts)."""
    tag = _read_tag(data, at)
    if isinstance(tag, Invalid):
        return tag
    length = _read_length(data, tag[1])
    if isinstance(length, Invalid):
        return length
    size, start = length
    if start + size > len(data):
        return Invalid("truncated", f"tag {tag[0]:X} wants {size} bytes, {len(data) - start} left")
    return tag[0], data[start : start + size], start + size


def template_length(prefix: bytes) -> int | None:
    """How many bytes of the file hold the member template, once ``prefix`` shows it; None: read on.

    For a file that does not start with a template, the length read so far:
    reading more would not make it one, and ``parse_member_file`` says why.
    """
    if not prefix or prefix[0] != MEMBER_TEMPLATE:
        return len(prefix)
    length = _read_length(prefix, 1)
    if isinstance(length, Invalid):
        return None if length.reason == "truncated" else len(prefix)
    size, start = length
    return start + size


def _bcd_digits(value: bytes) -> str | None:
    nibbles = [n for byte in value for n in (byte >> 4, byte & 0x0F)]
    if nibbles and nibbles[-1] == 0x0F:
        nibbles.pop()  # an odd number of digits, padded as EMV pads a PAN
    if any(n > 9 for n in nibbles):
        return None
    return "".join(str(n) for n in nibbles)


def _card_number(value: bytes | None) -> str | Invalid:
    if value is None:
        return Invalid("no_card_number", "tag 5A missing")
    digits = _bcd_digits(value)
    if digits is None:
        return Invalid("bad_card_number", "not packed BCD")
    if not 4 <= len(digits) <= 19:
        return Invalid("bad_card_number", f"{len(digits)} digits, 4-19 expected")
    return digits


def _expiry(value: bytes) -> str | Invalid:
    digits = _bcd_digits(value) if len(value) == 3 else None
    if digits is None or len(digits) != 6:
        return Invalid("bad_expiry", "not 3 bytes of YYMMDD in BCD")
    try:
        dt.date(2000 + int(digits[:2]), int(digits[2:4]), int(digits[4:]))
    except ValueError:
        return Invalid("bad_expiry", "not a calendar date")
    return digits


def _kind(value: bytes) -> int | Invalid:
    if len(value) != 1:
        return Invalid("bad_kind", f"tag C0 holds {len(value)} bytes, 1 expected")
    return value[0]


def _not_a_template(data: bytes) -> Invalid | None:
    if not data:
        return Invalid("empty_file")
    if all(byte in _PADDING for byte in data):
        return Invalid("blank_card", "only padding: the card was never personalised")
    if data[0] != MEMBER_TEMPLATE:
        return Invalid("bad_template", f"starts with {data[0]:02X}, not the member template 70")
    return None


def _template_fields(data: bytes) -> dict[int, bytes] | Invalid:
    """The member template's objects by tag, checked for truncation, duplicates and trailing bytes."""
    problem = _not_a_template(data)
    if problem is not None:
        return problem
    outer = _read_tlv(data, 0)
    if isinstance(outer, Invalid):
        return outer
    _, body, end = outer
    if any(byte not in _PADDING for byte in data[end:]):
        return Invalid("trailing_data", f"{len(data) - end} bytes after the template are not padding")
    fields: dict[int, bytes] = {}
    at = 0
    while at < len(body):
        item = _read_tlv(body, at)
        if isinstance(item, Invalid):
            return item
        tag, value, at = item
        if tag in fields:
            return Invalid("duplicate_tag", f"tag {tag:X} appears twice")
        fields[tag] = value
    return fields


def parse_member_file(data: bytes) -> MemberFile | Invalid:
    """The member file's fields, or why it is not one; never raises, whatever the bytes."""
    fields = _template_fields(data)
    if isinstance(fields, Invalid):
        return fields
    number = _card_number(fields.get(TAG_CARD_NUMBER))
    if isinstance(number, Invalid):
        return number
    expiry = _expiry(fields[TAG_EXPIRY]) if TAG_EXPIRY in fields else None
    if isinstance(expiry, Invalid):
        return expiry
    kind = _kind(fields[TAG_KIND]) if TAG_KIND in fields else None
    if isinstance(kind, Invalid):
        return kind
    return MemberFile(number, expiry, kind)


def member_file_bytes(number: str, expiry: str | None = None, kind: int | None = None) -> bytes:
    """The member file for a card number (what an issuer personalises; tests and tools use it)."""
    if not re.fullmatch(r"[0-9]{4,19}", number):
        raise ValueError("a card number is 4-19 digits")
    body = _tlv(TAG_CARD_NUMBER, bytes.fromhex(number + ("F" if len(number) % 2 else "")))
    if expiry is not None:
        value = bytes.fromhex(expiry) if re.fullmatch(r"[0-9]{6}", expiry) else b""
        if isinstance(_expiry(value), Invalid):
            raise ValueError("expiry is YYMMDD, a calendar date")
        body += _tlv(TAG_EXPIRY, value)
    if kind is not None:
        body += _tlv(TAG_KIND, bytes((kind,)))
    return _tlv(MEMBER_TEMPLATE, body)


def _tlv(tag: int, value: bytes) -> bytes:
    tag_bytes = tag.to_bytes(2 if tag > 0xFF else 1, "big")
    if len(value) < 0x80:
        length = bytes((len(value),))
    elif len(value) <= 0xFF:
        length = bytes((0x81, len(value)))
    else:
        length = b"\x82" + len(value).to_bytes(2, "big")
    return tag_bytes + length + value


# --- reading a card -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReadPlan:
    """What to read off a card: the application, which part of its file, and the UID fallback."""

    aid: bytes = DEFAULT_AID
    offset: int = 0
    length: int | None = None  # exactly this many bytes; None: the member template's own length
    max_length: int = 1024  # never read more than this (None length), nor accept a longer template
    chunk: int = 128  # Le of each READ BINARY
    uid_fallback: bool = False

    def __post_init__(self) -> None:
        select_aid(self.aid)  # validates the AID's length
        limit = self.length if self.length is not None else self.max_length
        if limit < 1 or self.offset < 0 or self.offset + limit > MAX_OFFSET + 1:
            raise ValueError("the member file must lie within offsets 0-32767")
        if not 1 <= self.chunk <= MAX_SHORT_LE:
            raise ValueError("chunk (READ BINARY Le) is 1-256")


# SELECT answers that mean "no such application here" (rather than "it is here but refuses"):
# not found, and what cards and contactless readers say to a SELECT they cannot do at all.
_NO_APPLICATION = frozenset(
    {
        Status.NOT_FOUND,
        Status.FUNCTION_NOT_SUPPORTED,
        Status.WRONG_P1P2,
        Status.INS_NOT_SUPPORTED,
        Status.CLA_NOT_SUPPORTED,
    }
)
_NO_UID = _NO_APPLICATION | {Status.WRONG_LENGTH, Status.NOT_ALLOWED}


def read_card(transmit: Transmit, plan: ReadPlan) -> CardOutcome:
    """Identify the card in the reader: its member file, else (where allowed) its UID, else why not.

    Never raises for anything the card answers; exceptions from ``transmit``
    (a timeout, a pulled card, pcscd gone) pass through to the caller.
    """
    try:
        selected = exchange(transmit, select_aid(plan.aid))
        if selected.status is Status.OK:
            data = _read_file(transmit, plan)
            return data if isinstance(data, Invalid) else parse_member_file(data)
        if selected.status is Status.BLOCKED:
            return Invalid("application_blocked", f"SELECT: {selected}")
        if selected.status not in _NO_APPLICATION:
            return Invalid("card_error", f"SELECT: {selected}")
        if not plan.uid_fallback:
            return Invalid("unknown_card", f"no member application (SELECT: {selected})")
        return _read_uid(transmit, selected)
    except BadResponseError as exc:
        return Invalid("bad_response", str(exc))


def _read_file(transmit: Transmit, plan: ReadPlan) -> bytes | Invalid:
    limit = plan.length if plan.length is not None else plan.max_length
    data = b""
    while len(data) < limit:
        want = min(plan.chunk, limit - len(data))
        response = exchange(transmit, read_binary(plan.offset + len(data), want))
        if response.status is Status.WRONG_P1P2 and data:
            break  # the previous chunk ended exactly at the end of the file
        if response.status not in {Status.OK, Status.END_OF_FILE}:
            reason = "no_member_file" if response.status is Status.NOT_FOUND else "card_error"
            return Invalid(reason, f"READ BINARY at {plan.offset + len(data)}: {response}")
        if len(response.data) > want:
            return Invalid("bad_response", f"READ BINARY returned {len(response.data)} bytes for Le={want}")
        data += response.data
        if response.status is Status.END_OF_FILE or not response.data:
            break
        if plan.length is None:
            needed = template_length(data)
            if needed is not None:
                if needed > plan.max_length:
                    return Invalid("file_too_long", f"template of {needed} bytes, at most {plan.max_length}")
                limit = needed
    return data[:limit]


def _read_uid(transmit: Transmit, selected: Response) -> CardOutcome:
    answer = exchange(transmit, get_uid())
    if answer.status in _NO_UID:
        return Invalid("unknown_card", f"no member application (SELECT: {selected}) and no UID (GET DATA: {answer})")
    if answer.status is not Status.OK:
        return Invalid("card_error", f"GET DATA UID: {answer}")
    uid = answer.data
    if len(uid) not in {4, 7, 8, 10}:
        return Invalid("bad_uid", f"a UID of {len(uid)} bytes")
    if len(uid) == 4 and uid[0] == 0x08:
        return Invalid("random_uid", "a random 4-byte UID (08...) changes at every tap")
    return UidRead(uid)
