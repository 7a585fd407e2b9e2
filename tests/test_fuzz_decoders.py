"""Garbage into every decoder the lane and head office run on bytes from outside: a value or their own error.

What is fuzzed here and not already elsewhere (the drivers' own text and byte properties are in
test_magstripe, test_barcode, test_apdu, test_member_qr; damaged baskets in test_input_errors;
the engine over random rulesets in test_engine_properties):

* the MQTT wire (``sync.wire``): batches, acks and states as random bytes, as valid messages
  mutated byte by byte and field by field, and as JSON nested deeper than the interpreter's stack;
* the lane's downlink: signed ruleset envelopes (``sync.signing``), member and hot-list notices
  (``sync.downlink``), member-delta pages and snapshots (``agent.snapshot``);
* ruleset TOML (``agent.ruleset.parse_ruleset``) of the shipped programmes, mutated;
* keyboard-wedge input events (``drivers.keystrokes``) and response APDUs (``drivers.apdu``);
* the engine on the shipped programmes, at any moment, for any member.

Each must return a value or raise the error type its module documents; nothing else, and no hang
(pytest-timeout).  ``LANE_FUZZ=long`` (``make fuzz``) runs 20 times the examples.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import time
from collections import Counter
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO_ROOT
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from agent.basket import Basket, Line, Member, Tender
from agent.engine import price
from agent.errors import InputError, RulesetError
from agent.ruleset import Ruleset, load_ruleset, parse_ruleset
from agent.snapshot import SnapshotCard, SnapshotMember, SnapshotReader, card_hash, read_delta, write_delta
from drivers.apdu import BadResponseError, parse_response
from drivers.keymap import KEYMAPS
from drivers.keystrokes import KeystrokeAssembler
from drivers.member_qr import Rejected, SignedCode, StaticCode, parse_member_code
from sync import signing, wire
from sync.downlink import HotlistNotice, MembersNotice

LONG = os.environ.get("LANE_FUZZ") == "long"
EXAMPLES = 4000 if LONG else 200
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
pytestmark = pytest.mark.timeout(1800 if LONG else 240)

STORE, LANE = "store-0101", "lane-03"
EPOCH = "0123456789abcdef0123456789abcdef"
RULESETS = sorted((REPO_ROOT / "config" / "rules").glob("*.toml"))
SHANGHAI = dt.timezone(dt.timedelta(hours=8))

# Outcomes per test, printed once at the end of the module.
OUTCOMES: dict[str, Counter[str]] = {}


def outcome(test: str, what: str) -> None:
    OUTCOMES.setdefault(test, Counter())[what] += 1


def refused(test: str, code: str, message: str, known: Collection[str] | None = None) -> None:
    """A refusal in the module's own error type: tallied, and it names its reason."""
    outcome(test, code)
    assert code
    assert message
    assert known is None or code in known


def refused_with_issues(test: str, exc: InputError) -> None:
    """An InputError lists every problem, each with its code and message."""
    outcome(test, exc.issues[0].code if exc.issues else "no_issue")
    assert exc.issues
    assert all(issue.code and issue.message for issue in exc.issues)


@pytest.fixture(scope="module", autouse=True)
def _summary(request: pytest.FixtureRequest) -> Iterator[None]:
    started = time.monotonic()
    yield
    total = sum(sum(c.values()) for c in OUTCOMES.values())
    line = f"[fuzz] decoders: {total} inputs over {len(OUTCOMES)} entry points ({EXAMPLES} examples each)"
    line += f", {time.monotonic() - started:.0f} s; " + "; ".join(
        f"{test} {dict(c)}" for test, c in sorted(OUTCOMES.items())
    )
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if capture is None or reporter is None:
        print(line)
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line("\n" + line)


# --- generic garbage ------------------------------------------------------------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@st.composite
def mutated(draw: st.DrawFn, original: bytes) -> bytes:
    """``original`` with a few byte-level edits: flips, deletions, insertions, a truncation, a splice."""
    data = bytearray(original)
    for _ in range(draw(st.integers(1, 4))):
        action = draw(st.sampled_from(["flip", "delete", "insert", "truncate", "repeat"]))
        if not data:
            data += draw(st.binary(min_size=1, max_size=8))
            continue
        at = draw(st.integers(0, len(data) - 1))
        if action == "flip":
            data[at] ^= draw(st.integers(1, 255))
        elif action == "delete":
            del data[at : at + draw(st.integers(1, 16))]
        elif action == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8) | st.sampled_from([b'"', b"{", b"]", b",", b"\\u"]))
        elif action == "truncate":
            del data[at:]
        else:
            data[at:at] = data[at : at + draw(st.integers(1, 64))]
    return bytes(data)


