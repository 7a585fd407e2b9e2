"""Keymaps and the keystroke assembler: kernel records in, reads out, record by record.

The records come from ``keyrecords.records_for_text`` (what a wedge device
configured for a layout sends) and from hypothesis (anything at all).  The
assembler must never raise, never let a read grow past ``max_chars``, and
never turn a read that lost keys into text a decoder would take.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from keyrecords import INPUT_EVENT, T0_US, Record, key_records, pack, records_for_text, tap, unpack

from drivers import keymap as km
from drivers.keystrokes import (
    EV_KEY,
    EV_MSC,
    EV_SYN,
    KEY_PRESSED,
    KEY_RELEASED,
    KEY_REPEATED,
    SYN_DROPPED,
    SYN_REPORT,
    Keyed,
    KeystrokeAssembler,
)

PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
PRINTABLE_ASCII = "".join(chr(c) for c in range(0x20, 0x7F))


def assemble(records: list[Record], layout: str = "us", **kwargs: int) -> list[Keyed]:
    assembler = KeystrokeAssembler(km.keymap(layout), **kwargs)
    out: list[Keyed] = []
    for record in records:
        out += assembler.feed(*record)
    return out


def typeable(layout: str) -> str:
    keymap = km.keymap(layout)
    return "".join(c for c in PRINTABLE_ASCII if keymap.keystroke(c) is not None)


# --- keymaps -------------------------------------------------------------------------------


def test_known_keymaps_and_unknown_name() -> None:
    assert set(km.KEYMAPS) == {"us", "de", "fr"}
    assert km.keymap("us") is km.US
    with pytest.raises(ValueError, match="unknown keymap 'uk': known keymaps are de, fr, us"):
        km.keymap("uk")


def test_key_codes_are_the_kernels() -> None:
    # A few values from linux/input-event-codes.h, as a guard against a slipped table.
    assert (km.KEY_1, km.KEY_0, km.KEY_Q, km.KEY_A, km.KEY_Z, km.KEY_M) == (2, 11, 16, 30, 44, 50)
    assert (km.KEY_ENTER, km.KEY_LEFTSHIFT, km.KEY_RIGHTSHIFT, km.KEY_SPACE, km.KEY_CAPSLOCK) == (28, 42, 54, 57, 58)
    assert (km.KEY_KP7, km.KEY_KP0, km.KEY_KPENTER, km.KEY_RIGHTALT, km.KEY_102ND) == (71, 82, 96, 100, 86)


def test_us_layout() -> None:
    us = km.US
    assert [us.char(code, shifted=False) for code in km.DIGIT_ROW] == list("1234567890")
    assert [us.char(code, shifted=True) for code in km.DIGIT_ROW] == list("!@#$%^&*()")
    assert (us.char(km.KEY_A, shifted=False), us.char(km.KEY_A, shifted=True)) == ("a", "A")
    assert (us.char(km.KEY_SEMICOLON, shifted=False), us.char(km.KEY_SEMICOLON, shifted=True)) == (";", ":")
    assert (us.char(km.KEY_EQUAL, shifted=False), us.char(km.KEY_SLASH, shifted=True)) == ("=", "?")
    assert us.char(km.KEY_ESC, shifted=False) is None
    assert us.char(km.KEY_A, shifted=False, altgr=True) is None


def test_german_layout() -> None:
    de = km.DE
    assert (de.char(km.KEY_Y, shifted=False), de.char(km.KEY_Z, shifted=False), de.char(km.KEY_Z, shifted=True)) == (
        "z",
        "y",
        "Y",
    )
    assert [de.char(code, shifted=True) for code in km.DIGIT_ROW] == list('!"§$%&/()=')
    assert de.char(km.KEY_MINUS, shifted=True) == "?"
    assert de.char(km.KEY_COMMA, shifted=True) == ";"
    assert de.char(km.KEY_GRAVE, shifted=False) == "^"
    assert de.char(km.KEY_Q, shifted=False, altgr=True) == "@"
    assert "^" in de.dead


def test_french_layout_needs_shift_for_digits() -> None:
    fr = km.FR
    assert [fr.char(code, shifted=False) for code in km.DIGIT_ROW] == list("&é\"'(-è_çà")
    assert [fr.char(code, shifted=True) for code in km.DIGIT_ROW] == list("1234567890")
    assert (
        fr.char(km.KEY_Q, shifted=False),
        fr.char(km.KEY_A, shifted=False),
        fr.char(km.KEY_SEMICOLON, shifted=True),
    ) == ("a", "q", "M")
    assert (fr.char(km.KEY_W, shifted=False), fr.char(km.KEY_Z, shifted=False), fr.char(km.KEY_M, shifted=False)) == (
        "z",
        "w",
        ",",
    )
    assert fr.char(km.KEY_APOSTROPHE, shifted=True) == "%"
    assert fr.char(km.KEY_M, shifted=True) == "?"
    # Caps Lock shifts letters (m too), but the digit row stays as it is.
    assert fr.char(km.KEY_SEMICOLON, shifted=False, caps_lock=True) == "M"
    assert fr.char(km.KEY_1, shifted=False, caps_lock=True) == "&"


def test_keypad_gives_digits_on_every_layout() -> None:
    for keymap in km.KEYMAPS.values():
        assert keymap.char(km.KEY_KP7, shifted=False) == "7"
        assert keymap.char(km.KEY_KP7, shifted=True) == "7"


def test_keymaps_compare_by_name_and_cannot_change() -> None:
    assert km.keymap("de") == km.DE
    assert km.DE != km.US
    assert len({km.DE, km.keymap("de"), km.US}) == 2
    with pytest.raises(TypeError):
        km.US.plain[km.KEY_A] = "x"  # type: ignore[index]


def test_custom_keymap_validation() -> None:
    custom = km.Keymap.build("digits", {km.KEY_1: "1"}, {km.KEY_1: "!"})
    assert custom.char(km.KEY_1, shifted=True) == "!"
    with pytest.raises(ValueError, match="exactly one character"):
        km.Keymap.build("bad", {km.KEY_1: "12"}, {})


@pytest.mark.parametrize("layout", sorted(km.KEYMAPS))
def test_every_typeable_character_round_trips(layout: str) -> None:
    keymap = km.keymap(layout)
    chars = set(keymap.plain.values()) | set(keymap.shifted.values()) | set(keymap.altgr.values())
    text = "".join(sorted(c for c in chars if c != "\t"))
    (read,) = assemble(records_for_text(text, layout), layout)
    assert read.text == text
    assert (read.ended_by, read.unmapped) == ("enter", 0)


# --- the assembler: record by record ---------------------------------------------------------


def test_a_read_completes_only_at_enters_key_down() -> None:
    records = records_for_text("M1234567890")
    assembler = KeystrokeAssembler(km.US)
    enter_down = next(i for i, r in enumerate(records) if r[2:] == (EV_KEY, km.KEY_ENTER, KEY_PRESSED))
    for i, record in enumerate(records):
        out = assembler.feed(*record)
        if i == enter_down:
            assert [k.text for k in out] == ["M1234567890"]
            assert out[0].ended_by == "enter"
            assert out[0].started_us == T0_US + 500
            assert out[0].ended_us == T0_US + 11 * 2000 + 500
        else:
            assert out == []
    assert not assembler.pending


@given(st.text(alphabet=PRINTABLE_ASCII, max_size=80), st.sampled_from(sorted(km.KEYMAPS)))
@PROPERTY
def test_typed_text_comes_back(text: str, layout: str) -> None:
    text = "".join(c for c in text if c in typeable(layout))
    reads = assemble(records_for_text(text, layout), layout)
    if text:
        assert [(r.text, r.ended_by, r.unmapped) for r in reads] == [(text, "enter", 0)]
    else:
        assert reads == []  # Enter alone is no read


def test_keypad_enter_ends_a_read() -> None:
    records = records_for_text("123", enter=False) + tap(km.KEY_KPENTER, T0_US + 10_000, 2000)
    assert [r.text for r in assemble(records)] == ["123"]


def test_right_shift_and_shift_released_mid_read() -> None:
    t = T0_US
    records = tap(km.KEY_A, t, 1000, modifiers=(km.KEY_RIGHTSHIFT,))
    records += key_records(km.KEY_LEFTSHIFT, KEY_PRESSED, t + 1000)
    records += tap(km.KEY_B, t + 1100, 1000)
    records += key_records(km.KEY_LEFTSHIFT, KEY_RELEASED, t + 2200)
    records += tap(km.KEY_C, t + 3000, 1000) + tap(km.KEY_ENTER, t + 4000, 1000)
    assert [r.text for r in assemble(records)] == ["ABc"]


def test_both_shifts_held_then_one_released_stays_shifted() -> None:
    t = T0_US
    records = key_records(km.KEY_LEFTSHIFT, KEY_PRESSED, t) + key_records(km.KEY_RIGHTSHIFT, KEY_PRESSED, t)
    records += key_records(km.KEY_LEFTSHIFT, KEY_RELEASED, t + 10)
    records += tap(km.KEY_A, t + 100, 1000) + tap(km.KEY_ENTER, t + 2000, 1000)
    assert [r.text for r in assemble(records)] == ["A"]


def test_caps_lock_shifts_letters_only_and_shift_undoes_it() -> None:
    t = T0_US
    records = tap(km.KEY_CAPSLOCK, t, 1000)
    records += tap(km.KEY_A, t + 1000, 1000) + tap(km.KEY_1, t + 2000, 1000)
    records += tap(km.KEY_B, t + 3000, 1000, modifiers=(km.KEY_LEFTSHIFT,))
    records += tap(km.KEY_CAPSLOCK, t + 4000, 1000) + tap(km.KEY_C, t + 5000, 1000)
    records += tap(km.KEY_ENTER, t + 6000, 1000)
    assert [(r.text, r.unmapped) for r in assemble(records)] == [("A1bc", 0)]


def test_autorepeat_is_ignored() -> None:
    t = T0_US
    records = key_records(km.KEY_5, KEY_PRESSED, t)
    records += [(t // 1_000_000, t % 1_000_000 + 100 + i, EV_KEY, km.KEY_5, KEY_REPEATED) for i in range(1000)]
    records += key_records(km.KEY_5, KEY_RELEASED, t + 2000) + tap(km.KEY_ENTER, t + 3000, 1000)
    assert [r.text for r in assemble(records)] == ["5"]


def test_interleaved_key_downs_keep_press_order() -> None:
    t = T0_US
    records = key_records(km.KEY_A, KEY_PRESSED, t) + key_records(km.KEY_B, KEY_PRESSED, t + 100)
    records += key_records(km.KEY_A, KEY_RELEASED, t + 200) + key_records(km.KEY_B, KEY_RELEASED, t + 300)
    records += tap(km.KEY_ENTER, t + 1000, 500)
    assert [r.text for r in assemble(records)] == ["ab"]


def test_unmapped_keys_are_counted_not_typed() -> None:
    t = T0_US
    records = tap(km.KEY_1, t, 1000) + tap(km.KEY_ESC, t + 1000, 1000) + tap(km.KEY_BACKSPACE, t + 2000, 1000)
    records += tap(km.KEY_2, t + 3000, 1000) + tap(0x120, t + 4000, 1000) + tap(km.KEY_ENTER, t + 5000, 1000)
    (read,) = assemble(records)
    assert (read.text, read.unmapped, read.decodable) == ("12", 3, False)


def test_keys_pressed_with_ctrl_or_alt_are_unmapped() -> None:
    # An Alt+keypad scanner would otherwise type the decimal codes as digits.
    t = T0_US
    records = key_records(km.KEY_LEFTALT, KEY_PRESSED, t)
    records += tap(km.KEY_KP0, t + 100, 500) + tap(km.KEY_KP6, t + 600, 500) + tap(km.KEY_KP5, t + 1100, 500)
    records += key_records(km.KEY_LEFTALT, KEY_RELEASED, t + 1600)
    records += tap(km.KEY_J, t + 2000, 500, modifiers=(km.KEY_LEFTCTRL,)) + tap(km.KEY_ENTER, t + 3000, 500)
    (read,) = assemble(records)
    assert (read.text, read.unmapped) == ("", 4)


def test_altgr_level() -> None:
    records = records_for_text("a@b", "de")
    assert any(r[2:] == (EV_KEY, km.KEY_RIGHTALT, KEY_PRESSED) for r in records)
    assert [r.text for r in assemble(records, "de")] == ["a@b"]


def test_dead_keys() -> None:
    t = T0_US
    # Dead ^ then space: the accent alone (what records_for_text sends).
    assert [r.text for r in assemble(records_for_text("^1^", "de"), "de")] == ["^1^"]
    # A reader that does not send the space: the accent, then the next character.
    records = tap(km.KEY_GRAVE, t, 1000) + tap(km.KEY_A, t + 1000, 1000)
    records += tap(km.KEY_GRAVE, t + 2000, 1000) + tap(km.KEY_ENTER, t + 3000, 1000)
    assert [r.text for r in assemble(records, "de")] == ["^a^"]
    # On the US layout ` is an ordinary key.
    assert [r.text for r in assemble(records_for_text("` x"), "us")] == ["` x"]


# --- ends of reads -------------------------------------------------------------------------


def test_gap_ends_a_read_and_the_late_key_starts_the_next() -> None:
    first = records_for_text("111", per_key_us=2000, enter=False)
    second = records_for_text("222", t0=T0_US + 6000 + 51_000, per_key_us=2000)
    reads = assemble(first + second, gap_ms=50)
    assert [(r.text, r.ended_by) for r in reads] == [("111", "gap"), ("222", "enter")]
    assert reads[0].ended_us == T0_US + 4000 + 500


def test_no_gap_at_exactly_gap_ms() -> None:
    t = T0_US
    records = tap(km.KEY_1, t, 1000) + tap(km.KEY_2, t + 50_000, 1000) + tap(km.KEY_ENTER, t + 51_000, 1000)
    assert [r.text for r in assemble(records, gap_ms=50)] == ["12"]


def test_flush() -> None:
    assembler = KeystrokeAssembler(km.US, gap_ms=50)
    for record in records_for_text("9876", enter=False):
        assembler.feed(*record)
    assert assembler.pending
    last_key = T0_US + 3 * 2000 + 500
    sec, usec = divmod(last_key + 50_000, 1_000_000)
    assert assembler.flush(sec, usec) == []  # not older than the gap yet
    sec, usec = divmod(last_key - 5_000_000, 1_000_000)
    assert assembler.flush(sec, usec) == []  # a clock behind the events' ends nothing
    sec, usec = divmod(last_key + 50_001, 1_000_000)
    assert [(r.text, r.ended_by) for r in assembler.flush(sec, usec)] == [("9876", "gap")]
    assert not assembler.pending
    assert assembler.flush(sec + 10, usec) == []
    assert KeystrokeAssembler(km.US).flush(0, 0) == []


def test_overflow_emits_once_and_drops_the_rest_of_the_read() -> None:
    records = records_for_text("1234567890ABCDEFGHIJ")
    records += records_for_text("42", t0=T0_US + 100_000)
    reads = assemble(records, max_chars=8)
    assert [(r.text, r.ended_by) for r in reads] == [("12345678", "overflow"), ("42", "enter")]
    assert not reads[0].decodable


def test_overflow_also_ends_at_a_gap() -> None:
    records = records_for_text("1234567890", enter=False) + records_for_text("77", t0=T0_US + 1_000_000)
    reads = assemble(records, max_chars=4)
    assert [(r.text, r.ended_by) for r in reads] == [("1234", "overflow"), ("77", "enter")]


def test_lost_events_cut_the_read_and_its_tail() -> None:
    head = records_for_text("M1234", enter=False)
    t = T0_US + 5 * 2000
    dropped = [(t // 1_000_000, t % 1_000_000, EV_SYN, SYN_DROPPED, 0)]
    # Until the next SYN_REPORT even a key-up is ignored (the kernel's contract).
    dropped += [(t // 1_000_000, t % 1_000_000 + 1, EV_KEY, km.KEY_ENTER, KEY_PRESSED)]
    dropped += [(t // 1_000_000, t % 1_000_000 + 2, EV_SYN, SYN_REPORT, 0)]
    tail = records_for_text("567890", t0=t + 1000)
    after = records_for_text("M999", t0=t + 200_000)
    reads = assemble(head + dropped + tail + after)
    assert [(r.text, r.ended_by) for r in reads] == [("", "dropped"), ("M999", "enter")]


def test_lost_events_forget_held_modifiers() -> None:
    t = T0_US
    records = key_records(km.KEY_LEFTSHIFT, KEY_PRESSED, t)
    records += [(t // 1_000_000, 10, EV_SYN, SYN_DROPPED, 0), (t // 1_000_000, 11, EV_SYN, SYN_REPORT, 0)]
    records += tap(km.KEY_ENTER, t + 1000, 500) + records_for_text("a", t0=t + 100_000)
    assert [r.text for r in assemble(records) if r.ended_by == "enter"] == ["a"]


def test_timestamps_going_backwards_end_the_read() -> None:
    records = records_for_text("555", enter=False)
    records += records_for_text("666", t0=T0_US - 3_600_000_000)
    reads = assemble(records)
    assert [(r.text, r.ended_by) for r in reads] == [("555", "gap"), ("666", "enter")]


def test_reset_forgets_state() -> None:
    assembler = KeystrokeAssembler(km.US)
    for record in records_for_text("12", enter=False) + key_records(km.KEY_LEFTSHIFT, KEY_PRESSED, T0_US + 5000):
        assembler.feed(*record)
    assembler.reset()
    out: list[Keyed] = []
    for record in records_for_text("ab", t0=T0_US + 6000, enter=False) + tap(km.KEY_ENTER, T0_US + 20_000, 1000):
        out += assembler.feed(*record)
    assert [r.text for r in out] == ["ab"]


def test_bad_parameters() -> None:
    with pytest.raises(ValueError, match="gap_ms"):
        KeystrokeAssembler(km.US, gap_ms=0)
    with pytest.raises(ValueError, match="max_chars"):
        KeystrokeAssembler(km.US, max_chars=0)


def test_keyed_repr_masks_the_text() -> None:
    (read,) = assemble(records_for_text("6222021234567890"))
    assert "6222021234567890" not in repr(read)
    assert "7890" in repr(read)


# --- garbage ----------------------------------------------------------------------------------

_RECORD = st.tuples(
    st.integers(-(2**40), 2**40),
    st.integers(-(2**31), 2**31),
    st.sampled_from([EV_SYN, EV_KEY, EV_MSC, 2, 3, 0x15, 0xFFFF]),
    st.one_of(st.integers(0, 0x2FF), st.sampled_from([km.KEY_ENTER, km.KEY_LEFTSHIFT, km.KEY_CAPSLOCK, 3])),
    st.one_of(st.sampled_from([KEY_RELEASED, KEY_PRESSED, KEY_REPEATED]), st.integers(-(2**31), 2**31 - 1)),
)


@given(st.lists(_RECORD, max_size=300), st.sampled_from(sorted(km.KEYMAPS)), st.integers(1, 40))
@PROPERTY
def test_garbage_records_never_raise_and_reads_stay_bounded(records: list[Record], layout: str, max_chars: int) -> None:
    assembler = KeystrokeAssembler(km.keymap(layout), gap_ms=50, max_chars=max_chars)
    reads: list[Keyed] = []
    for record in records:
        reads += assembler.feed(*record)
    reads += assembler.flush(2**41, 0)
    for read in reads:
        assert len(read.text) <= max_chars
        assert read.unmapped >= 0
        assert read.ended_by in ("enter", "gap", "overflow", "dropped")
        if read.ended_by == "dropped":
            assert read.text == ""


@given(st.text(alphabet="0123456789", min_size=1, max_size=30), st.data())
@PROPERTY
def test_a_dropped_or_cut_record_never_yields_a_longer_or_other_whole_read(digits: str, data: st.DataObject) -> None:
    """Delete any one record from a scan: the read that comes out is the scan, or not decodable, or shorter."""
    records = records_for_text(digits)
    i = data.draw(st.integers(0, len(records) - 1))
    reads = assemble(records[:i] + records[i + 1 :])
    for read in reads:
        if read.decodable and read.ended_by == "enter":
            # Losing a key-down loses its digit: a decoder sees a shorter number, and
            # check digits or lengths must refuse it.  It never gains or changes a digit.
            assert len(read.text) <= len(digits)
            assert all(c in digits for c in read.text)


@given(st.text(alphabet="0123456789", min_size=1, max_size=30))
@PROPERTY
def test_us_digits_decoded_with_french_keymap_are_no_digits(digits: str) -> None:
    (read,) = assemble(records_for_text(digits, "us"), "fr")
    assert not any(c.isdigit() for c in read.text)
    (read,) = assemble(records_for_text(digits, "fr"), "us")
    assert not any(c.isdigit() for c in read.text)


# --- the record helper ------------------------------------------------------------------------


def test_pack_unpack_round_trip() -> None:
    records = records_for_text("A1")
    data = pack(records)
    assert INPUT_EVENT.size == 24
    assert len(data) == 24 * len(records)
    assert unpack(data) == records
    with pytest.raises(ValueError, match="whole number"):
        unpack(data[:-1])


def test_records_for_text_shape() -> None:
    records = records_for_text("A", per_key_us=4000)
    kinds = [(r[2], r[3], r[4]) for r in records]
    assert kinds[:3] == [(EV_MSC, 4, 0x70000 + km.KEY_LEFTSHIFT), (EV_KEY, km.KEY_LEFTSHIFT, 1), (EV_SYN, 0, 0)]
    assert (EV_KEY, km.KEY_A, 1) in kinds
    assert (EV_KEY, km.KEY_A, 0) in kinds
    assert kinds[-6:-3] == [(EV_MSC, 4, 0x70000 + km.KEY_ENTER), (EV_KEY, km.KEY_ENTER, 1), (EV_SYN, 0, 0)]
    with pytest.raises(ValueError, match="cannot type"):
        records_for_text("ä", "us")
