"""The service desk: members' registration, personal data, cards, adjustments (docs/member-centre.md).

Each operation is a function taking a ``Connection`` inside a write
transaction and a ``Desk`` (the programme, the staff member acting, the
moment, the keys); ``ServiceDesk`` runs each in its own transaction, as
``MemberTable`` does for the member table.  Every operation writes one
``centre_audit`` row naming the staff member; every change lanes must see
(a new member, a birthday, a card issued, lost, replaced or cancelled, a
balance, a tier) goes through ``sync.hq.members``' change log, so it reaches
the lanes with the next member version, and a lost card is on the hot list at
once.

Personal data (name, phone, ID number, address, e-mail, a family card
holder's name) is stored encrypted (``sync.hq.centre.pii``) and looked up by
keyed hashes; it never appears in the audit, the logs or an error message,
and is decrypted only by ``personal_data``, which is itself audited.  Card
numbers are kept only as the chain's keyed hash and a masked form (the last
four digits); the full number leaves head office once, in the answer that
issues the card, so the desk can print it.

Decisions the seeds leave open, taken here:

- Registration admits at the highest tier the receipts qualify for
  (``qualify.joinable``), else at the lowest tier -- which itself may need
  receipts (Kangcheng's gold, 888 mall's points card) or the join fee (xx
  mall).  Receipts are attached with 0 points (they count as the member's
  spend; they earned nothing, and a card issued today is valid tomorrow).
- A phone number or ID number belongs to one active member: registering it
  twice is refused (two accounts would pool points the programmes forbid
  pooling).
- A replacement keeps the validity of the card it replaces (a lost card is
  not a renewal); a card whose validity has ended is replaced with a new
  validity.  Either way it is valid from the day after it is issued.
- Cancelling keeps the balances (the ledger is append-only) and cancels
  every card not already lost or replaced.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import json
import logging
import re
import secrets
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, select, update

from agent.errors import LaneError
from agent.money import format_fen, parse_money
from agent.ruleset_schema import CardValidity, Qualify
from agent.snapshot import card_hash as hash_card_number
from agent.snapshot import normalise_card_number
from sync.hq.audit import RulesetLibrary
from sync.hq.centre import claims
from sync.hq.centre.claims import Claimed, GuestSale, Receipt
from sync.hq.centre.pii import PersonalData, PersonalDataError, normalise_phone
from sync.hq.centre.programme import Programme, add_years, live_programme
from sync.hq.centre.qualify import YEAR_DAYS, Evidence, joinable
from sync.hq.centre.spend import MemberDays
from sync.hq.members import (
    Card,
    Member,
    MemberError,
    _commit,
    _load,
    _Pending,
    get_member,
)
from sync.hq.members import adjust as adjust_balances
from sync.hq.members import set_card_state as set_state
from sync.hq.members import set_tier as set_member_tier
from sync.hq.schema import (
    HOT_CARD_STATES,
    card_register,
    centre_audit,
    centre_ledger,
    member_cards,
    member_profiles,
    members,
    tier_history,
)

if TYPE_CHECKING:
    from sync.hq.config import HqConfig
    from sync.hq.db import HqDatabase

log = logging.getLogger(__name__)

ENCRYPTED_FIELDS = ("name", "phone", "id_number", "address", "email")
PROFILE_FIELDS = (*ENCRYPTED_FIELDS, "birthday", "marketing_consent")
_MEMBER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_CARD_HASH = re.compile(r"[0-9a-f]{64}")
_BIRTHDAY = re.compile(r"(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])")
_EMAIL = re.compile(r"[^@\s]{1,64}@[^@\s]+\.[^@\s]+")
_LIMITS = {"name": 100, "address": 500, "email": 254, "holder": 100}
_GENERATED_ID_DIGITS = 12


class DeskConfigError(LaneError):
    """The desk cannot do this with head office's configuration: no personal-data key, no card key."""

    code = "desk_unconfigured"

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# --- card numbers and validity (pure) --------------------------------------------------


def luhn_digit(payload: str) -> str:
    """The Luhn check digit of a string of digits (ISO/IEC 7812), appended to make a card number."""
    total = 0
    for index, char in enumerate(reversed(payload)):
        value = int(char) * (2 if index % 2 == 0 else 1)
        total += value - 9 if value > 9 else value
    return str((10 - total % 10) % 10)


def luhn_valid(number: str) -> bool:
    return number.isdigit() and len(number) >= 2 and luhn_digit(number[:-1]) == number[-1]


@dataclass(frozen=True, slots=True)
class CardNumbering:
    """How head office numbers the cards it issues: ``prefix``, random digits, a Luhn check digit."""

    prefix: str = "8800"
    length: int = 16

    def generate(self) -> str:
        body = self.length - len(self.prefix) - 1
        payload = self.prefix + "".join(str(secrets.randbelow(10)) for _ in range(body))
        return payload + luhn_digit(payload)


def mask_number(number: str) -> str:
    """``************1234``: how a card number is shown anywhere but on the card itself."""
    return "*" * max(len(number) - 4, 0) + number[-4:]


def card_validity(validity: CardValidity, issued_on: dt.date) -> tuple[dt.date, dt.date | None]:
    """``(valid_from, valid_until)`` of a card issued on ``issued_on`` (both days included).

    Valid from the day after it is issued (seed 000).  ``years``: the day
    before the same date ``years`` later (one year from 16 March is 15 March);
    ``half_year`` (xx mall, seed 004): issued January-June, until 30 June of
    the next year; July-December, 30 June of the year after that.
    """
    valid_from = issued_on + dt.timedelta(days=1)
    if validity.kind == "none":
        return valid_from, None
    if validity.kind == "years":
        return valid_from, add_years(valid_from, validity.years) - dt.timedelta(days=1)
    years = 1 if issued_on.month <= 6 else 2
    return valid_from, dt.date(issued_on.year + years, 6, 30)


# --- what an operation is given ------------------------------------------------------


