"""The member centre's service desk (sync/hq/centre/registry.py, claims.py, pii.py, staff.py, members_api.py).

Database tests run on a real SQLite file and a real PostgreSQL database
(``db_url``, tests/conftest.py) with head office's clock set by the test.
Sales reach head office the way lanes send them: journal bodies priced by the
engine with the programme's ruleset, applied with ``HqDatabase.apply_batch``,
so a late claim re-prices exactly what a lane journaled.  The HTTP API runs
in process (``create_hq_app`` with this router, over httpx's ASGI
transport); the command line as real ``lane-hq`` processes.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import datetime as dt
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
from conftest import REPO_ROOT
from sqlalchemy import select, text

from agent.basket import Member as PricedMember
from agent.basket import parse_member
from agent.engine import price
from agent.money import format_fen
from agent.pos_models import SaleIn
from agent.render import to_wire
from agent.ruleset import Ruleset, load_ruleset
from agent.snapshot import card_hash
from sync.hq import schema
from sync.hq.api import create_hq_app
from sync.hq.audit import RulesetLibrary
from sync.hq.centre import members_api
from sync.hq.centre.claims import Receipt
from sync.hq.centre.pii import PersonalData, PersonalDataError, normalise_phone
from sync.hq.centre.programme import Programme
from sync.hq.centre.registry import (
    CardNumbering,
    DeskConfigError,
    Registration,
    ServiceDesk,
    card_validity,
    luhn_valid,
)
from sync.hq.centre.staff import bearer_value, staff_of, staff_token
from sync.hq.config import parse_hq_config
from sync.hq.db import HqDatabase
from sync.hq.members import MemberError
from sync.hq.metrics import HqMetrics
from sync.hq.owner import DbOwner
from sync.wire import RawEntry, decode_batch, encode_batch

RULES = REPO_ROOT / "config" / "rules"
R888 = load_ruleset(RULES / "888-mall.toml")
RKC = load_ruleset(RULES / "kangcheng.toml")
RXX = load_ruleset(RULES / "xx-mall.toml")
LIBRARY = RulesetLibrary([R888, RKC, RXX])
SHANGHAI = ZoneInfo("Asia/Shanghai")
CARD_KEY = bytes(range(32))
PII_KEY = bytes(range(100, 132))
OTHER_KEY = bytes(range(200, 232))
STAFF_SECRET = "staff-secret-for-the-tests"
STORE, LANE = "s01", "l01"
EPOCH = "0123456789abcdef" * 2

# Personal data the tests register: none of it may appear in a row, a log line or an audit detail.
NAME = "张三丰"
PHONE = "+86 138-0013-8000"
PHONE_DIGITS = "13800138000"
ID_NUMBER = "11010519491231002X"
ADDRESS = "北京市朝阳区建国路88号"
EMAIL = "zhang.sanfeng@example.com"
HOLDER = "李四光"
SECRETS = (NAME, PHONE, PHONE_DIGITS, ID_NUMBER, ADDRESS, EMAIL, HOLDER)


def local(year: int, month: int, day: int, hour: int = 10, minute: int = 0) -> dt.datetime:
    return dt.datetime(year, month, day, hour, minute, tzinfo=SHANGHAI)


class Clock:
    """Head office's clock, set by the test."""

    def __init__(self, at: dt.datetime) -> None:
        self.at = at

    def __call__(self) -> dt.datetime:
        return self.at


@pytest.fixture
def clock() -> Clock:
    return Clock(local(2026, 3, 15))


@pytest.fixture
def hq(db_url: str, clock: Clock) -> Iterator[HqDatabase]:
    database = HqDatabase.open(db_url, now=clock)
    try:
        yield database
    finally:
        database.close()


def desk_for(db: HqDatabase, ruleset: Ruleset, *, key: bytes = PII_KEY) -> ServiceDesk:
    return ServiceDesk(
        db,
        lambda: Programme(ruleset),
        pii=PersonalData(key),
        card_key=CARD_KEY,
        numbering=CardNumbering("8800", 16),
        library=LIBRARY,
    )


# --- sales as lanes journal them ---------------------------------------------------------------


def member_doc(member_id: str, tier: str) -> dict[str, Any]:
    return {
        "member_id": member_id,
        "tier": tier,
        "card_kind": "standard",
        "birthday": None,
        "points_balance": 0,
        "rebate_balance": "0.00",
        "next_tier": None,
        "next_tier_from": None,
    }


