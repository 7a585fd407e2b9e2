"""What a barcode scan is: a product, a printed member card, a coupon, a member QR code, or nothing usable.

``classify_scan`` is pure and never raises.  It looks at one scan's text, as
the scanner typed it, in this order:

1. An AIM symbology identifier (``]E0``, ``]C1``, ``]Q1``, ...), if the
   scanner is set to send one, is taken off and tells an EAN/UPC symbol from
   everything else.  Without one, a scan of 8, 12 or 13 digits is taken as
   EAN-8, UPC-A or EAN-13: a Code 128 member card of that many digits then
   needs the scanner to send AIM identifiers (or a letter prefix).
2. EAN/UPC digits must have a right check digit (``bad_check_digit``
   otherwise).  UPC-A is the 13-digit EAN with a leading 0 and is reported
   that way, however the scanner sent it.  Numbers starting with one of
   ``member_gtin_prefixes`` (in-store numbers, usually ``2x``) are member
   cards, with ``coupon_gtin_prefixes`` coupons, anything else a product.
3. Text starting ``LM<digit>.`` is a member QR code (``drivers.member_qr``):
   a well-formed one is ``MemberQR`` for the scanner's ``QRVerifier``, which
   checks signature, time and replays; anything else claiming to be one is
   refused.
4. Other text is a member card number if it matches ``member_pattern`` (and
   starts with one of ``member_prefixes``, when given), a coupon if it starts
   with one of ``coupon_prefixes`` and matches ``coupon_pattern``; if both,
   or neither, it is refused.

A rule that is not met refuses the scan (``Rejected``); nothing is guessed,
because a guess could be somebody else's card.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from drivers.base import CardRead, CouponScan, mask
from drivers.magstripe import luhn_ok
from drivers.member_qr import Rejected, is_member_code, parse_member_code

__all__ = [
    "Coupon",
    "MemberCard",
    "MemberQR",
    "Product",
    "Rejected",
    "ScanRules",
    "Scanned",
    "classify_scan",
    "ean_check_digit_ok",
]

_DIGITS = frozenset("0123456789")
_EAN_LENGTHS = (8, 12, 13)
_AIM = re.compile(r"\][A-Za-z][0-9A-Za-z]", re.ASCII)


@dataclass(frozen=True, slots=True)
class ScanRules:
    """How a lane tells member cards and coupons from other barcodes (patterns are matched whole, ASCII)."""

    # A printed member card number (Code 128, Code 39, QR, ...): an optional M and 10-19 digits.
    member_pattern: str = r"M?[0-9]{10,19}"
    # When given, a member card number must also start with one of these.
    member_prefixes: tuple[str, ...] = ()
    # Require the Luhn check on a member card number's digits.
    member_luhn: bool = False
    # EAN-13/EAN-8 numbers starting with these are member cards (restricted-circulation 2x numbers).
    member_gtin_prefixes: tuple[str, ...] = ()
    coupon_prefixes: tuple[str, ...] = ("CPN",)
    # A coupon code as a whole, prefix included.
    coupon_pattern: str = r"[0-9A-Z_-]{4,64}"
    # EAN-13 numbers starting with these are coupons (GS1 gives coupons the 99 prefix).
    coupon_gtin_prefixes: tuple[str, ...] = ()
    max_length: int = 256
    _member_re: re.Pattern[str] = field(init=False, repr=False, compare=False)
    _coupon_re: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        compiled = []
        for name, pattern in (("member_pattern", self.member_pattern), ("coupon_pattern", self.coupon_pattern)):
            try:
                compiled.append(re.compile(pattern, re.ASCII))
            except re.error as exc:
                raise ValueError(f"{name} {pattern!r} is not a regular expression: {exc}") from exc
        object.__setattr__(self, "_member_re", compiled[0])
        object.__setattr__(self, "_coupon_re", compiled[1])
        for name, prefixes in (("member_prefixes", self.member_prefixes), ("coupon_prefixes", self.coupon_prefixes)):
            if any(not p for p in prefixes):
                raise ValueError(f"{name} must not contain an empty prefix (it would match every scan)")
        for name, prefixes in (
            ("member_gtin_prefixes", self.member_gtin_prefixes),
            ("coupon_gtin_prefixes", self.coupon_gtin_prefixes),
        ):
            if any(not p or not _DIGITS.issuperset(p) for p in prefixes):
                raise ValueError(f"{name} must be digit strings")
        if self.max_length < 1:
            raise ValueError("max_length must be at least 1")

    def is_member(self, number: str) -> bool:
        """Whether a text (non-EAN) scan has the form of a member card number (the Luhn check aside)."""
        if self.member_prefixes and not number.startswith(self.member_prefixes):
            return False
        return self._member_re.fullmatch(number) is not None

    def is_coupon(self, code: str) -> bool:
        """Whether a text (non-EAN) scan is a coupon code."""
        return (
            bool(self.coupon_prefixes)
            and code.startswith(self.coupon_prefixes)
            and bool(self._coupon_re.fullmatch(code))
        )


@dataclass(frozen=True, slots=True)
class Product:
    """A product's EAN-13 (UPC-A with its leading 0) or EAN-8."""

    ean: str