@dataclass(frozen=True)
class Desk:
    """One operation's circumstances: the programme in force, who acts, when, and the keys it may need.

    The programme is looked up the first time an operation needs it (a date,
    a tier, a card's validity): reporting a card lost or cancelling a member
    works even when no programme is configured.
    """

    programme_of: Callable[[], Programme]
    actor: str
    now: dt.datetime
    pii: PersonalData | None = None
    card_key: bytes | None = None
    numbering: CardNumbering = dataclasses.field(default_factory=CardNumbering)
    library: RulesetLibrary | None = None

    @functools.cached_property
    def programme(self) -> Programme:
        """The live programme; ProgrammeError when there is none."""
        return self.programme_of()

    @property
    def today(self) -> dt.date:
        return self.programme.local_date(self.now)

    def need_pii(self) -> PersonalData:
        if self.pii is None:
            raise DeskConfigError(
                "personal_data_unconfigured",
                "head office has no personal-data key ([centre] personal_data_key_env / personal_data_key_file)",
            )
        return self.pii

    def need_card_key(self) -> bytes:
        if self.card_key is None:
            raise DeskConfigError(
                "card_key_unconfigured", "head office has no card key ([members] card_hash_key / card_hash_key_env)"
            )
        return self.card_key


@dataclass(frozen=True, slots=True)
class Registration:
    """A new member as the desk fills the form in; ``member_id`` None: head office numbers it."""

    name: str
    phone: str
    id_number: str | None = None
    address: str | None = None
    email: str | None = None
    birthday: str | None = None  # "MM-DD"
    marketing_consent: bool = False
    store: str | None = None
    member_id: str | None = None
    receipts: tuple[Receipt, ...] = ()
    pay_join_fee: bool = False  # the join fee ([centre] join_fee) was paid instead of qualifying receipts


# --- validation (no value ever appears in a message) --------------------------------------


def _text(field: str, value: str, limit: int) -> str:
    text = value.strip()
    if not text or len(text) > limit or any(ord(ch) < 32 or ord(ch) == 127 for ch in text):
        raise MemberError(f"bad_{field}", f"{field}: 1-{limit} characters of text, no control characters")
    return text


def _field_value(field: str, value: str) -> str:
    """The text stored (encrypted) for ``field``; MemberError ``bad_<field>``."""
    if field == "phone":
        try:
            return normalise_phone(value)
        except ValueError as exc:
            raise MemberError("bad_phone", f"phone: {exc}") from None
    if field == "id_number":
        text = _text(field, value, 64)
        if not re.fullmatch(r"[0-9A-Za-z-]{4,64}", text.replace(" ", "")):
            raise MemberError("bad_id_number", "id_number: 4-64 letters, digits or '-'")
        return text.replace(" ", "").upper()
    if field == "email":
        text = _text(field, value, _LIMITS["email"])
        if not _EMAIL.fullmatch(text):
            raise MemberError("bad_email", "email: an address like name@example.com")
        return text
    return _text(field, value, _LIMITS[field])


def check_birthday(value: str) -> str:
    """A month and day ``MM-DD`` that exists (29 February included); MemberError ``bad_birthday``."""
    if not _BIRTHDAY.fullmatch(value):
        raise MemberError("bad_birthday", "birthday: MM-DD, the month and the day")
    try:
        dt.date(2000, int(value[:2]), int(value[3:]))  # a leap year: 02-29 is a birthday
    except ValueError:
        raise MemberError("bad_birthday", "birthday: no such day") from None
    return value


def check_member_id(member_id: str) -> str:
    if not _MEMBER_ID.fullmatch(member_id):
        raise MemberError("bad_member_id", "a member id is 1-64 letters, digits, '.', '_' or '-'")
    return member_id


def check_card_hash(card_hash: str) -> str:
    if not _CARD_HASH.fullmatch(card_hash):
        raise MemberError("bad_card_hash", "a card hash is 64 lower-case hex digits")
    return card_hash


def _reason(reason: str) -> str:
    text = reason.strip()
    if not text or len(text) > 500 or "\x00" in text:
        raise MemberError("bad_reason", "a reason is 1-500 characters of text")
    return text


# --- shared steps --------------------------------------------------------------------------


def record_audit(
    conn: Connection,
    desk: Desk,
    action: str,
    *,
    member_id: str | None = None,
    card_hash: str | None = None,
    reason: str = "",
    detail: Mapping[str, Any] | None = None,
) -> None:
    """One ``centre_audit`` row; ``detail`` must hold no personal data (ids, codes, counts, amounts)."""
    conn.execute(
        centre_audit.insert().values(
            at=desk.now,
            actor=desk.actor,
            action=action,
            member_id=member_id,
            card_hash=card_hash,
            reason=reason or action,
            detail=json.dumps(dict(detail or {}), sort_keys=True, default=str, ensure_ascii=False),
        )
    )


def _member(conn: Connection, member_id: str) -> Member:
    """The member, its row locked until the transaction ends; ``unknown_member`` otherwise."""
    found = _load(conn, [member_id]).get(member_id)
    if found is None:
        raise MemberError("unknown_member", f"member {member_id!r} is not in head office's member table")
    return found


def _status(conn: Connection, member_id: str) -> str | None:
    """The profile's status, or None for a member with no profile (imported from a snapshot)."""
    p = member_profiles.c
    status: str | None = conn.execute(select(p.status).where(p.member_id == member_id)).scalar()
    return status


def _active(conn: Connection, member_id: str) -> None:
    if _status(conn, member_id) == "cancelled":
        raise MemberError("member_cancelled", f"member {member_id} is cancelled")


def _unique_hash(conn: Connection, column: str, value: str | None, member_id: str | None) -> None:
    """A phone or ID number belongs to one active member."""
    if value is None:
        return
    p = member_profiles.c
    query = select(p.member_id).where(p[column] == value, p.status == "active")
    if member_id is not None:
        query = query.where(p.member_id != member_id)
    holder = conn.execute(query.limit(1)).scalar()
    if holder is not None:
        code, what = ("phone_registered", "phone number") if column == "phone_hash" else ("id_registered", "ID number")
        raise MemberError(code, f"this {what} is registered to member {holder}")