def sale_body(
    ruleset: Ruleset, sale_id: str, at: dt.datetime, fen: int, member: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A sale's journal body as agent/service.py writes it: the request, the member and the engine's result."""
    request: dict[str, Any] = {
        "sale_id": sale_id,
        "at": at.isoformat(),
        "lines": [
            {
                "line_id": "1",
                "sku": "6900000000999",
                "category": "womenswear",
                "qty": "1",
                "unit_price": format_fen(fen),
            }
        ],
    }
    if member is not None:
        request["member_id"] = member["member_id"]
    who = None if member is None else parse_member(member)
    due = price(SaleIn.model_validate(request).to_basket(), who, ruleset, at).net_fen
    request["tenders"] = [{"kind": "cash", "amount": format_fen(due)}]
    priced = price(SaleIn.model_validate(request).to_basket(), who, ruleset, at)
    return {
        "v": 1,
        "kind": "sale",
        "store": STORE,
        "lane": LANE,
        "rules": {"id": ruleset.id, "version": ruleset.version, "digest": ruleset.digest},
        "sale_id": sale_id,
        "request": request,
        "member": member,
        "result": to_wire(priced),
    }


class Lane:
    """One lane's journal stream into head office: each ``sell`` is one batch, the next seq."""

    def __init__(self, db: HqDatabase, ruleset: Ruleset) -> None:
        self.db = db
        self.ruleset = ruleset
        self.seq = 0

    def sell(self, at: dt.datetime, fen: int, member: dict[str, Any] | None = None) -> tuple[str, str]:
        """``(entry id, sale id)`` of a sale applied at head office."""
        self.seq += 1
        sale_id = f"S{self.seq:05d}-{uuid.uuid4().hex[:6]}"
        entry_id = str(uuid.uuid4())
        body = sale_body(self.ruleset, sale_id, at, fen, member)
        entry = RawEntry(
            seq=self.seq,
            id=entry_id,
            kind="sale",
            at=at.isoformat(),
            rules_version=self.ruleset.version,
            member_version=0,
            body=json.dumps(body, ensure_ascii=False),
        )
        applied = self.db.apply_batch(
            decode_batch(STORE, LANE, encode_batch(STORE, LANE, EPOCH, [entry])), f"retail/{STORE}/{LANE}/journal"
        )
        assert applied.applied == 1, applied
        return entry_id, sale_id


def rows(db: HqDatabase, sql: str, **params: Any) -> list[tuple[Any, ...]]:
    with db._engine.connect() as conn:
        return [tuple(row) for row in conn.execute(text(sql), params)]


def everything(db: HqDatabase) -> str:
    """Every row of every table, as text: what someone reading the database without the key sees."""
    parts = []
    with db._engine.connect() as conn:
        for table in schema.metadata.sorted_tables:
            parts.extend(repr(tuple(row)) for row in conn.execute(select(table)))
    return "\n".join(parts)


def forms_of(value: str) -> list[str]:
    """A value as it might leak: the text, its UTF-8 in hex, its base64 (standard and URL-safe, padded or not)."""
    data = value.encode()
    b64 = [base64.b64encode(data).decode(), base64.urlsafe_b64encode(data).decode()]
    return [value, data.hex(), *b64, *(text.rstrip("=") for text in b64)]


def assert_no_personal_data(found: str) -> None:
    for value in SECRETS:
        for form in forms_of(value):
            assert form not in found, (value, form)


def balances_match_the_ledger(db: HqDatabase) -> None:
    """members.points_balance / rebate_fen = sum(points_ledger) + sum(centre_ledger), for every member."""
    found = rows(
        db,
        "SELECT m.member_id, m.points_balance, m.rebate_fen,"
        " COALESCE((SELECT SUM(points) FROM points_ledger p WHERE p.member_id = m.member_id), 0)"
        " + COALESCE((SELECT SUM(points) FROM centre_ledger c WHERE c.member_id = m.member_id), 0),"
        " COALESCE((SELECT SUM(rebate_fen) FROM points_ledger p WHERE p.member_id = m.member_id), 0)"
        " + COALESCE((SELECT SUM(rebate_fen) FROM centre_ledger c WHERE c.member_id = m.member_id), 0)"
        " FROM members m",
    )
    for member_id, points, rebate, ledger_points, ledger_rebate in found:
        assert (int(points), int(rebate)) == (int(ledger_points), int(ledger_rebate)), member_id


def register_xx(desk: ServiceDesk, **changes: Any) -> str:
    """A member of xx mall who paid the 10-yuan join fee, with every personal-data field."""
    form = Registration(
        name=NAME,
        phone=PHONE,
        id_number=ID_NUMBER,
        address=ADDRESS,
        email=EMAIL,
        birthday="07-14",
        marketing_consent=True,
        store=STORE,
        pay_join_fee=True,
    )
    return desk.register("desk-wang", dataclasses.replace(form, **changes)).member_id


# --- pure parts: keys, hashes, tokens, numbers, validity --------------------------------------


def test_personal_data_is_bound_to_its_member_and_field_and_to_its_key() -> None:
    pii = PersonalData(PII_KEY)
    token = pii.encrypt("M1", "name", NAME)
    assert token.startswith(f"v1.{pii.key_id}.")
    assert NAME not in token
    assert pii.decrypt("M1", "name", token) == NAME
    assert pii.encrypt("M1", "name", NAME) != token  # a new nonce each time
    for member_id, field in (("M2", "name"), ("M1", "address")):
        with pytest.raises(PersonalDataError) as copied:
            pii.decrypt(member_id, field, token)
        assert copied.value.code == "not_this_field"
    other = PersonalData(OTHER_KEY)
    assert other.key_id != pii.key_id
    with pytest.raises(PersonalDataError) as wrong:
        other.decrypt("M1", "name", token)
    assert wrong.value.code == "wrong_key"
    assert wrong.value.message == (
        f"personal data was encrypted with key {pii.key_id}, this head office has key {other.key_id}"
    )
    tampered = token[:-2] + ("A" if token[-2] != "A" else "B") + token[-1]
    with pytest.raises(PersonalDataError):
        pii.decrypt("M1", "name", tampered)
    with pytest.raises(PersonalDataError) as weak:
        PersonalData(b"short key")
    assert weak.value.code == "weak_key"


def test_phone_numbers_and_id_numbers_hash_by_their_normalised_form() -> None:
    pii = PersonalData(PII_KEY)
    for written in (
        "13800138000",
        "+86 138 0013 8000",
        "8613800138000",
        "0086-138-0013-8000",
        "１３８００１３８０００",
    ):
        assert normalise_phone(written) == PHONE_DIGITS
        assert pii.phone_hash(written) == pii.phone_hash(PHONE)
    assert normalise_phone("+86 21 6234 5678") == "862162345678"  # not a mobile: the country code stays
    assert pii.phone_hash("13800138001") != pii.phone_hash(PHONE)
    assert PersonalData(OTHER_KEY).phone_hash(PHONE) != pii.phone_hash(PHONE)  # keyed: no key, no guessing
    assert pii.id_number_hash("11010519491231002x") == pii.id_number_hash(" 110105 19491231002X ")
    assert pii.phone_hash(PHONE) != pii.id_number_hash(PHONE_DIGITS)  # separate labels
    with pytest.raises(ValueError, match="5-15 digits"):
        normalise_phone("call me")


def test_staff_tokens_prove_a_name_under_the_secret() -> None:
    secret = STAFF_SECRET.encode()
    value = bearer_value(secret, "wang.li")
    assert value == f"wang.li:{staff_token(secret, 'wang.li')}"
    assert staff_of(secret, value) == "wang.li"
    assert staff_of(b"another secret", value) is None
    assert staff_of(secret, value.replace("wang.li", "zhao.yi", 1)) is None
    assert staff_of(secret, staff_token(secret, "wang.li")) is None  # the name is part of it
    with pytest.raises(ValueError, match="staff name"):
        staff_token(secret, "a:b")


def test_generated_card_numbers_have_the_prefix_and_a_luhn_check_digit() -> None:
    numbering = CardNumbering("8800", 16)
    numbers = {numbering.generate() for _ in range(200)}
    assert len(numbers) == 200
    for number in numbers:
        assert len(number) == 16
        assert number.startswith("8800")
        assert luhn_valid(number)
    assert luhn_valid("79927398713")
    assert not luhn_valid("79927398710")


def test_card_validity_of_the_three_programmes() -> None:
    xx, m888, kc = RXX.centre.card_validity, R888.centre.card_validity, RKC.centre.card_validity
    assert card_validity(xx, dt.date(2026, 3, 15)) == (dt.date(2026, 3, 16), dt.date(2027, 6, 30))
    assert card_validity(xx, dt.date(2026, 6, 30)) == (dt.date(2026, 7, 1), dt.date(2027, 6, 30))
    assert card_validity(xx, dt.date(2026, 7, 1)) == (dt.date(2026, 7, 2), dt.date(2028, 6, 30))
    assert card_validity(xx, dt.date(2026, 9, 1)) == (dt.date(2026, 9, 2), dt.date(2028, 6, 30))
    assert card_validity(m888, dt.date(2026, 3, 15)) == (dt.date(2026, 3, 16), dt.date(2027, 3, 15))
    assert card_validity(m888, dt.date(2028, 2, 28)) == (dt.date(2028, 2, 29), dt.date(2029, 2, 27))
    assert card_validity(kc, dt.date(2026, 3, 15)) == (dt.date(2026, 3, 16), None)


# --- registration and personal data ------------------------------------------------------------


def test_registration_stores_personal_data_unreadable_without_the_key(hq: HqDatabase) -> None:
    desk = desk_for(hq, RXX)
    member_id = register_xx(desk)
    issued = desk.issue_card("desk-wang", member_id, role="family", holder=HOLDER)
    [(name_enc, phone_enc, id_enc, address_enc, email_enc, phone_hash, consent, status)] = rows(
        hq,
        "SELECT name_enc, phone_enc, id_number_enc, address_enc, email_enc, phone_hash, marketing_consent, status"
        " FROM member_profiles WHERE member_id = :m",
        m=member_id,
    )
    assert (consent, status) == (1, "active")
    assert_no_personal_data(everything(hq))  # profiles, card register, audit, change log, ledger: all of it
    pii = PersonalData(PII_KEY)
    assert pii.decrypt(member_id, "name", name_enc) == NAME
    assert pii.decrypt(member_id, "phone", phone_enc) == PHONE_DIGITS
    assert pii.decrypt(member_id, "id_number", id_enc) == ID_NUMBER
    assert pii.decrypt(member_id, "address", address_enc) == ADDRESS
    assert pii.decrypt(member_id, "email", email_enc) == EMAIL
    assert phone_hash == pii.phone_hash(PHONE)
    [(holder_enc, masked)] = rows(
        hq, "SELECT holder_enc, number_masked FROM card_register WHERE member_id = :m", m=member_id
    )
    assert pii.decrypt(member_id, f"holder:{issued.card_hash}", holder_enc) == HOLDER
    assert masked == "*" * 12 + issued.number[-4:]
    other = PersonalData(OTHER_KEY)
    for field, token in (("name", name_enc), ("address", address_enc), (f"holder:{issued.card_hash}", holder_enc)):
        with pytest.raises(PersonalDataError, match=f"encrypted with key {pii.key_id}, this head office has key"):
            other.decrypt(member_id, field, token)
    # Moved to another member's row, or to another field, the ciphertext does not decrypt.
    with pytest.raises(PersonalDataError, match="copied from another member or field"):
        pii.decrypt(member_id, "address", name_enc)
    with pytest.raises(PersonalDataError, match="copied from another member or field"):
        pii.decrypt("M-other", "name", name_enc)
    # Through the desk: the data comes back only with the key, and the viewing is recorded.
    assert "viewed personal data" not in [e.reason for e in desk.audit_trail(member_id)]
    shown = desk.personal_data("desk-li", member_id)
    assert (shown.name, shown.phone, shown.id_number, shown.address, shown.email) == (
        NAME,
        PHONE_DIGITS,
        ID_NUMBER,
        ADDRESS,
        EMAIL,
    )
    assert shown.holders == {issued.number_masked: HOLDER}
    assert NAME not in repr(shown)
    newest = desk.audit_trail(member_id)[0]
    assert (newest.actor, newest.action) == ("desk-li", "view_personal_data")
    with pytest.raises(PersonalDataError) as wrong:
        desk_for(hq, RXX, key=OTHER_KEY).personal_data("desk-li", member_id)
    assert wrong.value.code == "wrong_key"


def test_registration_reaches_the_lanes_and_writes_its_history(hq: HqDatabase) -> None:
    desk = desk_for(hq, RXX)
    member_id = register_xx(desk)
    assert member_id.startswith("M")
    assert len(member_id) == 13
    line = json.loads(rows(hq, "SELECT line FROM member_changes WHERE member_id = :m", m=member_id)[0][0])
    assert (line["tier"], line["birthday"], line["points_balance"], line["cards"]) == ("normal", "07-14", 0, [])
    assert rows(
        hq,
        "SELECT kind, from_tier, to_tier, CAST(effective_from AS TEXT), reason FROM tier_history WHERE member_id = :m",
        m=member_id,
    ) == [("manual", None, "normal", "2026-03-15", "registered")]
    [(actor, action, detail)] = rows(
        hq, "SELECT actor, action, detail FROM centre_audit WHERE member_id = :m", m=member_id
    )
    assert (actor, action) == ("desk-wang", "register")
    assert json.loads(detail)["join_fee_fen"] == 1000
    assert json.loads(detail)["why"] == "join fee 10.00 paid"
    balances_match_the_ledger(hq)
    given = register_xx(desk, phone="139 0000 1111", id_number="310101199001010011", member_id="M-given-1")
    assert given == "M-given-1"
    with pytest.raises(MemberError) as twice:
        register_xx(desk, phone="139 0000 2222", id_number=None, member_id="M-given-1")
    assert twice.value.code == "member_exists"


def test_find_by_phone_in_any_format_and_one_active_member_per_phone(hq: HqDatabase) -> None:
    desk = desk_for(hq, RXX)
    member_id = register_xx(desk)
    for written in (PHONE, PHONE_DIGITS, "8613800138000", "+86 138 0013 8000"):
        assert [(f.member_id, f.status, f.tier) for f in desk.find("desk-wang", phone=written)] == [
            (member_id, "active", "normal")
        ]
    assert desk.find("desk-wang", phone="13800138001") == []
    assert [f.member_id for f in desk.find("desk-wang", id_number=ID_NUMBER.lower())] == [member_id]
    for changes, code in (({}, "phone_registered"), ({"phone": "13900001111"}, "id_registered")):
        with pytest.raises(MemberError) as again:
            register_xx(desk, **changes)
        assert again.value.code == code
        assert PHONE_DIGITS not in again.value.message
        assert ID_NUMBER not in again.value.message
    searches = rows(hq, "SELECT detail FROM centre_audit WHERE action = 'find'")
    assert len(searches) == 6
    assert_no_personal_data(everything(hq))


def test_a_profile_update_changes_only_what_is_given(hq: HqDatabase) -> None:
    desk = desk_for(hq, RXX)
    member_id = register_xx(desk)
    version = hq.members.head_version()
    done = desk.update_profile("desk-wang", member_id, {"address": None, "phone": "139 1234 5678"})
    assert done.fields == ("address", "phone")
    assert done.version is None  # lanes see neither
    assert hq.members.head_version() == version
    shown = desk.personal_data("desk-wang", member_id)
    assert (shown.name, shown.phone, shown.address) == (NAME, "13912345678", None)
    assert [f.member_id for f in desk.find("desk-wang", phone="13912345678")] == [member_id]
    assert desk.find("desk-wang", phone=PHONE) == []
    birthday = desk.update_profile("desk-wang", member_id, {"birthday": "12-01", "marketing_consent": False})
    assert birthday.version == version + 1
    assert (
        json.loads(rows(hq, "SELECT line FROM member_changes WHERE version = :v", v=birthday.version)[0][0])["birthday"]
        == "12-01"
    )
    for changes, code in (
        ({"name": None}, "bad_name"),
        ({"email": "not an address"}, "bad_email"),
        ({"birthday": "02-30"}, "bad_birthday"),
        ({"shoe_size": "42"}, "bad_field"),
    ):
        with pytest.raises(MemberError) as refused:
            desk.update_profile("desk-wang", member_id, changes)
        assert refused.value.code == code
    updates = [
        json.loads(d) for (d,) in rows(hq, "SELECT detail FROM centre_audit WHERE action = 'update' ORDER BY id")
    ]
    assert updates == [{"fields": ["address", "phone"]}, {"fields": ["birthday", "marketing_consent"]}]
    assert_no_personal_data(everything(hq))


# --- cards ---------------------------------------------------------------------------------------


def hot(db: HqDatabase) -> dict[str, str]:
    return {card["card_hash"]: card["state"] for card in db.members.hotlist(30, 1000).cards}


def test_cards_take_effect_the_next_day_with_the_programmes_validity(hq: HqDatabase, clock: Clock) -> None:
    xx = desk_for(hq, RXX)
    member_id = register_xx(xx)
    march = xx.issue_card("desk-wang", member_id)
    assert (march.valid_from, march.valid_until) == (dt.date(2026, 3, 16), dt.date(2027, 6, 30))
    assert march.number.startswith("8800")
    assert luhn_valid(march.number)
    assert march.card_hash == card_hash(CARD_KEY, march.number).hex()
    clock.at = local(2026, 9, 1)
    september = xx.issue_card("desk-wang", member_id)
    assert (september.valid_from, september.valid_until) == (dt.date(2026, 9, 2), dt.date(2028, 6, 30))
    stored = rows(
        hq,
        "SELECT card_hash, kind, state, CAST(valid_from AS TEXT), CAST(valid_until AS TEXT) FROM member_cards"
        " WHERE member_id = :m",
        m=member_id,
    )
    assert sorted(stored) == sorted(
        [
            (march.card_hash, "standard", "active", "2026-03-16", "2027-06-30"),
            (september.card_hash, "standard", "active", "2026-09-02", "2028-06-30"),
        ]
    )
    line = json.loads(rows(hq, "SELECT line FROM member_changes WHERE version = :v", v=september.version)[0][0])
    assert {card["card_hash"]: card["valid_from"] for card in line["cards"]} == {
        march.card_hash: "2026-03-16",
        september.card_hash: "2026-09-02",
    }
    clock.at = local(2026, 3, 15, 23, 59)
    m888 = desk_for(hq, R888)
    lane = Lane(hq, R888)
    receipt, _ = lane.sell(local(2026, 3, 15, 20, 0), 5_000)
    joined = m888.register("desk-wang", Registration(name=NAME, phone="13700000000", receipts=(Receipt(receipt),)))
    one_year = m888.issue_card("desk-wang", joined.member_id)
    assert (one_year.valid_from, one_year.valid_until) == (dt.date(2026, 3, 16), dt.date(2027, 3, 15))
    given = m888.issue_card("desk-wang", joined.member_id, number="6200 1234 0000 0042")
    assert given.number == "6200123400000042"
    assert given.card_hash == card_hash(CARD_KEY, "6200123400000042").hex()
    with pytest.raises(MemberError) as taken:
        m888.issue_card("desk-wang", member_id, number="6200-1234-0000-0042")
    assert taken.value.code == "card_exists"
    assert "6200123400000042" not in taken.value.message
    with pytest.raises(MemberError) as kind:
        m888.issue_card("desk-wang", member_id, kind="platinum-plus")
    assert kind.value.code == "bad_card_kind"
    audit = rows(hq, "SELECT detail FROM centre_audit WHERE action = 'issue_card'")
    assert all(given.number not in detail and march.number not in detail for (detail,) in audit)


def test_a_lost_card_is_on_the_hot_list_at_once(hq: HqDatabase) -> None:
    desk = desk_for(hq, RXX)
    member_id = register_xx(desk)
    card = desk.issue_card("desk-wang", member_id)
    other = desk.issue_card("desk-wang", member_id)
    assert hot(hq) == {}
    head = hq.members.head_version()
    lost = desk.report_lost("desk-zhao", card.card_hash, "lost on the bus")
    assert (lost.member_id, lost.state, lost.version) == (member_id, "lost", head + 1)
    assert hot(hq) == {card.card_hash: "lost"}
    assert hq.members.notice_state(30)[1] == (1, head + 1)
    again = desk.report_lost("desk-zhao", card.card_hash)
    assert again.version is None
    assert hq.members.head_version() == head + 1
    trail = [(e.actor, e.action, e.card_hash, e.reason) for e in desk.audit_trail(member_id)]
    assert trail[:2] == [
        ("desk-zhao", "report_lost", card.card_hash, "reported lost"),
        ("desk-zhao", "report_lost", card.card_hash, "lost on the bus"),
    ]
    assert rows(hq, "SELECT state FROM member_cards WHERE card_hash = :h", h=other.card_hash) == [("active",)]
    with pytest.raises(MemberError) as unknown:
        desk.report_lost("desk-zhao", "ab" * 32)
    assert unknown.value.code == "unknown_card"


def test_a_replacement_has_a_new_number_and_the_member_keeps_points_history_and_tier(
    hq: HqDatabase, clock: Clock
) -> None:
    clock.at = local(2026, 5, 20, 11, 0)
    desk = desk_for(hq, R888)
    lane = Lane(hq, R888)
    receipt, _ = lane.sell(local(2026, 5, 20, 10, 0), 250_000)  # 2,500.00 the same day: VIP
    joined = desk.register("desk-wang", Registration(name=NAME, phone=PHONE, receipts=(Receipt(receipt),)))
    assert joined.tier == "vip"
    member_id = joined.member_id
    old = desk.issue_card("desk-wang", member_id)
    clock.at = local(2026, 6, 1, 12, 0)
    member = member_doc(member_id, "vip")
    sold = [lane.sell(local(2026, 6, 1, 11, 0), 100_000, member), lane.sell(local(2026, 6, 1, 11, 30), 30_000, member)]
    points_before, rebate_before, _ = rows(
        hq, "SELECT points_balance, rebate_fen, version FROM members WHERE member_id = :m", m=member_id
    )[0]
    assert points_before == 900 + 270
    desk.report_lost("desk-wang", old.card_hash)
    clock.at = local(2026, 6, 2, 9, 0)
    new = desk.replace_card("desk-li", old.card_hash, reason="lost, ID checked")
    assert new.number != old.number
    assert new.card_hash != old.card_hash
    assert (new.member_id, new.replaces, new.fee_fen) == (member_id, old.card_hash, 1000)
    assert (new.valid_from, new.valid_until) == (dt.date(2026, 6, 3), old.valid_until)  # not a renewal
    states = dict(rows(hq, "SELECT card_hash, state FROM member_cards WHERE member_id = :m", m=member_id))
    assert states == {old.card_hash: "replaced", new.card_hash: "active"}
    assert hot(hq) == {old.card_hash: "replaced"}
    assert rows(hq, "SELECT replaces, fee_fen, issued_by FROM card_register WHERE card_hash = :h", h=new.card_hash) == [
        (old.card_hash, 1000, "desk-li")
    ]
    assert rows(hq, "SELECT tier, points_balance, rebate_fen FROM members WHERE member_id = :m", m=member_id) == [
        ("vip", points_before, rebate_before)
    ]
    assert sorted(r[0] for r in rows(hq, "SELECT entry_id FROM sales WHERE member_id = :m", m=member_id)) == sorted(
        entry for entry, _ in sold
    )
    assert rows(hq, "SELECT count(*) FROM points_ledger WHERE member_id = :m", m=member_id) == [(2,)]
    view = desk.view(member_id)
    assert view is not None
    assert [(c.number_masked, c.state, c.replaces) for c in view.cards] == [
        (old.number_masked, "replaced", None),
        (new.number_masked, "active", old.card_hash),
    ]
    with pytest.raises(MemberError) as twice:
        desk.replace_card("desk-li", old.card_hash)
    assert twice.value.code == "card_not_replaceable"
    balances_match_the_ledger(hq)


def test_a_family_card_shares_the_account(hq: HqDatabase, clock: Clock) -> None:
    clock.at = local(2026, 5, 20, 11, 0)
    desk = desk_for(hq, R888)
    lane = Lane(hq, R888)
    receipt, _ = lane.sell(local(2026, 5, 20, 10, 0), 250_000)
    member_id = desk.register("desk-wang", Registration(name=NAME, phone=PHONE, receipts=(Receipt(receipt),))).member_id
    owner = desk.issue_card("desk-wang", member_id)
    family = desk.issue_card("desk-wang", member_id, role="family", holder=HOLDER)
    assert family.role == "family"
    cards = dict(rows(hq, "SELECT card_hash, member_id FROM member_cards"))
    assert cards == {owner.card_hash: member_id, family.card_hash: member_id}
    lane.sell(local(2026, 5, 22, 11, 0), 100_000, member_doc(member_id, "vip"))  # with either card: one account
    line = json.loads(
        rows(
            hq,
            "SELECT c.line FROM members m JOIN member_changes c ON c.version = m.version WHERE m.member_id = :m",
            m=member_id,
        )[0][0]
    )
    assert line["points_balance"] == 900
    assert {card["card_hash"] for card in line["cards"]} == {owner.card_hash, family.card_hash}
    for role, holder in (("family", None), ("owner", HOLDER), ("guest", None)):
        with pytest.raises(MemberError):
            desk.issue_card("desk-wang", member_id, role=role, holder=holder)
    assert_no_personal_data(everything(hq))


def test_cancelling_puts_every_card_on_the_hot_list_and_keeps_the_balance(hq: HqDatabase, clock: Clock) -> None:
    clock.at = local(2026, 5, 20, 11, 0)
    desk = desk_for(hq, R888)
    lane = Lane(hq, R888)
    receipt, _ = lane.sell(local(2026, 5, 20, 10, 0), 250_000)
    member_id = desk.register("desk-wang", Registration(name=NAME, phone=PHONE, receipts=(Receipt(receipt),))).member_id
    cards = [desk.issue_card("desk-wang", member_id) for _ in range(2)]
    lost = desk.issue_card("desk-wang", member_id)
    desk.report_lost("desk-wang", lost.card_hash)
    desk.adjust("desk-wang", member_id, 120, 0, "welcome gift")
    done = desk.cancel("desk-zhao", member_id, "at the member's request")
    assert done is not None
    assert done.cards_cancelled == 2
    assert hot(hq) == {cards[0].card_hash: "cancelled", cards[1].card_hash: "cancelled", lost.card_hash: "lost"}
    assert rows(hq, "SELECT status FROM member_profiles WHERE member_id = :m", m=member_id) == [("cancelled",)]
    assert rows(hq, "SELECT points_balance FROM members WHERE member_id = :m", m=member_id) == [(120,)]
    assert desk.cancel("desk-zhao", member_id, "again") is None
    guest, _ = lane.sell(local(2026, 5, 20, 10, 30), 10_000)
    for attempt in (
        lambda: desk.issue_card("desk-wang", member_id),
        lambda: desk.claim("desk-wang", member_id, Receipt(guest)),
        lambda: desk.update_profile("desk-wang", member_id, {"email": EMAIL}),
        lambda: desk.set_tier("desk-wang", member_id, "gold", "by hand"),
    ):
        with pytest.raises(MemberError) as refused:
            attempt()
        assert refused.value.code == "member_cancelled"
    # The phone number is free for a new membership once the old one is cancelled.
    rejoined = desk.register("desk-wang", Registration(name=NAME, phone=PHONE, receipts=(Receipt(guest),)))
    assert rejoined.member_id != member_id
    balances_match_the_ledger(hq)


# --- late claims -------------------------------------------------------------------------------


def test_a_late_claim_inside_the_window_credits_the_repriced_points_once(hq: HqDatabase, clock: Clock) -> None:
    clock.at = local(2026, 12, 10, 16, 0)  # the 888 mall's member day
    desk = desk_for(hq, R888)
    lane = Lane(hq, R888)
    receipt, _ = lane.sell(local(2026, 12, 10, 10, 0), 210_000)
    member_id = desk.register("desk-wang", Registration(name=NAME, phone=PHONE, receipts=(Receipt(receipt),))).member_id
    guest_entry, guest_sale = lane.sell(local(2026, 12, 10, 14, 5), 100_000)
    body = json.loads(rows(hq, "SELECT body FROM journal_entries WHERE id = :e", e=guest_entry)[0][0])
    assert body["result"]["totals"]["points"] == 0  # a guest earns nothing
    expected = price(
        dataclasses.replace(SaleIn.model_validate(body["request"]).to_basket(), tenders=()),
        PricedMember(member_id=member_id, tier="vip"),
        R888,
        local(2026, 12, 10, 14, 5),
    ).points
    assert expected == 855  # 1,000.00 at VIP 9折 and the member day's 95折: the points of 855.00
    claimed = desk.claim("desk-li", member_id, Receipt(store=STORE, lane=LANE, sale_id=guest_sale))
    assert (claimed.entry_id, claimed.points, claimed.points_balance, claimed.sale_day) == (
        guest_entry,
        expected,
        expected,
        dt.date(2026, 12, 10),
    )
    assert rows(hq, "SELECT key, kind, points, rebate_fen, CAST(on_date AS TEXT), actor, ref FROM centre_ledger") == [
        (f"claim:{guest_entry}", "claim", expected, 0, "2026-12-10", "desk-li", guest_entry)
    ]
    assert rows(hq, "SELECT entry_id, member_id, points FROM sale_claims WHERE points > 0") == [
        (guest_entry, member_id, expected)
    ]
    line = json.loads(rows(hq, "SELECT line FROM member_changes WHERE version = :v", v=claimed.version)[0][0])
    assert line["points_balance"] == expected  # the credit reaches the lanes
    with pytest.raises(MemberError) as twice:
        desk.claim("desk-li", member_id, Receipt(guest_entry))
    assert twice.value.code == "already_claimed"
    assert rows(hq, "SELECT points_balance FROM members WHERE member_id = :m", m=member_id) == [(expected,)]
    trail = desk.audit_trail(member_id)
    assert (trail[0].actor, trail[0].action, trail[0].detail["points"]) == ("desk-li", "claim", expected)
    balances_match_the_ledger(hq)


def test_claims_outside_the_window_of_another_members_or_unknown_receipts_are_refused(
    hq: HqDatabase, clock: Clock
) -> None:
    clock.at = local(2026, 12, 10, 16, 0)
    desk = desk_for(hq, R888)
    lane = Lane(hq, R888)
    receipt, _ = lane.sell(local(2026, 12, 10, 10, 0), 10_000)
    member_id = desk.register("desk-wang", Registration(name=NAME, phone=PHONE, receipts=(Receipt(receipt),))).member_id
    yesterday, _ = lane.sell(local(2026, 12, 9, 21, 0), 50_000)
    with pytest.raises(MemberError) as closed:
        desk.claim("desk-li", member_id, Receipt(yesterday))
    assert closed.value.code == "claim_window_closed"
    assert closed.value.message == (
        f"receipts are claimed on the day of the sale; sale {STORE}/{LANE}/"
        f"{rows(hq, 'SELECT sale_id FROM sales WHERE entry_id = :e', e=yesterday)[0][0]} was on 2026-12-09,"
        " today is 2026-12-10"
    )
    with_member, _ = lane.sell(local(2026, 12, 10, 11, 0), 50_000, member_doc(member_id, "points_card"))
    unknown_rules = RawEntry(
        seq=lane.seq + 1,
        id=str(uuid.uuid4()),
        kind="sale",
        at=local(2026, 12, 10, 12, 0).isoformat(),
        rules_version="2099.1",
        member_version=0,
        body=json.dumps(
            {
                **sale_body(R888, "S-old-rules", local(2026, 12, 10, 12, 0), 50_000),
                "rules": {"id": "888-mall", "version": "2099.1", "digest": "0" * 64},
            }
        ),
    )
    lane.seq += 1
    hq.apply_batch(
        decode_batch(STORE, LANE, encode_batch(STORE, LANE, EPOCH, [unknown_rules])), f"retail/{STORE}/{LANE}/journal"
    )
    for receipt_of, code in (
        (Receipt(with_member), "receipt_has_member"),
        (Receipt(str(uuid.uuid4())), "receipt_unknown"),
        (Receipt(store=STORE, lane=LANE, sale_id="no-such-sale"), "receipt_unknown"),
        (Receipt(receipt), "already_claimed"),  # it joined the member up
        (Receipt(unknown_rules.id), "unknown_rules"),
    ):
        with pytest.raises(MemberError) as refused:
            desk.claim("desk-li", member_id, receipt_of)
        assert refused.value.code == code
    with pytest.raises(MemberError) as nobody:
        desk.claim("desk-li", "M-nobody", Receipt(yesterday))
    assert nobody.value.code == "unknown_member"
    assert rows(hq, "SELECT count(*) FROM centre_ledger") == [(0,)]
    balances_match_the_ledger(hq)


def test_a_longer_claim_window_counts_local_days(hq: HqDatabase, clock: Clock, tmp_path: Path) -> None:
    source = (RULES / "888-mall.toml").read_text(encoding="utf-8")
    assert "claim_window_days = 0" in source
    path = tmp_path / "888-two-days.toml"
    path.write_text(
        source.replace("claim_window_days = 0", "claim_window_days = 2").replace(
            f'version = "{R888.version}"', 'version = "2026.11.2"'
        ),
        encoding="utf-8",
    )
    two_days = load_ruleset(path)
    library = RulesetLibrary([R888, two_days])
    desk = ServiceDesk(hq, lambda: Programme(two_days), pii=PersonalData(PII_KEY), card_key=CARD_KEY, library=library)
    lane = Lane(hq, two_days)
    clock.at = local(2026, 12, 1, 9, 0)
    receipt, _ = lane.sell(local(2026, 12, 1, 8, 30), 10_000)
    member_id = desk.register("desk-wang", Registration(name=NAME, phone=PHONE, receipts=(Receipt(receipt),))).member_id
    late_evening = lane.sell(local(2026, 12, 1, 23, 30), 20_000)[0]  # 15:30 UTC: still 1 December locally
    next_morning = lane.sell(local(2026, 12, 2, 0, 30), 30_000)[0]
    clock.at = local(2026, 12, 4, 0, 15)  # day 3 after the 1st, day 2 after the 2nd
    with pytest.raises(MemberError, match=r"within 2 days of the sale; .* was on 2026-12-01, today is 2026-12-04"):
        desk.claim("desk-li", member_id, Receipt(late_evening))
    assert desk.claim("desk-li", member_id, Receipt(next_morning)).points == 300


def test_two_desks_claiming_one_receipt_at_once_credit_it_once(db_url: str, clock: Clock) -> None:
    clock.at = local(2026, 12, 10, 16, 0)
    setup = HqDatabase.open(db_url, now=clock)
    lane = Lane(setup, R888)
    joined = []
    for phone in ("13800000001", "13800000002"):
        receipt, _ = lane.sell(local(2026, 12, 10, 10, 0), 10_000)
        form = Registration(name=NAME, phone=phone, receipts=(Receipt(receipt),))
        joined.append(desk_for(setup, R888).register("desk-wang", form).member_id)
    contested, _ = lane.sell(local(2026, 12, 10, 11, 0), 100_000)
    setup.close()
    desks = [HqDatabase.open(db_url, now=clock) for _ in range(2)]
    start = threading.Barrier(2)
    outcomes: list[str] = []

    def claim(index: int) -> None:
        start.wait(10)
        try:
            desk_for(desks[index], R888).claim(f"desk-{index}", joined[index], Receipt(contested))
            outcomes.append("claimed")
        except MemberError as exc:
            outcomes.append(exc.code)

    threads = [threading.Thread(target=claim, args=(index,)) for index in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    try:
        assert sorted(outcomes) == ["already_claimed", "claimed"]
        [(count, points)] = rows(desks[0], "SELECT count(*), SUM(points) FROM centre_ledger")
        assert (count, int(points)) == (1, 1000)  # 1,000.00 at the points card: 1 point per yuan
        assert rows(desks[0], "SELECT count(*) FROM sale_claims WHERE entry_id = :e", e=contested) == [(1,)]
        balances_match_the_ledger(desks[0])
    finally:
        for database in desks:
            database.close()


# --- adjustments and tiers ---------------------------------------------------------------------


def test_a_manual_adjustment_needs_a_reason_is_audited_and_the_ledger_sums_to_the_balance(
    hq: HqDatabase, clock: Clock
) -> None:
    clock.at = local(2026, 5, 20, 11, 0)
    desk = desk_for(hq, R888)
    lane = Lane(hq, R888)
    receipt, _ = lane.sell(local(2026, 5, 20, 10, 0), 250_000)
    member_id = desk.register("desk-wang", Registration(name=NAME, phone=PHONE, receipts=(Receipt(receipt),))).member_id
    lane.sell(local(2026, 5, 20, 10, 30), 100_000, member_doc(member_id, "vip"))
    for reason in ("", "   "):
        with pytest.raises(MemberError) as blank:
            desk.adjust("desk-wang", member_id, 50, 0, reason)
        assert blank.value.code == "bad_reason"
    done = desk.adjust("desk-wang", member_id, 50, 1_250, "goodwill, ticket 4711", key="ticket-4711")
    assert (done.points_balance, done.rebate_balance_fen, done.replayed) == (950, 1_250, False)
    again = desk.adjust("desk-wang", member_id, 50, 1_250, "goodwill, ticket 4711", key="ticket-4711")
    assert (again.points_balance, again.replayed) == (950, True)
    with pytest.raises(MemberError) as conflict:
        desk.adjust("desk-wang", member_id, 60, 0, "goodwill", key="ticket-4711")
    assert conflict.value.code == "idempotency_conflict"
    with pytest.raises(MemberError) as below:
        desk.adjust("desk-wang", member_id, -2_000, 0, "clawback")
    assert below.value.code == "negative_balance"
    desk.adjust("desk-zhao", member_id, -100, 0, "points obtained by abuse")
    assert rows(hq, "SELECT points_balance, rebate_fen FROM members WHERE member_id = :m", m=member_id) == [
        (850, 1_250)
    ]
    assert rows(hq, "SELECT kind, points, rebate_fen, actor, reason FROM centre_ledger ORDER BY id") == [
        ("adjust", 50, 1_250, "desk-wang", "goodwill, ticket 4711"),
        ("adjust", -100, 0, "desk-zhao", "points obtained by abuse"),
    ]
    audited = [
        (e.actor, e.action, e.reason, e.detail["points"]) for e in desk.audit_trail(member_id) if e.action == "adjust"
    ]
    assert audited == [
        ("desk-zhao", "adjust", "points obtained by abuse", -100),
        ("desk-wang", "adjust", "goodwill, ticket 4711", 50),
    ]
    balances_match_the_ledger(hq)


def test_a_tier_set_by_hand_is_in_the_tier_history(hq: HqDatabase, clock: Clock) -> None:
    desk = desk_for(hq, RXX)
    member_id = register_xx(desk)
    now = desk.set_tier("desk-wang", member_id, "gold", "complaint settled")
    assert (now.tier, now.effective_from) == ("gold", dt.date(2026, 3, 15))
    later = desk.set_tier("desk-wang", member_id, "diamond", "promised", dt.date(2026, 4, 1))
    assert later.effective_from == dt.date(2026, 4, 1)
    assert rows(
        hq, "SELECT tier, next_tier, CAST(next_tier_from AS TEXT) FROM members WHERE member_id = :m", m=member_id
    ) == [("gold", "diamond", "2026-04-01")]
    assert rows(
        hq,
        "SELECT kind, from_tier, to_tier, CAST(effective_from AS TEXT), reason FROM tier_history"
        " WHERE member_id = :m ORDER BY id",
        m=member_id,
    )[1:] == [
        ("manual", "normal", "gold", "2026-03-15", "complaint settled"),
        ("manual", "gold", "diamond", "2026-04-01", "promised"),
    ]
    with pytest.raises(MemberError) as unknown:
        desk.set_tier("desk-wang", member_id, "vip", "888's tier")
    assert unknown.value.code == "unknown_tier"
    assert clock.at.date() == dt.date(2026, 3, 15)


# --- joining: the seed programmes ----------------------------------------------------------------


def test_kangcheng_gold_needs_800_the_same_day_or_2000_over_30_days(hq: HqDatabase, clock: Clock) -> None:
    clock.at = local(2026, 6, 30, 18, 0)
    desk = desk_for(hq, RKC)
    lane = Lane(hq, RKC)
    phones = iter(f"1390000{i:04d}" for i in range(100))

    def join(*receipts: str) -> str:
        form = Registration(name=NAME, phone=next(phones), receipts=tuple(Receipt(r) for r in receipts))
        return desk.register("desk-wang", form).tier

    def refused(*receipts: str) -> MemberError:
        with pytest.raises(MemberError) as exc:
            join(*receipts)
        return exc.value

    assert join(lane.sell(local(2026, 6, 30, 10, 0), 80_000)[0]) == "gold"
    below = refused(lane.sell(local(2026, 6, 30, 10, 5), 79_999)[0])
    assert below.code == "join_not_qualified"
    assert below.message == (
        "joining as gold needs receipts meeting one of: same-day spend 800.00, 30-day spend 2000.00"
        " (this programme has no join fee); the receipts given come to 799.99"
    )
    yesterday = lane.sell(local(2026, 6, 29, 10, 0), 90_000)[0]
    assert refused(yesterday).code == "join_not_qualified"  # 800 is the same day's spend
    window = [lane.sell(local(2026, 6, day, 12, 0), fen)[0] for day, fen in ((1, 70_000), (15, 70_000), (30, 60_000))]
    assert join(*window) == "gold"  # 2,000.00 over 1..30 June
    short = [lane.sell(local(2026, 6, day, 12, 0), fen)[0] for day, fen in ((2, 70_000), (16, 70_000), (29, 59_999))]
    assert refused(*short).code == "join_not_qualified"
    # Platinum's 60-day window is the longest look-back: a receipt from before it counts for nothing.
    old = lane.sell(local(2026, 5, 1, 12, 0), 150_000)[0]
    recent = lane.sell(local(2026, 6, 30, 12, 30), 50_000)[0]
    too_old = refused(old, recent)
    assert too_old.code == "receipt_too_old"
    assert "was on 2026-05-01: receipts for joining are from 2026-05-02 on (60 days)" in too_old.message
    assert join(lane.sell(local(2026, 6, 30, 13, 0), 200_000)[0]) == "platinum"  # same-day 2,000: the higher tier
    assert refused().code == "join_not_qualified"
    attached = rows(hq, "SELECT count(*), COALESCE(SUM(points), 0) FROM sale_claims")
    assert attached == [(5, 0)]  # the receipts of the three members: counted as their spend, no points
    assert rows(hq, "SELECT count(*) FROM centre_ledger") == [(0,)]


def test_xx_mall_joins_with_the_10_yuan_fee_or_a_qualifying_day_within_three_days(hq: HqDatabase, clock: Clock) -> None:
    clock.at = local(2026, 3, 18, 15, 0)
    desk = desk_for(hq, RXX)
    lane = Lane(hq, RXX)
    phones = iter(f"1370000{i:04d}" for i in range(100))

    def join(*receipts: str, fee: bool = False) -> tuple[str, str, int]:
        form = Registration(
            name=NAME, phone=next(phones), receipts=tuple(Receipt(r) for r in receipts), pay_join_fee=fee
        )
        done = desk.register("desk-wang", form)
        return done.tier, done.why, done.join_fee_fen

    assert join(fee=True) == ("normal", "join fee 10.00 paid", 1000)
    with pytest.raises(MemberError) as no_fee:
        join()
    assert no_fee.value.code == "join_not_qualified"
    assert "or the join fee 10.00; no receipts were given" in no_fee.value.message
    assert join(lane.sell(local(2026, 3, 15, 12, 0), 20_000)[0]) == ("normal", "same-day spend 200.00 >= 200.00", 0)
    assert join(lane.sell(local(2026, 3, 16, 12, 0), 100_000)[0])[0] == "silver"
    assert join(lane.sell(local(2026, 3, 18, 12, 0), 300_000)[0], fee=True)[:2] == (
        "gold",
        "same-day spend 3000.00 >= 3000.00",
    )  # receipts qualify: no fee taken
    with pytest.raises(MemberError) as late:
        join(lane.sell(local(2026, 3, 14, 12, 0), 600_000)[0])
    assert late.value.code == "receipt_too_old"  # four days ago: past "三日内申办"
    fees = [
        json.loads(d)["join_fee_fen"] for (d,) in rows(hq, "SELECT detail FROM centre_audit WHERE action = 'register'")
    ]
    assert sorted(fees) == [0, 0, 0, 1000]


def test_without_keys_the_desk_says_what_is_missing(hq: HqDatabase) -> None:
    bare = ServiceDesk(hq, lambda: Programme(RXX))
    with pytest.raises(DeskConfigError) as no_pii:
        bare.register("desk-wang", Registration(name=NAME, phone=PHONE, pay_join_fee=True))
    assert no_pii.value.code == "personal_data_unconfigured"
    member_id = register_xx(ServiceDesk(hq, lambda: Programme(RXX), pii=PersonalData(PII_KEY)))
    with pytest.raises(DeskConfigError) as no_card_key:
        bare.issue_card("desk-wang", member_id)
    assert no_card_key.value.code == "card_key_unconfigured"


# --- logs ------------------------------------------------------------------------------------------


def test_no_personal_data_or_card_number_in_the_logs(
    hq: HqDatabase, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    desk = desk_for(hq, RXX)
    member_id = register_xx(desk)
    card = desk.issue_card("desk-wang", member_id, role="family", holder=HOLDER)
    desk.find("desk-wang", phone=PHONE)
    desk.update_profile("desk-wang", member_id, {"address": ADDRESS, "email": EMAIL})
    desk.personal_data("desk-wang", member_id)
    desk.report_lost("desk-wang", card.card_hash)
    new = desk.replace_card("desk-wang", card.card_hash)
    for attempt in (
        lambda: register_xx(desk),
        lambda: desk.update_profile("desk-wang", member_id, {"email": "@" + EMAIL}),
    ):
        with pytest.raises(MemberError) as refused:
            attempt()
        assert_no_personal_data(refused.value.message)
    assert "registered member" in caplog.text  # the desk does log what it does
    assert_no_personal_data(caplog.text)
    assert card.number not in caplog.text
    assert new.number not in caplog.text
    details = "\n".join(d for (d,) in rows(hq, "SELECT detail FROM centre_audit"))
    assert_no_personal_data(details)
    assert card.number not in details
    assert new.number not in details
    assert clock.at.year == 2026


# --- the HTTP API -------------------------------------------------------------------------------


def api_config(db_url: str, rules: Path, *, staff: bool = True) -> str:
    staff_line = 'staff_secret_env = "LANE_HQ_TEST_STAFF"\n' if staff else ""
    return (
        f'[database]\nurl = "{db_url}"\n\n[rules]\ndirectory = "{rules}"\n\n'
        f'[members]\ncard_hash_key = "hex:{CARD_KEY.hex()}"\n\n'
        f'[centre]\nruleset = "xx-mall"\npersonal_data_key_env = "LANE_HQ_TEST_PII"\n{staff_line}'
    )


def rules_directory(tmp_path: Path) -> Path:
    rules = tmp_path / "rules"
    rules.mkdir(exist_ok=True)
    shutil.copyfile(RULES / "xx-mall.toml", rules / "xx-mall.toml")
    return rules


def call_api(
    db: HqDatabase, config_text: str, calls: Callable[[httpx.AsyncClient], Awaitable[None]], library: RulesetLibrary
) -> None:
    config = parse_hq_config(config_text)

    async def run() -> None:
        owner = DbOwner(db)
        app = create_hq_app(owner, HqMetrics(), routers=[members_api.router(config, owner, library)])
        transport = httpx.ASGITransport(app=app)
        try:
            async with httpx.AsyncClient(transport=transport, base_url="http://hq") as client:
                await calls(client)
        finally:
            owner._pool.shutdown(wait=True)  # the test closes the database itself

    asyncio.run(run())


@pytest.fixture
def api_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LANE_HQ_TEST_PII", f"hex:{PII_KEY.hex()}")
    monkeypatch.setenv("LANE_HQ_TEST_STAFF", STAFF_SECRET)


def auth(name: str = "desk-wang") -> dict[str, str]:
    return {"Authorization": f"Bearer {bearer_value(STAFF_SECRET.encode(), name)}"}


def test_the_desk_api_needs_a_staff_token_and_answers_shaped_errors(
    hq: HqDatabase, db_url: str, tmp_path: Path, api_env: None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    rules = rules_directory(tmp_path)
    library = RulesetLibrary.load(rules)
    form = {"name": NAME, "phone": PHONE, "id_number": ID_NUMBER, "address": ADDRESS, "pay_join_fee": True}
    fresh = {"name": NAME, "pay_join_fee": True}
    seen: dict[str, Any] = {}

    async def calls(client: httpx.AsyncClient) -> None:
        for headers in ({}, {"Authorization": "Bearer desk-wang:not-the-token"}, {"Authorization": "Basic abc"}):
            for method, path, body in (
                ("POST", "/v1/centre/members", form),
                ("POST", "/v1/centre/members", {"name": 1}),  # invalid too: still 401 first
                ("GET", "/v1/centre/members/M1", None),
                ("GET", "/v1/centre/members?phone=13800138000", None),
            ):
                answer = await client.request(method, path, json=body, headers=headers)
                assert answer.status_code == 401, (headers, path, answer.text)
                assert answer.json()["error"]["code"] == "unauthorized"
        registered = await client.post("/v1/centre/members", json=form, headers=auth())
        assert registered.status_code == 201, registered.text
        doc = registered.json()
        assert (doc["tier"], doc["join_fee"], doc["why"]) == ("normal", "10.00", "join fee 10.00 paid")
        member_id = doc["member_id"]
        seen["member"] = member_id
        issued = await client.post(f"/v1/centre/members/{member_id}/cards", json={}, headers=auth())
        assert issued.status_code == 201, issued.text
        number = issued.json()["number"]
        seen["number"] = number
        assert luhn_valid(number)
        assert issued.json()["number_masked"] == "*" * 12 + number[-4:]
        shown = await client.get(f"/v1/centre/members/{member_id}", headers=auth())
        assert shown.status_code == 200
        assert number not in shown.text
        assert shown.json()["personal"] is None
        assert shown.json()["cards"][0]["number"] == "*" * 12 + number[-4:]
        assert_no_personal_data(shown.text)
        personal = await client.get(f"/v1/centre/members/{member_id}?personal=true", headers=auth("desk-li"))
        assert personal.json()["personal"]["name"] == NAME
        assert personal.json()["personal"]["id_number"] == ID_NUMBER
        found = await client.get("/v1/centre/members", params={"phone": "8613800138000"}, headers=auth())
        assert found.json() == {"members": [{"member_id": member_id, "status": "active", "tier": "normal"}]}
        looked_up = await client.post("/v1/centre/members/lookup", json={"id_number": ID_NUMBER}, headers=auth())
        assert looked_up.json() == found.json()
        patched = await client.patch(f"/v1/centre/members/{member_id}", json={"address": None}, headers=auth())
        assert patched.json() == {"member_id": member_id, "fields": ["address"], "version": None}
        card = issued.json()["card_hash"]
        lost = await client.post(f"/v1/centre/cards/{card}/lost", headers=auth())
        assert (lost.status_code, lost.json()["state"], lost.json()["changed"]) == (200, "lost", True)
        replaced = await client.post(f"/v1/centre/cards/{card}/replace", json={"reason": "lost"}, headers=auth())
        assert replaced.status_code == 201
        assert replaced.json()["replaces"] == card
        adjusted = await client.post(
            f"/v1/centre/members/{member_id}/adjustments",
            json={"points": 40, "rebate": "0.00", "reason": "goodwill", "idempotency_key": "k1"},
            headers=auth(),
        )
        assert (adjusted.status_code, adjusted.json()["points_balance"]) == (201, 40)
        tier = await client.post(
            f"/v1/centre/members/{member_id}/tier", json={"tier": "silver", "reason": "by hand"}, headers=auth()
        )
        assert tier.json()["tier"] == "silver"
        trail = await client.get(f"/v1/centre/members/{member_id}/audit", headers=auth())
        actions = [(e["actor"], e["action"]) for e in trail.json()["entries"]]
        assert ("desk-li", "view_personal_data") in actions
        assert actions[-1] == ("desk-wang", "register")
        assert_no_personal_data(trail.text)
        for method, path, body, status, code in (
            ("GET", "/v1/centre/members/M-nobody", None, 404, "unknown_member"),
            ("POST", "/v1/centre/cards/" + "ab" * 32 + "/lost", {}, 404, "unknown_card"),
            (
                "POST",
                "/v1/centre/members",
                {**fresh, "phone": "13900000001", "pay_join_fee": False},
                409,
                "join_not_qualified",
            ),
            ("POST", "/v1/centre/members", form, 409, "phone_registered"),
            ("POST", "/v1/centre/members", {**fresh, "phone": "13900000002", "email": f"x{ADDRESS}"}, 422, "bad_email"),
            ("POST", "/v1/centre/members", {**fresh, "phone": "not a phone"}, 422, "bad_phone"),
            ("POST", "/v1/centre/members", {"phone": PHONE}, 422, "invalid"),
            ("POST", f"/v1/centre/members/{member_id}/adjustments", {"points": 5}, 422, "invalid"),
            ("POST", f"/v1/centre/members/{member_id}/adjustments", {"points": 5, "reason": " "}, 422, "bad_reason"),
            ("POST", f"/v1/centre/members/{member_id}/claims", {"entry_id": str(uuid.uuid4())}, 404, "receipt_unknown"),
            ("POST", f"/v1/centre/members/{member_id}/claims", {"store": "s01"}, 422, "invalid"),
            ("POST", f"/v1/centre/cards/{card}/lost", None, 409, "card_not_active"),
        ):
            answer = await client.request(method, path, json=body, headers=auth())
            assert answer.status_code == status, (path, body, answer.text)
            error = answer.json()["error"]
            assert error["code"] == code, (path, error)
            assert set(error) == {"code", "message"}
            assert_no_personal_data(error["message"])
        garbled = await client.post(
            "/v1/centre/members", content=b"{not json", headers={**auth(), "Content-Type": "application/json"}
        )
        assert (garbled.status_code, garbled.json()["error"]["code"]) == (422, "json_syntax")
        schema_doc = (await client.get("/openapi.json")).json()
        paths = {path: set(ops) for path, ops in schema_doc["paths"].items() if path.startswith("/v1/centre/")}
        assert paths == {
            "/v1/centre/members": {"get", "post"},
            "/v1/centre/members/lookup": {"post"},
            "/v1/centre/members/{member_id}": {"get", "patch"},
            "/v1/centre/members/{member_id}/cancel": {"post"},
            "/v1/centre/members/{member_id}/cards": {"post"},
            "/v1/centre/cards/{card_hash}/lost": {"post"},
            "/v1/centre/cards/{card_hash}/replace": {"post"},
            "/v1/centre/members/{member_id}/claims": {"post"},
            "/v1/centre/members/{member_id}/adjustments": {"post"},
            "/v1/centre/members/{member_id}/tier": {"post"},
            "/v1/centre/members/{member_id}/audit": {"get"},
        }
        components = schema_doc["components"]["schemas"]
        assert {"RegisterIn", "MemberOut", "IssuedOut", "AdjustIn", "ReceiptIn"} <= set(components)
        assert "staff" in schema_doc["components"]["securitySchemes"]
        register_op = schema_doc["paths"]["/v1/centre/members"]["post"]
        assert not [p for p in register_op.get("parameters", []) if p["name"] in {"actor", "credentials"}]
        cancelled = await client.post(
            f"/v1/centre/members/{member_id}/cancel", json={"reason": "moved away"}, headers=auth()
        )
        assert cancelled.json()["changed"] is True

    call_api(hq, api_config(db_url, rules), calls, library)
    # Head office's own log lines (the test's HTTP client logs the URLs it asks for, query strings included).
    logged = "\n".join(record.getMessage() for record in caplog.records if not record.name.startswith("httpx"))
    assert "viewed the personal data" in logged
    assert_no_personal_data(logged)
    assert seen["number"] not in logged
    assert rows(hq, "SELECT status FROM member_profiles WHERE member_id = :m", m=seen["member"]) == [("cancelled",)]


def test_the_desk_api_is_closed_without_a_staff_secret(
    hq: HqDatabase, db_url: str, tmp_path: Path, api_env: None
) -> None:
    rules = rules_directory(tmp_path)

    async def calls(client: httpx.AsyncClient) -> None:
        for body in ({"name": NAME, "phone": PHONE}, {"bad": True}):
            answer = await client.post("/v1/centre/members", json=body, headers=auth())
            assert (answer.status_code, answer.json()["error"]["code"]) == (503, "staff_auth_unconfigured")
        answer = await client.get("/v1/centre/members/M1", headers=auth())
        assert answer.json()["error"]["code"] == "staff_auth_unconfigured"

    call_api(hq, api_config(db_url, rules, staff=False), calls, RulesetLibrary.load(rules))


def test_a_late_claim_through_the_api(hq: HqDatabase, db_url: str, clock: Clock, tmp_path: Path, api_env: None) -> None:
    clock.at = local(2026, 3, 18, 15, 0)
    rules = rules_directory(tmp_path)
    library = RulesetLibrary.load(rules)
    lane = Lane(hq, RXX)
    joining, _ = lane.sell(local(2026, 3, 18, 10, 0), 120_000)
    guest, guest_sale = lane.sell(local(2026, 3, 18, 11, 0), 45_000)

    async def calls(client: httpx.AsyncClient) -> None:
        registered = await client.post(
            "/v1/centre/members",
            json={"name": NAME, "phone": PHONE, "receipts": [{"entry_id": joining}]},
            headers=auth(),
        )
        assert registered.json()["tier"] == "silver"
        member_id = registered.json()["member_id"]
        claim = {"store": STORE, "lane": LANE, "sale_id": guest_sale}
        claimed = await client.post(f"/v1/centre/members/{member_id}/claims", json=claim, headers=auth())
        assert claimed.status_code == 201, claimed.text
        assert claimed.json()["entry_id"] == guest
        assert (claimed.json()["points"], claimed.json()["points_balance"]) == (427, 427)  # 450.00 at 9.5折
        twice = await client.post(f"/v1/centre/members/{member_id}/claims", json={"entry_id": guest}, headers=auth())
        assert (twice.status_code, twice.json()["error"]["code"]) == (409, "already_claimed")

    call_api(hq, api_config(db_url, rules), calls, library)
    balances_match_the_ledger(hq)


# --- the command line, as real processes --------------------------------------------------------


def cli(
    config: Path, *args: str, stdin: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sync.hq.cli", *args, "--config", str(config)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        input=stdin,
        env={
            **os.environ,
            "LANE_HQ_TEST_PII": f"hex:{PII_KEY.hex()}",
            "LANE_HQ_TEST_STAFF": STAFF_SECRET,
            **(env or {}),
        },
    )


def test_the_command_line_registers_issues_reports_and_claims(tmp_path: Path) -> None:
    rules = rules_directory(tmp_path)
    db_url = f"sqlite:///{tmp_path}/hq.db"
    config = tmp_path / "hq.toml"
    config.write_text(api_config(db_url, rules), encoding="utf-8")
    form = json.dumps({"name": NAME, "phone": PHONE, "id_number": ID_NUMBER, "address": ADDRESS})
    outputs: list[str] = []

    def ok(*args: str, stdin: str | None = None) -> str:
        done = cli(config, *args, stdin=stdin)
        assert done.returncode == 0, (args, done.stdout, done.stderr)
        outputs.append(done.stdout + done.stderr)
        return done.stdout

    registered = ok("members", "register", "--json", "-", "--join-fee-paid", "--staff", "desk-wang", stdin=form)
    assert registered.startswith("registered member M")
    assert "as normal (join fee 10.00 paid)" in registered
    member_id = registered.split()[2]
    assert ok("members", "find", "--phone", "+86 138 0013 8000").split()[:3] == [member_id, "active", "normal"]
    issued = ok("cards", "issue", member_id, "--staff", "desk-wang")
    number = issued.split("card number: ")[1].split()[0]
    assert luhn_valid(number)
    assert number.startswith("8800")
    assert issued.count(number) == 1
    today = dt.datetime.now(SHANGHAI).date()
    assert f"valid {today + dt.timedelta(days=1)} .." in issued
    shown = ok("members", "show", member_id)
    assert number not in shown
    assert "*" * 12 + number[-4:] in shown
    assert "on file: name, phone, id_number, address" in shown
    personal = ok("members", "show", member_id, "--personal", "--staff", "desk-li")
    assert f"name: {NAME}" in personal
    assert ok("cards", "lost", number, "--staff", "desk-zhao").endswith("lost (member version 3)\n")
    digest = card_hash(CARD_KEY, number).hex()
    replaced = ok("cards", "replace", "--hash", digest, "--reason", "lost, ID checked")
    new_number = replaced.split("card number: ")[1].split()[0]
    assert new_number != number
    reader = HqDatabase.open(db_url)
    try:
        assert hot(reader) == {digest: "replaced"}
        lane = Lane(reader, RXX)
        _, sale_id = lane.sell(dt.datetime.now(SHANGHAI) - dt.timedelta(seconds=5), 30_000)
    finally:
        reader.close()
    claimed = ok("members", "claim", member_id, "--sale", f"{STORE}/{LANE}/{sale_id}", "--staff", "desk-li")
    assert claimed.endswith("claimed, +300 points -> 300 points\n")
    audit = ok("members", "audit", member_id)
    actions = [line.split()[2] for line in audit.splitlines()]
    assert actions == ["claim", "replace_card", "report_lost", "view_personal_data", "issue_card", "register"]
    assert "desk-zhao" in audit
    token = ok("staff", "token", "desk-wang").strip()
    assert staff_of(STAFF_SECRET.encode(), token) == "desk-wang"
    for index, out in enumerate(outputs):
        if out != personal:  # only --personal prints personal data
            assert_no_personal_data(out)
        if index != 2:  # only `cards issue` prints its number
            assert number not in out
    assert sum(new_number in out for out in outputs) == 1  # and `cards replace` the new one
    for args, code, message in (
        (("members", "register", "--name", "王五", "--phone", "13900000009"), 1, "join_not_qualified"),
        (
            ("members", "register", "--name", "王五", "--phone", "13900000009", "--email", "no", "--join-fee-paid"),
            1,
            "bad_email",
        ),
        (("members", "claim", member_id, "--entry", str(uuid.uuid4())), 1, "receipt_unknown"),
        (("members", "cancel", member_id), 2, "--reason"),
        (("cards", "issue", "M-nobody"), 1, "unknown_member"),
        (("staff", "token", "a:b"), 1, "staff name"),
    ):
        done = cli(config, *args)
        assert done.returncode == code, (args, done.stdout, done.stderr)
        assert message in done.stderr, (args, done.stderr)
    no_keys = tmp_path / "bare.toml"
    no_keys.write_text(
        f'[database]\nurl = "{db_url}"\n\n[rules]\ndirectory = "{rules}"\n\n[centre]\nruleset = "xx-mall"\n'
    )
    for args, message in (
        (("members", "register", "--json", "-", "--join-fee-paid"), "personal_data_unconfigured"),
        (("staff", "token", "desk-wang"), "staff_secret"),
        (("cards", "issue", member_id), "card_hash_key"),
    ):
        done = cli(no_keys, *args, stdin=form)
        assert done.returncode == 78, (args, done.stdout, done.stderr)
        assert message in done.stderr, (args, done.stderr)
    cancelled = ok("members", "cancel", member_id, "--reason", "moved away")
    assert "cancelled, 1 card(s) cancelled" in cancelled
