"""The service desk's HTTP API: members, cards, late claims, adjustments (docs/member-centre.md).

Every route is under ``/v1/centre/`` and needs a staff token
(``Authorization: Bearer <name>:<token>``, ``sync.hq.centre.staff``); the
name is the actor of the audit row each operation writes.  The work runs on
the database's owner thread (``DbOwner.call``) through
``sync.hq.centre.registry``.

Errors are ``{"error": {"code", "message"}}``: 401 no or a wrong token, 404
an unknown member, card or receipt, 409 a refusal (``join_not_qualified``,
``already_claimed``, ``claim_window_closed``, ``member_cancelled``, …), 422 a
request that does not validate (the message names the field, never its
value), 503 head office lacks a key it needs (staff secret, personal-data
key, card key).

Personal data leaves head office only in ``GET /v1/centre/members/{id}?personal=true``,
which is audited; card numbers only in the answers that issue a card
(``POST …/cards``, ``POST /v1/centre/cards/{hash}/replace``), which the
desk prints.  Everything else shows card numbers masked (last four digits).
"""

# No ``from __future__ import annotations``: FastAPI reads the routes' annotations as objects, and
# the staff dependency in them is built per router (see sync/hq/centre/staff.py).

import datetime as dt
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Annotated, Any, Literal, Self, TypeVar

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from agent.errors import InputError
from agent.money import format_fen, parse_money
from sync.hq.audit import RulesetLibrary
from sync.hq.centre import registry
from sync.hq.centre.claims import Claimed, Receipt
from sync.hq.centre.pii import PersonalData, PersonalDataError
from sync.hq.centre.programme import ProgrammeError, live_programme
from sync.hq.centre.staff import staff_guard, staff_of
from sync.hq.config import HqConfig
from sync.hq.db import HqDatabase
from sync.hq.members import MemberError
from sync.hq.owner import DbOwner

log = logging.getLogger(__name__)
T = TypeVar("T")

_NOT_FOUND = frozenset({"unknown_member", "unknown_card", "receipt_unknown", "no_profile"})
_INVALID = frozenset({"no_change", "no_adjustment", "receipt_repeated", "unknown_tier", "bad_lookup"})

