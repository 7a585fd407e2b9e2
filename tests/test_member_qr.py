"""Member QR codes: head office signs, the lane verifies offline; forged, changed, stale and replayed codes fail.

The keys are RFC 8032's Ed25519 test keys (public test vectors, never a
real head office's).  ``docs/member-qr.md``'s worked example is checked
here too, so the document cannot drift from the code.
"""

from __future__ import annotations

import re
import secrets
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from keyrecords import records_for_text

from drivers.base import MemberCode
from drivers.keymap import keymap
from drivers.keystrokes import KeystrokeAssembler
from drivers.member_qr import (
    MAX_CODE_LENGTH,
    NONCE_BYTES,
    QRVerifier,
    Rejected,
    SignedCode,
    StaticCode,
    Verified,
    is_member_code,
    parse_member_code,
    sign_member_code,
    static_member_code,
)

PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# RFC 8032, section 7.1, tests 1 and 2.
HQ1_PRIVATE = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
HQ2_PRIVATE = bytes.fromhex("4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb")
T = 1_765_350_000
NONCE = bytes(range(NONCE_BYTES))
B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def public(private: bytes) -> bytes:
    return Ed25519PrivateKey.from_private_bytes(private).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


HQ1_PUBLIC = public(HQ1_PRIVATE)
HQ2_PUBLIC = public(HQ2_PRIVATE)


def verifier(**kwargs: object) -> QRVerifier:
    return QRVerifier({"hq1": HQ1_PUBLIC, "hq2": HQ2_PUBLIC}, **kwargs)  # type: ignore[arg-type]


def code(member_id: str = "M000123", issued: int = T, nonce: bytes = NONCE, kid: str = "hq1") -> str:
    return sign_member_code(HQ1_PRIVATE if kid == "hq1" else HQ2_PRIVATE, kid, member_id, issued, nonce)


def reason(result: Verified | Rejected | StaticCode | SignedCode) -> str | None:
    return result.reason if isinstance(result, Rejected) else None


def test_rfc8032_public_key() -> None:
    assert HQ1_PUBLIC.hex() == "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"


# --- good codes -------------------------------------------------------------------------------


def test_a_fresh_code_verifies() -> None:
    text = code()
    assert text.startswith("LM1.hq1.M000123.1765350000.AAECAwQFBgcI.")
    assert len(text) <= MAX_CODE_LENGTH
    result = verifier().verify(text, T + 5)
    assert result == Verified("M000123", dynamic=True, kid="hq1", issued=T)
    assert isinstance(result, Verified)
    assert result.member_code("qr-1") == MemberCode("qr-1", "barcode", "M000123", dynamic=True)


def test_key_rotation_both_keys_verify() -> None:
    lane = verifier()
    assert isinstance(lane.verify(code(kid="hq1"), T), Verified)
    assert isinstance(lane.verify(code(kid="hq2"), T), Verified)
    # A code claiming the other key id does not verify.
    forged = code(kid="hq2").replace(".hq2.", ".hq1.", 1)
    assert reason(lane.verify(forged, T)) == "bad_signature"


@given(
    st.from_regex(r"[0-9A-Za-z_-]{1,32}", fullmatch=True),
    st.integers(0, 10**11 - 1),
    st.binary(min_size=NONCE_BYTES, max_size=NONCE_BYTES),
)
@PROPERTY
def test_sign_then_verify_round_trip(member_id: str, issued: int, nonce: bytes) -> None:
    text = code(member_id, issued, nonce)
    assert len(text) <= MAX_CODE_LENGTH
    assert verifier().verify(text, issued) == Verified(member_id, dynamic=True, kid="hq1", issued=issued)


# --- time -------------------------------------------------------------------------------------


def test_window_and_skew_boundaries() -> None:
    text = code()
    assert isinstance(verifier(window_s=60, skew_s=30).verify(text, T + 90), Verified)
    assert reason(verifier(window_s=60, skew_s=30).verify(text, T + 90.001)) == "expired"
    assert isinstance(verifier(window_s=60, skew_s=30).verify(text, T - 30), Verified)
    assert reason(verifier(window_s=60, skew_s=30).verify(text, T - 30.001)) == "not_yet_valid"
    assert reason(verifier(skew_s=0).verify(text, T - 1)) == "not_yet_valid"
    assert reason(verifier().verify(text, T + 86_400)) == "expired"


