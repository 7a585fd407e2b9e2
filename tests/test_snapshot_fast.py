"""The snapshot reader's fast check against the pydantic models it stands in for.

``agent.snapshot._FastCheck`` checks member lines by hand and hands anything it
does not accept to ``SnapshotMember``, which then decides and words the
report.  So the one property that matters: whatever the fast check accepts,
the model accepts too, with exactly the same rows.  And it must actually
accept ordinary lines, or the import is slow again without any test failing.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from agent.snapshot import CardRow, MemberRow, SnapshotMember, _FastCheck, _model_rows

DAY = dt.date(2026, 12, 10)
DEFAULT_VERSION = 9
HASH = "ab" * 32

CARD: dict[str, Any] = {"card_hash": HASH, "kind": "standard", "state": "active", "valid_from": "2025-01-01"}
MEMBER: dict[str, Any] = {
    "member_id": "M000123",
    "tier": "gold",
    "points_balance": 1200,
    "rebate_balance": "35.20",
    "cards": [CARD],
}

# Values around every rule of the models: types, lengths, ranges, formats, calendars.
TEXTS: list[Any] = ["", "x", "x" * 64, "x" * 65, "会员", "A\u0000B", " ", 5, None, True, ["x"], {"x": 1}]
INTS: list[Any] = [
    0,
    1,
    -1,
    10**12,
    10**12 + 1,
    2**62,
    2**62 + 1,
    2**63,
    -(2**63),
    1.0,
    12.5,
    "12",
    True,
    False,
    None,
    [],
]
MONEY: list[Any] = [
    "0",
    "0.00",
    "35.2",
    "35.20",
    "35.200",
    "-0.00",
    "-1",
    "00012.50",
    "1e3",
    " 1.00",
    "1.00 ",
    "+1",
    "１２",
]
MONEY += ["99999999999.99", "999999999999.99", "99999999999999", "100000000000000", "1_000", "", ".5", "5.", 35, 35.2]
DATES: list[Any] = ["2025-01-01", "2024-02-29", "2023-02-29", "2025-13-01", "2025-00-10", "0000-01-01", "0001-01-01"]
DATES += ["9999-12-31", "2025-1-01", "20250101", "2025-01-01T00:00:00", "2025-01-01 ", "２０２５-01-01", 20250101, None]
BIRTHDAYS: list[Any] = ["03-14", "02-29", "02-30", "13-01", "00-10", "3-14", "03-14 ", "0314", "", None, 314, ["03-14"]]
STATES: list[Any] = ["active", "lost", "replaced", "expired", "cancelled", "stolen", "Active", "", None, 1, ["active"]]
HASHES: list[Any] = [
    HASH,
    "AB" * 32,
    "ab" * 31,
    "ab" * 33,
    "ab" * 31 + "a ",
    "ab" * 31 + "zz",
    "ab " * 21 + "a",
    "",
    None,
    7,
]


def model_rows(raw: bytes) -> tuple[MemberRow, list[CardRow]] | None:
    try:
        member = SnapshotMember.model_validate_json(raw)
    except ValidationError:
        return None
    return _model_rows(member, DAY, DEFAULT_VERSION)


def check(doc: Any) -> tuple[MemberRow, list[CardRow]] | None:
    """Both checks on one line; returns the fast check's rows (None: it passed the line to pydantic)."""
    raw = json.dumps(doc).encode() + b"\n"
    fast = _FastCheck().member(raw, DAY.isoformat(), DEFAULT_VERSION)
    if fast is not None:
        assert fast == model_rows(raw), raw
    return fast


def field_values(name: str) -> list[Any]:
    pools: dict[str, list[Any]] = {
        "member_id": TEXTS,
        "tier": TEXTS,
        "card_kind": TEXTS,
        "next_tier": TEXTS,
        "next_tier_from": DATES,
        "birthday": BIRTHDAYS,
        "points_balance": INTS,
        "rebate_balance": MONEY,
        "version": INTS,
        "kind": TEXTS,
        "state": STATES,
        "valid_from": DATES,
        "valid_until": DATES,
        "card_hash": HASHES,
    }
    return pools[name]


MISSING = object()


