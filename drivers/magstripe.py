"""Magnetic-stripe swipes as a keyboard-wedge reader types them: tracks to card number, expiry and name.

A reader in keyboard mode types the tracks it read one after the other,
each between its sentinels (ISO/IEC 7811, 7813, 4909)::

    %B<PAN>^<NAME>^<YYMM><service code><discretionary>?     track 1 (alphanumeric, at most 79)
    ;<PAN>=<YYMM><service code><discretionary>?             track 2 (numeric, at most 40)
    ;<digits and =>?    or    +<digits and =>?              track 3 (numeric, at most 107)

An absent expiry or service code is written as one more field separator
(``^`` on track 1, ``=`` on track 2).  A reader that could not read a track
types ``%E?``, ``;E?`` or ``+E?`` for it; an empty track (``;?``) is a track
with nothing on it.  Readers check each track's parity and LRC themselves
and usually leave the LRC character out in keyboard mode; one that types it
(``lrc=True``) has it checked here too.

``decode_swipe`` never raises.  Everything about a read must be right for it
to be a ``Swipe``: sentinels, track order, every character in its track's
character set, field lengths, the PAN's length (12-19 digits) and, unless the
programme's cards are not Luhn-valid (``luhn=False``), its check digit, and
tracks 1 and 2 agreeing.  Anything else is ``Rejected`` with a short reason
code, because a read that is slightly wrong may be somebody else's number.
A track 3 swiped on its own is indistinguishable from a track 2, so a ``;``
track is always taken as track 2 first: readers that send track 3 without
track 2 must be set to start it with ``+``.

With tracks 1 and 2 both read (what most readers send), a character lost,
doubled or changed in one track's card number shows as the tracks
disagreeing.  A single-track read has only the Luhn check (which catches
every changed digit but not every lost one) and ``pan_lengths``: a programme
whose cards carry one track and no Luhn digit should name its PAN lengths.

Neither ``Swipe`` nor ``Rejected`` puts a whole card number in its repr or
detail.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

from drivers.base import CardRead, Source, Unreadable, mask

TRACK1_MAX = 79
TRACK2_MAX = 40
TRACK3_MAX = 107
MAX_SWIPE = TRACK1_MAX + TRACK2_MAX + TRACK3_MAX
PAN_MIN = 12
PAN_MAX = 19
NAME_MAX = 26

_STARTS = {"%": 1, ";": 2, "+": 3}
_DIGITS = frozenset("0123456789")
_NUMERIC_TRACK = _DIGITS | {"="}
# Track 1's 6-bit character set is ' '..'_'; % ^ ? are its sentinels and separator.  ';' is
# in the set, but no card we take puts one in its data, while a track 1 that lost its end
# sentinel runs straight into track 2's ';': refusing it catches that.
_TRACK1_DATA = frozenset(chr(c) for c in range(0x20, 0x60)) - set("%^?;")


@dataclass(frozen=True, slots=True)
class Swipe:
    """A good swipe: the card number, and the expiry, service code and name where the stripe has them."""

    pan: str = field(repr=False)
    expiry: str | None  # YYMM
    service_code: str | None
    name: str | None = field(repr=False)  # track 1's, as encoded (e.g. "DOE/JOHN"), padding stripped
    tracks: tuple[int, ...]  # the tracks read, e.g. (1, 2)

    def __repr__(self) -> str:
        name = None if self.name is None else "***"
        return (
            f"Swipe(pan={mask(self.pan)!r}, expiry={self.expiry!r}, service_code={self.service_code!r}, "
            f"name={name!r}, tracks={self.tracks!r})"
        )

    def card_read(self, device: str) -> CardRead:
        """The driver event for this swipe on ``device``."""
        return CardRead(device, "magstripe", self.pan, self.expiry)


@dataclass(frozen=True, slots=True)
class Rejected:
    """A read that must not be matched to anyone; ``reason`` is a short code, ``detail`` for a technician."""

    reason: str
    detail: str = ""

    def unreadable(self, device: str, source: Source = "magstripe") -> Unreadable:
        """The driver event for this rejection on ``device``."""
        return Unreadable(device, source, self.reason, self.detail)


@dataclass(frozen=True, slots=True)
class _Fields:
    track: int
    pan: str | None
    expiry: str | None
    service_code: str | None
    name: str | None


class _RejectedError(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(reason, detail)
        self.rejected = Rejected(reason, detail)


def decode_swipe(
    text: str,
    *,
    luhn: bool = True,
    pan_lengths: Collection[int] | None = None,
    lrc: bool = False,
    allow_partial: bool = False,
) -> Swipe | Rejected:
    """What a swipe typed, decoded; never raises.

    ``luhn``: the PAN must pass the Luhn check (member cards of some
    programmes do not).  ``pan_lengths``: the PAN lengths the programme's
    cards have (default: any of 12-19); naming them catches a digit lost or
    doubled on a single-track read, which is otherwise only caught by the
    Luhn check, and then not always.  ``lrc``: the reader types each track's LRC character
    after its end sentinel.  ``allow_partial``: a swipe with some tracks typed
    as read errors (``%E?``) still counts, from the tracks that were read; by
    default any track error rejects the whole swipe, and the cashier swipes
    again.
    """
    try:
        tracks = _split(text, lrc=lrc)
        return _combine(tracks, luhn=luhn, pan_lengths=pan_lengths, allow_partial=allow_partial)
    except _RejectedError as exc:
        return exc.rejected


def luhn_ok(digits: str) -> bool:
    """Whether a string of ASCII digits passes the Luhn (mod 10) check; False for anything else."""
    if not digits or not _DIGITS.issuperset(digits):
        return False
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _split(text: str, *, lrc: bool) -> list[tuple[int, str]]:
    """The tracks typed, as (track number, content between the sentinels), in order."""
    if not text:
        raise _RejectedError("not_a_swipe", "an empty read")
    if len(text) > MAX_SWIPE:
        raise _RejectedError("too_long", f"{len(text)} characters; three tracks hold at most {MAX_SWIPE}")
    if text[0] not in _STARTS:
        raise _RejectedError("not_a_swipe", "does not start with a track's start sentinel (% ; +)")
    tracks: list[tuple[int, str]] = []
    pos = 0
    while pos < len(text):
        number, content, pos = _next_track(text, pos, tracks[-1][0] if tracks else 0, lrc=lrc)
        tracks.append((number, content))
    return tracks


def _next_track(text: str, pos: int, previous: int, *, lrc: bool) -> tuple[int, str, int]:
    """The track starting at ``pos``: its number, its content, and where the next one starts."""
    sentinel = text[pos]
    if sentinel not in _STARTS:
        raise _RejectedError("bad_track_order", f"character {pos + 1} follows an end sentinel but starts no track")
    number = _STARTS[sentinel]
    if sentinel == ";" and previous >= 2:
        number = 3  # the second ';' track is track 3
    if number <= previous:
        raise _RejectedError("bad_track_order", f"track {number} after track {previous}: two swipes run together?")
    end = text.find("?", pos + 1)
    if end < 0:
        raise _RejectedError("no_end_sentinel", f"track {number} has no end sentinel")
    content = text[pos + 1 : end]
    pos = end + 1
    if lrc:
        if pos >= len(text):
            raise _RejectedError("bad_lrc", f"track {number}: no LRC character after the end sentinel")
        if text[pos] != _lrc(number, content):
            raise _RejectedError("bad_lrc", f"track {number}: the LRC character does not match")
        pos += 1
    return number, content, pos


def _lrc(number: int, content: str) -> str | None:
    """The LRC character a track with this content carries; None if a character has no code in its set."""
    if number == 1:
        base, width, framed = 0x20, 0x40, f"%{content}?"
    else:
        # Track 3's '+' is the reader's rendering of the stripe's ';' start sentinel.
        base, width, framed = 0x30, 0x10, f";{content}?"
    acc = 0
    for ch in framed:
        value = ord(ch) - base
        if not 0 <= value < width:
            return None
        acc ^= value
    return chr(acc + base)


def _combine(
    tracks: list[tuple[int, str]], *, luhn: bool, pan_lengths: Collection[int] | None, allow_partial: bool
) -> Swipe | Rejected:
    errors = [number for number, content in tracks if content == "E"]
    if errors and not allow_partial:
        listed = ", ".join(str(n) for n in errors)
        return Rejected("read_error", f"the reader could not read track {listed}")
    fields = [_parse(number, content) for number, content in tracks if content not in ("", "E")]
    with_pan = [f for f in fields if f.pan is not None]
    if not with_pan:
        what = "a read error" if errors else "no track with a card number"
        return Rejected("read_error" if errors else "no_card_number", what)
    first = with_pan[0]
    for other in with_pan[1:]:
        for label, a, b in (
            ("card number", first.pan, other.pan),
            ("expiry", first.expiry, other.expiry),
            ("service code", first.service_code, other.service_code),
        ):
            if a != b:
                return Rejected("tracks_disagree", f"tracks {first.track} and {other.track} have different {label}s")
    pan = first.pan or ""
    refused = _refuse_pan(pan, luhn=luhn, pan_lengths=pan_lengths)
    if refused is not None:
        return refused
    name = next((f.name for f in fields if f.name is not None), None)
    return Swipe(
        pan=pan,
        expiry=first.expiry,
        service_code=first.service_code,
        name=name,
        tracks=tuple(f.track for f in fields),
    )


def _refuse_pan(pan: str, *, luhn: bool, pan_lengths: Collection[int] | None) -> Rejected | None:
    if not PAN_MIN <= len(pan) <= PAN_MAX:
        return Rejected("bad_pan", f"a card number of {len(pan)} digits, not {PAN_MIN}-{PAN_MAX}")
    if pan_lengths is not None and len(pan) not in pan_lengths:
        expected = ", ".join(str(n) for n in sorted(pan_lengths))
        return Rejected("bad_pan", f"a card number of {len(pan)} digits; this programme's have {expected}")
    if luhn and not luhn_ok(pan):
        return Rejected("bad_luhn", f"card number {mask(pan)} fails the Luhn check")
    return None


def _parse(number: int, content: str) -> _Fields:
    if number == 1:
        return _parse_track1(content)
    limit = TRACK2_MAX if number == 2 else TRACK3_MAX
    if len(content) + 2 > limit:
        raise _RejectedError(f"bad_track{number}", f"track {number} is longer than {limit} characters")
    if not _NUMERIC_TRACK.issuperset(content):
        raise _RejectedError(f"bad_track{number}", f"track {number} has characters other than digits and '='")
    if number == 3:
        # Track 3's layout (ISO 4909) varies by issuer; we only check it is well formed.
        return _Fields(3, None, None, None, None)
    pan, sep, rest = content.partition("=")
    if not sep:
        raise _RejectedError("bad_track2", "track 2 has no field separator after the card number")
    expiry, service_code, _ = _expiry_service(rest, "=", 2)
    return _Fields(2, _pan(pan, 2), expiry, service_code, None)


def _parse_track1(content: str) -> _Fields:
    if len(content) + 2 > TRACK1_MAX:
        raise _RejectedError("bad_track1", f"track 1 is longer than {TRACK1_MAX} characters")
    if not content[0].isascii() or not content[0].isalpha():
        raise _RejectedError("bad_track1", "track 1 does not start with a format code")
    if content[0] != "B":
        raise _RejectedError("unsupported_format", f"track 1 format code {content[0]!r}; only 'B' is supported")
    parts = content[1:].split("^", 2)
    if len(parts) != 3:
        raise _RejectedError("bad_track1", "track 1 needs two field separators (^)")
    pan, name, rest = parts
    if len(name) > NAME_MAX or not _TRACK1_DATA.issuperset(name):
        raise _RejectedError("bad_track1", f"track 1's name field is not up to {NAME_MAX} track characters")
    expiry, service_code, discretionary = _expiry_service(rest, "^", 1)
    if not _TRACK1_DATA.issuperset(discretionary):
        raise _RejectedError("bad_track1", "track 1's discretionary data has characters outside its set")
    return _Fields(1, _pan(pan, 1), expiry, service_code, name.strip() or None)


def _pan(pan: str, track: int) -> str:
    if not pan or len(pan) > PAN_MAX or not _DIGITS.issuperset(pan):
        raise _RejectedError("bad_pan", f"track {track}'s card number is not 1-{PAN_MAX} digits")
    return pan


def _expiry_service(rest: str, separator: str, track: int) -> tuple[str | None, str | None, str]:
    """Expiry (YYMM), service code and discretionary data; a separator stands for an absent field."""
    expiry: str | None = None
    service_code: str | None = None
    if rest.startswith(separator):
        rest = rest[1:]
    elif rest:
        expiry, rest = rest[:4], rest[4:]
        if len(expiry) != 4 or not _DIGITS.issuperset(expiry) or not 1 <= int(expiry[2:]) <= 12:
            raise _RejectedError("bad_expiry", f"track {track}'s expiry is not YYMM")
    if rest.startswith(separator):
        rest = rest[1:]
    elif rest:
        service_code, rest = rest[:3], rest[3:]
        if len(service_code) != 3 or not _DIGITS.issuperset(service_code):
            raise _RejectedError(f"bad_track{track}", f"track {track}'s service code is not 3 digits")
    if track == 2 and not _DIGITS.issuperset(rest):
        raise _RejectedError("bad_track2", "track 2's discretionary data is not all digits")
    return expiry, service_code, rest