# --- replay -----------------------------------------------------------------------------------


def test_a_code_is_accepted_once() -> None:
    lane = verifier()
    text = code()
    assert isinstance(lane.verify(text, T + 1), Verified)
    assert reason(lane.verify(text, T + 2)) == "replayed"
    assert reason(lane.verify(text, T + 89)) == "replayed"
    assert reason(lane.verify(text, T + 91)) == "expired"
    # Another nonce in the same second is another code.
    assert isinstance(lane.verify(code(nonce=b"\xff" * NONCE_BYTES), T + 3), Verified)


def test_a_forged_code_does_not_block_the_genuine_one() -> None:
    lane = verifier()
    genuine = code()
    forged = genuine[:-2] + ("AA" if not genuine.endswith("AA") else "BA")
    assert reason(lane.verify(forged, T)) in ("bad_signature", "malformed")
    assert isinstance(lane.verify(genuine, T), Verified)


def test_the_replay_cache_is_bounded_and_fails_closed() -> None:
    lane = verifier(cache_size=3)
    codes = [code(nonce=bytes([i]) * NONCE_BYTES) for i in range(5)]
    for text in codes[:3]:
        assert isinstance(lane.verify(text, T), Verified)
    assert reason(lane.verify(codes[3], T)) == "replay_cache_full"
    # Once the first three have expired they are forgotten, and room is made.
    later = [code(issued=T + 100, nonce=bytes([i]) * NONCE_BYTES) for i in range(3)]
    for text in later:
        assert isinstance(lane.verify(text, T + 100), Verified)
    assert len(lane._seen) == 3
    assert len(lane._expiries) == 3


@given(st.lists(st.tuples(st.integers(0, 7), st.integers(-40, 200), st.integers(0, 300)), max_size=60))
@PROPERTY
def test_replay_cache_property(scans: list[tuple[int, int, int]]) -> None:
    """Any sequence of scans at any times (the clock may go back): each code is accepted at most once."""
    lane = verifier(cache_size=5)
    accepted: set[str] = set()
    for which, issued_offset, now_offset in scans:
        text = code(issued=T + issued_offset, nonce=bytes([which]) * NONCE_BYTES)
        result = lane.verify(text, T + now_offset)
        if isinstance(result, Verified):
            assert text not in accepted
            accepted.add(text)
            assert T + issued_offset - 30 <= T + now_offset <= T + issued_offset + 90
        assert len(lane._seen) <= 5


def test_clock_going_back_does_not_reopen_a_used_code() -> None:
    lane = verifier()
    used = code()
    assert isinstance(lane.verify(used, T), Verified)
    # A code scanned much later makes the lane forget the first one...
    assert isinstance(lane.verify(code(issued=T + 1000), T + 1000), Verified)
    # ...then the clock is set back: the first code must not be accepted again.
    assert reason(lane.verify(used, T + 10)) == "expired"


# --- forged, changed, malformed ---------------------------------------------------------------


def test_every_single_character_change_is_refused() -> None:
    text = code()
    lane = verifier()
    for i in range(len(text)):
        for c in B64URL + ".=+/ ":
            if c != text[i]:
                changed = text[:i] + c + text[i + 1 :]
                assert not isinstance(lane.verify(changed, T), Verified), (i, c)
        assert not isinstance(lane.verify(text[:i] + text[i + 1 :], T), Verified)
        assert not isinstance(lane.verify(text[:i] + text[i] + text[i:], T), Verified)
    # None of that touched the genuine code.
    assert isinstance(lane.verify(text, T), Verified)


def test_every_truncation_is_refused() -> None:
    text = code()
    lane = verifier()
    for i in range(len(text)):
        assert not isinstance(lane.verify(text[:i], T), Verified)


def test_unknown_key_id() -> None:
    assert reason(QRVerifier({"hq2": HQ2_PUBLIC}).verify(code(kid="hq1"), T)) == "unknown_key"


