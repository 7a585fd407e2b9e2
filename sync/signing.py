"""Signed ruleset envelopes: head office builds them, lanes verify them (docs/downlink.md, "Rulesets").

Pure: no I/O, no clock.  An envelope is one JSON object::

    {"v":1,"kind":"ruleset","serial":7,"version":"888-2026.12",
     "effective_from":"2026-12-05T00:00:00+08:00","sha256":"…","key_id":"hq-2026",
     "signature":"base64 Ed25519","toml":"…"}

The signature is Ed25519 over ``SIGNING_PREFIX`` followed by the canonical
JSON (sorted keys, no spaces, UTF-8) of the five fields ``effective_from``,
``key_id``, ``serial``, ``sha256`` and ``version`` exactly as the envelope
writes them.  ``sha256`` binds the TOML text to the signature, and
``version`` must be the TOML's ``[ruleset] version``.

Every refusal is a ``EnvelopeError`` with one of ``REFUSAL_CODES`` and a
message that names the field, never quoting the TOML.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agent.errors import LaneError, RulesetError
from agent.ruleset import Ruleset, parse_ruleset

SIGNING_PREFIX: Final = b"lane-membership ruleset v1\n"
ENVELOPE_VERSION: Final = 1
MAX_ENVELOPE_BYTES: Final = 1024 * 1024  # the whole message; a ruleset is some 10-50 KB
MAX_SERIAL: Final = 2**53 - 1  # exact in every JSON reader
SIGNED_FIELDS: Final = ("effective_from", "key_id", "serial", "sha256", "version")
ENVELOPE_FIELDS: Final = frozenset({"v", "kind", *SIGNED_FIELDS, "signature", "toml"})

RefusalCode = Literal[
    "bad_json",
    "bad_envelope",
    "unknown_key",
    "bad_signature",
    "digest_mismatch",
    "version_mismatch",
    "invalid_ruleset",
    "stale_serial",
]
REFUSAL_CODES: Final[tuple[RefusalCode, ...]] = (
    "bad_json",
    "bad_envelope",
    "unknown_key",
    "bad_signature",
    "digest_mismatch",
    "version_mismatch",
    "invalid_ruleset",
    "stale_serial",
)

_KEY_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:+-]{0,39}")  # as agent.ruleset_schema.Header.version
_SHA256 = re.compile(r"[0-9a-f]{64}")
_MAX_TIME_TEXT = 64


class EnvelopeError(LaneError):
    """A ruleset envelope that a lane must not use; ``code`` is one of ``REFUSAL_CODES``."""

    def __init__(self, code: RefusalCode, message: str) -> None:
        super().__init__(message)
        self.code: RefusalCode = code
        self.message = message


@dataclass(frozen=True, slots=True)
class Envelope:
    """A structurally valid envelope (not yet verified)."""

    serial: int
    version: str
    effective_from: dt.datetime
    effective_from_text: str  # as signed
    sha256: str
    key_id: str
    signature: bytes
    toml: str

    def signing_input(self) -> bytes:
        """The bytes the signature covers."""
        return signing_input(
            effective_from=self.effective_from_text,
            key_id=self.key_id,
            serial=self.serial,
            sha256=self.sha256,
            version=self.version,
        )

    def document(self) -> dict[str, Any]:
        """The envelope as its JSON object."""
        return {
            "v": ENVELOPE_VERSION,
            "kind": "ruleset",
            "serial": self.serial,
            "version": self.version,
            "effective_from": self.effective_from_text,
            "sha256": self.sha256,
            "key_id": self.key_id,
            "signature": base64.b64encode(self.signature).decode("ascii"),
            "toml": self.toml,
        }

    def same_as(self, other: Envelope) -> bool:
        """Whether both are the same signed publication (what a retained message re-delivered is)."""
        return (self.serial, self.sha256, self.signature) == (other.serial, other.sha256, other.signature)


@dataclass(frozen=True, slots=True)
class Verified:
    """An envelope whose signature, digest and TOML all check out, with its compiled ruleset."""

    envelope: Envelope
    ruleset: Ruleset


def canonical_json(value: Mapping[str, Any]) -> bytes:
    """Sorted keys, no spaces, UTF-8 (non-ASCII written as itself, not escaped)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def signing_input(*, effective_from: str, key_id: str, serial: int, sha256: str, version: str) -> bytes:
    """``SIGNING_PREFIX`` + the canonical JSON of the signed fields."""
    fields = {
        "effective_from": effective_from,
        "key_id": key_id,
        "serial": serial,
        "sha256": sha256,
        "version": version,
    }
    return SIGNING_PREFIX + canonical_json(fields)


