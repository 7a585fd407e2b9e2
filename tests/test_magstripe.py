"""Swipe decoding: good swipes, every way a swipe goes wrong, and garbage, character by character.

The one thing that must never happen is a ``Swipe`` whose card number is not
the card's: every prefix, every single-character corruption of a two-track
swipe, two swipes run together, and a swipe typed in the wrong keyboard
layout are either refused or give the card's own number.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from keyrecords import records_for_text

from drivers.base import CardRead
from drivers.keymap import KEYMAPS, keymap
from drivers.keystrokes import KeystrokeAssembler
from drivers.magstripe import MAX_SWIPE, Rejected, Swipe, decode_swipe, luhn_ok

PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
PAN = "4111111111111111"  # the well-known Luhn-valid test number
MEMBER = "6200000000000001"  # not Luhn-valid: some programmes' member cards
TRACK_CHARS = "0123456789=^%;?+EB/ ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def luhn_digit(payload: str) -> str:
    """The digit that makes ``payload + digit`` Luhn-valid (written apart from drivers.magstripe)."""
    total = 0
    for i, ch in enumerate(reversed(payload)):
        d = int(ch) * (2 if i % 2 == 0 else 1)
        total += d // 10 + d % 10
    return str((10 - total % 10) % 10)


def track1(pan: str = PAN, name: str = "DOE/JOHN", expiry: str = "2512", service: str = "101") -> str:
    return f"%B{pan}^{name}^{expiry}{service}0000000000000?"


def track2(pan: str = PAN, expiry: str = "2512", service: str = "101") -> str:
    return f";{pan}={expiry}{service}0000000000?"


TRACK3 = ";011234567890123445=7247241000000000000303000000040400099010=000000==1=0000000000000000?"
PANS = st.builds(lambda body: body + luhn_digit(body), st.text(alphabet="0123456789", min_size=11, max_size=18))


def reason(result: Swipe | Rejected) -> str | None:
    return result.reason if isinstance(result, Rejected) else None


def assert_safe(result: Swipe | Rejected, pans: tuple[str, ...]) -> None:
    """A Swipe carries one of the card numbers actually swiped, and a Rejected no whole number."""
    if isinstance(result, Swipe):
        assert result.pan in pans
    else:
        assert not re.search(r"[0-9]{5}", result.detail), result.detail


# --- good swipes ------------------------------------------------------------------------------


def test_track_1_and_2() -> None:
    swipe = decode_swipe(track1() + track2())
    assert swipe == Swipe(pan=PAN, expiry="2512", service_code="101", name="DOE/JOHN", tracks=(1, 2))


def test_single_tracks() -> None:
    assert decode_swipe(track1()) == Swipe(PAN, "2512", "101", "DOE/JOHN", (1,))
    assert decode_swipe(track2()) == Swipe(PAN, "2512", "101", None, (2,))


def test_three_tracks_and_plus_sentinel() -> None:
    swipe = decode_swipe(track1() + track2() + TRACK3)
    assert isinstance(swipe, Swipe)
    assert (swipe.pan, swipe.tracks) == (PAN, (1, 2, 3))
    plus = decode_swipe(track2() + "+" + TRACK3[1:])
    assert isinstance(plus, Swipe)
    assert plus.tracks == (2, 3)


def test_absent_expiry_and_service_code_are_separators() -> None:
    swipe = decode_swipe(f"%B{PAN}^DOE/JOHN^^^1234?;{PAN}===5678?")
    assert swipe == Swipe(PAN, None, None, "DOE/JOHN", (1, 2))
    assert decode_swipe(f";{PAN}=?") == Swipe(PAN, None, None, None, (2,))
    assert decode_swipe(f";{PAN}=2512?") == Swipe(PAN, "2512", None, None, (2,))


def test_name_padding_and_empty_name() -> None:
    padded = decode_swipe(track1(name="DOE/JOHN".ljust(26)))
    assert isinstance(padded, Swipe)
    assert padded.name == "DOE/JOHN"
    empty = decode_swipe(track1(name=""))
    assert isinstance(empty, Swipe)
    assert empty.name is None


def test_empty_tracks_count_as_absent() -> None:
    swipe = decode_swipe("%?" + track2() + ";?")
    assert isinstance(swipe, Swipe)
    assert swipe.tracks == (2,)


def test_luhn_ok() -> None:
    assert luhn_ok(PAN)
    assert luhn_ok("4012888888881881")
    assert not luhn_ok("4111111111111112")
    assert not luhn_ok("")
    assert not luhn_ok("41x1")


def test_luhn_is_a_parameter() -> None:
    assert decode_swipe(track2(MEMBER)) == Rejected("bad_luhn", "card number ************0001 fails the Luhn check")
    swipe = decode_swipe(track2(MEMBER), luhn=False)
    assert isinstance(swipe, Swipe)
    assert swipe.pan == MEMBER


def test_pan_lengths() -> None:
    assert isinstance(decode_swipe(track2(), pan_lengths=(16,)), Swipe)
    rejected = decode_swipe(track2(), pan_lengths=(13, 19))
    assert isinstance(rejected, Rejected)
    assert rejected.reason == "bad_pan"


def lrc(framed: str) -> str:
    """The LRC character of one track with its sentinels (an oracle apart from drivers.magstripe)."""
    six_bit = framed.startswith("%")
    base = 0x20 if six_bit else 0x30
    framed = framed if not framed.startswith("+") else ";" + framed[1:]
    value = 0
    for ch in framed:
        value ^= ord(ch) - base
    return chr(base + value)


def test_lrc_checked_when_the_reader_sends_it() -> None:
    t1, t2 = track1(), track2()
    with_lrc = t1 + lrc(t1) + t2 + lrc(t2)
    assert isinstance(decode_swipe(with_lrc, lrc=True), Swipe)
    # Without lrc=True an LRC character is trailing garbage.
    assert isinstance(decode_swipe(with_lrc), Rejected)
    wrong = t1 + lrc(t1) + t2 + chr(ord(lrc(t2)) ^ 1)
    assert decode_swipe(wrong, lrc=True) == Rejected("bad_lrc", "track 2: the LRC character does not match")
    assert reason(decode_swipe(t1 + lrc(t1) + t2, lrc=True)) == "bad_lrc"


@given(PANS)
@PROPERTY
def test_lrc_every_single_digit_change_is_caught(pan: str) -> None:
    t2 = track2(pan)
    good = t2 + lrc(t2)
    assert isinstance(decode_swipe(good, lrc=True), Swipe)
    for i in range(1, len(pan) + 1):
        for d in "0123456789":
            if d != good[i]:
                result = decode_swipe(good[:i] + d + good[i + 1 :], lrc=True, luhn=False)
                assert isinstance(result, Rejected)


# --- reasons ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "not_a_swipe"),
        ("hello", "not_a_swipe"),
        ("4111111111111111", "not_a_swipe"),
        ("%E?", "read_error"),
        (";E?", "read_error"),
        ("+E?", "read_error"),
        ("%E?" + track2(), "read_error"),
        (track1() + ";E?", "read_error"),
        (track1()[:-1], "no_end_sentinel"),
        (track1() + track2()[:-1], "no_end_sentinel"),
        (track1() + track2("4012888888881881"), "tracks_disagree"),
        (track1() + track2(expiry="2612"), "tracks_disagree"),
        (track1() + track2(service="201"), "tracks_disagree"),
        (track2() + track1(), "bad_track_order"),
        (track1() + track1(), "bad_track_order"),
        (track1() + track2() + TRACK3 + track2(), "bad_track_order"),
        (track2() + "x", "bad_track_order"),
        ("%A" + track1()[2:], "unsupported_format"),
        ("%" + track1()[2:], "bad_track1"),
        (track1(expiry="2513"), "bad_expiry"),
        (track1(expiry="25A2"), "bad_expiry"),
        (track2(expiry="2500"), "bad_expiry"),
        (track1(service="1X1"), "bad_track1"),
        (track1(name="doe/john"), "bad_track1"),
        (track1(name="A" * 27), "bad_track1"),
        (f"%B{PAN}^DOE/JOHN?", "bad_track1"),
        (f";{PAN}2512?", "bad_track2"),
        (f";{PAN}=2512101A?", "bad_track2"),
        (f";{PAN}=2512101=1?", "bad_track2"),
        (f";{PAN}={'0' * 30}?", "bad_track2"),
        (track2(pan="41111111111"), "bad_pan"),
        (track2(pan="4" * 20), "bad_pan"),
        (";=2512?", "bad_pan"),
        ("+" + TRACK3[1:], "no_card_number"),
        ("%?;?", "no_card_number"),
        (";" * (MAX_SWIPE + 1), "too_long"),
    ],
)
def test_rejections(text: str, reason: str) -> None:
    result = decode_swipe(text)
    assert isinstance(result, Rejected)
    assert result.reason == reason
    assert_safe(result, ())


def test_allow_partial_takes_the_tracks_that_were_read() -> None:
    swipe = decode_swipe("%E?" + track2(), allow_partial=True)
    assert isinstance(swipe, Swipe)
    assert (swipe.pan, swipe.tracks) == (PAN, (2,))
    assert reason(decode_swipe("%E?;E?", allow_partial=True)) == "read_error"


def test_reprs_and_events_mask_the_card_number_and_name() -> None:
    swipe = decode_swipe(track1() + track2())
    assert isinstance(swipe, Swipe)
    assert PAN not in repr(swipe)
    assert "DOE" not in repr(swipe)
    assert "1111" in repr(swipe)
    event = swipe.card_read("msr-1")
    assert event == CardRead("msr-1", "magstripe", PAN, "2512")
    assert PAN not in repr(event)
    rejected = decode_swipe(track2("4111111111111112"))
    assert isinstance(rejected, Rejected)
    event2 = rejected.unreadable("msr-1")
    assert (event2.reason, event2.source) == ("bad_luhn", "magstripe")


# --- truncation, corruption, repeats ----------------------------------------------------------


@pytest.mark.parametrize("swipe", [track1() + track2(), track2(), track1() + track2() + TRACK3])
def test_every_prefix_is_refused_or_the_same_card(swipe: str) -> None:
    for i in range(len(swipe)):
        result = decode_swipe(swipe[:i])
        assert_safe(result, (PAN,))
        if i < len(track1()) and swipe.startswith("%"):
            assert isinstance(result, Rejected)


def test_every_single_character_corruption_of_a_two_track_swipe() -> None:
    swipe = track1() + track2()
    for i in range(len(swipe)):
        variants = [swipe[:i] + swipe[i + 1 :], swipe[:i] + swipe[i] + swipe[i:]]
        variants += [swipe[:i] + c + swipe[i + 1 :] for c in TRACK_CHARS if c != swipe[i]]
        for variant in variants:
            for luhn in (True, False):
                assert_safe(decode_swipe(variant, luhn=luhn), (PAN,))


@given(PANS)
@PROPERTY
def test_every_changed_digit_of_a_one_track_swipe_fails_luhn(pan: str) -> None:
    swipe = track2(pan)
    for i in range(1, len(pan) + 1):
        for d in "0123456789":
            if d != swipe[i]:
                result = decode_swipe(swipe[:i] + d + swipe[i + 1 :])
                assert isinstance(result, Rejected)


@given(PANS, PANS, st.sampled_from(["12", "2", "1", "123", "23"]))
@PROPERTY
def test_swipes_run_together_never_mix(pan_a: str, pan_b: str, tracks: str) -> None:
    def swipe(pan: str) -> str:
        parts = {"1": track1(pan), "2": track2(pan), "3": TRACK3}
        return "".join(parts[t] for t in tracks)

    same = decode_swipe(swipe(pan_a) + swipe(pan_a))
    assert_safe(same, (pan_a,))
    mixed = decode_swipe(swipe(pan_a) + swipe(pan_b))
    # Track 2 swiped twice reads as tracks 2 and 3: the first card, never a blend.
    assert_safe(mixed, (pan_a,))
    if "1" in tracks:
        assert isinstance(mixed, Rejected)


# --- garbage ----------------------------------------------------------------------------------


@given(st.text(alphabet=TRACK_CHARS, max_size=120))
@example(f"%B{PAN}^^^?")
@example(f"%B{PAN}^^?")
@example(";" + PAN + "=?")
@PROPERTY
def test_track_alphabet_garbage(text: str) -> None:
    result = decode_swipe(text, luhn=False)
    if isinstance(result, Swipe):
        assert f"%B{result.pan}^" in text or f";{result.pan}=" in text
        assert 12 <= len(result.pan) <= 19
        assert result.pan.isascii()
        assert result.pan.isdigit()
    assert_safe(result, (result.pan,) if isinstance(result, Swipe) else ())


@given(st.text(max_size=300))
@PROPERTY
def test_any_text_never_raises(text: str) -> None:
    result = decode_swipe(text)
    assert isinstance(result, Swipe | Rejected)
    if isinstance(result, Swipe):
        assert f"%B{result.pan}^" in text or f";{result.pan}=" in text


def test_non_ascii_digits_are_not_digits() -> None:
    assert isinstance(decode_swipe(";" + "٤" * 16 + "=2512?", luhn=False), Rejected)
    assert isinstance(decode_swipe(";" + PAN + "=２５１２?", luhn=False), Rejected)


# --- keyboard layouts -------------------------------------------------------------------------


def typed(text: str, device_layout: str, lane_layout: str) -> tuple[str, int]:
    assembler = KeystrokeAssembler(keymap(lane_layout))
    reads = [k for r in records_for_text(text, device_layout) for k in assembler.feed(*r)]
    assert len(reads) <= 1
    return (reads[0].text, reads[0].unmapped) if reads else ("", 0)


@given(PANS, st.sampled_from(sorted(KEYMAPS)))
@settings(max_examples=50, deadline=None)
def test_a_swipe_typed_in_the_lanes_layout_decodes(pan: str, layout: str) -> None:
    text, unmapped = typed(track1(pan) + track2(pan), layout, layout)
    assert unmapped == 0
    swipe = decode_swipe(text)
    assert isinstance(swipe, Swipe)
    assert swipe.pan == pan


@given(
    PANS,
    st.sampled_from(["12", "1", "2"]),
    st.sampled_from([(a, b) for a in sorted(KEYMAPS) for b in sorted(KEYMAPS) if a != b]),
)
@settings(max_examples=200, deadline=None)
def test_a_swipe_typed_in_another_layout_is_refused(pan: str, tracks: str, layouts: tuple[str, str]) -> None:
    swipe = "".join({"1": track1(pan), "2": track2(pan)}[t] for t in tracks)
    text, unmapped = typed(swipe, *layouts)
    result = decode_swipe(text, luhn=False)
    assert unmapped > 0 or isinstance(result, Rejected)
