"""drivers.apdu: commands byte by byte, status words, chaining, the member file, and reading a card (pure)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

import pytest
from card_emulator import DEFAULT_AID, VirtualCard, VpcdCard
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.apdu import (
    BadResponseError,
    Command,
    Invalid,
    MemberFile,
    ReadPlan,
    Status,
    UidRead,
    command_name,
    exchange,
    get_response,
    get_uid,
    member_file_bytes,
    parse_member_file,
    parse_response,
    read_binary,
    read_card,
    select_aid,
    template_length,
)

# The example in the module docstring and docs/hardware.md.
EXAMPLE = bytes.fromhex("70 13 5A 08 62 00 12 34 56 78 00 01 5F 24 03 27 12 31 C0 01 01")
EXAMPLE_MEMBER = MemberFile("6200123456780001", "271231", 1)


def card(**kwargs: object) -> Callable[[bytes], bytes]:
    """The emulated card's own APDU logic as a transmit function (no pcscd)."""
    return VpcdCard(VirtualCard(**kwargs)).respond


def member_card(data: bytes = EXAMPLE, **kwargs: object) -> Callable[[bytes], bytes]:
    return card(applications={DEFAULT_AID: data}, **kwargs)


def scripted(*answers: str) -> tuple[Callable[[bytes], bytes], list[bytes]]:
    """A transmit that answers from a list (hex), recording what was sent."""
    sent: list[bytes] = []
    queue = [bytes.fromhex(answer) for answer in answers]

    def transmit(command: bytes) -> bytes:
        sent.append(command)
        return queue.pop(0)

    return transmit, sent


# --- commands -----------------------------------------------------------------


def test_commands_byte_by_byte():
    assert select_aid(DEFAULT_AID).to_bytes() == bytes.fromhex("00 A4 04 00 07 F0 4C 41 4E 45 4D 42 00")
    assert read_binary(0, 128).to_bytes() == bytes.fromhex("00 B0 00 00 80")
    assert read_binary(0x1234, 256).to_bytes() == bytes.fromhex("00 B0 12 34 00")
    assert read_binary(0x7FFF, 1).to_bytes() == bytes.fromhex("00 B0 7F FF 01")
    assert get_uid().to_bytes() == bytes.fromhex("FF CA 00 00 00")
    assert get_response(0x15).to_bytes() == bytes.fromhex("00 C0 00 00 15")
    assert Command(0x80, 0x10, 1, 2, b"\xaa").to_bytes() == bytes.fromhex("80 10 01 02 01 AA")
    assert Command(0, 0xB0, 0, 0, le=256).with_le(0x10).to_bytes() == bytes.fromhex("00 B0 00 00 10")


@pytest.mark.parametrize(
    "make",
    [
        lambda: select_aid(b"\xf0\x01\x02\x03"),  # 4 bytes
        lambda: select_aid(bytes(17)),
        lambda: read_binary(0x8000, 1),
        lambda: read_binary(-1, 1),
        lambda: read_binary(0, 0),
        lambda: read_binary(0, 257),
        lambda: Command(0x100, 0, 0, 0),
        lambda: Command(0, 0, 0, 0, bytes(256)),
    ],
)
def test_commands_refuse_what_a_short_apdu_cannot_carry(make):
    with pytest.raises(ValueError, match=r"."):
        make()


def test_command_names():
    assert command_name(select_aid(DEFAULT_AID).to_bytes()) == "SELECT"
    assert command_name(read_binary(0, 1).to_bytes()) == "READ BINARY"
    assert command_name(get_uid().to_bytes()) == "GET DATA (UID)"
    assert command_name(bytes.fromhex("0084000008")) == "INS 84"
    assert command_name(b"\x00") == "a malformed command"