def _hash_of(pii: PersonalData, field: str, value: str) -> str:
    try:
        return pii.phone_hash(value) if field == "phone" else pii.id_number_hash(value)
    except ValueError as exc:
        raise MemberError(f"bad_{field}", f"{field}: {exc}") from None


def _encrypt(pii: PersonalData, member_id: str, field: str, value: str) -> str:
    try:
        return pii.encrypt(member_id, field, value)
    except PersonalDataError as exc:
        raise MemberError(f"bad_{field}", exc.message) from None


# --- registration ------------------------------------------------------------------------


def _criteria(rule: Qualify) -> list[str]:
    found = [] if rule.same_day_spend is None else [f"same-day spend {rule.same_day_spend}"]
    found += [f"{window.days}-day spend {window.spend}" for window in rule.windows]
    if rule.year_points is not None:
        found.append(f"{rule.year_points} points in a year")
    if rule.year_spend is not None:
        found.append(f"spend {rule.year_spend} in a year")
    if rule.year_visits is not None:
        found.append(f"{rule.year_visits} visits in a year")
    return found


def receipt_lookback_days(programme: Programme) -> int:
    """How many days back (today included) a receipt may be to count for joining."""
    longest = programme.centre.claim_window_days + 1
    for rule in programme.centre.qualify:
        span = max([1, *(window.days for window in rule.windows)])
        if rule.year_points or rule.year_spend or rule.year_visits:
            span = YEAR_DAYS
        longest = max(longest, rule.apply_within_days + span)
    return longest


def joining_tier(
    programme: Programme, today: dt.date, receipts: Sequence[GuestSale], pay_join_fee: bool
) -> tuple[str, str, int]:
    """``(tier, why, join fee in fen)`` a new member with ``receipts`` joins at; ``join_not_qualified`` if none.

    The highest tier whose ``[[centre.qualify]]`` rules the receipts meet
    (within each rule's ``apply_within_days``), else the lowest: open to all
    when no rule names it, otherwise it needs receipts meeting one of its
    rules or, where the programme has one, the join fee.
    """
    days = MemberDays()
    for sale in receipts:
        day = programme.local_date(sale.at_utc)
        days.spend[day] += sale.net_fen
        days.visits.add(day)
    evidence = Evidence(today, days, 0)
    named = {rule.tier for rule in programme.centre.qualify}
    if receipts:
        for tier in reversed(programme.tiers[1:]):
            why = joinable(programme, tier, evidence) if tier in named else None
            if why is not None:
                return tier, why, 0
    lowest = programme.tiers[0]
    why = joinable(programme, lowest, evidence)
    if why is not None:
        return lowest, why, 0
    fee = programme.centre.join_fee
    if fee is not None and pay_join_fee:
        return lowest, f"join fee {fee} paid", parse_money(fee)
    needs = [c for rule in programme.centre.qualify if rule.tier == lowest for c in _criteria(rule)]
    total = sum(sale.net_fen for sale in receipts)
    message = f"joining as {lowest} needs receipts meeting one of: {', '.join(needs)}"
    message += f", or the join fee {fee}" if fee is not None else " (this programme has no join fee)"
    message += f"; the receipts given come to {format_fen(total)}" if receipts else "; no receipts were given"
    raise MemberError("join_not_qualified", message)


def _receipts(conn: Connection, desk: Desk, receipts: Sequence[Receipt]) -> list[GuestSale]:
    found = [claims.guest_sale(conn, receipt) for receipt in receipts]
    if len({sale.entry_id for sale in found}) != len(found):
        raise MemberError("receipt_repeated", "each receipt is given once")
    lookback = receipt_lookback_days(desk.programme)
    oldest = desk.today - dt.timedelta(days=lookback - 1)
    for sale in found:
        day = desk.programme.local_date(sale.at_utc)
        if day < oldest:
            raise MemberError(
                "receipt_too_old",
                f"{sale.describe()} was on {day}: receipts for joining are from {oldest} on ({lookback} days)",
            )
    return found


def _new_member_id(conn: Connection) -> str:
    for _ in range(20):
        candidate = "M" + "".join(str(secrets.randbelow(10)) for _ in range(_GENERATED_ID_DIGITS))
        if conn.execute(select(members.c.member_id).where(members.c.member_id == candidate)).first() is None:
            return candidate
    raise AssertionError("no free member id after 20 draws")  # pragma: no cover - 10^12 ids


@dataclass(frozen=True, slots=True)
class Registered:
    member_id: str
    tier: str
    why: str
    join_fee_fen: int
    receipts: tuple[str, ...]  # entry ids attached
    version: int


def register(conn: Connection, desk: Desk, form: Registration) -> Registered:
    """A new member with its encrypted profile, at the tier its receipts (or the join fee) admit it to."""
    pii = desk.need_pii()
    given = {
        "name": form.name,
        "phone": form.phone,
        "id_number": form.id_number,
        "address": form.address,
        "email": form.email,
    }
    values = {field: None if value is None else _field_value(field, value) for field, value in given.items()}
    birthday = None if form.birthday is None else check_birthday(form.birthday)
    store = None if form.store is None else _text("store", form.store, 64)
    member_id = _new_member_id(conn) if form.member_id is None else check_member_id(form.member_id)
    if conn.execute(select(members.c.member_id).where(members.c.member_id == member_id)).first() is not None:
        raise MemberError("member_exists", f"member {member_id} exists already")
    phone_hash = _hash_of(pii, "phone", form.phone)
    id_hash = None if form.id_number is None else _hash_of(pii, "id_number", form.id_number)
    _unique_hash(conn, "phone_hash", phone_hash, None)
    _unique_hash(conn, "id_number_hash", id_hash, None)
    receipts = _receipts(conn, desk, form.receipts)
    tier, why, fee_fen = joining_tier(desk.programme, desk.today, receipts, form.pay_join_fee)
    member = Member(member_id, tier, None, None, birthday, None, 0, 0)
    [(_, version)] = _commit(conn, [_Pending(member, "registered", is_new=True, cards_changed=False)], desk.now)
    conn.execute(
        member_profiles.insert().values(
            member_id=member_id,
            status="active",
            **{
                f"{field}_enc": None if value is None else _encrypt(pii, member_id, field, value)
                for field, value in values.items()
            },
            phone_hash=phone_hash,
            id_number_hash=id_hash,
            marketing_consent=int(form.marketing_consent),
            registered_at=desk.now,
            registered_store=store,
            updated_at=desk.now,
            cancelled_at=None,
        )
    )
    for sale in receipts:
        claims.attach(conn, sale, member_id, 0, desk.actor, desk.now)
    conn.execute(
        tier_history.insert().values(
            key=f"registered:{member_id}",
            member_id=member_id,
            kind="manual",
            from_tier=None,
            to_tier=tier,
            effective_from=desk.today,
            decided_on=desk.today,
            reason="registered",
            at_utc=desk.now,
        )
    )
    detail = {
        "tier": tier,
        "why": why,
        "join_fee_fen": fee_fen,
        "receipts": [sale.entry_id for sale in receipts],
        "store": store,
        "fields": sorted(field for field, value in values.items() if value is not None),
        "marketing_consent": form.marketing_consent,
    }
    record_audit(conn, desk, "register", member_id=member_id, reason=f"registered as {tier}", detail=detail)
    log.info("centre: %s registered member %s as %s (%s)", desk.actor, member_id, tier, why)
    return Registered(member_id, tier, why, fee_fen, tuple(sale.entry_id for sale in receipts), version)


