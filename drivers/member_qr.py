"""Member QR codes from the phone app: the formats, head office's signing, and the lane's offline check.

The full description, with examples and key rotation, is ``docs/member-qr.md``;
in short, a QR code's text is one of::

    LM1.<kid>.<member_id>.<issued>.<nonce>.<sig>    dynamic: signed by head office, valid briefly
    LM0.<member_id>.<check>                         static: a printed member number, unsigned

* ``kid``: which head-office key signed it, 1-8 of ``[0-9A-Za-z_-]``;
* ``member_id``: head office's member id, 1-32 of ``[0-9A-Za-z_-]`` (no '.');
* ``issued``: when head office signed it, Unix seconds, decimal, no leading zeros;
* ``nonce``: 9 random bytes, base64url without padding (12 characters);
* ``sig``: the Ed25519 signature (64 bytes, base64url without padding,
  86 characters) of the ASCII text before the last '.', so it covers the
  version, key id, member, time and nonce;
* ``check``: the first 3 bytes of SHA-256 of the text before the last '.',
  base64url (4 characters).  It is not a signature (anyone can make one); it
  stops a code that a scanner or the wrong keymap changed (a German layout
  swaps Y and Z) from naming another member.

Base64url text must be canonical (what encoding the bytes gives), so every
code has exactly one spelling and no character can change without the check
failing.  A whole code is at most ``MAX_CODE_LENGTH`` characters; a typical
dynamic one is about 125, which a phone shows as a version 8 QR symbol.

A lane accepts a dynamic code from ``issued - skew_s`` to ``issued + window_s
+ skew_s`` and only once: ``QRVerifier`` remembers every code it accepted until
it expires (bounded by ``cache_size``), so a screenshot shown again, even
within the window, is refused as ``replayed``.  Static codes are refused
unless the lane sets ``accept_static``: they prove nothing that a printed
card number does not, and a screenshot of one works for ever.
"""

from __future__ import annotations

import base64
import hashlib
import heapq
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from drivers.base import MemberCode, Source, Unreadable

DYNAMIC = "LM1"
STATIC = "LM0"
MAX_CODE_LENGTH = 160
NONCE_BYTES = 9
SIGNATURE_BYTES = 64
CHECK_BYTES = 3

_KID = re.compile(r"[0-9A-Za-z_-]{1,8}", re.ASCII)
_MEMBER_ID = re.compile(r"[0-9A-Za-z_-]{1,32}", re.ASCII)
_ISSUED = re.compile(r"0|[1-9][0-9]{0,10}", re.ASCII)
_B64URL = re.compile(r"[0-9A-Za-z_-]*", re.ASCII)
# What makes a scanned text a member code at all (then it is either right or refused).
_SCHEME = re.compile(r"LM[0-9]+\.", re.ASCII)


@dataclass(frozen=True, slots=True)
class Rejected:
    """A code that must not identify anyone; ``reason`` is a short code, ``detail`` for a technician."""

    reason: str
    detail: str = ""

    def unreadable(self, device: str, source: Source = "barcode") -> Unreadable:
        """The driver event for this rejection on ``device``."""
        return Unreadable(device, source, self.reason, self.detail)


@dataclass(frozen=True, slots=True)
class StaticCode:
    """A well-formed static code (``LM0``)."""

    member_id: str


@dataclass(frozen=True, slots=True)
class SignedCode:
    """A well-formed dynamic code (``LM1``), not yet verified."""

    kid: str
    member_id: str
    issued: int
    nonce: bytes
    signature: bytes = field(repr=False)
    signed_text: str = field(repr=False)  # the text the signature is over


@dataclass(frozen=True, slots=True)
class Verified:
    """A code the lane accepts: whose it is, and whether it was a signed, time-limited one."""

    member_id: str
    dynamic: bool
    kid: str | None = None
    issued: int | None = None

    def member_code(self, device: str, source: Source = "barcode") -> MemberCode:
        """The driver event for this code on ``device``."""
        return MemberCode(device, source, self.member_id, self.dynamic)


def is_member_code(text: str) -> bool:
    """Whether ``text`` claims to be a member code (``LM<version>.``), good or bad."""
    return _SCHEME.match(text) is not None