@st.composite
def edited_json(draw: st.DrawFn, doc: Any) -> Any:
    """``doc`` (a decoded JSON document) with one value somewhere replaced, removed or added."""
    doc = json.loads(json.dumps(doc))
    parent: Any = None
    key: Any = None
    node = doc
    while isinstance(node, dict | list) and node and draw(st.booleans()):
        parent = node
        key = draw(st.sampled_from(sorted(node))) if isinstance(node, dict) else draw(st.integers(0, len(node) - 1))
        node = node[key]
    if parent is None:
        return draw(JSON_VALUES)
    action = draw(st.sampled_from(["replace", "delete", "add"]))
    if action == "replace":
        parent[key] = draw(JSON_VALUES)
    elif action == "delete":
        del parent[key]
    elif isinstance(parent, dict):
        parent[draw(st.text(max_size=8))] = draw(JSON_VALUES)
    else:
        parent.append(draw(JSON_VALUES))
    return doc


def deeply_nested(depth: int, opener: str) -> bytes:
    closer = {"[": "]", '{"a":': "}"}[opener]
    return (opener * depth + "1" + closer * depth).encode()


NESTED = st.builds(deeply_nested, st.integers(900, 60_000), st.sampled_from(["[", '{"a":']))


# --- the MQTT wire --------------------------------------------------------------------------------


def _entry(seq: int) -> wire.RawEntry:
    body = json.dumps({"v": 1, "kind": "sale", "store": STORE, "lane": LANE, "sale_id": f"S-{seq}", "n": "1.00"})
    return wire.RawEntry(
        seq, f"6f1d1c9e-0000-4000-8000-{seq:012d}", "sale", "2026-12-10T14:05:00+08:00", "2026.12", 7, body
    )


BATCH = wire.encode_batch(STORE, LANE, EPOCH, [_entry(seq) for seq in (41, 42, 43)])
ACK = wire.encode_ack(STORE, LANE, EPOCH, 42, member_version=9)
STATE = wire.encode_state(STORE, LANE, "online", 12, backlog=0, last_seq=42)
WIRE_INPUTS = (
    st.binary(max_size=400)
    | NESTED
    | mutated(BATCH)
    | mutated(ACK)
    | mutated(STATE)
    | edited_json(json.loads(BATCH)).map(lambda d: json.dumps(d).encode())
    | edited_json(json.loads(ACK)).map(lambda d: json.dumps(d).encode())
    | edited_json(json.loads(STATE)).map(lambda d: json.dumps(d).encode())
    | JSON_VALUES.map(lambda d: json.dumps(d).encode())
)


def _entries_sent(payload: bytes) -> int | None:
    """How many entries the message holds, read with the standard library (None: not a readable list)."""
    try:
        doc = json.loads(payload)
    except (ValueError, RecursionError):
        return None
    entries = doc.get("entries") if isinstance(doc, dict) else None
    return len(entries) if isinstance(entries, list) else None


@FUZZ
@given(WIRE_INPUTS)
def test_any_journal_message_is_a_batch_or_a_wire_error(payload: bytes) -> None:
    try:
        batch = wire.decode_batch(STORE, LANE, payload)
    except wire.WireError as exc:
        refused("decode_batch", exc.code, exc.message)
        return
    outcome("decode_batch", "batch")
    # Every entry sent is kept or rejected, none lost, none invented, and all are this lane's.
    assert len(batch.entries) + len(batch.rejects) == _entries_sent(payload)
    assert (batch.store, batch.lane) == (STORE, LANE)
    for entry in batch.entries:
        assert entry.body["store"] == STORE
        assert entry.body["lane"] == LANE
        assert entry.seq >= 1
    for reject in batch.rejects:
        assert reject.code
        assert reject.seq is None or reject.seq >= 1


@FUZZ
@given(WIRE_INPUTS)
def test_any_ack_or_state_is_one_or_a_wire_error(payload: bytes) -> None:
    for name, decode in (("decode_ack", wire.decode_ack), ("decode_state", wire.decode_state)):
        try:
            decoded = decode(STORE, LANE, payload)
        except wire.WireError as exc:
            refused(name, exc.code, exc.message)
            continue
        outcome(name, "decoded")
        if isinstance(decoded, wire.Ack):
            assert decoded.seq >= 0
            assert len(decoded.epoch) == 32
        else:
            assert decoded.state in ("online", "offline")
            assert decoded.session >= 0