# --- personal data -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Updated:
    member_id: str
    fields: tuple[str, ...]
    version: int | None  # a new member version when lanes see the change (the birthday)


def _encrypted_changes(
    conn: Connection, pii: PersonalData, member_id: str, changes: Mapping[str, Any]
) -> dict[str, Any]:
    """The profile columns for the personal-data fields among ``changes``: encrypted text, look-up hashes."""
    values: dict[str, Any] = {}
    for name in ENCRYPTED_FIELDS:
        if name not in changes:
            continue
        value = changes[name]
        if value is None and name in {"name", "phone"}:
            raise MemberError(f"bad_{name}", f"{name} is required and cannot be cleared")
        text = None if value is None else _field_value(name, str(value))
        values[f"{name}_enc"] = None if text is None else _encrypt(pii, member_id, name, text)
        if name in {"phone", "id_number"}:
            digest = None if text is None else _hash_of(pii, name, text)
            _unique_hash(conn, f"{name}_hash", digest, member_id)
            values[f"{name}_hash"] = digest
    return values


def update_profile(conn: Connection, desk: Desk, member_id: str, changes: Mapping[str, Any]) -> Updated:
    """Change some of a member's personal data: only the keys given; None clears an optional field."""
    unknown = sorted(set(changes) - set(PROFILE_FIELDS))
    if unknown:
        raise MemberError("bad_field", f"not a profile field: {', '.join(unknown)}; one of {', '.join(PROFILE_FIELDS)}")
    if not changes:
        raise MemberError("no_change", "give at least one field to change")
    pii = desk.need_pii()
    member = _member(conn, member_id)
    status = _status(conn, member_id)
    if status is None:
        raise MemberError("no_profile", f"member {member_id} has no profile at head office (imported): register it")
    if status == "cancelled":
        raise MemberError("member_cancelled", f"member {member_id} is cancelled")
    values = _encrypted_changes(conn, pii, member_id, changes)
    if "marketing_consent" in changes:
        consent = changes["marketing_consent"]
        if not isinstance(consent, bool):
            raise MemberError("bad_marketing_consent", "marketing_consent: true or false")
        values["marketing_consent"] = int(consent)
    version = None
    if "birthday" in changes:
        birthday = changes["birthday"]
        birthday = None if birthday is None else check_birthday(str(birthday))
        if birthday != member.birthday:
            member.birthday = birthday
            [(_, version)] = _commit(conn, [_Pending(member, "birthday changed", cards_changed=False)], desk.now)
    conn.execute(
        update(member_profiles).where(member_profiles.c.member_id == member_id).values(updated_at=desk.now, **values)
    )
    fields = tuple(sorted(changes))
    record_audit(conn, desk, "update", member_id=member_id, reason="personal data updated", detail={"fields": fields})
    log.info("centre: %s updated %s of member %s", desk.actor, ", ".join(fields), member_id)
    return Updated(member_id, fields, version)


@dataclass(frozen=True, slots=True)
class Personal:
    """A member's personal data, decrypted: for the desk's screen, never for a log."""

    member_id: str
    name: str | None
    phone: str | None
    id_number: str | None
    address: str | None
    email: str | None
    holders: dict[str, str]  # family cards: masked number -> the holder's name

    def __repr__(self) -> str:  # a Personal printed by accident shows no data
        return f"Personal(member_id={self.member_id!r}, …)"


def personal_data(conn: Connection, desk: Desk, member_id: str) -> Personal:
    """Decrypt a member's personal data, and record in the audit that ``desk.actor`` viewed it."""
    pii = desk.need_pii()
    p = member_profiles.c
    mapping = conn.execute(select(member_profiles).where(p.member_id == member_id)).mappings().first()
    if mapping is None:
        if conn.execute(select(members.c.member_id).where(members.c.member_id == member_id)).first() is None:
            raise MemberError("unknown_member", f"member {member_id!r} is not in head office's member table")
        raise MemberError("no_profile", f"member {member_id} has no profile at head office (imported)")
    texts = {
        field: None if mapping[f"{field}_enc"] is None else pii.decrypt(member_id, field, mapping[f"{field}_enc"])
        for field in ENCRYPTED_FIELDS
    }
    r = card_register.c
    holders = {
        masked: pii.decrypt(member_id, f"holder:{card}", enc)
        for card, masked, enc in conn.execute(
            select(r.card_hash, r.number_masked, r.holder_enc).where(
                r.member_id == member_id, r.holder_enc.is_not(None)
            )
        )
    }
    record_audit(conn, desk, "view_personal_data", member_id=member_id, reason="viewed personal data")
    log.info("centre: %s viewed the personal data of member %s", desk.actor, member_id)
    return Personal(member_id, holders=holders, **texts)