# --- responses ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("sw", "status"),
    [
        ("9000", Status.OK),
        ("6282", Status.END_OF_FILE),
        ("6283", Status.BLOCKED),
        ("63C2", Status.WARNING),
        ("6110", Status.MORE_DATA),
        ("6C15", Status.WRONG_LE),
        ("6700", Status.WRONG_LENGTH),
        ("6982", Status.SECURITY),
        ("6985", Status.NOT_ALLOWED),
        ("6A81", Status.FUNCTION_NOT_SUPPORTED),
        ("6A82", Status.NOT_FOUND),
        ("6A86", Status.WRONG_P1P2),
        ("6B00", Status.WRONG_P1P2),
        ("6D00", Status.INS_NOT_SUPPORTED),
        ("6E00", Status.CLA_NOT_SUPPORTED),
        ("6F00", Status.ERROR),
        ("9001", Status.ERROR),
    ],
)
def test_status_words(sw, status):
    response = parse_response(bytes.fromhex("AABB" + sw))
    assert response.status is status
    assert response.data == b"\xaa\xbb"
    assert response.sw == int(sw, 16)


def test_a_response_without_a_status_word_is_refused():
    for raw in (b"", b"\x90"):
        with pytest.raises(BadResponseError):
            parse_response(raw)


def test_response_repr_and_str_never_show_the_data():
    response = parse_response(bytes.fromhex("5A0862001234567800019000"))
    assert "6200" not in repr(response)
    assert str(response) == "SW 9000 (ok, 10 data bytes)"


def test_exchange_collects_61xx_with_get_response():
    transmit, sent = scripted("0102 6103", "030405 9000")
    response = exchange(transmit, select_aid(DEFAULT_AID))
    assert response.data == bytes.fromhex("0102030405")
    assert response.status is Status.OK
    assert sent[1] == bytes.fromhex("00 C0 00 00 03")


def test_exchange_reissues_after_6cxx_with_the_right_le():
    transmit, sent = scripted("6C15", "00" * 0x15 + "9000")
    response = exchange(transmit, read_binary(0, 128))
    assert len(response.data) == 0x15
    assert sent == [bytes.fromhex("00B0000080"), bytes.fromhex("00B0000015")]


def test_exchange_6c00_means_256():
    transmit, sent = scripted("6C00", "9000")
    exchange(transmit, read_binary(0, 1))
    assert sent[1] == bytes.fromhex("00B0000000")


def test_exchange_does_not_loop_on_a_card_that_keeps_saying_6cxx_or_61xx():
    transmit, sent = scripted("6C10", "6C10")
    assert exchange(transmit, read_binary(0, 1)).status is Status.WRONG_LE
    assert len(sent) == 2
    with pytest.raises(BadResponseError, match="did not end"):
        exchange(lambda _: b"\x00\x61\x01", get_uid())
    with pytest.raises(BadResponseError, match="grew past"):
        exchange(lambda _: bytes(300) + b"\x61\x00", get_uid())


# --- the member file ----------------------------------------------------------


def test_the_documented_example():
    assert parse_member_file(EXAMPLE) == EXAMPLE_MEMBER
    assert member_file_bytes("6200123456780001", "271231", 1) == EXAMPLE
    assert EXAMPLE_MEMBER.expiry_yymm == "2712"
    assert template_length(EXAMPLE) == len(EXAMPLE)


def test_member_file_repr_masks_the_number():
    assert "62001234" not in repr(EXAMPLE_MEMBER)
    assert "0001" in repr(EXAMPLE_MEMBER)
    assert "04A1B2C3" not in repr(UidRead(bytes.fromhex("04A1B2C3D4E5F6")))


@pytest.mark.parametrize(
    ("hex_file", "expected"),
    [
        ("70 04 5A 02 12 34", MemberFile("1234")),
        ("70 05 5A 03 12 34 5F", MemberFile("12345")),  # odd digit count, F-padded
        ("70 04 5A 02 12 34 00 00 00", MemberFile("1234")),  # padding of a fixed-size EF
        ("70 04 5A 02 12 34 FF FF", MemberFile("1234")),
        ("70 0A DF 01 01 AA 5A 02 12 34 E0 00", MemberFile("1234")),  # unknown tags skipped
        ("70 81 04 5A 02 12 34", MemberFile("1234")),  # long-form lengths
        ("70 82 00 05 5A 81 02 12 34", MemberFile("1234")),
        ("70 0A 5A 02 12 34 5F 24 03 28 02 29", MemberFile("1234", "280229")),  # a leap day
        ("70 0C 5A 0A 12 34 56 78 90 12 34 56 78 9F", MemberFile("1234567890123456789")),  # 19 digits
    ],
)
def test_member_files(hex_file, expected):
    assert parse_member_file(bytes.fromhex(hex_file)) == expected