# --- the lane's downlink --------------------------------------------------------------------------

SIGNER = Ed25519PrivateKey.generate()
KEYS = {"hq-2026": SIGNER.public_key()}
TOML_888 = (REPO_ROOT / "config" / "rules" / "888-mall.toml").read_text(encoding="utf-8")
VERSION_888 = load_ruleset(REPO_ROOT / "config" / "rules" / "888-mall.toml").version
ENVELOPE = signing.build_envelope(
    TOML_888,
    version=VERSION_888,
    serial=7,
    effective_from=dt.datetime(2026, 12, 1, tzinfo=SHANGHAI),
    key_id="hq-2026",
    private_key=SIGNER,
)
ORIGINAL = signing.decode_envelope(ENVELOPE)


@FUZZ
@given(
    st.binary(max_size=300)
    | NESTED
    | mutated(ENVELOPE)
    | edited_json(json.loads(ENVELOPE)).map(lambda d: json.dumps(d).encode())
)
def test_a_forged_or_damaged_ruleset_envelope_never_verifies_as_another(payload: bytes) -> None:
    try:
        verified = signing.verify(payload, KEYS)
    except signing.EnvelopeError as exc:
        refused("signing.verify", exc.code, exc.message, known=signing.REFUSAL_CODES)
        return
    outcome("signing.verify", "verified")
    # Only whitespace or key order can change and still verify: the signed fields are the original's.
    got = verified.envelope
    assert (got.serial, got.version, got.effective_from_text, got.sha256, got.key_id, got.toml) == (
        ORIGINAL.serial,
        ORIGINAL.version,
        ORIGINAL.effective_from_text,
        ORIGINAL.sha256,
        ORIGINAL.key_id,
        ORIGINAL.toml,
    )


MEMBERS = json.dumps(
    {"v": 1, "kind": "members", "version": 12, "at": "2026-12-10T14:05:00+08:00", "snapshot_version": 7}
)
HOTLIST = json.dumps(
    {
        "v": 1,
        "kind": "hotlist",
        "version": 12,
        "at": "2026-12-10T14:05:00+08:00",
        "cards": [{"card_hash": "ab" * 32, "member_id": "M000123", "state": "lost", "version": 11}],
    }
)


@FUZZ
@given(
    st.binary(max_size=300)
    | NESTED
    | mutated(MEMBERS.encode())
    | mutated(HOTLIST.encode())
    | edited_json(json.loads(MEMBERS)).map(lambda d: json.dumps(d).encode())
    | edited_json(json.loads(HOTLIST)).map(lambda d: json.dumps(d).encode())
)
def test_any_member_or_hot_list_notice_is_one_or_a_validation_error(payload: bytes) -> None:
    # What MemberSync._parse does with a notice under the wire's size limit.
    for model in (MembersNotice, HotlistNotice):
        try:
            notice = model.model_validate_json(payload)
        except ValidationError as exc:
            outcome(model.__name__, str(exc.errors(include_url=False)[0]["type"]))
            continue
        outcome(model.__name__, "valid")
        assert notice.v == 1
        assert notice.at.utcoffset() is not None


CARD_KEY = bytes(range(32))


def _members() -> list[SnapshotMember]:
    def card(number: str, state: str = "active") -> SnapshotCard:
        return SnapshotCard(
            card_hash=card_hash(CARD_KEY, number).hex(),
            kind="standard",
            state=state,  # type: ignore[arg-type]
            valid_from=dt.date(2025, 1, 1),
            valid_until=None,
        )

    return [
        SnapshotMember(
            member_id=f"M{number:06d}",
            tier="gold",
            birthday="02-29",
            points_balance=1200 * number,
            rebate_balance="35.20",
            cards=(card(f"6200 1234 5678 {number:04d}"), card(f"6200 9999 5678 {number:04d}", "lost")),
            version=number + 7,
        )
        for number in range(1, 4)
    ]


