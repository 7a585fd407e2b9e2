"""The MQTT wire between lanes and head office (docs/protocol.md): topics and payloads, version 1.

Pure functions: no I/O, no clock.  The lane encodes journal batches from the
JSON text its store already holds (``encode_batch`` splices it, nothing is
decoded and encoded again); head office decodes and validates them
(``decode_batch``), keeping what is valid and naming what is not, entry by
entry, so that one bad entry never blocks the rest of a lane's stream.

Topics (root configurable, default ``retail``)::

    {root}/{store}/{lane}/journal   lane -> HQ   QoS1   a batch of journal entries, in seq order
    {root}/{store}/{lane}/ack       HQ -> lane   QoS1   retained: highest seq durably committed
    {root}/{store}/{lane}/state     lane         QoS1   retained: online / offline (Last Will)
"""

from __future__ import annotations

import datetime as dt
import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from agent.errors import LaneError
from agent.store import JournalRow

# Re-exported: the wire's names and limits, kept in agent.topics for the lane's configuration.
from agent.topics import DEFAULT_ROOT, MAX_BATCH_ENTRIES, MAX_PAYLOAD_BYTES, check_root

__all__ = [
    "DEFAULT_ROOT",
    "KINDS",
    "MAX_BATCH_ENTRIES",
    "MAX_PAYLOAD_BYTES",
    "WIRE_VERSION",
    "Ack",
    "Batch",
    "Entry",
    "LaneState",
    "RawEntry",
    "Reject",
    "WireError",
    "check_root",
    "decode_ack",
    "decode_batch",
    "decode_state",
    "encode_ack",
    "encode_batch",
    "encode_entry",
    "encode_state",
    "join_batch",
    "journal_filter",
    "lane_topic",
    "parse_lane_topic",
    "state_filter",
]

WIRE_VERSION = 1
KINDS = frozenset({"sale", "return", "void"})

_IDENT = re.compile(r"[A-Za-z0-9_-]{1,32}")
_EPOCH = re.compile(r"[0-9a-f]{32}")

Leaf = Literal["journal", "ack", "state"]
LEAVES: frozenset[str] = frozenset({"journal", "ack", "state"})


class WireError(LaneError):
    """A message that cannot be taken at all (not JSON, wrong version, names another lane than its topic)."""

    code = "bad_message"

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def lane_topic(root: str, store: str, lane: str, leaf: Leaf) -> str:
    """``{root}/{store}/{lane}/{leaf}``."""
    return f"{root}/{store}/{lane}/{leaf}"


HqLeaf = Literal["members", "hotlist", "rules"]
HQ_LEAVES: tuple[HqLeaf, ...] = ("members", "hotlist", "rules")


def hq_topic(root: str, leaf: HqLeaf) -> str:
    """``{root}/hq/{leaf}``: head office's retained notices to every lane (docs/downlink.md)."""
    return f"{root}/hq/{leaf}"


def journal_filter(root: str, share_group: str | None = None) -> str:
    """The subscription head office takes for every lane's journal, shared when a group is given."""
    topic = f"{root}/+/+/journal"
    return topic if share_group is None else f"$share/{share_group}/{topic}"


def state_filter(root: str) -> str:
    """Every lane's retained state."""
    return f"{root}/+/+/state"


def parse_lane_topic(root: str, topic: str) -> tuple[str, str, str] | None:
    """``(store, lane, leaf)`` of a lane topic under ``root``, or None when ``topic`` is not one."""
    prefix = root + "/"
    if not topic.startswith(prefix):
        return None
    parts = topic[len(prefix) :].split("/")
    if len(parts) != 3 or parts[2] not in LEAVES:
        return None
    store, lane, leaf = parts
    if not (_IDENT.fullmatch(store) and _IDENT.fullmatch(lane)):
        return None
    return store, lane, leaf


# --- journal batches (lane -> head office) -------------------------------------


# A journal row as the lane's store holds it, ``body`` its JSON text spliced in unchanged.
RawEntry = JournalRow


def encode_entry(store: str, lane: str, entry: RawEntry) -> bytes:
    """One entry of a journal message, UTF-8: the stored body text goes in as it is."""
    return (
        f'{{"v":1,"store":{json.dumps(store)},"lane":{json.dumps(lane)},"seq":{int(entry.seq)},'
        f'"id":{json.dumps(entry.id)},"kind":{json.dumps(entry.kind)},"at":{json.dumps(entry.at)},'
        f'"rules_version":{json.dumps(entry.rules_version)},"member_version":{int(entry.member_version)},'
        f'"body":{entry.body}}}'
    ).encode()


def join_batch(store: str, lane: str, epoch: str, encoded: Sequence[bytes]) -> bytes:
    """One journal message of entries already encoded (``encode_entry``), consecutive and in seq order."""
    head = f'{{"v":1,"store":{json.dumps(store)},"lane":{json.dumps(lane)},"epoch":{json.dumps(epoch)},"entries":['
    return head.encode() + b",".join(encoded) + b"]}"