@pytest.mark.parametrize(
    ("hex_file", "reason"),
    [
        ("", "empty_file"),
        ("00 00 00 00", "blank_card"),
        ("FF FF", "blank_card"),
        ("6F 04 5A 02 12 34", "bad_template"),
        ("70", "truncated"),
        ("70 05 5A 02 12 34", "truncated"),
        ("70 04 5A 03 12 34", "truncated"),
        ("70 83 00 00 04 5A 02 12 34", "bad_tlv"),  # 3-byte length form
        ("70 80", "bad_tlv"),  # indefinite length
        ("70 05 5F 84 01 01 00", "bad_tlv"),  # 3-byte tag
        ("70 01 5F", "truncated"),  # 2-byte tag cut short
        ("70 04 5A 02 12 34 12", "trailing_data"),
        ("70 04 5A 02 12 34 00 01", "trailing_data"),
        ("70 03 C0 01 01", "no_card_number"),
        ("70 08 5A 02 12 34 5A 02 12 34", "duplicate_tag"),
        ("70 03 5A 01 12", "bad_card_number"),  # 2 digits
        ("70 0C 5A 0A 12 34 56 78 90 12 34 56 78 90", "bad_card_number"),  # 20 digits
        ("70 04 5A 02 12 3A", "bad_card_number"),  # not BCD
        ("70 04 5A 02 1F 34", "bad_card_number"),  # F pad not at the end
        ("70 04 5A 02 12 FF", "bad_card_number"),
        ("70 0A 5A 02 12 34 5F 24 03 27 13 01", "bad_expiry"),  # month 13
        ("70 0A 5A 02 12 34 5F 24 03 27 02 30", "bad_expiry"),  # 30 February
        ("70 0A 5A 02 12 34 5F 24 03 27 02 29", "bad_expiry"),  # 2027 is no leap year
        ("70 09 5A 02 12 34 5F 24 02 27 12", "bad_expiry"),
        ("70 0A 5A 02 12 34 5F 24 03 2A 12 31", "bad_expiry"),
        ("70 06 5A 02 12 34 C0 00", "bad_kind"),
        ("70 08 5A 02 12 34 C0 02 01 01", "bad_kind"),
    ],
)
def test_member_files_refused(hex_file, reason):
    outcome = parse_member_file(bytes.fromhex(hex_file))
    assert isinstance(outcome, Invalid)
    assert outcome.reason == reason


def test_every_truncation_of_a_member_file_is_refused():
    for cut in range(len(EXAMPLE)):
        assert isinstance(parse_member_file(EXAMPLE[:cut]), Invalid), cut


def test_template_length_as_bytes_arrive():
    assert template_length(b"") == 0
    assert template_length(b"\x70") is None
    assert template_length(b"\x70\x81") is None
    assert template_length(b"\x70\x81\x90") == 3 + 0x90
    assert template_length(b"\x70\x13") == 0x15
    assert template_length(b"\x6f\x13") == 2  # not a template: read no further
    assert template_length(b"\x70\x85") == 2


def test_member_file_bytes_refuses_what_it_cannot_encode():
    for number in ("123", "1" * 20, "12a4", "١٢٣٤"):
        with pytest.raises(ValueError, match="digits"):
            member_file_bytes(number)
    for expiry in ("271332", "2712", "27-12-31"):
        with pytest.raises(ValueError, match="YYMMDD"):
            member_file_bytes("1234", expiry)


