"""Members' personal data at rest: AES-256-GCM per field, keyed hashes for look-ups (pure, no I/O).

Head office keeps one personal-data key (``[centre] personal_data_key_*``,
at least 16 bytes).  Two keys are derived from it with HKDF-SHA256 under
different labels: an AES-256-GCM key for the text and an HMAC-SHA256 key for
the look-up hashes, so neither use can stand in for the other.

A field is stored as ``v1.<key id>.<base64url(nonce | ciphertext | tag)>``.
The associated data binds the member id and the field's name: a ciphertext
copied to another member's row, or from the address into the name, fails to
decrypt instead of showing one member's data as another's.  The key id (8 hex
digits of a hash of the derived key, which tells nothing about the key) says
which key a value was written with, so a head office started with another key
says so plainly instead of "decryption failed".

Phone numbers and ID numbers are found through HMACs of their normalised form
under the derived HMAC key: equal numbers give equal hashes, and without the
key a hash cannot be tested against a guess (a phone number has few enough
digits to be guessed from a plain hash).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
import unicodedata

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from agent.errors import LaneError

MIN_KEY_BYTES = 16
VERSION = "v1"
_NONCE_BYTES = 12  # AES-GCM's standard nonce; random per value (2^-32 collision risk only after ~2^32 values)
_SALT = b"lane-membership member centre personal data"
_AEAD_INFO = b"v1 aes-256-gcm"
_HMAC_INFO = b"v1 hmac-sha256 look-up"
_KEY_ID_LABEL = b"lane-membership personal data key id v1\x00"
_TOKEN = re.compile(r"v1\.([0-9a-f]{8})\.([A-Za-z0-9_-]+)")
MAX_TEXT_BYTES = 4096  # a name, an address, an e-mail address: far below this


class PersonalDataError(LaneError):
    """Personal data that cannot be encrypted or decrypted here; ``code`` says why (no data in the message)."""

    code = "personal_data_error"

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _derive(key: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=_SALT, info=info).derive(key)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def normalise_phone(phone: str) -> str:
    """The digits of a phone number; a mainland mobile loses its country code (+86 / 0086 / 86).

    ``+86 138-0013-8000``, ``8613800138000`` and ``138 0013 8000`` are one
    number.  Raises ValueError (naming no digits) for fewer than 5 or more than
    15 digits (E.164's limit).
    """
    digits = "".join(ch for ch in unicodedata.normalize("NFKC", phone) if ch.isascii() and ch.isdigit())
    for prefix in ("0086", "86"):
        rest = digits[len(prefix) :]
        if digits.startswith(prefix) and len(rest) == 11 and rest.startswith("1"):
            digits = rest
            break
    if not 5 <= len(digits) <= 15:
        raise ValueError("a phone number has 5-15 digits")
    return digits


def normalise_id_number(id_number: str) -> str:
    """An ID number as compared: NFKC, no spaces, upper-cased (a resident ID's check letter is X or x)."""
    text = "".join(unicodedata.normalize("NFKC", id_number).split()).upper()
    if not 4 <= len(text) <= 64:
        raise ValueError("an ID number is 4-64 characters")
    return text


class PersonalData:
    """The two derived keys of one personal-data key; immutable, safe to share between threads."""

    __slots__ = ("_aead", "_hmac_key", "key_id")

    def __init__(self, key: bytes) -> None:
        if len(key) < MIN_KEY_BYTES:
            raise PersonalDataError("weak_key", f"the personal-data key must be at least {MIN_KEY_BYTES} bytes")
        aead_key = _derive(key, _AEAD_INFO)
        self._aead = AESGCM(aead_key)
        self._hmac_key = _derive(key, _HMAC_INFO)
        self.key_id = hashlib.sha256(_KEY_ID_LABEL + aead_key).hexdigest()[:8]

    def __repr__(self) -> str:
        return f"PersonalData(key_id={self.key_id!r})"

    @staticmethod
    def _associated(member_id: str, field: str) -> bytes:
        # NUL cannot occur in either (ids are checked text), so the pair is unambiguous.
        return b"\x00".join((VERSION.encode(), member_id.encode(), field.encode()))

    def encrypt(self, member_id: str, field: str, text: str) -> str:
        """``text`` encrypted for ``member_id``'s ``field``: ``v1.<key id>.<base64url(nonce|ciphertext|tag)>``."""
        data = text.encode("utf-8")
        if len(data) > MAX_TEXT_BYTES:
            raise PersonalDataError("too_long", f"{field}: at most {MAX_TEXT_BYTES} bytes")
        nonce = os.urandom(_NONCE_BYTES)
        sealed = self._aead.encrypt(nonce, data, self._associated(member_id, field))
        return f"{VERSION}.{self.key_id}.{_b64(nonce + sealed)}"

    def decrypt(self, member_id: str, field: str, token: str) -> str:
        """The text of a value ``encrypt`` made for this member and field.

        Raises PersonalDataError: ``wrong_key`` (another key wrote it),
        ``bad_format``, or ``not_this_field`` (altered, or copied from another
        member or field).
        """
        match = _TOKEN.fullmatch(token)
        if match is None:
            raise PersonalDataError("bad_format", f"{field} of member {member_id!r} is not a v1 encrypted value")
        if match[1] != self.key_id:
            raise PersonalDataError(
                "wrong_key",
                f"personal data was encrypted with key {match[1]}, this head office has key {self.key_id}",
            )
        try:
            raw = _unb64(match[2])
        except (binascii.Error, ValueError):
            raise PersonalDataError("bad_format", f"{field} of member {member_id!r} is not valid base64") from None
        if len(raw) < _NONCE_BYTES + 16:
            raise PersonalDataError("bad_format", f"{field} of member {member_id!r} is too short")
        try:
            data = self._aead.decrypt(raw[:_NONCE_BYTES], raw[_NONCE_BYTES:], self._associated(member_id, field))
        except InvalidTag:
            raise PersonalDataError(
                "not_this_field",
                f"{field} of member {member_id!r} does not decrypt: altered, or copied from another member or field",
            ) from None
        return data.decode("utf-8")

    def _hash(self, label: bytes, text: str) -> str:
        return hmac.new(self._hmac_key, label + b"\x00" + text.encode("utf-8"), hashlib.sha256).hexdigest()

    def phone_hash(self, phone: str) -> str:
        """The keyed hash a phone number is looked up by (64 hex); ValueError for a number that is none."""
        return self._hash(b"phone", normalise_phone(phone))

    def id_number_hash(self, id_number: str) -> str:
        """The keyed hash of an ID number (upper-cased, spaces removed); ValueError when it is not one."""
        return self._hash(b"id_number", normalise_id_number(id_number))


def key_id_of(token: str) -> str | None:
    """The key id an encrypted value names, or None when it is not one."""
    match = _TOKEN.fullmatch(token)
    return None if match is None else match[1]
