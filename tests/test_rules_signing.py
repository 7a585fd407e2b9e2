"""Signed ruleset envelopes (sync/signing.py): the round trip, and each refusal code with a concrete tampering."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
from typing import Any

import pytest
from conftest import RULES_888
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from sync import signing
from sync.signing import EnvelopeError

pytestmark = pytest.mark.timeout(60)

SHANGHAI = dt.timezone(dt.timedelta(hours=8))
WHEN = dt.datetime(2026, 12, 5, 0, 0, tzinfo=SHANGHAI)
KEY = Ed25519PrivateKey.generate()
OTHER = Ed25519PrivateKey.generate()
KEYS: dict[str, Ed25519PublicKey] = {"hq-2026": KEY.public_key()}
TOML = RULES_888.read_text(encoding="utf-8")
VERSION = "2026.11.1"  # config/rules/888-mall.toml's [ruleset] version


def envelope(
    toml: str = TOML, *, version: str = VERSION, serial: int = 7, key: Ed25519PrivateKey = KEY, key_id: str = "hq-2026"
) -> bytes:
    return signing.build_envelope(
        toml, version=version, serial=serial, effective_from=WHEN, key_id=key_id, private_key=key
    )


def edited(payload: bytes, **changes: Any) -> bytes:
    doc = json.loads(payload)
    doc.update(changes)
    return json.dumps(doc).encode()


def refused(payload: bytes, keys: dict[str, Ed25519PublicKey] = KEYS, newest: int | None = None) -> EnvelopeError:
    with pytest.raises(EnvelopeError) as caught:
        signing.verify(payload, keys, newest=newest)
    assert caught.value.code in signing.REFUSAL_CODES
    assert caught.value.message
    return caught.value


def test_the_toml_version_is_what_the_tests_assume() -> None:
    assert f'version = "{VERSION}"' in TOML


def test_round_trip() -> None:
    payload = envelope()
    verified = signing.verify(payload, KEYS)
    env = verified.envelope
    assert (env.serial, env.version, env.key_id, env.effective_from) == (7, VERSION, "hq-2026", WHEN)
    assert env.toml == TOML
    assert verified.ruleset.id == "888-mall"
    assert verified.ruleset.version == VERSION
    # The digest lanes journal with each sale is the one head office's library computes from the same text.
    assert verified.ruleset.digest == hashlib.sha256(TOML.encode()).hexdigest() == env.sha256
    # Strictly newer than the serial in force: accepted.
    assert signing.verify(payload, KEYS, newest=6).envelope.serial == 7


def test_the_signature_covers_exactly_the_documented_bytes() -> None:
    """docs/downlink.md: the prefix, then the canonical JSON (sorted keys, no spaces) of five fields."""
    doc = json.loads(envelope())
    assert set(doc) == {"v", "kind", "serial", "version", "effective_from", "sha256", "key_id", "signature", "toml"}
    assert (doc["v"], doc["kind"]) == (1, "ruleset")
    assert doc["sha256"] == hashlib.sha256(doc["toml"].encode("utf-8")).hexdigest()
    assert doc["effective_from"] == "2026-12-05T00:00:00+08:00"
    message = (
        b"lane-membership ruleset v1\n"
        + (
            '{"effective_from":"2026-12-05T00:00:00+08:00","key_id":"hq-2026","serial":7,'
            f'"sha256":"{doc["sha256"]}","version":"{VERSION}"}}'
        ).encode()
    )
    KEY.public_key().verify(base64.b64decode(doc["signature"]), message)  # raises if it were anything else


def test_a_non_ascii_version_field_is_signed_as_utf8() -> None:
    text = signing.signing_input(effective_from="t", key_id="k", serial=1, sha256="s", version="版本")
    assert text.endswith('"version":"版本"}'.encode())


def test_a_flipped_signature_byte_is_bad_signature() -> None:
    doc = json.loads(envelope())
    raw = bytearray(base64.b64decode(doc["signature"]))
    raw[10] ^= 0x01
    exc = refused(edited(envelope(), signature=base64.b64encode(bytes(raw)).decode()))
    assert exc.code == "bad_signature"


def test_toml_altered_after_signing_is_digest_mismatch() -> None:
    altered = TOML.replace('version = "2026.11.1"', 'version = "2026.11.1"\n# one more line', 1)
    exc = refused(edited(envelope(), toml=altered))
    assert exc.code == "digest_mismatch"


def test_a_new_digest_for_altered_toml_breaks_the_signature() -> None:
    altered = TOML + "\n# tampered\n"
    exc = refused(edited(envelope(), toml=altered, sha256=hashlib.sha256(altered.encode()).hexdigest()))
    assert exc.code == "bad_signature"


@pytest.mark.parametrize(
    ("field", "value"),
    [("serial", 8), ("effective_from", "2026-12-04T00:00:00+08:00"), ("version", "2026.11.2")],
)
def test_every_signed_field_is_covered(field: str, value: object) -> None:
    assert refused(edited(envelope(), **{field: value})).code == "bad_signature"


def test_signed_with_another_key_is_bad_signature() -> None:
    exc = refused(envelope(key=OTHER))
    assert exc.code == "bad_signature"
    assert "hq-2026" in exc.message


def test_an_unknown_key_id_is_unknown_key() -> None:
    exc = refused(envelope(key=OTHER, key_id="hq-rogue"))
    assert exc.code == "unknown_key"
    assert "hq-rogue" in exc.message


def test_no_keys_configured_refuses_everything_as_unknown_key() -> None:
    exc = refused(envelope(), keys={})
    assert exc.code == "unknown_key"
    assert "sync.rules_keys is empty" in exc.message


def test_a_version_other_than_the_tomls_is_version_mismatch() -> None:
    exc = refused(envelope(version="2026.12.1"))
    assert exc.code == "version_mismatch"
    assert "2026.12.1" in exc.message
    assert VERSION in exc.message


def test_toml_that_does_not_parse_is_invalid_ruleset() -> None:
    exc = refused(envelope("[ruleset\nid = ", version="1"))
    assert exc.code == "invalid_ruleset"
    assert "toml_syntax" in exc.message


def test_a_ruleset_that_does_not_compile_is_invalid_ruleset() -> None:
    broken = TOML.replace('tiers = ["gold"]', 'tiers = ["platinum"]', 1)
    assert broken != TOML
    exc = refused(envelope(broken))
    assert exc.code == "invalid_ruleset"
    assert "unknown_tier" in exc.message


@pytest.mark.parametrize("newest", [7, 8, 100])
def test_an_older_serial_replayed_is_stale_serial(newest: int) -> None:
    exc = refused(envelope(serial=7), newest=newest)
    assert exc.code == "stale_serial"
    assert str(newest) in exc.message


def test_stale_is_decided_after_the_signature() -> None:
    """A forged envelope with an old serial is a forgery first: the count says what it was."""
    assert refused(envelope(key=OTHER, serial=1), newest=7).code == "bad_signature"


def test_an_oversize_envelope_is_refused_before_parsing() -> None:
    big = TOML + "#" * signing.MAX_ENVELOPE_BYTES
    payload = edited(envelope(), toml=big)
    assert len(payload) > signing.MAX_ENVELOPE_BYTES
    exc = refused(payload)
    assert exc.code == "bad_envelope"
    assert "above the limit" in exc.message
    with pytest.raises(ValueError, match="above the limit"):
        envelope(big)  # head office refuses to publish what every lane would refuse


@pytest.mark.parametrize(
    "payload",
    [b"", b"not json", b"\xff\xfe{}", b'{"v":1,', b'{"v": NaN}', b'{"v":1,"v":1}'],
    ids=["empty", "text", "not-utf8", "truncated", "nan", "duplicate-key"],
)
def test_non_json_is_bad_json(payload: bytes) -> None:
    assert refused(payload).code == "bad_json"


def _without(field: str) -> bytes:
    doc = json.loads(envelope())
    del doc[field]
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    ("payload", "hint"),
    [
        (b"[]", "JSON object"),
        (b'"ruleset"', "JSON object"),
        (_without("signature"), "missing signature"),
        (edited(envelope(), extra=1), "unknown extra"),
        (edited(envelope(), v=2), "v:"),
        (edited(envelope(), v=True), "v:"),
        (edited(envelope(), kind="members"), "kind"),
        (edited(envelope(), serial="7"), "serial"),
        (edited(envelope(), serial=True), "serial"),
        (edited(envelope(), serial=0), "serial"),
        (edited(envelope(), serial=2**53), "serial"),
        (edited(envelope(), serial=7.0), "serial"),
        (edited(envelope(), version=""), "version"),
        (edited(envelope(), version="a b"), "version"),
        (edited(envelope(), effective_from="2026-12-05T00:00:00"), "UTC offset"),
        (edited(envelope(), effective_from="tomorrow"), "ISO 8601"),
        (edited(envelope(), effective_from="2026-12-05T00:00:00+08:00" + " " * 64), "effective_from"),
        (edited(envelope(), sha256="A" * 64), "sha256"),
        (edited(envelope(), sha256="ab"), "sha256"),
        (edited(envelope(), key_id="a/b"), "key_id"),
        (edited(envelope(), key_id=""), "key_id"),
        (edited(envelope(), signature="!!!!"), "base64"),
        (edited(envelope(), signature=base64.b64encode(b"x" * 63).decode()), "64 bytes"),
        (edited(envelope(), toml=""), "toml"),
        (edited(envelope(), toml=["x"]), "toml"),
    ],
)
def test_malformed_fields_are_bad_envelope(payload: bytes, hint: str) -> None:
    exc = refused(payload)
    assert exc.code == "bad_envelope"
    assert hint in exc.message


def test_the_refusal_message_never_quotes_the_toml() -> None:
    altered = TOML + "\n# secret-marker-123\n"
    for payload in (edited(envelope(), toml=altered), envelope(altered.replace("[ruleset]", "[rulezet]"), version="1")):
        assert "secret-marker-123" not in refused(payload).message


def test_build_needs_a_utc_offset() -> None:
    with pytest.raises(ValueError, match="UTC offset"):
        signing.build_envelope(
            TOML, version=VERSION, serial=1, effective_from=WHEN.replace(tzinfo=None), key_id="k", private_key=KEY
        )


def test_public_keys_as_lanes_configure_them() -> None:
    raw = KEY.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    text = signing.public_key_text(KEY.public_key())
    assert text == "hex:" + raw.hex()
    keys = signing.public_keys({"hq-2026": text.upper().replace("HEX:", "hex:")})
    assert signing.verify(envelope(), keys).envelope.serial == 7
    with pytest.raises(ValueError, match="hex:"):
        signing.public_key_from_text("base64:" + base64.b64encode(raw).decode())


def test_same_as_tells_a_redelivery_from_a_new_publication() -> None:
    first = signing.decode_envelope(envelope())
    assert first.same_as(signing.decode_envelope(envelope()))  # Ed25519 is deterministic
    assert not first.same_as(signing.decode_envelope(envelope(serial=8)))