def parse_member_code(text: str) -> StaticCode | SignedCode | Rejected:
    """The pieces of a member code, checked for form only (a static code's check included); never raises."""
    if len(text) > MAX_CODE_LENGTH:
        return Rejected("malformed", f"{len(text)} characters; a member code has at most {MAX_CODE_LENGTH}")
    parts = text.split(".")
    if parts[0] == STATIC:
        return _parse_static(parts)
    if parts[0] == DYNAMIC:
        return _parse_dynamic(parts)
    if _SCHEME.match(text):
        return Rejected("unsupported_version", "a member code version this lane does not know")
    return Rejected("malformed", "not a member code")


def _parse_static(parts: list[str]) -> StaticCode | Rejected:
    if len(parts) != 3 or not _MEMBER_ID.fullmatch(parts[1]):
        return Rejected("malformed", "a static member code is LM0.<member id>.<check>")
    if parts[2] != _check(f"{STATIC}.{parts[1]}"):
        return Rejected("bad_check", "the static member code's check characters do not match")
    return StaticCode(parts[1])


def _parse_dynamic(parts: list[str]) -> SignedCode | Rejected:
    if len(parts) != 6:
        return Rejected("malformed", "a dynamic member code has six parts separated by '.'")
    _, kid, member_id, issued, nonce_text, sig_text = parts
    nonce = _b64decode(nonce_text, NONCE_BYTES)
    signature = _b64decode(sig_text, SIGNATURE_BYTES)
    for ok, piece in (
        (_KID.fullmatch(kid), "key id"),
        (_MEMBER_ID.fullmatch(member_id), "member id"),
        (_ISSUED.fullmatch(issued), "issue time"),
    ):
        if not ok:
            return Rejected("malformed", f"the dynamic member code's {piece} is not well formed")
    if nonce is None:
        return Rejected("malformed", f"the nonce is not {NONCE_BYTES} bytes of canonical base64url")
    if signature is None:
        return Rejected("malformed", f"the signature is not {SIGNATURE_BYTES} bytes of canonical base64url")
    return SignedCode(
        kid=kid,
        member_id=member_id,
        issued=int(issued),
        nonce=nonce,
        signature=signature,
        signed_text=".".join(parts[:5]),
    )


class QRVerifier:
    """Verifies member codes offline, with head office's public keys, and refuses replays.

    Keeps state (the codes already accepted), so one verifier per lane
    scanner, used from one thread.  ``public_keys`` maps key ids to raw
    32-byte Ed25519 public keys.
    """

    def __init__(
        self,
        public_keys: Mapping[str, bytes],
        *,
        window_s: int = 60,
        skew_s: int = 30,
        cache_size: int = 10_000,
        accept_static: bool = False,
    ) -> None:
        if window_s < 1 or skew_s < 0 or cache_size < 1:
            raise ValueError("window_s and cache_size must be at least 1, and skew_s not negative")
        self._keys: dict[str, Ed25519PublicKey] = {}
        for kid, raw in public_keys.items():
            if not _KID.fullmatch(kid):
                raise ValueError(f"key id {kid!r} is not 1-8 of [0-9A-Za-z_-]")
            if len(raw) != 32:
                raise ValueError(f"key {kid!r}: an Ed25519 public key is 32 bytes, not {len(raw)}")
            try:
                self._keys[kid] = Ed25519PublicKey.from_public_bytes(bytes(raw))
            except ValueError as exc:
                raise ValueError(f"key {kid!r} is not an Ed25519 public key: {exc}") from exc
        self.window_s = window_s
        self.skew_s = skew_s
        self.cache_size = cache_size
        self.accept_static = accept_static
        self._seen: set[tuple[str, str, int, bytes]] = set()
        self._expiries: list[tuple[int, tuple[str, str, int, bytes]]] = []
        # The latest expiry among the codes already forgotten: a code expiring no later
        # might be one of them, so it is refused (this only matters if the clock goes back).
        self._forgotten_until = -1

    def verify(self, text: str, now_unix: float) -> Verified | Rejected:
        """Whether ``text``, scanned at ``now_unix``, identifies a member; never raises.

        A dynamic code that passes is remembered, so the same code again is ``replayed``.
        """
        parsed = parse_member_code(text)
        if isinstance(parsed, Rejected):
            return parsed
        if isinstance(parsed, StaticCode):
            if not self.accept_static:
                return Rejected("static_not_accepted", "this lane accepts only the app's dynamic member codes")
            return Verified(parsed.member_id, dynamic=False)
        key = self._keys.get(parsed.kid)
        if key is None:
            return Rejected("unknown_key", f"signed with key {parsed.kid!r}, which this lane does not have")
        try:
            key.verify(parsed.signature, parsed.signed_text.encode("ascii"))
        except InvalidSignature:
            return Rejected("bad_signature", f"the signature does not match key {parsed.kid!r}")
        # Only now, with the code known to be head office's, does it touch the replay cache:
        # a forged code must not be able to block a genuine one.
        return self._admit(parsed, now_unix)

    def _admit(self, code: SignedCode, now: float) -> Verified | Rejected:
        expires = code.issued + self.window_s + self.skew_s
        if now > expires:
            return Rejected("expired", f"issued {now - code.issued:.0f} s ago; valid for {self.window_s} s")
        if now < code.issued - self.skew_s:
            return Rejected("not_yet_valid", f"issued {code.issued - now:.0f} s in the future (clock skew?)")
        self._forget_expired(now)
        if expires <= self._forgotten_until:
            return Rejected("expired", "older than codes this lane no longer remembers (did the clock go back?)")
        entry = (code.kid, code.member_id, code.issued, code.nonce)
        if entry in self._seen:
            return Rejected("replayed", "this code was already used")
        if len(self._seen) >= self.cache_size:
            # Forgetting a live code would let it be used twice: refuse instead.  Far beyond
            # any real lane's rate (cache_size codes within one window).
            return Rejected("replay_cache_full", f"{len(self._seen)} codes accepted within one window")
        self._seen.add(entry)
        heapq.heappush(self._expiries, (expires, entry))
        return Verified(code.member_id, dynamic=True, kid=code.kid, issued=code.issued)

    def _forget_expired(self, now: float) -> None:
        while self._expiries and self._expiries[0][0] < now:
            expires, entry = heapq.heappop(self._expiries)
            self._seen.discard(entry)
            self._forgotten_until = max(self._forgotten_until, expires)