numbers = st.text("0123456789", min_size=4, max_size=19)
dates = st.dates(min_value=dt.date(2000, 1, 1), max_value=dt.date(2099, 12, 31))


@given(
    number=numbers,
    expiry=st.none() | dates.map(lambda d: d.strftime("%y%m%d")),
    kind=st.none() | st.integers(0, 255),
    padding=st.binary(max_size=40).map(lambda b: bytes(0xFF if x & 1 else 0 for x in b)),
)
def test_member_file_round_trip(number, expiry, kind, padding):
    data = member_file_bytes(number, expiry, kind)
    assert parse_member_file(data + padding) == MemberFile(number, expiry, kind)


@given(st.binary(max_size=300))
@settings(max_examples=2000)
def test_parse_member_file_never_raises(data):
    assert isinstance(parse_member_file(data), MemberFile | Invalid)


@given(st.data())
def test_a_corrupted_member_file_never_raises_nor_grows_digits(data):
    valid = bytearray(EXAMPLE)
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(valid) - 1))
        valid[at] = data.draw(st.integers(0, 255))
    outcome = parse_member_file(bytes(valid))
    assert isinstance(outcome, MemberFile | Invalid)
    if isinstance(outcome, MemberFile):
        assert outcome.number.isdigit()
        assert 4 <= len(outcome.number) <= 19


# --- reading a card -----------------------------------------------------------


def test_read_a_member_card():
    assert read_card(member_card(), ReadPlan()) == EXAMPLE_MEMBER


def test_read_in_every_chunk_size():
    data = member_file_bytes("6200888800000002", "301231")
    for chunk in range(1, len(data) + 2):
        assert read_card(member_card(data), ReadPlan(chunk=chunk)) == MemberFile("6200888800000002", "301231"), chunk


@pytest.mark.parametrize("chunk", [8, 128])  # 8: the end is found by 6B00 at offset 16; 128: by 6282
def test_a_file_shorter_than_its_template_is_truncated(chunk):
    short = EXAMPLE[:16]
    outcome = read_card(member_card(short), ReadPlan(chunk=chunk))
    assert isinstance(outcome, Invalid)
    assert outcome.reason == "truncated"


def test_read_counts_apdus_through_a_recording_transmit():
    data = EXAMPLE + bytes(1000)
    sent: list[bytes] = []
    inner = member_card(data)

    def transmit(command: bytes) -> bytes:
        sent.append(command)
        return inner(command)

    assert read_card(transmit, ReadPlan(chunk=8)) == EXAMPLE_MEMBER
    assert len(sent) == 1 + 3  # SELECT, then 3 x 8 bytes cover the 21-byte template


def test_read_an_exact_region_at_an_offset():
    data = b"\xee" * 40 + EXAMPLE + bytes(11)
    plan = ReadPlan(offset=40, length=len(EXAMPLE) + 11, chunk=16)
    assert read_card(member_card(data), plan) == EXAMPLE_MEMBER
    outcome = read_card(member_card(data), ReadPlan(offset=39, length=len(EXAMPLE) + 1))
    assert isinstance(outcome, Invalid)
    assert outcome.reason == "bad_template"


def test_read_follows_get_response_and_wrong_le():
    assert read_card(member_card(fci=bytes(300), get_response_chunk=0x40), ReadPlan()) == EXAMPLE_MEMBER
    assert read_card(member_card(exact_le=True), ReadPlan()) == EXAMPLE_MEMBER


def test_a_template_longer_than_allowed_is_refused_without_reading_it():
    data = member_file_bytes("1234") + bytes(10)
    long_template = b"\x70\x82\x10\x00" + bytes(0x1000)
    outcome = read_card(member_card(long_template), ReadPlan(max_length=1024))
    assert outcome == Invalid("file_too_long", "template of 4100 bytes, at most 1024")
    assert read_card(member_card(data), ReadPlan(max_length=6)) == MemberFile("1234")