def test_signed_by_another_key_under_a_known_id() -> None:
    rogue = sign_member_code(HQ2_PRIVATE, "hq1", "M000123", T, NONCE)
    assert reason(verifier().verify(rogue, T)) == "bad_signature"


def _pieces(**replace: str) -> str:
    parts = dict(zip(["v", "kid", "member", "issued", "nonce", "sig"], code().split("."), strict=True))
    parts.update(replace)
    return ".".join(parts.values())


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "malformed"),
        ("hello", "malformed"),
        ("LM1", "malformed"),
        ("LM1.", "malformed"),
        ("lm1.hq1.M1.1.AAAAAAAAAAAA." + "A" * 86, "malformed"),
        ("LM2.hq1.M000123.1765350000.AAECAwQFBgcI." + "A" * 86, "unsupported_version"),
        ("LM10.x", "unsupported_version"),
        (_pieces(kid="hq1x_toolong"), "malformed"),
        (_pieces(kid="h.q"), "malformed"),
        (_pieces(kid=""), "malformed"),
        (_pieces(member=""), "malformed"),
        (_pieces(member="M" * 33), "malformed"),
        (_pieces(member="M00 123"), "malformed"),
        (_pieces(member="M00é123"), "malformed"),
        (_pieces(issued="01765350000"), "malformed"),
        (_pieces(issued="+1765350000"), "malformed"),
        (_pieces(issued="176535000000"), "malformed"),
        (_pieces(issued="１７６５３５００００"), "malformed"),
        (_pieces(nonce="AAECAwQFBgc"), "malformed"),
        (_pieces(nonce="AAECAwQFBgcI="), "malformed"),
        (_pieces(nonce="AAECAwQFBgc+"), "malformed"),
        (_pieces(sig="A" * 85), "malformed"),
        (_pieces(sig="A" * 85 + "B"), "malformed"),  # spare bits set: not canonical
        (_pieces(sig="A" * 86 + "=="), "malformed"),
        (code() + ".", "malformed"),
        (code() + "\n", "malformed"),
        ("LM1." + "A" * 200, "malformed"),
    ],
)
def test_malformed_codes(text: str, why: str) -> None:
    assert reason(verifier().verify(text, T)) == why


@given(st.text(max_size=200))
@PROPERTY
def test_garbage_never_raises_and_never_verifies(text: str) -> None:
    assert not isinstance(verifier(accept_static=True).verify(text, T), Verified)


@given(st.lists(st.sampled_from([*code().split("."), "LM1", "LM0", "", "x"]), max_size=8))
@PROPERTY
def test_reassembled_pieces_never_verify_unless_they_are_the_code(pieces: list[str]) -> None:
    text = ".".join(pieces)
    result = verifier().verify(text, T)
    assert not isinstance(result, Verified) or text == code()


# --- static codes -----------------------------------------------------------------------------


def test_static_codes() -> None:
    text = static_member_code("M000123")
    assert re.fullmatch(r"LM0\.M000123\.[0-9A-Za-z_-]{4}", text)
    assert parse_member_code(text) == StaticCode("M000123")
    assert reason(verifier().verify(text, T)) == "static_not_accepted"
    lane = verifier(accept_static=True)
    assert lane.verify(text, T) == Verified("M000123", dynamic=False)
    # Static codes are not time-limited or single-use.
    assert lane.verify(text, T + 10**6) == Verified("M000123", dynamic=False)
    assert reason(lane.verify("LM0.M000123", T)) == "malformed"
    assert reason(lane.verify("LM0.M000123.AAAA", T)) == "bad_check"


def test_static_check_catches_every_single_character_change() -> None:
    text = static_member_code("MYZ000123")
    lane = verifier(accept_static=True)
    for i in range(4, len(text)):
        for c in B64URL:
            if c != text[i]:
                assert not isinstance(lane.verify(text[:i] + c + text[i + 1 :], T), Verified)