def toml_digest(toml: str) -> str:
    """SHA-256 (hex) of the TOML's UTF-8 bytes: also ``Ruleset.digest`` of the compiled text."""
    return hashlib.sha256(toml.encode("utf-8")).hexdigest()


def public_key_from_text(text: str) -> Ed25519PublicKey:
    """``hex:<64 hex digits>`` (as lanes' ``sync.rules_keys`` write it) → the public key; ValueError otherwise."""
    encoding, _, digits = text.partition(":")
    if encoding != "hex" or not re.fullmatch(r"[0-9a-fA-F]{64}", digits):
        raise ValueError("an Ed25519 public key is written 'hex:<64 hex digits>'")
    return Ed25519PublicKey.from_public_bytes(bytes.fromhex(digits))


def public_keys(texts: Mapping[str, str]) -> dict[str, Ed25519PublicKey]:
    """Every key of a ``sync.rules_keys`` table (already checked by the configuration)."""
    return {key_id: public_key_from_text(text) for key_id, text in texts.items()}


def public_key_text(key: Ed25519PublicKey) -> str:
    """The ``hex:…`` form lanes' ``sync.rules_keys`` take."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "hex:" + raw.hex()


# --- building (head office) ---------------------------------------------------------


def build_envelope(
    toml: str,
    *,
    version: str,
    serial: int,
    effective_from: dt.datetime,
    key_id: str,
    private_key: Ed25519PrivateKey,
) -> bytes:
    """The signed envelope's JSON bytes; ValueError for a field no lane would accept."""
    if effective_from.utcoffset() is None:
        raise ValueError("effective_from needs a UTC offset")
    text = effective_from.isoformat()
    digest = toml_digest(toml)
    message = signing_input(effective_from=text, key_id=key_id, serial=serial, sha256=digest, version=version)
    envelope = Envelope(
        serial=serial,
        version=version,
        effective_from=effective_from,
        effective_from_text=text,
        sha256=digest,
        key_id=key_id,
        signature=private_key.sign(message),
        toml=toml,
    )
    payload = canonical_json(envelope.document())
    try:
        decode_envelope(payload)  # the same checks as a lane's, so head office never publishes a refusal
    except EnvelopeError as exc:
        raise ValueError(exc.message) from exc
    return payload


# --- reading and verifying (lane) ------------------------------------------------------


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {key!r} appears twice")
        out[key] = value
    return out


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _bad(message: str) -> EnvelopeError:
    return EnvelopeError("bad_envelope", message)


def _integer(doc: Mapping[str, Any], key: str) -> int:
    value = doc[key]
    if not isinstance(value, int) or isinstance(value, bool):
        raise _bad(f"{key}: an integer")
    return value


def _text(doc: Mapping[str, Any], key: str, limit: int) -> str:
    value = doc[key]
    if not isinstance(value, str) or not value or len(value) > limit:
        raise _bad(f"{key}: a string of 1 to {limit} characters")
    return value