def test_unknown_cards():
    no_app = card(uid=None)
    outcome = read_card(no_app, ReadPlan())
    assert isinstance(outcome, Invalid)
    assert outcome.reason == "unknown_card"
    outcome = read_card(no_app, ReadPlan(uid_fallback=True))
    assert isinstance(outcome, Invalid)
    assert outcome.reason == "unknown_card"
    assert "GET DATA: SW 6A81" in outcome.detail
    outcome = read_card(card(no_uid_sw=b"\x6d\x00"), ReadPlan(uid_fallback=True))
    assert isinstance(outcome, Invalid)
    assert outcome.reason == "unknown_card"


def test_uid_fallback():
    transmit = card(uid=bytes.fromhex("04A1B2C3D4E5F6"))
    outcome = read_card(transmit, ReadPlan(uid_fallback=True))
    assert outcome == UidRead(bytes.fromhex("04A1B2C3D4E5F6"))
    assert isinstance(outcome, UidRead)
    assert outcome.number == "UID04A1B2C3D4E5F6"
    assert read_card(transmit, ReadPlan()) == Invalid(
        "unknown_card", "no member application (SELECT: SW 6A82 (not_found, 0 data bytes))"
    )
    # A member card's own application wins over its UID.
    assert read_card(member_card(uid=b"\x04\x01\x02\x03"), ReadPlan(uid_fallback=True)) == EXAMPLE_MEMBER


@pytest.mark.parametrize(
    ("uid", "reason"),
    [("08A1B2C3", "random_uid"), ("04A1B2", "bad_uid"), ("04A1B2C3D4", "bad_uid"), ("", "bad_uid")],
)
def test_uids_refused(uid, reason):
    outcome = read_card(card(uid=bytes.fromhex(uid)), ReadPlan(uid_fallback=True))
    assert isinstance(outcome, Invalid)
    assert outcome.reason == reason


@pytest.mark.parametrize(
    ("answers", "reason"),
    [
        (["6283"], "application_blocked"),
        (["6982"], "card_error"),
        (["9000", "6A82"], "no_member_file"),
        (["9000", "6982"], "card_error"),
        (["9000", "6B00"], "card_error"),  # offset past the end with nothing read yet
        (["9000", "0102039000"], "bad_response"),  # more bytes than Le asked for (Le=2 below)
        (["90"], "bad_response"),
        (["9000", ""], "bad_response"),
    ],
)
def test_card_errors(answers, reason):
    transmit, _ = scripted(*answers)
    outcome = read_card(transmit, ReadPlan(length=2))
    assert isinstance(outcome, Invalid)
    assert outcome.reason == reason


@given(st.lists(st.binary(max_size=40), min_size=1, max_size=60), st.booleans())
def test_read_card_never_raises_whatever_the_card_answers(answers, uid_fallback):
    queue = list(answers)

    def transmit(_: bytes) -> bytes:
        return queue.pop(0) if queue else b"\x6f\x00"

    assert isinstance(read_card(transmit, ReadPlan(chunk=7, uid_fallback=uid_fallback)), MemberFile | UidRead | Invalid)


@given(number=numbers, chunk=st.integers(1, 256), offset=st.integers(0, 300), exact_le=st.booleans())
def test_read_card_gives_the_same_member_whatever_the_chunking(number, chunk, offset, exact_le):
    data = bytes(offset) + member_file_bytes(number)
    plan = ReadPlan(offset=offset, chunk=chunk)
    assert read_card(member_card(data, exact_le=exact_le), plan) == MemberFile(number)


def test_transmit_errors_pass_through():
    class PulledError(Exception):
        pass

    def transmit(_: bytes) -> bytes:
        raise PulledError

    with pytest.raises(PulledError):
        read_card(transmit, ReadPlan())


def test_read_plan_validation():
    for bad in (
        {"aid": b"\x01\x02\x03\x04"},
        {"offset": 0x7FFF, "length": 2},
        {"length": 0},
        {"chunk": 0},
        {"chunk": 257},
        {"offset": -1},
    ):
        with pytest.raises(ValueError, match=r"."):
            ReadPlan(**bad)