def encode_batch(store: str, lane: str, epoch: str, entries: Sequence[RawEntry]) -> bytes:
    """One journal message: the lane, its journal epoch and ``entries`` (consecutive, in seq order)."""
    return join_batch(store, lane, epoch, [encode_entry(store, lane, entry) for entry in entries])


@dataclass(frozen=True, slots=True)
class Entry:
    """A valid journal entry as head office received it."""

    seq: int
    id: str
    kind: str
    at: dt.datetime
    rules_version: str
    member_version: int
    body: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Reject:
    """An entry head office cannot apply: dead-lettered with its reason, its seq (when readable) consumed."""

    seq: int | None
    id: str | None
    code: str
    message: str
    raw: Any


@dataclass(frozen=True, slots=True)
class Batch:
    """A decoded journal message: the valid entries and the rejected ones, each in the order sent."""

    store: str
    lane: str
    epoch: str
    entries: tuple[Entry, ...]
    rejects: tuple[Reject, ...]


def decode_batch(store: str, lane: str, payload: bytes) -> Batch:
    """Decode a message received on ``{root}/{store}/{lane}/journal``.

    Raises WireError when the message as a whole is unusable: too large, not
    a JSON object, another version, no epoch, or naming another lane than its
    topic (a lane publishing under someone else's name).  Entries that are
    malformed one by one become ``Reject``s; the rest are returned.
    """
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise WireError("too_large", f"{len(payload)} bytes; at most {MAX_PAYLOAD_BYTES} are accepted")
    doc = _json_object(payload)
    if not _is_version(doc.get("v")):
        raise WireError("bad_version", f"wire version {doc.get('v')!r}; this head office reads version {WIRE_VERSION}")
    if doc.get("store") != store or doc.get("lane") != lane:
        raise WireError(
            "lane_mismatch",
            f"topic names lane {store}/{lane} but the message names {doc.get('store')!r}/{doc.get('lane')!r}",
        )
    epoch = doc.get("epoch")
    if not isinstance(epoch, str) or not _EPOCH.fullmatch(epoch):
        raise WireError("bad_epoch", "epoch: 32 lowercase hex digits (the lane's journal epoch)")
    raw_entries = doc.get("entries")
    if not isinstance(raw_entries, list) or not raw_entries:
        raise WireError("bad_entries", "entries: a non-empty list")
    if len(raw_entries) > MAX_BATCH_ENTRIES:
        raise WireError("too_many", f"{len(raw_entries)} entries; at most {MAX_BATCH_ENTRIES} per message")
    entries: list[Entry] = []
    rejects: list[Reject] = []
    for raw in raw_entries:
        try:
            entries.append(_entry(store, lane, raw))
        except _EntryError as exc:
            seq = raw.get("seq") if isinstance(raw, dict) else None
            ident = raw.get("id") if isinstance(raw, dict) else None
            rejects.append(
                Reject(
                    seq=seq if _is_seq(seq) else None,
                    id=ident if isinstance(ident, str) and len(ident) <= 64 else None,
                    code=exc.code,
                    message=exc.message,
                    raw=raw,
                )
            )
    return Batch(store=store, lane=lane, epoch=epoch, entries=tuple(entries), rejects=tuple(rejects))


class _EntryError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _is_version(value: object) -> bool:
    # type(): JSON true and 1.0 compare equal to 1 in Python, and neither is version 1.
    return type(value) is int and value == WIRE_VERSION