MemberId = Annotated[str, Path(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", description="head office's member id")]
CardHash = Annotated[str, Path(pattern=r"^[0-9a-f]{64}$", description="the card's keyed hash (64 hex)")]


def _error(status: int, code: str, message: str) -> HTTPException:
    return HTTPException(status, detail={"code": code, "message": message})


def _refused(exc: Exception) -> HTTPException:
    """The HTTP answer to an operation the desk refused."""
    if isinstance(exc, MemberError):
        status = 404 if exc.code in _NOT_FOUND else 422 if exc.code.startswith("bad_") or exc.code in _INVALID else 409
        return _error(status, exc.code, exc.message)
    if isinstance(exc, registry.DeskConfigError):
        return _error(503, exc.code, exc.message)
    if isinstance(exc, PersonalDataError):
        log.error("personal data cannot be read: %s", exc.message)
        return _error(503, exc.code, exc.message)
    if isinstance(exc, ProgrammeError):
        return _error(409, exc.code, exc.message)
    if isinstance(exc, InputError):
        first = exc.issues[0]
        return _error(422, first.code, f"{first.field}: {first.message}")
    raise exc


def _validation_error(exc: RequestValidationError) -> dict[str, str]:
    # FastAPI's errors carry the input; the message names the field and the rule only (personal data).
    first = exc.errors()[0] if exc.errors() else {}
    where = ".".join(str(part) for part in first.get("loc", ())[1:]) or "body"
    kind = str(first.get("type", "invalid"))
    return {
        "code": "json_syntax" if kind == "json_invalid" else "invalid",
        "message": f"{where}: {first.get('msg', '')}",
    }


def _route_class(secret: bytes | None) -> type[APIRoute]:
    """Routes whose validation errors are shaped as every other error, and never answered before the token."""

    class CentreRoute(APIRoute):
        def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
            handler = super().get_route_handler()

            async def shaped(request: Request) -> Response:
                try:
                    return await handler(request)
                except RequestValidationError as exc:
                    # A body is parsed before the dependencies run: an anonymous caller learns nothing from it.
                    header = request.headers.get("authorization", "")
                    scheme, _, credentials = header.partition(" ")
                    if secret is None:
                        message = (
                            "head office has no centre.staff_secret_env / staff_secret_file: the desk API is closed"
                        )
                        return JSONResponse(
                            {"error": {"code": "staff_auth_unconfigured", "message": message}}, status_code=503
                        )
                    if scheme.lower() != "bearer" or staff_of(secret, credentials) is None:
                        return JSONResponse(
                            {"error": {"code": "unauthorized", "message": "a staff token is required"}},
                            status_code=401,
                            headers={"WWW-Authenticate": "Bearer"},
                        )
                    return JSONResponse({"error": _validation_error(exc)}, status_code=422)

            return shaped

    return CentreRoute


# --- request bodies --------------------------------------------------------------------


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)


class ReceiptIn(_In):
    """A receipt: its journal entry id, or the store, lane and sale id printed on it."""

    entry_id: str | None = Field(default=None, max_length=64, description="the sale's journal entry id")
    store: str | None = Field(default=None, max_length=64)
    lane: str | None = Field(default=None, max_length=64)
    sale_id: str | None = Field(default=None, max_length=64, description="the POS's sale id on the receipt")

    @model_validator(mode="after")
    def _one_way(self) -> Self:
        self.receipt()
        return self

    def receipt(self) -> Receipt:
        try:
            return Receipt(self.entry_id, self.store, self.lane, self.sale_id)
        except MemberError as exc:
            raise ValueError(exc.message) from None


class RegisterIn(_In):
    """A new member: personal data (stored encrypted), consent, and the receipts it joins with."""

    name: str = Field(min_length=1, max_length=100)
    phone: str = Field(min_length=5, max_length=32, description="any format; +86 and separators are ignored")
    id_number: str | None = Field(default=None, max_length=64)
    address: str | None = Field(default=None, max_length=500)
    email: str | None = Field(default=None, max_length=254)
    birthday: str | None = Field(default=None, pattern=r"^[0-9]{2}-[0-9]{2}$", description="MM-DD")
    marketing_consent: bool = False
    store: str | None = Field(default=None, max_length=64, description="where the member registered")
    member_id: str | None = Field(default=None, max_length=64, description="default: head office numbers it")
    receipts: list[ReceiptIn] = Field(default_factory=list, max_length=50, description="the day's receipts")
    pay_join_fee: bool = Field(default=False, description="the programme's join fee was paid instead of receipts")


class LookupIn(_In):
    """One of: a phone number, an ID number (both found through keyed hashes), a card's hash."""

    phone: str | None = Field(default=None, max_length=32)
    id_number: str | None = Field(default=None, max_length=64)
    card_hash: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")


class ProfilePatch(_In):
    """Fields to change; a field left out stays, null clears an optional one."""

    name: str | None = Field(default=None, min_length=1, max_length=100)
    phone: str | None = Field(default=None, min_length=5, max_length=32)
    id_number: str | None = Field(default=None, max_length=64)
    address: str | None = Field(default=None, max_length=500)
    email: str | None = Field(default=None, max_length=254)
    birthday: str | None = Field(default=None, pattern=r"^[0-9]{2}-[0-9]{2}$")
    marketing_consent: bool | None = None


class ReasonIn(_In):
    reason: str = Field(min_length=1, max_length=500)


class CardIn(_In):
    """A card to issue: a number given (a pre-printed card) or one head office generates."""

    number: str | None = Field(default=None, max_length=64, description="default: a new number with a check digit")
    role: Literal["owner", "family"] = "owner"
    holder: str | None = Field(default=None, max_length=100, description="a family card's holder (encrypted)")
    kind: str | None = Field(default=None, max_length=64, description="one of the ruleset's card_kinds")


class LostIn(_In):
    reason: str = Field(default="reported lost", min_length=1, max_length=500)


class ReplaceIn(_In):
    number: str | None = Field(default=None, max_length=64, description="default: a new number")
    kind: str | None = Field(default=None, max_length=64, description="default: the old card's kind")
    reason: str = Field(default="replacement card", min_length=1, max_length=500)


class AdjustIn(_In):
    """Points and rebate money to add (negative: take); a reason is required."""

    points: int = Field(default=0, ge=-(10**12), le=10**12)
    rebate: str = Field(default="0.00", description='decimal string, may be negative: "-5.00"')
    reason: str = Field(min_length=1, max_length=500)
    idempotency_key: str | None = Field(default=None, max_length=64, description="a retry with it changes nothing")

    @field_validator("rebate")
    @classmethod
    def _money(cls, value: str) -> str:
        parse_money(value, allow_negative=True)
        return value

    def rebate_fen(self) -> int:
        return parse_money(self.rebate, allow_negative=True)


class TierIn(_In):
    tier: str = Field(min_length=1, max_length=64)
    reason: str = Field(min_length=1, max_length=500)
    effective_from: dt.date | None = Field(default=None, description="a later day: the next tier from then")


# --- answers ----------------------------------------------------------------------------------


class _Out(BaseModel):
    model_config = ConfigDict(frozen=True)


class CardOut(_Out):
    card_hash: str
    number: str | None = Field(description="masked: the last four digits")
    kind: str
    state: str
    role: str | None
    valid_from: dt.date
    valid_until: dt.date | None
    issued_on: dt.date | None
    replaces: str | None
    fee: str


class PersonalOut(_Out):
    name: str | None
    phone: str | None
    id_number: str | None
    address: str | None
    email: str | None
    holders: dict[str, str] = Field(description="family cards: masked number -> holder")


class MemberOut(_Out):
    member_id: str
    tier: str
    next_tier: str | None
    next_tier_from: dt.date | None
    birthday: str | None
    points_balance: int
    rebate: str
    version: int
    status: str | None = Field(description="active, cancelled, or null for a member with no profile (imported)")
    registered_at: dt.datetime | None
    registered_store: str | None
    marketing_consent: bool | None
    on_file: list[str] = Field(description="the personal-data fields recorded (not their values)")
    cards: list[CardOut]
    personal: PersonalOut | None = Field(default=None, description="only with ?personal=true (audited)")


class RegisteredOut(_Out):
    member_id: str
    tier: str
    why: str
    join_fee: str
    receipts: list[str]
    version: int


class FoundOut(_Out):
    member_id: str
    status: str | None
    tier: str


class FoundListOut(_Out):
    members: list[FoundOut]


class UpdatedOut(_Out):
    member_id: str
    fields: list[str]
    version: int | None


class CancelledOut(_Out):
    member_id: str
    changed: bool
    cards_cancelled: int
    version: int | None


class IssuedOut(_Out):
    """The one answer with a card's full number: the desk prints it on the card."""

    number: str
    number_masked: str
    card_hash: str
    member_id: str
    kind: str
    role: str
    valid_from: dt.date
    valid_until: dt.date | None
    fee: str
    replaces: str | None
    version: int


class CardStateOut(_Out):
    card_hash: str
    member_id: str
    state: str
    changed: bool
    version: int | None


class ClaimOut(_Out):
    entry_id: str
    sale: str
    sale_day: dt.date
    member_id: str
    points: int
    points_balance: int
    version: int | None


class AdjustedOut(_Out):
    member_id: str
    points: int
    rebate: str
    points_balance: int
    rebate_balance: str
    version: int
    replayed: bool


class TierOut(_Out):
    member_id: str
    tier: str
    effective_from: dt.date
    changed: bool
    version: int | None


class AuditOut(_Out):
    at: dt.datetime
    actor: str
    action: str
    card_hash: str | None
    reason: str
    detail: dict[str, Any]


class AuditListOut(_Out):
    entries: list[AuditOut]


def _member_out(view: registry.MemberView, personal: registry.Personal | None) -> MemberOut:
    return MemberOut(
        member_id=view.member_id,
        tier=view.tier,
        next_tier=view.next_tier,
        next_tier_from=view.next_tier_from,
        birthday=view.birthday,
        points_balance=view.points_balance,
        rebate=format_fen(view.rebate_fen),
        version=view.version,
        status=view.status,
        registered_at=view.registered_at,
        registered_store=view.registered_store,
        marketing_consent=view.marketing_consent,
        on_file=list(view.on_file),
        cards=[
            CardOut(
                card_hash=card.card_hash,
                number=card.number_masked,
                kind=card.kind,
                state=card.state,
                role=card.role,
                valid_from=card.valid_from,
                valid_until=card.valid_until,
                issued_on=card.issued_on,
                replaces=card.replaces,
                fee=format_fen(card.fee_fen),
            )
            for card in view.cards
        ],
        personal=None
        if personal is None
        else PersonalOut(
            name=personal.name,
            phone=personal.phone,
            id_number=personal.id_number,
            address=personal.address,
            email=personal.email,
            holders=personal.holders,
        ),
    )


def _issued_out(card: registry.IssuedCard) -> IssuedOut:
    return IssuedOut(
        number=card.number,
        number_masked=card.number_masked,
        card_hash=card.card_hash,
        member_id=card.member_id,
        kind=card.kind,
        role=card.role,
        valid_from=card.valid_from,
        valid_until=card.valid_until,
        fee=format_fen(card.fee_fen),
        replaces=card.replaces,
        version=card.version,
    )


def _personal(config: HqConfig) -> PersonalData | None:
    key = config.personal_data_key()
    if key is None:
        return None
    try:
        return PersonalData(key)
    except PersonalDataError as exc:
        # No traceback: the message says what is wrong with the key (and shows nothing of it).
        log.error("[centre] personal-data key unusable: %s; the desk cannot read or write personal data", exc.message)  # noqa: TRY400
        return None


# What the route groups get: runs a desk operation on the owner thread, refusals turned into HTTP errors.
_Run = Callable[[Callable[[registry.ServiceDesk], Any]], Awaitable[Any]]


def router(config: HqConfig, owner: DbOwner, library: RulesetLibrary) -> APIRouter:
    """The service desk's routes under ``/v1/centre/``; each needs a staff token."""
    secret = config.staff_secret()
    api = APIRouter(tags=["member centre: service desk"], route_class=_route_class(secret))
    staff = Depends(staff_guard(secret))
    pii = _personal(config)
    card_key = config.card_key()
    numbering = registry.CardNumbering(config.centre.card_number_prefix, config.centre.card_number_length)

    def desk(db: HqDatabase) -> registry.ServiceDesk:
        return registry.ServiceDesk(
            db,
            lambda: live_programme(library, config.centre.ruleset),
            pii=pii,
            card_key=card_key,
            numbering=numbering,
            library=library,
        )

    async def run(work: Callable[[registry.ServiceDesk], T]) -> T:
        try:
            return await owner.call(lambda db: work(desk(db)))
        except (MemberError, registry.DeskConfigError, PersonalDataError, ProgrammeError, InputError) as exc:
            raise _refused(exc) from None

    _member_routes(api, run, staff)
    _lookup_routes(api, run, staff)
    _card_routes(api, run, staff)
    _balance_routes(api, run, staff)
    return api


def _member_routes(api: APIRouter, run: _Run, staff: Any) -> None:
    @api.post("/v1/centre/members", status_code=201)
    async def register(body: RegisterIn, actor: Annotated[str, staff]) -> RegisteredOut:
        """Register a member; the tier is the highest its receipts qualify for (or the lowest, by the fee)."""
        form = registry.Registration(
            name=body.name,
            phone=body.phone,
            id_number=body.id_number,
            address=body.address,
            email=body.email,
            birthday=body.birthday,
            marketing_consent=body.marketing_consent,
            store=body.store,
            member_id=body.member_id,
            receipts=tuple(receipt.receipt() for receipt in body.receipts),
            pay_join_fee=body.pay_join_fee,
        )
        done: registry.Registered = await run(lambda d: d.register(actor, form))
        return RegisteredOut(
            member_id=done.member_id,
            tier=done.tier,
            why=done.why,
            join_fee=format_fen(done.join_fee_fen),
            receipts=list(done.receipts),
            version=done.version,
        )

    @api.get("/v1/centre/members/{member_id}")
    async def show(member_id: MemberId, actor: Annotated[str, staff], personal: bool = False) -> MemberOut:
        """A member, its cards (numbers masked) and, with ``personal=true``, its personal data (audited)."""

        def work(d: registry.ServiceDesk) -> tuple[registry.MemberView | None, registry.Personal | None]:
            found = d.view(member_id)
            if found is None or not personal:
                return found, None
            return found, d.personal_data(actor, member_id)

        found, data = await run(work)
        if found is None:
            raise _error(404, "unknown_member", f"member {member_id!r} is not in head office's member table")
        return _member_out(found, data)

    @api.patch("/v1/centre/members/{member_id}")
    async def update(member_id: MemberId, body: ProfilePatch, actor: Annotated[str, staff]) -> UpdatedOut:
        """Change personal data: the fields given only (null clears an optional one)."""
        changes = {name: getattr(body, name) for name in body.model_fields_set}
        done: registry.Updated = await run(lambda d: d.update_profile(actor, member_id, changes))
        return UpdatedOut(member_id=done.member_id, fields=list(done.fields), version=done.version)

    @api.post("/v1/centre/members/{member_id}/cancel")
    async def cancel(member_id: MemberId, body: ReasonIn, actor: Annotated[str, staff]) -> CancelledOut:
        """Cancel a membership: every card cancelled (hot list at once); balances stay in the ledger."""
        done: registry.Cancelled | None = await run(lambda d: d.cancel(actor, member_id, body.reason))
        if done is None:
            return CancelledOut(member_id=member_id, changed=False, cards_cancelled=0, version=None)
        return CancelledOut(
            member_id=member_id, changed=True, cards_cancelled=done.cards_cancelled, version=done.version
        )


def _lookup_routes(api: APIRouter, run: _Run, staff: Any) -> None:
    @api.get("/v1/centre/members")
    async def find(
        actor: Annotated[str, staff],
        phone: Annotated[str | None, Query(max_length=32)] = None,
        id_number: Annotated[str | None, Query(max_length=64)] = None,
        card_hash: Annotated[str | None, Query(pattern=r"^[0-9a-f]{64}$")] = None,
    ) -> FoundListOut:
        """Members by phone number or ID number (through keyed hashes), or by a card's hash."""
        found: list[registry.Found] = await run(
            lambda d: d.find(actor, phone=phone, id_number=id_number, card=card_hash)
        )
        return FoundListOut(members=[FoundOut(member_id=f.member_id, status=f.status, tier=f.tier) for f in found])

    @api.post("/v1/centre/members/lookup")
    async def lookup(body: LookupIn, actor: Annotated[str, staff]) -> FoundListOut:
        """The same look-up with the number in the body: a URL's query string may be kept by proxies' logs."""
        found: list[registry.Found] = await run(
            lambda d: d.find(actor, phone=body.phone, id_number=body.id_number, card=body.card_hash)
        )
        return FoundListOut(members=[FoundOut(member_id=f.member_id, status=f.status, tier=f.tier) for f in found])


def _card_routes(api: APIRouter, run: _Run, staff: Any) -> None:
    @api.post("/v1/centre/members/{member_id}/cards", status_code=201)
    async def issue(member_id: MemberId, body: CardIn, actor: Annotated[str, staff]) -> IssuedOut:
        """Issue a card, valid from tomorrow.  The answer has the full number, once: print it."""
        card: registry.IssuedCard = await run(
            lambda d: d.issue_card(
                actor, member_id, number=body.number, role=body.role, holder=body.holder, kind=body.kind
            )
        )
        return _issued_out(card)

    @api.post("/v1/centre/cards/{card_hash}/lost")
    async def lost(card_hash: CardHash, actor: Annotated[str, staff], body: LostIn | None = None) -> CardStateOut:
        """Report a card lost: it is on the hot list at once."""
        reason = (body or LostIn()).reason
        done: registry.CardChanged = await run(lambda d: d.report_lost(actor, card_hash, reason))
        return CardStateOut(
            card_hash=done.card_hash,
            member_id=done.member_id,
            state=done.state,
            changed=done.version is not None,
            version=done.version,
        )

    @api.post("/v1/centre/cards/{card_hash}/replace", status_code=201)
    async def replace(card_hash: CardHash, actor: Annotated[str, staff], body: ReplaceIn | None = None) -> IssuedOut:
        """Replace a card (lost, damaged): a new number on the same account; the old card is void at once."""
        given = body or ReplaceIn()
        card: registry.IssuedCard = await run(
            lambda d: d.replace_card(actor, card_hash, number=given.number, kind=given.kind, reason=given.reason)
        )
        return _issued_out(card)


def _balance_routes(api: APIRouter, run: _Run, staff: Any) -> None:
    @api.post("/v1/centre/members/{member_id}/claims", status_code=201)
    async def claim(member_id: MemberId, body: ReceiptIn, actor: Annotated[str, staff]) -> ClaimOut:
        """A late point claim (补积分): attach a guest's receipt within the claim window; the points it earns."""
        done: Claimed = await run(lambda d: d.claim(actor, member_id, body.receipt()))
        return ClaimOut(
            entry_id=done.entry_id,
            sale=f"{done.store}/{done.lane}/{done.sale_id}",
            sale_day=done.sale_day,
            member_id=done.member_id,
            points=done.points,
            points_balance=done.points_balance,
            version=done.version,
        )

    @api.post("/v1/centre/members/{member_id}/adjustments", status_code=201)
    async def adjust(member_id: MemberId, body: AdjustIn, actor: Annotated[str, staff]) -> AdjustedOut:
        """A manual adjustment of points and rebate money, with its reason (audited)."""
        done: registry.Adjusted = await run(
            lambda d: d.adjust(actor, member_id, body.points, body.rebate_fen(), body.reason, key=body.idempotency_key)
        )
        return AdjustedOut(
            member_id=done.member_id,
            points=done.points,
            rebate=format_fen(done.rebate_fen),
            points_balance=done.points_balance,
            rebate_balance=format_fen(done.rebate_balance_fen),
            version=done.version,
            replayed=done.replayed,
        )

    @api.post("/v1/centre/members/{member_id}/tier")
    async def tier(member_id: MemberId, body: TierIn, actor: Annotated[str, staff]) -> TierOut:
        """Set the tier by hand: now, or from a later day as the next tier."""
        done: registry.TierSet = await run(
            lambda d: d.set_tier(actor, member_id, body.tier, body.reason, body.effective_from)
        )
        return TierOut(
            member_id=done.member_id,
            tier=done.tier,
            effective_from=done.effective_from,
            changed=done.version is not None,
            version=done.version,
        )

    @api.get("/v1/centre/members/{member_id}/audit")
    async def audit(
        member_id: MemberId,
        _actor: Annotated[str, staff],
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> AuditListOut:
        """Who did what to the member, newest first (no personal data)."""
        entries: list[registry.AuditEntry] = await run(lambda d: d.audit_trail(member_id, limit))
        return AuditListOut(
            entries=[
                AuditOut(
                    at=e.at, actor=e.actor, action=e.action, card_hash=e.card_hash, reason=e.reason, detail=e.detail
                )
                for e in entries
            ]
        )