@dataclass(frozen=True, slots=True)
class MemberCard:
    """A printed member card number, as scanned (a GTIN-13 when it came from an EAN/UPC symbol)."""

    number: str = field(repr=False)

    def __repr__(self) -> str:
        return f"MemberCard(number={mask(self.number)!r})"

    def card_read(self, device: str) -> CardRead:
        """The driver event for this card on ``device``."""
        return CardRead(device, "barcode", self.number)


@dataclass(frozen=True, slots=True)
class Coupon:
    """A coupon code."""

    code: str

    def coupon_scan(self, device: str) -> CouponScan:
        """The driver event for this coupon on ``device``."""
        return CouponScan(device, self.code)


@dataclass(frozen=True, slots=True)
class MemberQR:
    """A well-formed member QR code; ``QRVerifier.verify(text, now)`` decides whether it identifies anyone."""

    text: str = field(repr=False)  # a bearer token while it is valid: kept out of logs

    def __repr__(self) -> str:
        return f"MemberQR(text={self.text[:4]!r}...)"


Scanned = Product | MemberCard | Coupon | MemberQR | Rejected


def ean_check_digit_ok(digits: str) -> bool:
    """Whether an EAN-8, UPC-A (12) or EAN-13 number's last digit is its check digit; False for anything else."""
    if len(digits) not in _EAN_LENGTHS or not _DIGITS.issuperset(digits):
        return False
    # Weights 3, 1, 3, ... from the digit left of the check digit, for every length.
    total = sum(int(d) * (3 if i % 2 == 0 else 1) for i, d in enumerate(reversed(digits[:-1])))
    return (10 - total % 10) % 10 == int(digits[-1])


def classify_scan(text: str, rules: ScanRules) -> Scanned:
    """What one scan is (see the module docstring); never raises."""
    if not text:
        return Rejected("unknown_format", "an empty scan")
    if len(text) > rules.max_length:
        return Rejected("too_long", f"{len(text)} characters; this lane takes at most {rules.max_length}")
    symbology: str | None = None
    if text.startswith("]"):
        if not _AIM.match(text):
            return Rejected("unknown_format", "starts with ']' but not with an AIM symbology identifier")
        symbology, text = text[1:3], text[3:]
    if symbology is not None and symbology[0] == "E":
        return _ean_symbol(symbology, text, rules)
    if symbology is None and len(text) in _EAN_LENGTHS and _DIGITS.issuperset(text):
        return _gtin(text, rules)
    return _text(text, rules)


def _ean_symbol(symbology: str, digits: str, rules: ScanRules) -> Scanned:
    if not _DIGITS.issuperset(digits):
        return Rejected("unknown_format", "an EAN/UPC symbol with characters other than digits")
    modifier = symbology[1]
    # ]E0: EAN-13 or UPC-A; ]E4: EAN-8; ]E3: EAN-13 with its 2- or 5-digit add-on, which we ignore.
    if (modifier == "0" and len(digits) in (12, 13)) or (modifier == "4" and len(digits) == 8):
        return _gtin(digits, rules)
    if modifier == "3" and len(digits) in (15, 18):
        return _gtin(digits[:13], rules)
    return Rejected("unknown_format", f"EAN/UPC symbology ]{symbology} with {len(digits)} digits")


def _gtin(digits: str, rules: ScanRules) -> Scanned:
    if not ean_check_digit_ok(digits):
        return Rejected("bad_check_digit", f"a {len(digits)}-digit EAN/UPC number whose check digit is wrong")
    if len(digits) == 12:
        digits = "0" + digits  # UPC-A is EAN-13 with a leading 0, however the scanner sent it
    member = digits.startswith(rules.member_gtin_prefixes) if rules.member_gtin_prefixes else False
    coupon = digits.startswith(rules.coupon_gtin_prefixes) if rules.coupon_gtin_prefixes else False
    if member and coupon:
        return Rejected("ambiguous", "the number starts with both a member and a coupon prefix")
    if member:
        return MemberCard(digits)
    if coupon:
        return Coupon(digits)
    return Product(digits)


def _text(text: str, rules: ScanRules) -> Scanned:
    if is_member_code(text):
        parsed = parse_member_code(text)
        return parsed if isinstance(parsed, Rejected) else MemberQR(text)
    member = rules.is_member(text)
    coupon = rules.is_coupon(text)
    if member and coupon:
        return Rejected("ambiguous", "the scan matches both the member card and the coupon rules")
    if member:
        if rules.member_luhn and not luhn_ok("".join(c for c in text if c in _DIGITS)):
            return Rejected("bad_check_digit", "a member card number that fails the Luhn check")
        return MemberCard(text)
    if coupon:
        return Coupon(text)
    return Rejected("unknown_format", f"a {len(text)}-character scan that is no member card, coupon or member code")