@pytest.fixture(scope="module")
def pages(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    directory = tmp_path_factory.mktemp("fuzz-pages")
    original = write_delta(directory / "delta.jsonl", _members(), after=7, head=10, card_key=CARD_KEY)
    return directory, original.read_bytes()


def _line_edits(original: bytes) -> st.SearchStrategy[bytes]:
    """Whole lines dropped, doubled, swapped or edited as JSON, or the bytes mutated."""

    @st.composite
    def edit(draw: st.DrawFn) -> bytes:
        lines = original.split(b"\n")
        at = draw(st.integers(0, len(lines) - 1))
        action = draw(st.sampled_from(["drop", "double", "swap", "json", "bytes", "nested"]))
        if action == "drop":
            del lines[at]
        elif action == "double":
            lines.insert(at, lines[at])
        elif action == "swap":
            other = draw(st.integers(0, len(lines) - 1))
            lines[at], lines[other] = lines[other], lines[at]
        elif action == "json":
            try:
                doc = json.loads(lines[at])
            except ValueError:
                doc = {}
            lines[at] = json.dumps(draw(edited_json(doc))).encode()
        elif action == "nested":
            lines[at] = draw(NESTED)
        else:
            lines[at] = draw(mutated(lines[at]))
        return b"\n".join(lines)

    return edit()


@FUZZ
@given(data=st.data())
def test_a_damaged_member_delta_page_is_read_or_refused_with_an_input_error(
    pages: tuple[Path, bytes], data: st.DataObject
) -> None:
    directory, original = pages
    damaged = data.draw(_line_edits(original))
    path = directory / "damaged.jsonl"
    path.write_bytes(damaged)
    try:
        delta = read_delta(path, CARD_KEY)
    except InputError as exc:
        refused_with_issues("read_delta", exc)
        return
    outcome("read_delta", "read")
    versions = [row[8] for row in delta.members]
    assert versions == sorted(versions)
    assert all(delta.header.from_ < v <= delta.header.to for v in versions)
    # The snapshot reader reads the same lines line by line (the member import's path).
    with SnapshotReader(path) as reader:
        try:
            reader.header(CARD_KEY)
        except InputError:
            return
        while not reader.chunk(100).done:
            pass


# --- ruleset TOML -----------------------------------------------------------------------------


@st.composite
def damaged_toml(draw: st.DrawFn) -> str:
    text = draw(st.sampled_from(RULESETS)).read_text(encoding="utf-8")
    lines = text.split("\n")
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(lines) - 1))
        action = draw(st.sampled_from(["drop", "double", "value", "chars", "header"]))
        if action == "drop":
            del lines[at]
        elif action == "double":
            lines.insert(at, lines[at])
        elif action == "value" and "=" in lines[at]:
            key = lines[at].split("=", 1)[0]
            value = draw(
                st.sampled_from(['""', "-1", "0", "1e400", "true", "[]", "{}", '"9999-99-99"', '"99:99"', '"-0.00"'])
                | st.integers(-(2**64), 2**64).map(str)
                | st.text(max_size=10).map(json.dumps)
            )
            lines[at] = f"{key}= {value}"
        elif action == "header":
            lines.insert(at, draw(st.sampled_from(["[[rules]]", "[ruleset]", "[rules.when]", "[[tiers]]", "[x]"])))
        else:
            chars = list(lines[at])
            if chars:
                chars[draw(st.integers(0, len(chars) - 1))] = draw(st.characters())
            lines[at] = "".join(chars)
    return "\n".join(lines)


@FUZZ
@given(damaged_toml())
def test_a_damaged_ruleset_compiles_or_is_refused_with_a_ruleset_error(text: str) -> None:
    try:
        ruleset = parse_ruleset(text, source="fuzz.toml")
    except RulesetError as exc:
        refused_with_issues("parse_ruleset", exc)
        return
    outcome("parse_ruleset", "compiled")
    assert ruleset.version


# --- drivers ------------------------------------------------------------------------------------

EVENT = st.tuples(
    st.integers(0, 2) | st.integers(0, 2**31),  # sec: mostly one burst, sometimes anywhere (clock jumps)
    st.integers(0, 999_999),  # usec
    st.sampled_from([1, 1, 1, 0, 2, 4, 17]) | st.integers(0, 0xFFFF),  # type: KEY mostly, SYN, REL, MSC, LED, any
    st.integers(0, 120) | st.integers(0, 0xFFFF),  # code: the keys a wedge has, or any
    st.sampled_from([1, 0, 1, 0, 2]) | st.integers(-(2**31), 2**31 - 1),  # value: press, release, repeat, any
)