@dataclass(frozen=True, slots=True)
class Found:
    member_id: str
    status: str | None
    tier: str


def find(
    conn: Connection, desk: Desk, *, phone: str | None = None, id_number: str | None = None, card: str | None = None
) -> list[Found]:
    """Members by phone number, ID number (keyed hashes) or card hash; the look-up is audited (not its value)."""
    given = [name for name, value in (("phone", phone), ("id_number", id_number), ("card", card)) if value]
    if len(given) != 1:
        raise MemberError("bad_lookup", "look up by one of phone, id_number or card")
    m, p, c = members.c, member_profiles.c, member_cards.c
    query = select(m.member_id, p.status, m.tier).join_from(
        members, member_profiles, p.member_id == m.member_id, isouter=True
    )
    if card:
        query = query.join(member_cards, c.member_id == m.member_id).where(c.card_hash == check_card_hash(card))
    else:
        by_phone = given[0] == "phone"
        digest = _hash_of(desk.need_pii(), given[0], str(phone if by_phone else id_number))
        query = query.where((p.phone_hash if by_phone else p.id_number_hash) == digest)
    found = [Found(row.member_id, row.status, row.tier) for row in conn.execute(query.order_by(m.member_id))]
    record_audit(conn, desk, "find", reason=f"look-up by {given[0]}", detail={"by": given[0], "found": len(found)})
    return found


# --- reading a member (no personal data) ------------------------------------------------


@dataclass(frozen=True, slots=True)
class CardView:
    card_hash: str
    number_masked: str | None  # None: a card head office did not issue (imported)
    kind: str
    state: str
    role: str | None
    valid_from: dt.date
    valid_until: dt.date | None
    issued_on: dt.date | None
    replaces: str | None
    fee_fen: int


@dataclass(frozen=True, slots=True)
class MemberView:
    member_id: str
    tier: str
    next_tier: str | None
    next_tier_from: dt.date | None
    birthday: str | None
    points_balance: int
    rebate_fen: int
    version: int
    status: str | None  # None: no profile at head office (a member imported from a snapshot)
    registered_at: dt.datetime | None
    registered_store: str | None
    marketing_consent: bool | None
    on_file: tuple[str, ...]  # which personal-data fields are recorded (not their values)
    cards: tuple[CardView, ...]


def view(conn: Connection, member_id: str) -> MemberView | None:
    """What the desk sees of a member without decrypting anything; None for an unknown member."""
    member = get_member(conn, member_id)
    if member is None:
        return None
    p, r = member_profiles.c, card_register.c
    mapping = conn.execute(select(member_profiles).where(p.member_id == member_id)).mappings().first()
    register_rows = {
        row.card_hash: row for row in conn.execute(select(card_register).where(r.member_id == member_id)).all()
    }
    cards = []
    for card in sorted(member.cards.values(), key=lambda card: (card.valid_from, card.card_hash)):
        issued = register_rows.get(card.card_hash)
        cards.append(
            CardView(
                card_hash=card.card_hash,
                number_masked=None if issued is None else issued.number_masked,
                kind=card.kind,
                state=card.state,
                role=None if issued is None else issued.role,
                valid_from=card.valid_from,
                valid_until=card.valid_until,
                issued_on=None if issued is None else issued.issued_on,
                replaces=None if issued is None else issued.replaces,
                fee_fen=0 if issued is None else int(issued.fee_fen),
            )
        )
    return MemberView(
        member_id=member.member_id,
        tier=member.tier,
        next_tier=member.next_tier,
        next_tier_from=member.next_tier_from,
        birthday=member.birthday,
        points_balance=member.points_balance,
        rebate_fen=member.rebate_fen,
        version=member.version,
        status=None if mapping is None else mapping["status"],
        registered_at=None if mapping is None else mapping["registered_at"],
        registered_store=None if mapping is None else mapping["registered_store"],
        marketing_consent=None if mapping is None else bool(mapping["marketing_consent"]),
        on_file=() if mapping is None else tuple(f for f in ENCRYPTED_FIELDS if mapping[f"{f}_enc"] is not None),
        cards=tuple(cards),
    )


@dataclass(frozen=True, slots=True)
class AuditEntry:
    at: dt.datetime
    actor: str
    action: str
    card_hash: str | None
    reason: str
    detail: dict[str, Any]


def audit_trail(conn: Connection, member_id: str, limit: int = 100) -> list[AuditEntry]:
    """The member's audit rows, newest first."""
    a = centre_audit.c
    query = select(centre_audit).where(a.member_id == member_id).order_by(a.id.desc()).limit(limit)
    return [
        AuditEntry(row.at, row.actor, row.action, row.card_hash, row.reason, json.loads(row.detail))
        for row in conn.execute(query)
    ]


# --- cancelling --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Cancelled:
    member_id: str
    cards_cancelled: int
    version: int | None


def cancel(conn: Connection, desk: Desk, member_id: str, reason: str) -> Cancelled | None:
    """Cancel a membership: its cards cancelled (on the hot list at once), its profile closed; None if it was.

    The balances stay as the ledger has them; lanes refuse the cards from the
    next hot list (within about a second for an online lane).
    """
    reason = _reason(reason)
    member = _member(conn, member_id)
    status = _status(conn, member_id)
    if status == "cancelled":
        return None
    hot = 0
    for card_hash, card in list(member.cards.items()):
        if card.state not in HOT_CARD_STATES:
            member.cards[card_hash] = replace(card, state="cancelled", version=0, changed_at=desk.now)
            hot += 1
    member.next_tier = member.next_tier_from = None
    [(_, version)] = _commit(conn, [_Pending(member, f"cancelled: {reason}")], desk.now)
    if status is None:
        conn.execute(
            member_profiles.insert().values(
                member_id=member_id,
                status="cancelled",
                marketing_consent=0,
                registered_at=desk.now,
                updated_at=desk.now,
                cancelled_at=desk.now,
            )
        )
    else:
        conn.execute(
            update(member_profiles)
            .where(member_profiles.c.member_id == member_id)
            .values(status="cancelled", cancelled_at=desk.now, updated_at=desk.now)
        )
    record_audit(conn, desk, "cancel", member_id=member_id, reason=reason, detail={"cards_cancelled": hot})
    log.info("centre: %s cancelled member %s (%d cards)", desk.actor, member_id, hot)
    return Cancelled(member_id, hot, version)