def _parse(payload: bytes) -> dict[str, Any]:
    if len(payload) > MAX_ENVELOPE_BYTES:
        raise _bad(f"the envelope is {len(payload)} bytes, above the limit of {MAX_ENVELOPE_BYTES}")
    try:
        doc = json.loads(payload.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    # JSONDecodeError is a ValueError; RecursionError: JSON nested deeper than the interpreter's stack.
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise EnvelopeError("bad_json", f"not a JSON document: {exc}") from exc
    if not isinstance(doc, dict):
        raise _bad("the envelope is a JSON object")
    missing, unknown = ENVELOPE_FIELDS - doc.keys(), doc.keys() - ENVELOPE_FIELDS
    if missing or unknown:
        parts = [f"missing {', '.join(sorted(missing))}"] if missing else []
        parts += [f"unknown {', '.join(sorted(unknown))}"] if unknown else []
        raise _bad("fields: " + "; ".join(parts))
    if _integer(doc, "v") != ENVELOPE_VERSION:
        raise _bad(f"v: {doc['v']} is not envelope version {ENVELOPE_VERSION}")
    if doc["kind"] != "ruleset":
        raise _bad("kind: must be 'ruleset'")
    return doc


def _matching(doc: Mapping[str, Any], key: str, limit: int, pattern: re.Pattern[str], what: str) -> str:
    value = _text(doc, key, limit)
    if not pattern.fullmatch(value):
        raise _bad(f"{key}: {what}")
    return value


def _moment(doc: Mapping[str, Any]) -> tuple[dt.datetime, str]:
    text = _text(doc, "effective_from", _MAX_TIME_TEXT)
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError as exc:
        raise _bad("effective_from: an ISO 8601 time with a UTC offset") from exc
    if when.utcoffset() is None:
        raise _bad("effective_from: the time has no UTC offset")
    return when, text


def _signature(doc: Mapping[str, Any]) -> bytes:
    text = _text(doc, "signature", 128)
    try:
        signature = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise _bad("signature: standard base64") from exc
    if len(signature) != 64:
        raise _bad(f"signature: an Ed25519 signature is 64 bytes, not {len(signature)}")
    return signature


def decode_envelope(payload: bytes) -> Envelope:
    """Parse and check an envelope's structure (sizes, types, formats); nothing cryptographic yet."""
    doc = _parse(payload)
    serial = _integer(doc, "serial")
    if not 1 <= serial <= MAX_SERIAL:
        raise _bad(f"serial: 1 to {MAX_SERIAL}")
    version = _matching(doc, "version", 40, _VERSION, "letters, digits and _ . : + - (as [ruleset] version)")
    when, when_text = _moment(doc)
    digest = _matching(doc, "sha256", 64, _SHA256, "64 lowercase hex digits")
    key_id = _matching(doc, "key_id", 64, _KEY_ID, "1-64 letters, digits, '.', '_' or '-'")
    signature = _signature(doc)
    toml = _text(doc, "toml", MAX_ENVELOPE_BYTES)
    return Envelope(serial, version, when, when_text, digest, key_id, signature, toml)


def check_signature(envelope: Envelope, keys: Mapping[str, Ed25519PublicKey]) -> None:
    """The signature by ``keys[key_id]``, then the TOML's digest; raises EnvelopeError."""
    key = keys.get(envelope.key_id)
    if key is None:
        known = ", ".join(sorted(keys)) or "none: sync.rules_keys is empty"
        raise EnvelopeError("unknown_key", f"key_id {envelope.key_id!r} is not in sync.rules_keys (known: {known})")
    try:
        key.verify(envelope.signature, envelope.signing_input())
    except InvalidSignature as exc:
        raise EnvelopeError(
            "bad_signature", f"the signature does not verify with key {envelope.key_id!r} (serial {envelope.serial})"
        ) from exc
    actual = toml_digest(envelope.toml)
    if actual != envelope.sha256:
        raise EnvelopeError(
            "digest_mismatch", f"the TOML's SHA-256 is {actual[:12]}…, the signed sha256 {envelope.sha256[:12]}…"
        )


def compile_envelope(envelope: Envelope, source: str = "") -> Ruleset:
    """Compile the TOML (every check of ``lane-agent rules check``) and match its version; raises EnvelopeError."""
    where = source or f"head office ruleset serial {envelope.serial}"
    try:
        ruleset = parse_ruleset(envelope.toml, source=where)
    except RulesetError as exc:
        first = exc.issues[0] if exc.issues else None
        detail = "" if first is None else f": {first.field or '(top level)'}: {first.message} [{first.code}]"
        more = f" (and {len(exc.issues) - 1} more)" if len(exc.issues) > 1 else ""
        raise EnvelopeError("invalid_ruleset", f"the TOML does not compile{detail}{more}") from exc
    if ruleset.version != envelope.version:
        raise EnvelopeError(
            "version_mismatch", f"the envelope says version {envelope.version!r}, the TOML {ruleset.version!r}"
        )
    return ruleset


def check_serial(envelope: Envelope, newest: int | None) -> None:
    """Refuse an envelope not above ``newest``, the highest serial already taken (None: none yet)."""
    if newest is not None and envelope.serial <= newest:
        raise EnvelopeError(
            "stale_serial", f"serial {envelope.serial} is not above {newest}, the newest this lane has taken"
        )


def verify(payload: bytes, keys: Mapping[str, Ed25519PublicKey], *, newest: int | None = None) -> Verified:
    """Every check in order: structure, key, signature, digest, serial, TOML, version."""
    envelope = decode_envelope(payload)
    check_signature(envelope, keys)
    check_serial(envelope, newest)
    return Verified(envelope, compile_envelope(envelope))


__all__ = [
    "ENVELOPE_VERSION",
    "MAX_ENVELOPE_BYTES",
    "REFUSAL_CODES",
    "SIGNING_PREFIX",
    "Envelope",
    "EnvelopeError",
    "RefusalCode",
    "Verified",
    "build_envelope",
    "canonical_json",
    "check_serial",
    "check_signature",
    "compile_envelope",
    "decode_envelope",
    "public_key_from_text",
    "public_key_text",
    "public_keys",
    "signing_input",
    "toml_digest",
    "verify",
]