def sign_member_code(private_key_raw: bytes, kid: str, member_id: str, issued_unix: int, nonce: bytes) -> str:
    """A dynamic member code, as head office signs it (raw 32-byte Ed25519 private key; ValueError on bad input).

    ``nonce`` must be ``NONCE_BYTES`` fresh random bytes (``secrets.token_bytes``).
    """
    if not _KID.fullmatch(kid):
        raise ValueError(f"key id {kid!r} is not 1-8 of [0-9A-Za-z_-]")
    if not _MEMBER_ID.fullmatch(member_id):
        raise ValueError(f"member id {member_id!r} is not 1-32 of [0-9A-Za-z_-]")
    if not _ISSUED.fullmatch(str(issued_unix)):
        raise ValueError(f"issue time {issued_unix!r} is not Unix seconds of up to 11 digits")
    if len(nonce) != NONCE_BYTES:
        raise ValueError(f"the nonce is {NONCE_BYTES} bytes, not {len(nonce)}")
    if len(private_key_raw) != 32:
        raise ValueError("an Ed25519 private key is 32 bytes")
    body = f"{DYNAMIC}.{kid}.{member_id}.{issued_unix}.{_b64encode(nonce)}"
    signature = Ed25519PrivateKey.from_private_bytes(bytes(private_key_raw)).sign(body.encode("ascii"))
    return f"{body}.{_b64encode(signature)}"


def static_member_code(member_id: str) -> str:
    """The static member code for ``member_id`` (ValueError if it is not 1-32 of ``[0-9A-Za-z_-]``)."""
    if not _MEMBER_ID.fullmatch(member_id):
        raise ValueError(f"member id {member_id!r} is not 1-32 of [0-9A-Za-z_-]")
    body = f"{STATIC}.{member_id}"
    return f"{body}.{_check(body)}"


def _check(body: str) -> str:
    return _b64encode(hashlib.sha256(body.encode("ascii")).digest()[:CHECK_BYTES])


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str, size: int) -> bytes | None:
    """``size`` bytes from canonical unpadded base64url, else None."""
    if len(text) != (size * 8 + 5) // 6 or not _B64URL.fullmatch(text):
        return None
    data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    # Unused low bits must be zero, so that one byte string has one spelling.
    return data if _b64encode(data) == text else None