# --- cards ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class IssuedCard:
    """A card just issued.  ``number`` is the only full card number head office ever hands out: print it."""

    number: str
    number_masked: str
    card_hash: str
    member_id: str
    kind: str
    role: str
    valid_from: dt.date
    valid_until: dt.date | None
    fee_fen: int
    replaces: str | None
    version: int

    def __repr__(self) -> str:  # never the number in a log or a traceback
        return f"IssuedCard(number={self.number_masked!r}, member_id={self.member_id!r}, card_hash={self.card_hash!r})"


def _card_number(conn: Connection, desk: Desk, number: str | None) -> tuple[str, str]:
    """``(number, card hash)`` of a new card: the number given, or a new one; ``card_exists`` when taken."""
    key = desk.need_card_key()
    if number is not None:
        try:
            text = normalise_card_number(number)
        except ValueError as exc:
            raise MemberError("bad_card_number", str(exc)) from None
        digest = hash_card_number(key, text).hex()
        if _card_taken(conn, digest):
            raise MemberError("card_exists", f"card {mask_number(text)} is held already")
        return text, digest
    for _ in range(20):
        text = desk.numbering.generate()
        digest = hash_card_number(key, text).hex()
        if not _card_taken(conn, digest):
            return text, digest
    raise AssertionError("no free card number after 20 draws")  # pragma: no cover - 10^11 numbers


def _card_taken(conn: Connection, digest: str) -> bool:
    c, r = member_cards.c, card_register.c
    held = conn.execute(select(c.card_hash).where(c.card_hash == digest)).first()
    return held is not None or conn.execute(select(r.card_hash).where(r.card_hash == digest)).first() is not None


def _kind(desk: Desk, kind: str | None) -> str:
    kinds = desk.programme.ruleset.card_kinds
    if kind is None:
        return kinds[0] if kinds else "standard"
    if kinds and kind not in kinds:
        raise MemberError("bad_card_kind", f"card kind {kind!r}: this programme's kinds are {', '.join(kinds)}")
    return kind


def _add_card(
    conn: Connection,
    desk: Desk,
    member: Member,
    *,
    number: str | None,
    kind: str,
    role: str,
    holder: str | None,
    replaces: Card | None,
    fee_fen: int,
    reason: str,
) -> IssuedCard:
    text, digest = _card_number(conn, desk, number)
    valid_from, valid_until = card_validity(desk.programme.centre.card_validity, desk.today)
    if replaces is not None and replaces.valid_until is not None and replaces.valid_until >= valid_from:
        valid_until = replaces.valid_until  # a replacement is not a renewal
    member.cards[digest] = Card(digest, kind, "active", valid_from, valid_until, 0, desk.now)
    if replaces is not None:
        member.cards[replaces.card_hash] = replace(replaces, state="replaced", version=0, changed_at=desk.now)
    [(_, version)] = _commit(conn, [_Pending(member, reason)], desk.now)
    holder_enc = None
    if holder is not None:
        holder_enc = _encrypt(desk.need_pii(), member.member_id, f"holder:{digest}", _text("holder", holder, 100))
    conn.execute(
        card_register.insert().values(
            card_hash=digest,
            member_id=member.member_id,
            number_masked=mask_number(text),
            role=role,
            holder_enc=holder_enc,
            issued_on=desk.today,
            issued_at=desk.now,
            issued_by=desk.actor,
            replaces=None if replaces is None else replaces.card_hash,
            fee_fen=fee_fen,
        )
    )
    return IssuedCard(
        number=text,
        number_masked=mask_number(text),
        card_hash=digest,
        member_id=member.member_id,
        kind=kind,
        role=role,
        valid_from=valid_from,
        valid_until=valid_until,
        fee_fen=fee_fen,
        replaces=None if replaces is None else replaces.card_hash,
        version=version,
    )


def issue_card(
    conn: Connection,
    desk: Desk,
    member_id: str,
    *,
    number: str | None = None,
    role: str = "owner",
    holder: str | None = None,
    kind: str | None = None,
) -> IssuedCard:
    """A new card for ``member_id``, valid from tomorrow; a family card (``holder`` named) shares the account."""
    if role not in {"owner", "family"}:
        raise MemberError("bad_role", "a card's role is owner or family")
    if (role == "family") != (holder is not None):
        raise MemberError("bad_holder", "a family card names its holder; an owner card does not")
    if holder is not None:
        desk.need_pii()
    desk.need_card_key()
    member = _member(conn, member_id)
    _active(conn, member_id)
    card_kind = _kind(desk, kind)
    issued = _add_card(
        conn,
        desk,
        member,
        number=number,
        kind=card_kind,
        role=role,
        holder=holder,
        replaces=None,
        fee_fen=0,
        reason=f"{role} card issued",
    )
    detail = {
        "number": issued.number_masked,
        "kind": card_kind,
        "role": role,
        "valid_from": issued.valid_from,
        "valid_until": issued.valid_until,
    }
    record_audit(
        conn, desk, "issue_card", member_id=member_id, card_hash=issued.card_hash, reason="card issued", detail=detail
    )
    log.info("centre: %s issued card %s (%s) to member %s", desk.actor, issued.number_masked, role, member_id)
    return issued


def _card_owner(conn: Connection, card_hash: str) -> tuple[Member, Card]:
    owner = conn.execute(
        select(member_cards.c.member_id).where(member_cards.c.card_hash == check_card_hash(card_hash))
    ).scalar()
    if owner is None:
        raise MemberError("unknown_card", f"card {card_hash[:12]}… is not in head office's member table")
    member = _member(conn, owner)
    card = member.cards.get(card_hash)
    if card is None:  # moved between the two reads; the locked row says where
        raise MemberError("card_moved", f"card {card_hash[:12]}… changed hands meanwhile; try again")
    return member, card