def mutated(doc: dict[str, Any], name: str, value: Any) -> dict[str, Any]:
    out = dict(doc)
    if value is MISSING:
        out.pop(name, None)
    else:
        out[name] = value
    return out


def test_ordinary_lines_take_the_fast_path() -> None:
    assert check(MEMBER) is not None
    full = {
        **MEMBER,
        "card_kind": "vip",
        "next_tier": "platinum",
        "next_tier_from": "2026-12-11",
        "birthday": "02-29",
        "version": 3,
        "cards": [{**CARD, "valid_until": "2027-12-31"}, {**CARD, "card_hash": "cd" * 32, "state": "lost"}],
    }
    assert check(full) is not None
    assert check({**MEMBER, "cards": []}) is not None
    assert check({k: v for k, v in MEMBER.items() if k != "cards"}) is not None
    assert check({**MEMBER, "birthday": None, "version": None, "card_kind": None}) is not None


def test_every_single_field_change_agrees_with_the_model() -> None:
    member_fields = ["member_id", "tier", "card_kind", "next_tier", "next_tier_from", "birthday"]
    member_fields += ["points_balance", "rebate_balance", "version"]
    for name in member_fields:
        for value in [*field_values(name), MISSING]:
            check(mutated(MEMBER, name, value))
            check(mutated({**MEMBER, "next_tier": "gold", "next_tier_from": "2026-12-11"}, name, value))
    for name in ["card_hash", "kind", "state", "valid_from", "valid_until"]:
        for value in [*field_values(name), MISSING]:
            check({**MEMBER, "cards": [mutated(CARD, name, value)]})
            check({**MEMBER, "cards": [CARD, mutated({**CARD, "card_hash": "cd" * 32}, name, value)]})
    odd_cards: list[Any] = [None, {}, "x", [None], [[]], [CARD] * 64, [CARD] * 65, [{**CARD, "phone": "1"}]]
    for odd in odd_cards:
        check({**MEMBER, "cards": odd})
    odd_lines: list[Any] = [
        None,
        [],
        "x",
        1,
        {},
        {**MEMBER, "name": "Zhang San"},
        {"kind": "end", "count": 1, "sha256": HASH},
    ]
    for line in odd_lines:
        check(line)


def test_which_card_kind_a_member_gets_matches_the_model() -> None:
    # Newest active card valid on the day, else newest active, else the first card, else "standard"; ties: first.
    cards = [
        {**CARD, "card_hash": f"{i:02x}" * 32, "kind": f"k{i}", "state": state, "valid_from": start, **until}
        for i, (state, start, until) in enumerate(
            [
                ("active", "2025-01-01", {}),
                ("active", "2026-06-01", {"valid_until": "2026-12-09"}),
                ("lost", "2026-07-01", {}),
                ("active", "2025-01-01", {"valid_until": "2030-01-01"}),
                ("active", "2027-01-01", {}),
                ("replaced", "2020-01-01", {}),
            ]
        )
    ]
    for start in range(len(cards)):
        for end in range(start + 1, len(cards) + 1):
            assert check({**MEMBER, "cards": cards[start:end]}) is not None
            assert check({**MEMBER, "cards": cards[start:end][::-1]}) is not None


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=5,
)


def field_strategy(name: str) -> st.SearchStrategy[Any]:
    return st.sampled_from(field_values(name)) | json_values


card_docs = st.fixed_dictionaries(
    {"card_hash": st.sampled_from([*HASHES[:2], "cd" * 32])},
    optional={name: field_strategy(name) for name in ["kind", "state", "valid_from", "valid_until"]},
)


@given(
    st.fixed_dictionaries(
        {},
        optional={
            **{
                name: field_strategy(name)
                for name in [
                    "member_id",
                    "tier",
                    "card_kind",
                    "next_tier",
                    "next_tier_from",
                    "birthday",
                    "points_balance",
                    "rebate_balance",
                    "version",
                ]
            },
            "cards": st.lists(card_docs, max_size=3) | json_values,
            "extra": json_values,
        },
    )
)
@settings(max_examples=1500)
def test_random_lines_agree_with_the_model(doc: dict[str, Any]) -> None:
    check(doc)
