"""What head office keeps of a journal entry: pure extraction of sale, return and void rows from its body.

No I/O.  ``extract`` reads only the keys its kind needs (a body may carry more:
consumers ignore keys they do not know) and raises ``FactError`` naming the
first one that is missing or unusable, so that the entry is dead-lettered
with a reason instead of applied half-understood.  Money is parsed from its
decimal strings to integer fen; nothing here is ever a float.

Everything extracted ends up in a database column, so text is checked for
what a database refuses (NUL characters, lone surrogates) and integers for
what a BIGINT holds: one entry that the database would refuse must not roll
back, and so block, its lane's whole stream.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from agent.money import parse_money
from sync.wire import Entry

MAX_ID = 64  # sale_id, return_id, member_id: the POS API's limits (agent.pos_models.Key, agent.basket.Code)
MAX_NAME = 128  # ruleset ids, versions and digests
MAX_COUNT = 10**12  # points; far beyond any member, well inside a BIGINT
MAX_BIGINT = 2**63 - 1


class FactError(ValueError):
    """An entry's body lacks what its kind needs: ``code`` names the kind, ``field`` the key."""

    def __init__(self, code: str, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.code = code
        self.field = field
        self.message = f"{field}: {message}"


@dataclass(frozen=True, slots=True)
class SaleFacts:
    sale_id: str
    member_id: str | None
    gross_fen: int
    discount_fen: int
    net_fen: int
    points_earned: int
    points_spent: int
    rebate_spent_fen: int
    rules_id: str
    rules_version: str
    rules_digest: str | None


@dataclass(frozen=True, slots=True)
class ReturnFacts:
    return_id: str
    sale_id: str
    sale_entry_id: str
    member_id: str | None
    refund_fen: int
    points_reversed: int


@dataclass(frozen=True, slots=True)
class VoidFacts:
    sale_id: str
    sale_entry_id: str
    member_id: str | None
    refund_fen: int
    points_reversed: int
    points_restored: int
    rebate_restored_fen: int


Facts = SaleFacts | ReturnFacts | VoidFacts


@dataclass(frozen=True, slots=True)
class LedgerMove:
    """One row of a member's points ledger: signed points and rebate (fen) that move the balances."""

    member_id: str
    kind: str
    points: int
    rebate_fen: int


class _Reader:
    """Typed access to a decoded body, raising FactError with the path of what is wrong."""

    def __init__(self, code: str) -> None:
        self.code = code

    def fail(self, field: str, message: str) -> FactError:
        return FactError(self.code, field, message)

    def obj(self, doc: Mapping[str, Any], key: str, path: str) -> Mapping[str, Any]:
        value = doc.get(key)
        if not isinstance(value, Mapping):
            raise self.fail(path, "missing" if value is None else "an object is expected")
        return value

    def text(self, doc: Mapping[str, Any], key: str, path: str, limit: int = MAX_ID) -> str:
        value = doc.get(key)
        if value is None:
            raise self.fail(path, "missing")
        return self._checked_text(value, path, limit)

    def optional_text(self, doc: Mapping[str, Any], key: str, path: str, limit: int = MAX_ID) -> str | None:
        value = doc.get(key)
        return None if value is None else self._checked_text(value, path, limit)

    def _checked_text(self, value: object, path: str, limit: int) -> str:
        if not isinstance(value, str) or not value:
            raise self.fail(path, "a non-empty string is expected")
        if len(value) > limit:
            raise self.fail(path, f"longer than {limit} characters")
        if not storable(value):
            raise self.fail(path, "contains a NUL or an unpaired surrogate")
        return value

    def money(self, doc: Mapping[str, Any], key: str, path: str) -> int:
        value = doc.get(key)
        if value is None:
            raise self.fail(path, "missing")
        try:
            return parse_money(value)
        except ValueError as exc:
            raise self.fail(path, str(exc)) from None

    def count(self, doc: Mapping[str, Any], key: str, path: str) -> int:
        value = doc.get(key)
        if value is None:
            raise self.fail(path, "missing")
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_COUNT:
            raise self.fail(path, f"an integer from 0 to {MAX_COUNT} is expected, not {_show(value)}")
        return value

    def member_id(self, doc: Mapping[str, Any], path: str) -> str | None:
        return self.optional_text(doc, "member_id", path)


def storable(value: str) -> bool:
    """Whether a database takes ``value`` as text: no NUL (PostgreSQL refuses it) and valid UTF-8.

    Text decoded by ``sync.wire`` (orjson) is valid UTF-8 already, without lone
    surrogates; the encode check is for text from anywhere else, and costs a
    copy, so it runs only on text that is not plain ASCII.
    """
    if "\x00" in value:
        return False
    if value.isascii():
        return True
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def _show(value: object) -> str:
    shown = json.dumps(value, ensure_ascii=True, default=repr)
    return shown if len(shown) <= 40 else shown[:37] + "..."


def _sale(body: Mapping[str, Any]) -> SaleFacts:
    r = _Reader("bad_sale")
    sale_id = r.text(body, "sale_id", "sale_id")
    rules = r.obj(body, "rules", "rules")
    member = body.get("member")
    if member is not None and not isinstance(member, Mapping):
        raise r.fail("member", "an object or null is expected")
    result = r.obj(body, "result", "result")
    totals = r.obj(result, "totals", "result.totals")
    tenders = result.get("tenders")
    if not isinstance(tenders, Sequence) or isinstance(tenders, str):
        raise r.fail("result.tenders", "a list is expected")
    points_spent = rebate_spent = 0
    for index, tender in enumerate(tenders):
        path = f"result.tenders[{index}]"
        if not isinstance(tender, Mapping):
            raise r.fail(path, "an object is expected")
        kind = r.text(tender, "kind", f"{path}.kind")
        if kind == "points":
            points_spent += r.count(tender, "points", f"{path}.points")
        elif kind == "rebate":
            rebate_spent += r.money(tender, "amount", f"{path}.amount")
    return SaleFacts(
        sale_id=sale_id,
        member_id=None if member is None else r.text(member, "member_id", "member.member_id"),
        gross_fen=r.money(totals, "gross", "result.totals.gross"),
        discount_fen=r.money(totals, "discount", "result.totals.discount"),
        net_fen=r.money(totals, "net", "result.totals.net"),
        points_earned=r.count(totals, "points", "result.totals.points"),
        points_spent=points_spent,
        rebate_spent_fen=rebate_spent,
        rules_id=r.text(rules, "id", "rules.id", MAX_NAME),
        rules_version=r.text(rules, "version", "rules.version", MAX_NAME),
        rules_digest=r.optional_text(rules, "digest", "rules.digest", MAX_NAME),
    )


def _return(body: Mapping[str, Any]) -> ReturnFacts:
    r = _Reader("bad_return")
    return ReturnFacts(
        return_id=r.text(body, "return_id", "return_id"),
        sale_id=r.text(body, "sale_id", "sale_id"),
        sale_entry_id=r.text(body, "sale_journal_id", "sale_journal_id"),
        member_id=r.member_id(body, "member_id"),
        refund_fen=r.money(body, "refund", "refund"),
        points_reversed=r.count(body, "points_reversed", "points_reversed"),
    )


def _void(body: Mapping[str, Any]) -> VoidFacts:
    r = _Reader("bad_void")
    return VoidFacts(
        sale_id=r.text(body, "sale_id", "sale_id"),
        sale_entry_id=r.text(body, "sale_journal_id", "sale_journal_id"),
        member_id=r.member_id(body, "member_id"),
        refund_fen=r.money(body, "refund", "refund"),
        points_reversed=r.count(body, "points_reversed", "points_reversed"),
        points_restored=r.count(body, "points_restored", "points_restored"),
        rebate_restored_fen=r.money(body, "rebate_restored", "rebate_restored"),
    )


def extract(entry: Entry) -> Facts:
    """The sale, return or void row of ``entry``; FactError when its body lacks what its kind needs.

    Also checks the entry's own fields that ``sync.wire`` leaves unbounded but
    a database column bounds (``rules_version`` text, ``member_version`` size).
    """
    if not storable(entry.rules_version):
        raise FactError("bad_entry", "rules_version", "contains a NUL or an unpaired surrogate")
    if entry.member_version > MAX_BIGINT:
        raise FactError("bad_entry", "member_version", f"larger than {MAX_BIGINT}")
    if entry.kind == "sale":
        return _sale(entry.body)
    if entry.kind == "return":
        return _return(entry.body)
    if entry.kind == "void":
        return _void(entry.body)
    raise FactError("bad_entry", "kind", f"{entry.kind!r} is not sale, return or void")


def ledger_moves(facts: Facts) -> list[LedgerMove]:
    """The points-ledger rows of an entry: none for a guest, and none that would move nothing.

    A sale earns ``totals.points``, redeems what its points tenders spent and
    spends what its rebate tenders paid; a return reverses its points; a void
    puts back what the sale spent and takes back what it earned, in one row.
    """
    member = facts.member_id
    if member is None:
        return []
    if isinstance(facts, SaleFacts):
        moves = [
            LedgerMove(member, "earn", facts.points_earned, 0),
            LedgerMove(member, "redeem", -facts.points_spent, 0),
            LedgerMove(member, "rebate_spend", 0, -facts.rebate_spent_fen),
        ]
    elif isinstance(facts, ReturnFacts):
        moves = [LedgerMove(member, "return", -facts.points_reversed, 0)]
    else:
        if not (facts.points_restored or facts.points_reversed or facts.rebate_restored_fen):
            return []
        # Kept even when restored and reversed points cancel out: the row records that the void undid both.
        return [LedgerMove(member, "void", facts.points_restored - facts.points_reversed, facts.rebate_restored_fen)]
    return [move for move in moves if move.points or move.rebate_fen]