@FUZZ
@given(
    st.sampled_from(sorted(KEYMAPS)),
    st.integers(1, 200),
    st.integers(1, 64),
    st.lists(EVENT, max_size=200),
)
def test_any_input_event_stream_assembles_reads_without_raising(
    layout: str, gap_ms: int, max_chars: int, events: list[tuple[int, int, int, int, int]]
) -> None:
    assembler = KeystrokeAssembler(KEYMAPS[layout], gap_ms=gap_ms, max_chars=max_chars)
    reads = []
    for event in events:
        reads += assembler.feed(*event)
    reads += assembler.flush(2**31 + 10, 0)
    outcome("KeystrokeAssembler", f"{min(len(reads), 3)} reads")
    for read in reads:
        assert len(read.text) <= max_chars
        assert read.started_us <= read.ended_us or read.ended_us == 0


@FUZZ
@given(st.binary(max_size=300))
def test_any_response_apdu_splits_or_is_refused(raw: bytes) -> None:
    try:
        response = parse_response(raw)
    except BadResponseError:
        outcome("parse_response", "refused")
        assert len(raw) < 2
        return
    outcome("parse_response", "parsed")
    assert response.data + bytes([response.sw1, response.sw2]) == raw


@FUZZ
@given(
    st.builds(
        lambda prefix, rest: prefix + rest,
        st.sampled_from(["LM0.", "LM1.", "LM1..", "LM2.", "lm1.", ""]),
        st.text(max_size=200) | st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.="),
    )
)
def test_any_member_code_text_parses_to_a_code_or_a_rejection(text: str) -> None:
    parsed = parse_member_code(text)
    outcome("parse_member_code", type(parsed).__name__)
    assert isinstance(parsed, StaticCode | SignedCode | Rejected)


# --- the engine on the shipped programmes ----------------------------------------------------------

PROGRAMMES: dict[str, Ruleset] = {path.stem: load_ruleset(path) for path in RULESETS}
CATEGORIES = ("womenswear", "menswear", "fresh", "tobacco", "cosmetics", "gold", "dining", "other")


@st.composite
def baskets(draw: st.DrawFn) -> Basket:
    lines = tuple(
        Line(
            line_id=str(number),
            sku=draw(st.sampled_from(["6901234567892", "6900000000012", "1", "0"])),
            category=draw(st.sampled_from(CATEGORIES)),
            qty=draw(st.integers(1, 999_000)),
            unit_fen=draw(st.integers(0, 10**9)),
            regular_fen=draw(st.none() | st.integers(0, 10**9)),
            flags=frozenset(draw(st.lists(st.sampled_from(["special_price", "group_buy", "marked_down"]), max_size=2))),
        )
        for number in range(draw(st.integers(1, 8)))
    )
    tenders = tuple(
        Tender(kind=kind, amount_fen=draw(st.integers(1, 10**8)) if kind != "points" else None, points=points)
        for kind, points in draw(
            st.lists(
                st.sampled_from(["cash", "bank_card", "points", "rebate", "stored_value", "coupon"]).map(
                    lambda k: (k, 100 if k == "points" else None)
                ),
                max_size=3,
            )
        )
    )
    coupons = tuple(draw(st.lists(st.text(min_size=1, max_size=12), max_size=2)))
    return Basket(lines=lines, coupons=coupons, tenders=tenders)


MEMBERS_AT_TILL = st.none() | st.builds(
    Member,
    member_id=st.just("M000123"),
    tier=st.sampled_from(["normal", "silver", "gold", "vip", "diamond", "nobody"]),
    card_kind=st.sampled_from(["standard", "staff", "virtual"]),
    birthday=st.none() | st.tuples(st.integers(1, 12), st.integers(1, 28)),
    points_balance=st.integers(0, 10**9),
    rebate_fen=st.integers(0, 10**9),
)
# Hypothesis takes naive bounds; every moment drawn then gets the lane's offset.
MOMENTS = st.datetimes(min_value=dt.datetime(2000, 1, 1), max_value=dt.datetime(2099, 12, 31)).map(  # noqa: DTZ001
    lambda moment: moment.replace(tzinfo=SHANGHAI)
)


@FUZZ
@given(st.sampled_from(sorted(PROGRAMMES)), baskets(), MEMBERS_AT_TILL, MOMENTS)
def test_any_basket_on_every_shipped_programme_prices_or_is_refused(
    programme: str, basket: Basket, member: Member | None, at: dt.datetime
) -> None:
    try:
        priced = price(basket, member, PROGRAMMES[programme], at)
    except InputError as exc:
        refused_with_issues("engine.price", exc)
        return
    outcome("engine.price", "priced")
    assert sum(line.net_fen for line in priced.lines) == priced.net_fen
    assert all(line.net_fen >= 0 for line in priced.lines)
