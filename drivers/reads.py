"""What a read means: the text a wedge device typed (or a script gave) as a driver event.

Shared by the evdev driver and the simulated one, so a scripted demo swipe
goes through exactly the decoders a real one does.  Pure: no I/O.
"""

from __future__ import annotations

import base64
import binascii
from typing import Literal

from pydantic import Field, field_validator

from drivers.barcode import Coupon, MemberCard, MemberQR, Product, ScanRules, classify_scan
from drivers.barcode import Rejected as ScanRejected
from drivers.base import CardRead, CouponScan, DriverEvent, Source, Unreadable
from drivers.config import DeviceConfig
from drivers.magstripe import Swipe, decode_swipe
from drivers.member_qr import QRVerifier, Verified

Role = Literal["magstripe", "barcode", "auto"]
_SWIPE_STARTS = ("%", ";", "+")


class ReadSettings(DeviceConfig):
    """How a device's reads are understood (keys shared by evdev_wedge and simulated devices)."""

    role: Role = Field(
        default="auto", description="magstripe, barcode, or auto (a read starting with % ; or + is a swipe)"
    )
    luhn: bool = Field(default=False, description="require a valid Luhn check digit on swiped card numbers")
    # strict=False on the tuples: TOML gives arrays as lists; the model keeps them immutable.
    member_prefixes: tuple[str, ...] = Field(
        default=(),
        strict=False,
        description="printed member-card barcodes start with one of these (empty: the default pattern)",
    )
    coupon_prefixes: tuple[str, ...] = Field(
        default=("CPN",), strict=False, description="coupon barcodes start with one of these"
    )
    qr_keys: dict[str, str] = Field(
        default_factory=dict,
        description="head office's Ed25519 public keys for dynamic member QR codes: key id -> 'hex:…' or 'base64:…'",
    )
    qr_window_s: int = Field(default=60, ge=10, le=600, description="how long a dynamic member QR code is valid")
    accept_static_qr: bool = Field(default=False, description="accept unsigned (printed) member QR codes")

    @field_validator("qr_keys")
    @classmethod
    def _keys(cls, keys: dict[str, str]) -> dict[str, str]:
        for kid, text in keys.items():
            public_key(kid, text)
        return keys


def public_key(kid: str, text: str) -> bytes:
    """An Ed25519 public key written 'hex:…' or 'base64:…' (raises ValueError naming the key id)."""
    if not text.startswith(("hex:", "base64:")):
        raise ValueError(f"qr_keys.{kid}: write it 'hex:…' or 'base64:…'")
    try:
        raw = bytes.fromhex(text[4:]) if text.startswith("hex:") else base64.b64decode(text[7:], validate=True)
    except (ValueError, binascii.Error) as exc:
        raise ValueError(f"qr_keys.{kid}: {exc}") from exc
    if len(raw) != 32:
        raise ValueError(f"qr_keys.{kid}: an Ed25519 public key is 32 bytes, not {len(raw)}")
    return raw


class ReadDecoder:
    """Turns one read's text into an event; anything doubtful is Unreadable, never a member."""

    def __init__(self, settings: ReadSettings) -> None:
        self.name = settings.name
        self.settings = settings
        self._rules = ScanRules(member_prefixes=settings.member_prefixes, coupon_prefixes=settings.coupon_prefixes)
        keys = {kid: public_key(kid, text) for kid, text in settings.qr_keys.items()}
        self._qr = QRVerifier(keys, window_s=settings.qr_window_s, accept_static=settings.accept_static_qr)

    def source_of(self, text: str) -> Source:
        if self.settings.role != "auto":
            return "magstripe" if self.settings.role == "magstripe" else "barcode"
        return "magstripe" if text.startswith(_SWIPE_STARTS) else "barcode"

    def decode(self, text: str, now: float) -> DriverEvent:  # noqa: PLR0911 - one answer per kind of read
        """The event for ``text`` read at ``now`` (Unix seconds; dynamic QR codes are time-limited)."""
        if self.source_of(text) == "magstripe":
            swipe = decode_swipe(text, luhn=self.settings.luhn)
            if isinstance(swipe, Swipe):
                return CardRead(self.name, "magstripe", swipe.pan, swipe.expiry)
            return Unreadable(self.name, "magstripe", swipe.reason, swipe.detail)
        scanned = classify_scan(text, self._rules)
        if isinstance(scanned, MemberCard):
            return CardRead(self.name, "barcode", scanned.number)
        if isinstance(scanned, Coupon):
            return CouponScan(self.name, scanned.code)
        if isinstance(scanned, MemberQR):
            verified = self._qr.verify(scanned.text, now)
            if isinstance(verified, Verified):
                return verified.member_code(self.name)
            return Unreadable(self.name, "barcode", verified.reason, verified.detail)
        if isinstance(scanned, Product):
            return Unreadable(self.name, "barcode", "product_code", "a product barcode on the member scanner")
        assert isinstance(scanned, ScanRejected)
        return Unreadable(self.name, "barcode", scanned.reason, scanned.detail)