def _is_seq(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value < 2**63


def _entry(store: str, lane: str, raw: object) -> Entry:  # noqa: C901 - one flat check per field
    if not isinstance(raw, dict):
        raise _EntryError("bad_entry", "an entry is a JSON object")
    if not _is_version(raw.get("v")):
        raise _EntryError("bad_version", f"entry version {raw.get('v')!r}")
    if raw.get("store") != store or raw.get("lane") != lane:
        raise _EntryError("lane_mismatch", f"the entry names {raw.get('store')!r}/{raw.get('lane')!r}")
    seq = raw.get("seq")
    if not _is_seq(seq):
        raise _EntryError("bad_seq", "seq: an integer from 1")
    ident = raw.get("id")
    try:
        parsed_id = uuid.UUID(ident) if isinstance(ident, str) else None
    except ValueError:
        parsed_id = None
    if parsed_id is None or str(parsed_id) != ident:
        raise _EntryError("bad_id", "id: a UUID in its canonical lowercase form")
    kind = raw.get("kind")
    if kind not in KINDS:
        raise _EntryError("bad_kind", f"kind {kind!r}: one of {', '.join(sorted(KINDS))}")
    at = _moment(raw.get("at"))
    rules_version = raw.get("rules_version")
    if not isinstance(rules_version, str) or not 1 <= len(rules_version) <= 64:
        raise _EntryError("bad_rules_version", "rules_version: a non-empty string")
    member_version = raw.get("member_version")
    if not isinstance(member_version, int) or isinstance(member_version, bool) or member_version < 0:
        raise _EntryError("bad_member_version", "member_version: an integer from 0")
    body = raw.get("body")
    if not isinstance(body, dict):
        raise _EntryError("bad_body", "body: a JSON object")
    if body.get("kind") != kind or body.get("store") != store or body.get("lane") != lane:
        raise _EntryError("body_mismatch", "the body's kind, store or lane differ from the entry's")
    assert isinstance(seq, int)
    assert isinstance(ident, str)
    return Entry(
        seq=seq, id=ident, kind=kind, at=at, rules_version=rules_version, member_version=member_version, body=body
    )


def _moment(value: object) -> dt.datetime:
    if not isinstance(value, str):
        raise _EntryError("bad_at", "at: an ISO 8601 time with its offset")
    try:
        moment = dt.datetime.fromisoformat(value)
    except ValueError:
        moment = None
    if moment is None or moment.tzinfo is None:
        raise _EntryError("bad_at", "at: an ISO 8601 time with its offset")
    return moment


def _json_object(payload: bytes) -> dict[str, Any]:
    try:
        # orjson: a batch of 500 sales is ~1 MB of JSON, which the standard library parses 4x slower.
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError:
        # orjson also refuses valid JSON that escapes a lone surrogate ("\ud800"): the standard
        # library takes it, and head office stores such text escaped rather than lose the entry.
        try:
            doc = json.loads(payload)
        # RecursionError: JSON nested deeper than the interpreter's stack (orjson stops at 1,024 levels first).
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise WireError("not_json", f"not JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise WireError("not_object", "a message is a JSON object")
    return doc


# --- acknowledgements (head office -> lane) ------------------------------------------


@dataclass(frozen=True, slots=True)
class Ack:
    """Every entry of ``epoch`` up to ``seq`` is durably committed at head office."""

    epoch: str
    seq: int
    #: head office's member version after the commit (None from a head office that does not say)
    member_version: int | None = None


def encode_ack(store: str, lane: str, epoch: str, seq: int, member_version: int | None = None) -> bytes:
    """The acknowledgement head office publishes (retained) after its commit.

    ``member_version``: head office's member-table version once the batch's balance changes are
    committed; the lane retires the entries' own spend only when its cache has reached it.
    """
    doc: dict[str, object] = {"v": WIRE_VERSION, "store": store, "lane": lane, "epoch": epoch, "seq": seq}
    if member_version is not None:
        doc["member_version"] = member_version
    return json.dumps(doc).encode()


def decode_ack(store: str, lane: str, payload: bytes) -> Ack:
    """An acknowledgement received on this lane's ack topic; WireError when malformed or for another lane."""
    doc = _json_object(payload)
    if not _is_version(doc.get("v")):
        raise WireError("bad_version", f"ack version {doc.get('v')!r}")
    if doc.get("store") != store or doc.get("lane") != lane:
        raise WireError("lane_mismatch", f"an ack for {doc.get('store')!r}/{doc.get('lane')!r}")
    epoch, seq = doc.get("epoch"), doc.get("seq")
    if not isinstance(epoch, str) or not _EPOCH.fullmatch(epoch):
        raise WireError("bad_epoch", "epoch: 32 lowercase hex digits")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
        raise WireError("bad_seq", "seq: an integer from 0")
    member_version = doc.get("member_version")
    if member_version is not None and (
        not isinstance(member_version, int) or isinstance(member_version, bool) or member_version < 0
    ):
        raise WireError("bad_member_version", "member_version: an integer from 0")
    return Ack(epoch=epoch, seq=seq, member_version=member_version)


# --- lane state (retained) -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LaneState:
    """A lane's retained state: ``online`` with figures, or ``offline`` (its Last Will)."""

    state: Literal["online", "offline"]
    session: int
    info: Mapping[str, Any]


def encode_state(store: str, lane: str, state: Literal["online", "offline"], session: int, **info: Any) -> bytes:
    """A state message; ``session`` grows with each connection, so an older session's will loses to a newer one."""
    doc = {"v": WIRE_VERSION, "store": store, "lane": lane, "state": state, "session": session, **info}
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()


def decode_state(store: str, lane: str, payload: bytes) -> LaneState:
    """A state message received on this lane's state topic; WireError when malformed or for another lane."""
    doc = _json_object(payload)
    if not _is_version(doc.get("v")):
        raise WireError("bad_version", f"state version {doc.get('v')!r}")
    if doc.get("store") != store or doc.get("lane") != lane:
        raise WireError("lane_mismatch", f"a state for {doc.get('store')!r}/{doc.get('lane')!r}")
    state, session = doc.get("state"), doc.get("session")
    if state not in ("online", "offline"):
        raise WireError("bad_state", "state: online or offline")
    if not isinstance(session, int) or isinstance(session, bool) or session < 0:
        raise WireError("bad_session", "session: an integer from 0")
    info = {k: v for k, v in doc.items() if k not in {"v", "store", "lane", "state", "session"}}
    return LaneState(state=state, session=session, info=info)
