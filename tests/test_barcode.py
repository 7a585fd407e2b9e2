"""Barcode classification: EAN/UPC check digits, AIM identifiers, member cards, coupons, member QR codes.

Check digits are tested against every single-digit corruption; the rules
against garbage and against scans typed in the wrong keyboard layout, which
must never come out as another member's card.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from keyrecords import records_for_text

from drivers.barcode import (
    Coupon,
    MemberCard,
    MemberQR,
    Product,
    Rejected,
    Scanned,
    ScanRules,
    classify_scan,
    ean_check_digit_ok,
)
from drivers.base import CardRead, CouponScan
from drivers.keymap import KEYMAPS, keymap
from drivers.keystrokes import KeystrokeAssembler
from drivers.member_qr import static_member_code

PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
RULES = ScanRules()
EAN13 = "4006381333931"
UPCA = "036000291452"
EAN8 = "96385074"


def check_digit(payload: str) -> str:
    """The EAN/UPC check digit for ``payload`` (written apart from drivers.barcode: weights from the left)."""
    n = len(payload) + 1
    # Counting from the right of the full number (check digit = 1), odd positions weigh 1, even ones 3.
    total = sum(int(d) * (1 if (i % 2) != (n % 2) else 3) for i, d in enumerate(payload))
    return str(-total % 10)


def reason(result: Scanned) -> str | None:
    return result.reason if isinstance(result, Rejected) else None


# --- check digits -----------------------------------------------------------------------------


def test_known_check_digits() -> None:
    for good in (EAN13, UPCA, EAN8, "0" + UPCA, "5901234123457", "12345670"):
        assert ean_check_digit_ok(good), good
        assert check_digit(good[:-1]) == good[-1]
    for bad in ("4006381333932", "036000291453", "96385075", "", "1234567", "40063813339311", "400638133393x"):
        assert not ean_check_digit_ok(bad), bad
    assert not ean_check_digit_ok("٤٠٠٦٣٨١٣٣٣٩٣١")  # Arabic-Indic digits are not digits here


@given(st.sampled_from([7, 11, 12]).flatmap(lambda n: st.text(alphabet="0123456789", min_size=n, max_size=n)))
@PROPERTY
def test_every_single_digit_corruption_is_caught(payload: str) -> None:
    number = payload + check_digit(payload)
    assert ean_check_digit_ok(number)
    assert not isinstance(classify_scan(number, RULES), Rejected)
    for i in range(len(number)):
        for d in "0123456789":
            if d != number[i]:
                corrupted = number[:i] + d + number[i + 1 :]
                assert not ean_check_digit_ok(corrupted)
                assert reason(classify_scan(corrupted, RULES)) == "bad_check_digit"
                assert reason(classify_scan("]E0" + corrupted, RULES)) in ("bad_check_digit", "unknown_format")


# --- products and AIM identifiers -------------------------------------------------------------


def test_products() -> None:
    assert classify_scan(EAN13, RULES) == Product(EAN13)
    assert classify_scan(EAN8, RULES) == Product(EAN8)
    assert classify_scan("]E4" + EAN8, RULES) == Product(EAN8)
    assert classify_scan("]E3" + EAN13 + "12", RULES) == Product(EAN13)
    assert classify_scan("]E3" + EAN13 + "12345", RULES) == Product(EAN13)


def test_upc_a_is_ean_13_with_a_leading_zero_however_it_arrives() -> None:
    for text in (UPCA, "0" + UPCA, "]E0" + UPCA, "]E0" + "0" + UPCA):
        assert classify_scan(text, RULES) == Product("0" + UPCA), text


@pytest.mark.parametrize(
    "text",
    ["]E0" + EAN8, "]E4" + EAN13, "]E1" + "12", "]E2" + "12345", "]E0" + EAN13 + "x", "]E3" + EAN13, "]" + "E", "]+0x"],
)
def test_malformed_ean_symbols(text: str) -> None:
    assert reason(classify_scan(text, RULES)) == "unknown_format"


def test_aim_tells_code_128_digits_from_an_ean() -> None:
    # 13 digits that are no valid EAN: without AIM a bad EAN, with ]C0 a Code 128 member card.
    number = "1234567890123"
    assert not ean_check_digit_ok(number)
    assert reason(classify_scan(number, RULES)) == "bad_check_digit"
    assert classify_scan("]C0" + number, RULES) == MemberCard(number)
    assert classify_scan("]Q1" + "M1234567890", RULES) == MemberCard("M1234567890")


# --- member cards -----------------------------------------------------------------------------


def test_member_cards() -> None:
    assert classify_scan("M1234567890", RULES) == MemberCard("M1234567890")
    assert classify_scan("1234567890", RULES) == MemberCard("1234567890")
    assert classify_scan("M" + "1" * 19, RULES) == MemberCard("M" + "1" * 19)
    for bad in ("M123456789", "M" + "1" * 20, "m1234567890", "M1234567890 ", " M1234567890", "M١٢٣٤٥٦٧٨٩٠"):
        assert reason(classify_scan(bad, RULES)) == "unknown_format", bad
    assert reason(classify_scan("M1234567890\n", RULES)) == "unknown_format"


def test_member_prefixes_pattern_and_luhn() -> None:
    rules = ScanRules(member_pattern=r"^[A-Z]{2}\d{8}$", member_prefixes=("VP", "GD"), member_luhn=True)
    assert classify_scan("VP12345674", rules) == MemberCard("VP12345674")
    assert reason(classify_scan("VP12345675", rules)) == "bad_check_digit"
    assert reason(classify_scan("XX12345674", rules)) == "unknown_format"


def test_member_cards_as_in_store_eans() -> None:
    rules = ScanRules(member_gtin_prefixes=("29",))
    number = "29" + "0000012345"
    number += check_digit(number)
    assert classify_scan(number, rules) == MemberCard(number)
    assert classify_scan(number, RULES) == Product(number)
    assert classify_scan(EAN13, rules) == Product(EAN13)


def test_member_card_event_and_repr() -> None:
    card = classify_scan("M6222021234567890", RULES)
    assert isinstance(card, MemberCard)
    assert "6222021234567890" not in repr(card)
    assert card.card_read("scanner-1") == CardRead("scanner-1", "barcode", "M6222021234567890")


# --- coupons ----------------------------------------------------------------------------------


def test_coupons() -> None:
    assert classify_scan("CPN-XMAS50", RULES) == Coupon("CPN-XMAS50")
    assert reason(classify_scan("CPN-xmas50", RULES)) == "unknown_format"
    assert reason(classify_scan("XMAS50", RULES)) == "unknown_format"
    coupon = classify_scan("CPN0001", RULES)
    assert isinstance(coupon, Coupon)
    assert coupon.coupon_scan("scanner-1") == CouponScan("scanner-1", "CPN0001")
    gs1 = ScanRules(coupon_gtin_prefixes=("99",))
    number = "99" + "1234567890"
    number += check_digit(number)
    assert classify_scan(number, gs1) == Coupon(number)


def test_ambiguous_rules_refuse() -> None:
    rules = ScanRules(coupon_prefixes=("M",), coupon_pattern=r"M[0-9]+")
    assert reason(classify_scan("M1234567890", rules)) == "ambiguous"
    both = ScanRules(member_gtin_prefixes=("2",), coupon_gtin_prefixes=("29",))
    number = "29" + "0000012345"
    assert reason(classify_scan(number + check_digit(number), both)) == "ambiguous"


def test_bad_rules() -> None:
    with pytest.raises(ValueError, match="member_pattern"):
        ScanRules(member_pattern="(")
    with pytest.raises(ValueError, match="empty prefix"):
        ScanRules(coupon_prefixes=("",))
    with pytest.raises(ValueError, match="digit strings"):
        ScanRules(member_gtin_prefixes=("2x",))
    with pytest.raises(ValueError, match="max_length"):
        ScanRules(max_length=0)
    assert ScanRules() == ScanRules()
    assert hash(ScanRules()) == hash(ScanRules())


# --- member QR codes --------------------------------------------------------------------------


def test_member_qr_codes_go_to_the_verifier() -> None:
    static = static_member_code("M000123")
    assert classify_scan(static, RULES) == MemberQR(static)
    assert classify_scan("]Q1" + static, RULES) == MemberQR(static)
    assert "M000123" not in repr(MemberQR(static))
    # A member code that is not well formed is refused here, never tried as a member card.
    assert reason(classify_scan("LM0.1234567890.AAAA", ScanRules(member_pattern=r".*"))) == "bad_check"
    assert reason(classify_scan("LM1.hq1.M1", RULES)) == "malformed"
    assert reason(classify_scan("LM9.x", RULES)) == "unsupported_version"


# --- garbage ----------------------------------------------------------------------------------


def test_too_long_and_empty() -> None:
    assert reason(classify_scan("1" * 257, RULES)) == "too_long"
    assert reason(classify_scan("", RULES)) == "unknown_format"


@given(st.text(max_size=300))
@PROPERTY
def test_any_text_never_raises(text: str) -> None:
    assert_consistent(text, classify_scan(text, RULES))


@given(st.text(alphabet="0123456789]EC0Q1M-NPLa. ", max_size=30))
@PROPERTY
def test_scan_alphabet_garbage(text: str) -> None:
    assert_consistent(text, classify_scan(text, RULES))


def assert_consistent(text: str, result: Scanned) -> None:
    body = text[3:] if re.match(r"\][A-Za-z][0-9A-Za-z]", text) else text
    if isinstance(result, Product):
        assert ean_check_digit_ok(result.ean)
        assert result.ean in ("0" + body, body[:13], body)
    elif isinstance(result, MemberCard):
        assert result.number == body
        assert re.fullmatch(r"M?[0-9]{10,19}", result.number, flags=re.ASCII)
    elif isinstance(result, Coupon):
        assert result.code == body
        assert result.code.startswith("CPN")
    elif isinstance(result, MemberQR):
        assert result.text == body


# --- keyboard layouts -------------------------------------------------------------------------


def typed(text: str, device_layout: str, lane_layout: str) -> list[tuple[str, bool]]:
    assembler = KeystrokeAssembler(keymap(lane_layout))
    return [(k.text, k.decodable) for r in records_for_text(text, device_layout) for k in assembler.feed(*r)]


NUMBERS = st.builds(
    lambda m, digits: m + digits, st.sampled_from(["", "M"]), st.text(alphabet="0123456789", min_size=10, max_size=19)
)
LAYOUT_PAIRS = [(a, b) for a in sorted(KEYMAPS) for b in sorted(KEYMAPS) if a != b]


@given(NUMBERS, st.sampled_from(LAYOUT_PAIRS), st.sampled_from(["", "]C0"]))
@PROPERTY
def test_a_member_card_in_the_wrong_layout_is_never_another_card(
    number: str, layouts: tuple[str, str], aim: str
) -> None:
    for text, decodable in typed(aim + number, *layouts):
        result = classify_scan(text, RULES)
        if decodable and isinstance(result, MemberCard):
            # Only layouts that type digits and M alike (us and de) may get through, and unchanged.
            assert result.number == number
            assert "fr" not in layouts


@given(NUMBERS)
@settings(max_examples=100, deadline=None)
def test_us_scans_decoded_as_french_are_refused(number: str) -> None:
    ((text, decodable),) = typed(number, "us", "fr")
    assert not decodable or isinstance(classify_scan(text, RULES), Rejected)


@given(st.sampled_from([EAN13, UPCA, EAN8, "5901234123457"]), st.sampled_from(LAYOUT_PAIRS))
@settings(max_examples=50, deadline=None)
def test_products_in_the_wrong_layout(ean: str, layouts: tuple[str, str]) -> None:
    ((text, decodable),) = typed(ean, *layouts)
    result = classify_scan(text, RULES)
    assert not decodable or isinstance(result, Rejected | Product)
    if isinstance(result, Product):
        assert result.ean in (ean, "0" + ean)


@pytest.mark.parametrize("layout", sorted(KEYMAPS))
def test_scans_in_the_lanes_layout(layout: str) -> None:
    for text, expected in (
        ("]E0" + EAN13, Product(EAN13)),
        ("M1234567890", MemberCard("M1234567890")),
        ("CPN-XMAS50", Coupon("CPN-XMAS50")),
        ("]Q1" + static_member_code("M000123"), MemberQR(static_member_code("M000123"))),
    ):
        ((typed_text, decodable),) = typed(text, layout, layout)
        assert decodable
        assert classify_scan(typed_text, RULES) == expected