@given(st.from_regex(r"[0-9A-Za-z_-]{1,32}", fullmatch=True))
@PROPERTY
def test_static_code_under_the_wrong_keymap_is_refused_or_the_same(member_id: str) -> None:
    """A German layout swaps Y and Z: without the check, LM0.Y1 would become member Z1."""
    lane = verifier(accept_static=True)
    text = static_member_code(member_id)
    for device, lane_layout in (("us", "de"), ("de", "us"), ("us", "fr"), ("fr", "us")):
        assembler = KeystrokeAssembler(keymap(lane_layout))
        reads = [k for r in records_for_text(text, device) for k in assembler.feed(*r)]
        for read in reads:
            result = lane.verify(read.text, T)
            if read.decodable and isinstance(result, Verified):
                assert result.member_id == member_id


def test_dynamic_code_through_the_keyboard() -> None:
    text = code("MYZ_9-a")
    lane = verifier()
    for layout in ("us", "de", "fr"):
        assembler = KeystrokeAssembler(keymap(layout))
        (read,) = [k for r in records_for_text(text, layout) for k in assembler.feed(*r)]
        assert read.text == text
    assembler = KeystrokeAssembler(keymap("de"))
    (read,) = [k for r in records_for_text(text, "us") for k in assembler.feed(*r)]
    assert read.text != text
    assert not isinstance(lane.verify(read.text, T), Verified)
    assert isinstance(lane.verify(text, T), Verified)


# --- helpers and arguments --------------------------------------------------------------------


def test_is_member_code() -> None:
    assert is_member_code("LM1.x")
    assert is_member_code("LM0.x")
    assert is_member_code("LM7.")
    assert not is_member_code("LM.1")
    assert not is_member_code("M1234567890")
    assert not is_member_code("lm1.x")


def test_signing_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="key id"):
        sign_member_code(HQ1_PRIVATE, "hq.1", "M1", T, NONCE)
    with pytest.raises(ValueError, match="member id"):
        sign_member_code(HQ1_PRIVATE, "hq1", "M.1", T, NONCE)
    with pytest.raises(ValueError, match="issue time"):
        sign_member_code(HQ1_PRIVATE, "hq1", "M1", -1, NONCE)
    with pytest.raises(ValueError, match="nonce"):
        sign_member_code(HQ1_PRIVATE, "hq1", "M1", T, b"short")
    with pytest.raises(ValueError, match="private key"):
        sign_member_code(HQ1_PRIVATE[:31], "hq1", "M1", T, NONCE)
    with pytest.raises(ValueError, match="member id"):
        static_member_code("")
    assert len(secrets.token_bytes(NONCE_BYTES)) == NONCE_BYTES


def test_verifier_refuses_bad_configuration() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        QRVerifier({"hq1": HQ1_PUBLIC[:31]})
    with pytest.raises(ValueError, match="key id"):
        QRVerifier({"hq 1": HQ1_PUBLIC})
    with pytest.raises(ValueError, match="window_s"):
        QRVerifier({}, window_s=0)
    with pytest.raises(ValueError, match="window_s"):
        QRVerifier({}, cache_size=0)


def test_reprs_hide_signature() -> None:
    parsed = parse_member_code(code())
    assert isinstance(parsed, SignedCode)
    assert code().split(".")[-1] not in repr(parsed)
    rejected = verifier().verify("LM1.nope", T)
    assert isinstance(rejected, Rejected)
    assert rejected.unreadable("qr-1").source == "barcode"


# --- the document -----------------------------------------------------------------------------


def test_the_documents_example_verifies(repo_root: Path) -> None:
    doc = (repo_root / "docs" / "member-qr.md").read_text(encoding="utf-8")
    (example,) = re.findall(r"^(LM1\.[0-9A-Za-z_.-]+)$", doc, flags=re.MULTILINE)
    (static,) = re.findall(r"^(LM0\.[0-9A-Za-z_.-]+)$", doc, flags=re.MULTILINE)
    (public_hex,) = re.findall(r"public key \(hex\): `([0-9a-f]{64})`", doc)
    assert bytes.fromhex(public_hex) == HQ1_PUBLIC
    assert example == code()
    lane = QRVerifier({"hq1": bytes.fromhex(public_hex)}, accept_static=True)
    assert lane.verify(example, T + 10) == Verified("M000123", dynamic=True, kid="hq1", issued=T)
    assert lane.verify(static, T) == Verified("M000123", dynamic=False)
