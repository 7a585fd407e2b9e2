"""Exact money, quantity and rate arithmetic: parsers, formatters, rounding and allocation.

The parsers are the project's first line against bad input, so besides round
trips they get garbage: every byte inserted, replaced or deleted at every
position of a valid value, and arbitrary text.  The oracle for "what is a
valid decimal string" is written here, independently of ``agent.money``:
ASCII digits only, a bounded number of decimals, no sign, no spaces, no
exponent.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from decimal import Decimal
from fractions import Fraction

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from agent.money import (
    MAX_FEN,
    MAX_QTY,
    allocate,
    apportion,
    decimal_to_fen,
    div_half_up,
    format_fen,
    format_qty,
    format_rate,
    parse_money,
    parse_qty,
    parse_rate,
    to_decimal,
)

MONEY_SHAPE = re.compile(r"-?[0-9]{1,14}(\.[0-9]{1,2})?", re.ASCII)
QTY_SHAPE = re.compile(r"[0-9]{1,7}(\.[0-9]{1,3})?", re.ASCII)
RATE_SHAPE = re.compile(r"[0-9]{1,6}(\.[0-9]{1,4})?", re.ASCII)
NOT_STRINGS = [12.34, 12, 0, True, None, Decimal("12.34"), b"12.34", ["12.34"], {"v": "12.34"}, float("nan")]
# Characters that look like digits or decimal points to a human or to \d, but are not ASCII.
LOOKALIKES = "０１２３４５６７８９٠١٢٣٤٥٦٧٨٩۰१२३४๑๒߀᠐𝟎𝟏．。·,"

GARBAGE_TEXT = st.text(
    alphabet=st.sampled_from("0123456789.-+ eE_,\t\n") | st.sampled_from(LOOKALIKES) | st.characters(),
    max_size=24,
)


def money_oracle(text: str, *, allow_negative: bool) -> int | None:
    """The fen a money string stands for, or None when it must be refused."""
    if not MONEY_SHAPE.fullmatch(text):
        return None
    value = Decimal(text)
    if value < 0 and not allow_negative:
        return None
    fen = int(value * 100)
    return None if abs(fen) > MAX_FEN else fen


def qty_oracle(text: str) -> int | None:
    if not QTY_SHAPE.fullmatch(text):
        return None
    milli = int(Decimal(text) * 1000)
    return milli if 0 < milli <= MAX_QTY else None


def rate_oracle(text: str) -> int | None:
    return int(Decimal(text) * 10_000) if RATE_SHAPE.fullmatch(text) else None


def outcome(parse: Callable[..., int], text: str, **kwargs: bool) -> int | None:
    try:
        return parse(text, **kwargs)
    except ValueError:
        return None


def byte_mutations(valid: str) -> list[str]:
    """Every single-character insertion, replacement and deletion of bytes 0-255 in ``valid``."""
    out = []
    for position in range(len(valid) + 1):
        for code in range(256):
            ch = chr(code)
            out.append(valid[:position] + ch + valid[position:])
            if position < len(valid):
                out.append(valid[:position] + ch + valid[position + 1 :])
        if position < len(valid):
            out.append(valid[:position] + valid[position + 1 :])
    return out


# --- money --------------------------------------------------------------------------------


@given(st.integers(-MAX_FEN, MAX_FEN))
@example(0)
@example(MAX_FEN)
@example(-MAX_FEN)
def test_format_fen_then_parse_money_round_trips(fen: int) -> None:
    text = format_fen(fen)
    assert re.fullmatch(r"-?[0-9]+\.[0-9]{2}", text), text
    assert Decimal(text) == Decimal(fen) / 100
    assert parse_money(text, allow_negative=True) == fen
    if fen >= 0:
        assert parse_money(text) == fen


@given(st.from_regex(MONEY_SHAPE, fullmatch=True), st.booleans())
def test_parse_money_reads_every_well_formed_string_exactly(text: str, allow_negative: bool) -> None:
    expected = money_oracle(text, allow_negative=allow_negative)
    assert outcome(parse_money, text, allow_negative=allow_negative) == expected
    if expected is not None:
        assert Decimal(format_fen(expected)) == Decimal(text)


@given(GARBAGE_TEXT, st.booleans())
@example(text="１２.３４", allow_negative=False)
@example(text="٣", allow_negative=False)
@example(text="12.34\n", allow_negative=False)
def test_parse_money_accepts_exactly_the_decimal_strings(text: str, allow_negative: bool) -> None:
    assert outcome(parse_money, text, allow_negative=allow_negative) == money_oracle(
        text, allow_negative=allow_negative
    )


@pytest.mark.parametrize("valid", ["12.34", "0.5", "-7.00", "99999999999999.99"])
def test_parse_money_byte_by_byte(valid: str) -> None:
    wrong = []
    for text in byte_mutations(valid):
        for allow_negative in (False, True):
            got = outcome(parse_money, text, allow_negative=allow_negative)
            if got != money_oracle(text, allow_negative=allow_negative):
                wrong.append((text, allow_negative, got))
    assert wrong == []


@pytest.mark.parametrize("value", NOT_STRINGS)
def test_parse_money_refuses_anything_but_a_string(value: object) -> None:
    with pytest.raises(ValueError, match="decimal string"):
        parse_money(value)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("1.234", "not a money amount"),
        ("0.001", "not a money amount"),
        ("-1.00", "negative"),
        ("-0.01", "negative"),
        ("1e3", "not a money amount"),
        (" 1.00", "not a money amount"),
        ("1.00 ", "not a money amount"),
        ("+1.00", "not a money amount"),
        (".50", "not a money amount"),
        ("1.", "not a money amount"),
        ("", "not a money amount"),
        ("NaN", "not a money amount"),
        ("Infinity", "not a money amount"),
        ("1_000.00", "not a money amount"),
        ("1,50", "not a money amount"),
        ("0x10", "not a money amount"),
        ("123456789012345", "not a money amount"),
        (format_fen(MAX_FEN + 1), "out of range"),
    ],
)
def test_parse_money_refuses_with_a_reason(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_money(text)


def test_negative_money_only_when_allowed() -> None:
    assert parse_money("-12.30", allow_negative=True) == -1230
    with pytest.raises(ValueError, match="negative"):
        parse_money("-12.30")


@given(st.integers(-MAX_FEN, MAX_FEN))
def test_decimal_conversions_round_trip(fen: int) -> None:
    assert to_decimal(fen) == Decimal(fen) / 100
    assert decimal_to_fen(to_decimal(fen)) == fen


@pytest.mark.parametrize("text", ["1.234", "0.001", "NaN", "sNaN", "Infinity", "-Infinity"])
def test_decimal_to_fen_refuses_sub_fen_and_non_finite_values(text: str) -> None:
    with pytest.raises(ValueError):  # the reason differs by case; ValueError is the contract
        decimal_to_fen(Decimal(text))


# --- quantities -------------------------------------------------------------------------------


@given(st.integers(1, MAX_QTY))
@example(1)
@example(356)
@example(MAX_QTY)
def test_format_qty_then_parse_qty_round_trips(milli: int) -> None:
    text = format_qty(milli)
    assert Decimal(text) == Decimal(milli) / 1000
    assert not text.endswith(".")
    assert "." not in text or not text.endswith("0"), text  # no trailing zeros: "1.5", "2"
    assert parse_qty(text) == milli


@given(st.from_regex(QTY_SHAPE, fullmatch=True) | GARBAGE_TEXT)
@example("0")
@example("0.000")
@example("1000000.001")
@example("１")
@example("0.3560")
def test_parse_qty_accepts_exactly_positive_decimals_with_three_places(text: str) -> None:
    assert outcome(parse_qty, text) == qty_oracle(text)


@pytest.mark.parametrize("valid", ["0.356", "2", "1000000"])
def test_parse_qty_byte_by_byte(valid: str) -> None:
    wrong = [(text, got) for text in byte_mutations(valid) if (got := outcome(parse_qty, text)) != qty_oracle(text)]
    assert wrong == []


@pytest.mark.parametrize("value", NOT_STRINGS)
def test_parse_qty_refuses_anything_but_a_string(value: object) -> None:
    with pytest.raises(ValueError, match="decimal string"):
        parse_qty(value)


@pytest.mark.parametrize(("text", "reason"), [("0", "greater than zero"), ("0.000", "greater than zero"),
                                              ("-1", "not a quantity"), ("1.2345", "not a quantity"),
                                              ("1000000.001", "out of range")])  # fmt: skip
def test_parse_qty_refuses_with_a_reason(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_qty(text)


# --- rates ------------------------------------------------------------------------------------------


@given(st.integers(0, 9_999_999_999))
@example(0)
@example(9500)
@example(10_000)
@example(100_000_000)
def test_format_rate_then_parse_rate_round_trips(e4: int) -> None:
    text = format_rate(e4)
    assert Decimal(text) == Decimal(e4) / 10_000
    assert parse_rate(text) == e4


@given(st.from_regex(RATE_SHAPE, fullmatch=True) | GARBAGE_TEXT)
@example("0.95")
@example("-0.95")
@example("0.12345")
@example("٠.٩٥")
def test_parse_rate_accepts_exactly_non_negative_decimals_with_four_places(text: str) -> None:
    assert outcome(parse_rate, text) == rate_oracle(text)


@pytest.mark.parametrize("valid", ["0.95", "2"])
def test_parse_rate_byte_by_byte(valid: str) -> None:
    wrong = [(text, got) for text in byte_mutations(valid) if (got := outcome(parse_rate, text)) != rate_oracle(text)]
    assert wrong == []


@pytest.mark.parametrize("value", NOT_STRINGS)
def test_parse_rate_refuses_anything_but_a_string(value: object) -> None:
    with pytest.raises(ValueError, match="decimal string"):
        parse_rate(value)


# --- rounding -------------------------------------------------------------------------------------------


@given(st.integers(0, 10**30), st.integers(1, 10**15))
@example(5, 10)
@example(15, 10)
@example(4, 10)
@example(0, 1)
def test_div_half_up_rounds_halves_away_from_zero(numerator: int, denominator: int) -> None:
    quotient, remainder = divmod(numerator, denominator)
    expected = quotient + (1 if Fraction(remainder, denominator) >= Fraction(1, 2) else 0)
    assert div_half_up(numerator, denominator) == expected


@pytest.mark.parametrize(("numerator", "denominator"), [(-1, 10), (1, 0), (1, -10), (-5, -10)])
def test_div_half_up_refuses_negative_numerators_and_non_positive_denominators(
    numerator: int, denominator: int
) -> None:
    with pytest.raises(ValueError, match="div_half_up"):
        div_half_up(numerator, denominator)


# --- allocation ------------------------------------------------------------------------------------------

WEIGHTS = st.lists(st.integers(0, 10**9) | st.sampled_from([0, 1, 7, 100]), min_size=1, max_size=30)


@settings(max_examples=300)
@given(st.integers(0, 10**12), WEIGHTS)
@example(2, [1, 1, 1])
@example(1, [0, 5, 5])
@example(100, [0, 0, 1])
def test_allocate_is_a_largest_remainder_split(total: int, weights: list[int]) -> None:
    if sum(weights) == 0:
        if total:
            with pytest.raises(ValueError, match="zero weights"):
                allocate(total, weights)
        else:
            assert allocate(total, weights) == [0] * len(weights)
        return
    parts = allocate(total, weights)
    weight_sum = sum(weights)
    assert len(parts) == len(weights)
    assert sum(parts) == total
    exact = [Fraction(total * w, weight_sum) for w in weights]
    for part, weight, share in zip(parts, weights, exact, strict=True):
        if weight == 0:
            assert part == 0
        # Each part is its exact share rounded down or up, never further off.
        assert share - 1 < part < share + 1
    # Extra units go to the largest remainders; equal remainders favour the earlier position.
    rounded_up = [i for i, (p, s) in enumerate(zip(parts, exact, strict=True)) if p > s]
    rounded_down = [i for i, (p, s) in enumerate(zip(parts, exact, strict=True)) if p < s]
    for up in rounded_up:
        for down in rounded_down:
            rem_up, rem_down = exact[up] % 1, exact[down] % 1
            assert rem_up > rem_down or (rem_up == rem_down and up < down), (up, down, parts)
    assert allocate(total, weights) == parts


@given(st.integers(1, 10**6), st.integers(1, 10**6), st.integers(2, 12))
def test_allocate_ties_go_to_the_earlier_line(total: int, weight: int, count: int) -> None:
    parts = allocate(total, [weight] * count)
    assert parts == sorted(parts, reverse=True)
    assert max(parts) - min(parts) <= 1


@pytest.mark.parametrize(
    ("total", "weights"),
    [(-1, [1, 2]), (5, [-1, 2]), (5, [2, -1]), (0, [-1, 3]), (0, [-1]), (0, [-3, 1]), (5, []), (5, [0, 0])],
)
def test_allocate_refuses_negative_totals_negative_weights_and_nothing_to_weigh(total: int, weights: list[int]) -> None:
    with pytest.raises(ValueError, match=r"allocate|weights"):
        allocate(total, weights)


def test_allocate_over_nothing_is_nothing() -> None:
    assert allocate(0, []) == []


@settings(max_examples=300)
@given(st.lists(st.integers(0, 10**12), min_size=1, max_size=20), st.integers(1, 10**6), st.data())
def test_apportion_keeps_each_whole_part_and_spreads_the_rest_by_remainder(
    numerators: list[int], denominator: int, data: st.DataObject
) -> None:
    floors = sum(n // denominator for n in numerators)
    ceilings = sum(-(-n // denominator) for n in numerators)
    total = data.draw(st.integers(floors, ceilings), label="total")
    parts = apportion(total, numerators, denominator)
    assert sum(parts) == total
    for part, numerator in zip(parts, numerators, strict=True):
        assert numerator // denominator <= part <= -(-numerator // denominator)
    up = [i for i, (p, n) in enumerate(zip(parts, numerators, strict=True)) if p * denominator > n]
    down = [i for i, (p, n) in enumerate(zip(parts, numerators, strict=True)) if p * denominator < n]
    for i in up:
        for j in down:
            ri, rj = numerators[i] % denominator, numerators[j] % denominator
            assert ri > rj or (ri == rj and i < j), (i, j, parts)


@pytest.mark.parametrize(("total", "numerators", "denominator"), [(4, [150, 50], 100), (0, [150], 100), (-1, [0], 1)])
def test_apportion_refuses_a_total_outside_floors_and_ceilings(
    total: int, numerators: list[int], denominator: int
) -> None:
    with pytest.raises(ValueError, match="apportion"):
        apportion(total, numerators, denominator)