@dataclass(frozen=True, slots=True)
class CardChanged:
    card_hash: str
    member_id: str
    state: str
    version: int | None  # None: it was so already


def report_lost(conn: Connection, desk: Desk, card_hash: str, reason: str = "reported lost") -> CardChanged:
    """A card reported lost: ``lost`` at once, so it is on the next hot list; None version when it was already."""
    reason = _reason(reason)
    member, card = _card_owner(conn, card_hash)
    version = None
    if card.state in {"replaced", "cancelled"}:
        raise MemberError("card_not_active", f"card {card_hash[:12]}… is {card.state}: it cannot be reported lost")
    if card.state != "lost":
        change = set_state(conn, card_hash, "lost", reason, desk.now)
        version = None if change is None else change.version
    record_audit(
        conn,
        desk,
        "report_lost",
        member_id=member.member_id,
        card_hash=card_hash,
        reason=reason,
        detail={"was": card.state, "changed": version is not None},
    )
    log.info("centre: %s reported card %s… of member %s lost", desk.actor, card_hash[:12], member.member_id)
    return CardChanged(card_hash, member.member_id, "lost", version)


def replace_card(
    conn: Connection,
    desk: Desk,
    card_hash: str,
    *,
    number: str | None = None,
    kind: str | None = None,
    reason: str = "replacement card",
) -> IssuedCard:
    """A new card (a new number) for the member of ``card_hash``, which is ``replaced`` at once.

    Points, sales and tier belong to the member, not the card: they stay.
    The programme's ``card_fee`` is recorded on the new card.
    """
    reason = _reason(reason)
    desk.need_card_key()
    member, old = _card_owner(conn, card_hash)
    _active(conn, member.member_id)
    if old.state in {"replaced", "cancelled"}:
        raise MemberError("card_not_replaceable", f"card {card_hash[:12]}… is {old.state} already")
    r = card_register.c
    previous = conn.execute(select(r.role, r.holder_enc).where(r.card_hash == card_hash)).first()
    role = "owner" if previous is None else previous.role
    holder = None
    if previous is not None and previous.holder_enc is not None:
        holder = desk.need_pii().decrypt(member.member_id, f"holder:{card_hash}", previous.holder_enc)
    fee_fen = desk.programme.card_fee_fen()
    issued = _add_card(
        conn,
        desk,
        member,
        number=number,
        kind=_kind(desk, kind or old.kind),
        role=role,
        holder=holder,
        replaces=old,
        fee_fen=fee_fen,
        reason=f"card replaced: {reason}",
    )
    detail = {
        "number": issued.number_masked,
        "replaces": card_hash,
        "was": old.state,
        "fee_fen": fee_fen,
        "valid_until": issued.valid_until,
    }
    record_audit(
        conn, desk, "replace_card", member_id=member.member_id, card_hash=issued.card_hash, reason=reason, detail=detail
    )
    log.info(
        "centre: %s replaced card %s… of member %s by %s",
        desk.actor,
        card_hash[:12],
        member.member_id,
        issued.number_masked,
    )
    return issued


# --- balances and tiers ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Adjusted:
    member_id: str
    points: int
    rebate_fen: int
    points_balance: int
    rebate_balance_fen: int
    version: int
    replayed: bool  # the idempotency key was used before with the same adjustment: nothing new


def adjust(
    conn: Connection,
    desk: Desk,
    member_id: str,
    points: int,
    rebate_fen: int,
    reason: str,
    *,
    key: str | None = None,
) -> Adjusted:
    """A manual adjustment: a centre-ledger ``adjust`` row (a reason is required), audited.

    ``key``: an idempotency key; the same key with the same adjustment again
    changes nothing, with another adjustment it is refused (``idempotency_conflict``).
    """
    reason = _reason(reason)
    ledger_key = None if key is None else f"adjust:{_text('key', key, 64)}"
    if ledger_key is not None:
        cl = centre_ledger.c
        earlier = conn.execute(select(cl.member_id, cl.points, cl.rebate_fen).where(cl.key == ledger_key)).first()
        if earlier is not None:
            if (earlier.member_id, int(earlier.points), int(earlier.rebate_fen)) != (member_id, points, rebate_fen):
                raise MemberError("idempotency_conflict", f"key {key!r} was used for another adjustment")
            member = _member(conn, member_id)
            return Adjusted(
                member_id, points, rebate_fen, member.points_balance, member.rebate_fen, member.version, replayed=True
            )
    change = adjust_balances(
        conn, member_id, points, rebate_fen, reason, desk.now, actor=desk.actor, on_date=desk.today, key=ledger_key
    )
    member = _member(conn, member_id)
    record_audit(
        conn,
        desk,
        "adjust",
        member_id=member_id,
        reason=reason,
        detail={"points": points, "rebate_fen": rebate_fen, "key": ledger_key},
    )
    log.info(
        "centre: %s adjusted member %s by %+d points, %s rebate", desk.actor, member_id, points, format_fen(rebate_fen)
    )
    return Adjusted(
        member_id, points, rebate_fen, member.points_balance, member.rebate_fen, change.version, replayed=False
    )


@dataclass(frozen=True, slots=True)
class TierSet:
    member_id: str
    tier: str
    effective_from: dt.date
    version: int | None  # None: it was so already


def set_tier(
    conn: Connection, desk: Desk, member_id: str, tier: str, reason: str, effective_from: dt.date | None = None
) -> TierSet:
    """Set a tier by hand: in force at once, or from ``effective_from`` (a later day) as the next tier."""
    reason = _reason(reason)
    if tier not in desk.programme.tiers:
        raise MemberError(
            "unknown_tier", f"tier {tier!r}: this programme's tiers are {', '.join(desk.programme.tiers)}"
        )
    member = _member(conn, member_id)
    _active(conn, member_id)
    today = desk.today
    if effective_from is not None and effective_from <= today:
        effective_from = None  # today or before: in force now
    if effective_from is None:
        change = set_member_tier(conn, member_id, tier, None, None, reason, desk.now)
    else:
        change = set_member_tier(conn, member_id, member.tier, tier, effective_from, reason, desk.now)
    start = effective_from or today
    if change is not None:
        conn.execute(
            tier_history.insert().values(
                key=f"manual:{uuid.uuid4()}",
                member_id=member_id,
                kind="manual",
                from_tier=member.tier,
                to_tier=tier,
                effective_from=start,
                decided_on=today,
                reason=reason,
                at_utc=desk.now,
            )
        )
    record_audit(
        conn,
        desk,
        "set_tier",
        member_id=member_id,
        reason=reason,
        detail={"from": member.tier, "to": tier, "effective_from": start, "changed": change is not None},
    )
    return TierSet(member_id, tier, start, None if change is None else change.version)


def claim_receipt(conn: Connection, desk: Desk, member_id: str, receipt: Receipt) -> Claimed:
    """A late point claim (``sync.hq.centre.claims``), audited."""
    if desk.library is None:
        raise DeskConfigError("no_rules", "head office has no rules directory to re-price the receipt with")
    claimed = claims.claim(conn, desk.library, desk.programme, member_id, receipt, desk.actor, desk.now)
    detail = {
        "entry_id": claimed.entry_id,
        "sale": f"{claimed.store}/{claimed.lane}/{claimed.sale_id}",
        "sale_day": claimed.sale_day,
        "points": claimed.points,
    }
    record_audit(conn, desk, "claim", member_id=member_id, reason="late point claim", detail=detail)
    log.info(
        "centre: %s credited %d points to member %s for entry %s",
        desk.actor,
        claimed.points,
        member_id,
        claimed.entry_id,
    )
    return claimed


# --- bound to a database --------------------------------------------------------------------


class ServiceDesk:
    """The desk's operations on one database, each in its own transaction (called on its owner thread)."""

    def __init__(
        self,
        db: HqDatabase,
        programme: Callable[[], Programme],
        *,
        pii: PersonalData | None = None,
        card_key: bytes | None = None,
        numbering: CardNumbering | None = None,
        library: RulesetLibrary | None = None,
    ) -> None:
        self._db = db
        self._programme = programme
        self._pii = pii
        self._card_key = card_key
        self._numbering = numbering or CardNumbering()
        self._library = library

    @classmethod
    def from_config(cls, db: HqDatabase, config: HqConfig, library: RulesetLibrary) -> ServiceDesk:
        """The desk as ``config`` sets it up; the programme is looked up at each operation (a new version counts)."""
        key = config.personal_data_key()
        return cls(
            db,
            lambda: live_programme(library, config.centre.ruleset),
            pii=None if key is None else PersonalData(key),
            card_key=config.card_key(),
            numbering=CardNumbering(config.centre.card_number_prefix, config.centre.card_number_length),
            library=library,
        )

    def desk(self, actor: str) -> Desk:
        return Desk(
            self._programme,
            actor,
            self._db.now(),
            pii=self._pii,
            card_key=self._card_key,
            numbering=self._numbering,
            library=self._library,
        )

    @contextmanager
    def _write(self, actor: str) -> Iterator[tuple[Connection, Desk]]:
        desk = self.desk(actor)
        with self._db.transaction() as conn:
            yield conn, desk

    def register(self, actor: str, form: Registration) -> Registered:
        with self._write(actor) as (conn, desk):
            return register(conn, desk, form)

    def update_profile(self, actor: str, member_id: str, changes: Mapping[str, Any]) -> Updated:
        with self._write(actor) as (conn, desk):
            return update_profile(conn, desk, member_id, changes)

    def cancel(self, actor: str, member_id: str, reason: str) -> Cancelled | None:
        with self._write(actor) as (conn, desk):
            return cancel(conn, desk, member_id, reason)

    def find(
        self, actor: str, *, phone: str | None = None, id_number: str | None = None, card: str | None = None
    ) -> list[Found]:
        with self._write(actor) as (conn, desk):
            return find(conn, desk, phone=phone, id_number=id_number, card=card)

    def view(self, member_id: str) -> MemberView | None:
        with self._db.reading() as conn:
            return view(conn, member_id)

    def personal_data(self, actor: str, member_id: str) -> Personal:
        with self._write(actor) as (conn, desk):
            return personal_data(conn, desk, member_id)

    def issue_card(
        self,
        actor: str,
        member_id: str,
        *,
        number: str | None = None,
        role: str = "owner",
        holder: str | None = None,
        kind: str | None = None,
    ) -> IssuedCard:
        with self._write(actor) as (conn, desk):
            return issue_card(conn, desk, member_id, number=number, role=role, holder=holder, kind=kind)

    def report_lost(self, actor: str, card_hash: str, reason: str = "reported lost") -> CardChanged:
        with self._write(actor) as (conn, desk):
            return report_lost(conn, desk, card_hash, reason)

    def replace_card(
        self,
        actor: str,
        card_hash: str,
        *,
        number: str | None = None,
        kind: str | None = None,
        reason: str = "replacement card",
    ) -> IssuedCard:
        with self._write(actor) as (conn, desk):
            return replace_card(conn, desk, card_hash, number=number, kind=kind, reason=reason)

    def adjust(
        self, actor: str, member_id: str, points: int, rebate_fen: int, reason: str, *, key: str | None = None
    ) -> Adjusted:
        with self._write(actor) as (conn, desk):
            return adjust(conn, desk, member_id, points, rebate_fen, reason, key=key)

    def set_tier(
        self, actor: str, member_id: str, tier: str, reason: str, effective_from: dt.date | None = None
    ) -> TierSet:
        with self._write(actor) as (conn, desk):
            return set_tier(conn, desk, member_id, tier, reason, effective_from)

    def claim(self, actor: str, member_id: str, receipt: Receipt) -> Claimed:
        with self._write(actor) as (conn, desk):
            return claim_receipt(conn, desk, member_id, receipt)

    def audit_trail(self, member_id: str, limit: int = 100) -> list[AuditEntry]:
        with self._db.reading() as conn:
            return audit_trail(conn, member_id, limit)
