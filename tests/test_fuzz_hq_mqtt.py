"""Malformed and forged MQTT traffic against a real head office, while an honest lane syncs through it.

Real parts only: a private Mosquitto (tests/broker.py), ``lane-hq run`` on a fresh PostgreSQL
database (tests/hq_harness.py, tests/pgdb.py) and a ``lane-agent run`` selling and syncing
(tests/lane_harness.py).  A seeded generator makes every message and, independently of head
office's code, what the protocol (docs/protocol.md) says must become of it:

* a message that cannot be taken at all (random bytes, truncated or garbled JSON, non-UTF-8,
  JSON nested far deeper than any parser's stack, not an object, another version, a body naming
  another lane than its topic, a bad epoch, no entries, too many entries, over 8 MiB, a topic
  that is not a lane's) is dead-lettered whole, with its code, and not acknowledged;
* in a batch that can be taken, each entry at the lane's next seq is applied or, when malformed,
  dead-lettered with its code; entries with unreadable seqs are dead-lettered; duplicates and gaps
  apply nothing; an entry whose totals do not add up is applied and caught by the audit;
* replays and gaps on the honest lane's own topic change nothing; invalid lane states are counted
  and ignored; garbage acks and head-office notices are ignored by the lane.

Afterwards head office is still running and healthy, no handler failed, the dead letters and
counters are exactly the expected ones, nothing malformed reached journal_entries, sales or
points_ledger, and the honest lane's journal arrived exactly once.  ``LANE_FUZZ=long``
(``make fuzz``) sends 20,000 messages instead of 400.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import random
import sqlite3
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import httpx
import pytest
from broker import Broker
from conftest import REPO_ROOT
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hq_harness import Hq, HqReader
from lane_harness import Lane, basket
from pgdb import fresh_database

from sync import signing, wire

LONG = os.environ.get("LANE_FUZZ") == "long"
MESSAGES = int(os.environ.get("LANE_FUZZ_MESSAGES", "20000" if LONG else "400"))
SEED = int(os.environ.get("LANE_FUZZ_SEED", "20261210"))
STORE, LANE = "store-0101", "lane-03"
ROOT = "retail"
pytestmark = pytest.mark.timeout(1800 if LONG else 240)


# --- the real parts (the small helpers of test_sync_e2e.py, copied: test modules are not a library) --


# The lane trusts this key for head office's signed rulesets, so it listens on {root}/hq/rules.
TRUSTED = Ed25519PrivateKey.generate()
RULES_TOML = (REPO_ROOT / "config" / "rules" / "888-mall.toml").read_text(encoding="utf-8")


def sync_section(broker: Broker) -> str:
    settings: dict[str, object] = {
        "enabled": True,
        "port": broker.port,
        "resend_after_seconds": 1.0,
        "state_interval_seconds": 1.0,
        "reconnect_min_seconds": 0.1,
        "reconnect_max_seconds": 0.5,
    }
    lines = [f"{key} = {json.dumps(value)}" for key, value in settings.items()]
    lines.append(f'rules_keys = {{ "hq-fuzz" = "{signing.public_key_text(TRUSTED.public_key())}" }}')
    return "\n[sync]\n" + "\n".join(lines) + "\n"


def lane_journal(lane: Lane) -> list[tuple[int, str, str, dict[str, Any]]]:
    assert lane.db is not None
    with sqlite3.connect(f"file:{lane.db}?mode=ro", uri=True) as conn:
        rows = conn.execute("SELECT seq, id, kind, body FROM journal ORDER BY seq").fetchall()
    return [(seq, ident, kind, json.loads(body)) for seq, ident, kind, body in rows]


def lane_acked(lane: Lane) -> tuple[int, int]:
    assert lane.db is not None
    with sqlite3.connect(f"file:{lane.db}?mode=ro", uri=True) as conn:
        acked = conn.execute("SELECT acked_seq FROM lane_state").fetchone()[0]
        last = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM journal").fetchone()[0]
    return int(acked), int(last)


def lane_epoch(lane: Lane) -> str:
    assert lane.db is not None
    with sqlite3.connect(f"file:{lane.db}?mode=ro", uri=True) as conn:
        return str(conn.execute("SELECT journal_epoch FROM lane_state").fetchone()[0])


def raw_entries(lane: Lane) -> list[wire.RawEntry]:
    assert lane.db is not None
    with sqlite3.connect(f"file:{lane.db}?mode=ro", uri=True) as conn:
        rows = conn.execute(
            "SELECT seq, id, kind, at, rules_version, member_version, body FROM journal ORDER BY seq"
        ).fetchall()
    return [wire.RawEntry(*row) for row in rows]


def wait_for(what: str, condition: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def wait_drained(lane: Lane, timeout: float = 60.0) -> None:
    wait_for(f"the lane's backlog to drain ({lane_acked(lane)})", lambda: len(set(lane_acked(lane))) == 1, timeout)


def sell(client: httpx.Client, sale_id: str, *, member: bool = True) -> None:
    doc = basket(sale_id=sale_id, **({"member_id": "M000123"} if member else {}))
    priced = client.post("/v1/price", json={k: v for k, v in doc.items() if k != "sale_id"})
    assert priced.status_code == 200, priced.text
    doc["tenders"] = [{"kind": "cash", "amount": priced.json()["totals"]["net"]}]
    answer = client.post("/v1/sales", json=doc)
    assert answer.status_code == 200, answer.text


def assert_exactly_once(lane: Lane, reader: HqReader) -> None:
    """Head office holds exactly the honest lane's journal, each entry once, with its derived rows."""
    journal = lane_journal(lane)
    held = reader.rows(
        "SELECT seq, id, kind FROM journal_entries WHERE store = :s AND lane = :l ORDER BY seq", s=STORE, l=LANE
    )
    assert [tuple(row) for row in held] == [(seq, ident, kind) for seq, ident, kind, _ in journal]
    sales = reader.scalar("SELECT count(*) FROM sales WHERE store = :s AND lane = :l", s=STORE, l=LANE)
    assert sales == sum(kind == "sale" for _, _, kind, _ in journal)
    earned = sum(
        body["result"]["totals"]["points"] for _, _, kind, body in journal if kind == "sale" and body["member"]
    )
    ledger = reader.scalar(
        "SELECT COALESCE(SUM(points), 0) FROM points_ledger WHERE kind = 'earn' AND store = :s AND lane = :l",
        s=STORE,
        l=LANE,
    )
    assert int(ledger) == earned


def publish(broker: Broker, messages: list[tuple[str, bytes]], pace: Callable[[int], None]) -> None:
    """QoS 1, pipelined 500 at a time; after each chunk ``pace(n)``, n the chunk's messages head office reads."""

    async def run() -> None:
        async with aiomqtt.Client(broker.host, broker.port, identifier=f"fuzz-{uuid.uuid4().hex[:8]}") as client:
            client.pending_calls_threshold = 1000
            for start in range(0, len(messages), 500):
                chunk = messages[start : start + 500]
                await asyncio.gather(*(client.publish(topic, payload, qos=1, timeout=60) for topic, payload in chunk))
                await asyncio.to_thread(pace, sum(hq_reads(topic) for topic, _ in chunk))

    asyncio.run(run())


def hq_reads(topic: str) -> bool:
    """Whether head office's subscriptions ({root}/+/+/journal and {root}/+/+/state) take ``topic``."""
    parts = topic.split("/")
    return len(parts) == 4 and parts[0] == ROOT and parts[3] in ("journal", "state")


# Head office takes at most 10,000 messages into its client's queue and discards the rest, after the
# broker has counted them delivered (sync/hq/ingest.py, max_queued_incoming_messages): an honest lane
# resends what is not acknowledged, but a flood's dead letters would be lost.  The publisher keeps
# at most this many messages ahead of what head office has handled.
AHEAD = 2_000


def handled(hq: Hq) -> float:
    """Messages head office has finished with: journal messages (every outcome) and lane states."""
    return hq.metric("hq_batches_total") + hq.metric("hq_lane_states_total")


# --- what is sent, and what must become of it --------------------------------------------------


@dataclass
class Expected:
    """What the protocol says head office must do with everything sent, tallied as it is generated."""

    messages: list[tuple[str, bytes]] = field(default_factory=list)
    kinds: Counter[str] = field(default_factory=Counter)
    whole: Counter[str] = field(default_factory=Counter)  # whole-message dead letters, by code
    entry_dead: Counter[str] = field(default_factory=Counter)  # entry dead letters, by code
    applied: set[str] = field(default_factory=set)  # entry ids to apply (other lanes than the honest one)
    refused: set[str] = field(default_factory=set)  # entry ids that must never be applied
    either: list[set[str]] = field(default_factory=list)  # exactly one id of each set is applied (dup seqs)
    tampered_sales: set[str] = field(default_factory=set)  # sale ids applied whose totals do not add up
    invalid_states: int = 0
    forged_rules: int = 0  # ruleset envelopes the lane must refuse

    def send(self, kind: str, topic: str, payload: bytes) -> None:
        self.kinds[kind] += 1
        self.messages.append((topic, payload))


def topic(lane: str, leaf: str, store: str = STORE) -> str:
    return f"{ROOT}/{store}/{lane}/{leaf}"


class Generator:
    """Builds the fuzz traffic from one seed, with its expected outcome."""

    def __init__(self, rng: random.Random, honest: list[wire.RawEntry], epoch: str) -> None:
        self.rng = rng
        self.honest = honest  # already acknowledged: their seqs are at or below the honest cursor
        self.epoch = epoch
        self.template = json.loads(next(e.body for e in honest if e.kind == "sale"))
        self.out = Expected()
        self.lanes = 0

    # -- helpers --

    def _other_lane(self) -> str:
        self.lanes += 1
        return f"fz-{self.lanes % 97:02d}"

    def _epoch(self) -> str:
        return uuid.UUID(int=self.rng.getrandbits(128)).hex

    def _entry(self, lane: str, seq: object, sale_id: str) -> dict[str, Any]:
        body = json.loads(json.dumps(self.template))
        body["lane"] = lane
        body["sale_id"] = sale_id
        if isinstance(body.get("request"), dict):
            body["request"]["sale_id"] = sale_id
        return {
            "v": 1,
            "store": STORE,
            "lane": lane,
            "seq": seq,
            "id": str(uuid.UUID(int=self.rng.getrandbits(128), version=4)),
            "kind": "sale",
            "at": self.honest[0].at,
            "rules_version": self.honest[0].rules_version,
            "member_version": 0,
            "body": body,
        }

    def _batch(self, lane: str, epoch: str, entries: list[Any], store: str = STORE) -> bytes:
        return json.dumps({"v": 1, "store": store, "lane": lane, "epoch": epoch, "entries": entries}).encode()

    def _garbage(self) -> bytes:
        r = self.rng
        choice = r.randrange(6)
        if choice == 0:
            return r.randbytes(r.randrange(1, 300))
        if choice == 1:
            return b"\xff\xfe" + r.randbytes(r.randrange(0, 40))
        if choice == 2:
            good = wire.encode_batch(STORE, LANE, self.epoch, self.honest[:1])
            return good[: r.randrange(1, len(good) - 1)]  # truncated
        if choice == 3:
            depth = r.randrange(1_100, 100_000)
            opener, closer = r.choice([("[", "]"), ('{"a":', "}")])
            return (opener * depth + "1" + closer * depth).encode()
        if choice == 4:
            good = bytearray(wire.encode_batch(STORE, LANE, self.epoch, self.honest[:1]))
            for _ in range(r.randrange(1, 5)):
                good[r.randrange(len(good))] = r.choice(b'{}[]",:\\\x00')
            return bytes(good)
        return r.choice([b"", b" ", b"null", b"[]", b'"text"', b"1e999", b"NaN", b"{", b"\x00"])

    @staticmethod
    def _code_of(payload: bytes, store: str, lane: str) -> str:
        """The whole-message code, read independently of sync.wire with the standard library."""
        if len(payload) > wire.MAX_PAYLOAD_BYTES:
            return "too_large"
        try:
            doc = json.loads(payload)
        except (ValueError, RecursionError):
            return "not_json"
        if not isinstance(doc, dict):
            return "not_object"
        if type(doc.get("v")) is not int or doc.get("v") != 1:
            return "bad_version"
        if doc.get("store") != store or doc.get("lane") != lane:
            return "lane_mismatch"
        epoch = doc.get("epoch")
        if not (isinstance(epoch, str) and len(epoch) == 32 and all(c in "0123456789abcdef" for c in epoch)):
            return "bad_epoch"
        entries = doc.get("entries")
        if not isinstance(entries, list) or not entries:
            return "bad_entries"
        if len(entries) > wire.MAX_BATCH_ENTRIES:
            return "too_many"
        return ""  # takeable

    def _whole(self, kind: str, lane: str, payload: bytes, store: str = STORE) -> None:
        code = self._code_of(payload, store, lane)
        assert code, f"{kind}: the generator made a takeable message"
        self.out.whole[code] += 1
        self.out.send(kind, topic(lane, "journal", store), payload)

    # -- the kinds of traffic --

    def garbage(self) -> None:
        lane = self.rng.choice([LANE, self._other_lane()])
        payload = self._garbage()
        while not self._code_of(payload, STORE, lane):  # a mutation that left the batch readable: another
            payload = self._garbage()
        self._whole("garbage", lane, payload)

    def wrong_shape(self) -> None:
        r = self.rng
        lane = r.choice([LANE, self._other_lane()])
        entry = self._entry(lane, 1, "X")
        shapes: list[Any] = [
            {"v": 2, "store": STORE, "lane": lane, "epoch": self._epoch(), "entries": [entry]},
            {"v": True, "store": STORE, "lane": lane, "epoch": self._epoch(), "entries": [entry]},
            {"v": "1", "store": STORE, "lane": lane, "epoch": self._epoch(), "entries": [entry]},
            {"v": 1, "store": STORE, "lane": "lane-99", "epoch": self._epoch(), "entries": [entry]},
            {"v": 1, "store": "store-9999", "lane": lane, "epoch": self._epoch(), "entries": [entry]},
            {"v": 1, "store": STORE, "lane": lane, "epoch": self.epoch.upper(), "entries": [entry]},
            {"v": 1, "store": STORE, "lane": lane, "epoch": self.epoch[:31], "entries": [entry]},
            {"v": 1, "store": STORE, "lane": lane, "epoch": 12, "entries": [entry]},
            {"v": 1, "store": STORE, "lane": lane, "epoch": self._epoch(), "entries": []},
            {"v": 1, "store": STORE, "lane": lane, "epoch": self._epoch(), "entries": {"0": entry}},
            {"v": 1, "store": STORE, "lane": lane, "epoch": self._epoch()},
            [entry],
            {"entries": [entry]},
        ]
        self._whole("wrong_shape", lane, json.dumps(r.choice(shapes)).encode())

    def bad_topic(self) -> None:
        r = self.rng
        store = r.choice(["s" * 33, "st ore", "stor\u00e9", "a.b", "$x"])
        leaf = r.choice(["journal", "state"])
        payload = self._garbage() if r.random() < 0.5 else self._batch(LANE, self.epoch, [])
        self.out.whole["bad_topic"] += 1
        self.out.send("bad_topic", f"{ROOT}/{store}/{LANE}/{leaf}", payload)

    def too_many(self) -> None:
        lane = self._other_lane()
        entries = [{"seq": n} for n in range(1, wire.MAX_BATCH_ENTRIES + 2)]
        self._whole("too_many", lane, self._batch(lane, self._epoch(), entries))

    def too_large(self) -> None:
        lane = self.rng.choice([LANE, self._other_lane()])
        entry = self._entry(lane, 1, "HUGE")
        entry["body"]["padding"] = "x" * (wire.MAX_PAYLOAD_BYTES + 10)
        self._whole("too_large", lane, self._batch(lane, self._epoch(), [entry]))

    def entries(self) -> None:
        """A takeable batch on another lane under a fresh epoch: seqs 1..n, each valid or broken on purpose."""
        r = self.rng
        lane, epoch = self._other_lane(), self._epoch()
        entries: list[Any] = []
        for seq in range(1, r.randrange(2, 9)):
            sale_id = f"FZ-{uuid.UUID(int=r.getrandbits(128)).hex[:16]}"
            entry = self._entry(lane, seq, sale_id)
            fault = r.choice(["valid", "valid", "tampered", "dup_seq", "dup_id", *BROKEN])
            if fault == "valid":
                self.out.applied.add(entry["id"])
            elif fault == "tampered":  # a lane awarding itself points: the wire cannot tell, the audit can
                entry["body"]["result"]["totals"]["points"] += 1 + r.randrange(1000)
                self.out.applied.add(entry["id"])
                self.out.tampered_sales.add(sale_id)
            elif fault == "dup_seq":  # the same seq twice, two ids: one is applied, the other is a duplicate
                twin = self._entry(lane, seq, sale_id + "-twin")
                entries.append(twin)
                self.out.either.append({twin["id"], entry["id"]})
            elif fault == "dup_id" and entries and entries[-1].get("id") in self.out.applied:
                entry["id"] = entries[-1]["id"]  # the id applied at the seq before: never applied twice
                self.out.entry_dead["duplicate_id"] += 1
            elif fault == "dup_id":
                self.out.applied.add(entry["id"])
            else:
                code = BROKEN[fault](entry, r)
                self.out.entry_dead[code] += 1
                self.out.refused.add(entry["id"])
            entries.append(entry)
        # Entries whose seq cannot be read: dead-lettered wherever they stand, moving nothing.
        for _ in range(r.choice([0, 0, 1, 2])):
            junk = self._entry(lane, r.choice([0, -1, -(2**70), 2**63, True, "3", 1.5, None]), "JUNK")
            self.out.entry_dead["bad_seq"] += 1
            self.out.refused.add(junk["id"])
            entries.insert(r.randrange(len(entries) + 1), junk)
        self.out.send("entries", topic(lane, "journal"), self._batch(lane, epoch, entries))

    def gap(self) -> None:
        """Seqs past the next one: held back, then answered with the lane's position; nothing applied."""
        r = self.rng
        honest = r.random() < 0.5
        lane, epoch = (LANE, self.epoch) if honest else (self._other_lane(), self._epoch())
        start = 10**9 + r.randrange(10**6) if honest else r.randrange(2, 50)
        entries = [self._entry(lane, start + n, f"GAP-{start + n}") for n in range(r.randrange(1, 4))]
        self.out.refused.update(entry["id"] for entry in entries)
        self.out.send("gap", topic(lane, "journal"), self._batch(lane, epoch, entries))

    def replay(self) -> None:
        """The honest lane's acknowledged entries again (as sent, or forged under their seqs): duplicates."""
        r = self.rng
        chosen = r.sample(self.honest, r.randrange(1, len(self.honest) + 1))
        if r.random() < 0.5:
            self.out.send("replay", topic(LANE, "journal"), wire.encode_batch(STORE, LANE, self.epoch, chosen))
            return
        forged = []
        for entry in chosen:
            doc = self._entry(LANE, entry.seq, "FORGED")
            doc["body"]["result"]["totals"]["points"] = 10**6
            self.out.refused.add(doc["id"])
            forged.append(doc)
        self.out.send("replay", topic(LANE, "journal"), self._batch(LANE, self.epoch, forged))

    def state(self) -> None:
        r = self.rng
        lane = r.choice([LANE, self._other_lane()])
        invalid: list[bytes] = [
            self._garbage() or b"x",
            json.dumps({"v": 2, "store": STORE, "lane": lane, "state": "online", "session": 1}).encode(),
            json.dumps({"v": 1, "store": STORE, "lane": "lane-98", "state": "online", "session": 1}).encode(),
            json.dumps({"v": 1, "store": STORE, "lane": lane, "state": "hacked", "session": 1}).encode(),
            json.dumps({"v": 1, "store": STORE, "lane": lane, "state": "offline", "session": -5}).encode(),
            json.dumps({"v": 1, "store": STORE, "lane": lane, "state": "online", "session": True}).encode(),
        ]
        payload = r.choice(invalid)
        with pytest.raises(wire.WireError):  # the generator's own check that it made an invalid state
            wire.decode_state(STORE, lane, payload)
        self.out.invalid_states += 1
        self.out.send("state", topic(lane, "state"), payload)

    def forged_downlink(self) -> None:
        """Acks and head-office notices nobody may trust: garbage, another epoch, beyond the lane's journal."""
        r = self.rng
        ack_forms = [
            self._garbage(),
            wire.encode_ack(STORE, LANE, self._epoch(), 10**6),
            wire.encode_ack(STORE, LANE, self.epoch, 10**12),
            wire.encode_ack(STORE, "lane-77", self.epoch, 1),
        ]
        if r.random() < 0.6:
            self.out.send("forged_ack", topic(LANE, "ack"), r.choice(ack_forms))
        elif r.random() < 0.5:
            leaf = r.choice(["members", "hotlist"])
            notice = r.choice([self._garbage(), json.dumps({"v": 1, "kind": leaf, "version": -1}).encode()])
            self.out.send("forged_notice", f"{ROOT}/hq/{leaf}", notice)
        else:
            self.out.forged_rules += 1
            self.out.send("forged_rules", f"{ROOT}/hq/rules", r.choice([self._garbage(), *FORGED_ENVELOPES]))

    def make(self, count: int) -> Expected:
        kinds: list[tuple[Callable[[], None], float]] = [
            (self.garbage, 22),
            (self.wrong_shape, 14),
            (self.entries, 24),
            (self.replay, 8),
            (self.gap, 3),
            (self.state, 12),
            (self.bad_topic, 4),
            (self.forged_downlink, 12),
            (self.too_many, 1),
        ]
        functions, weights = zip(*kinds, strict=True)
        for _ in range(count - 2):
            self.rng.choices(functions, weights)[0]()
        self.too_large()
        self.too_large()
        return self.out


def _envelope(key: Ed25519PrivateKey, key_id: str, serial: int = 9) -> bytes:
    return signing.build_envelope(
        RULES_TOML,
        version="2026.11.1",
        serial=serial,
        effective_from=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
        key_id=key_id,
        private_key=key,
    )


# Signed by a key the lane does not trust, under the trusted key's id and under another id.
FORGED_ENVELOPES = [_envelope(Ed25519PrivateKey.generate(), "hq-fuzz"), _envelope(Ed25519PrivateKey.generate(), "hq-x")]


def _bad_id(entry: dict[str, Any], r: random.Random) -> str:
    entry["id"] = r.choice(["not-a-uuid", entry["id"].upper(), "", 12])
    return "bad_id"


def _bad_kind(entry: dict[str, Any], r: random.Random) -> str:
    entry["kind"] = r.choice(["refund", "", None, "SALE"])
    return "bad_kind"


def _bad_at(entry: dict[str, Any], r: random.Random) -> str:
    entry["at"] = r.choice(["yesterday", "2026-12-10T14:05:00", 1765000000, "2026-13-45T00:00:00+08:00"])
    return "bad_at"


def _other_lane(entry: dict[str, Any], r: random.Random) -> str:
    entry[r.choice(["store", "lane"])] = "lane-09"
    return "lane_mismatch"


def _body_mismatch(entry: dict[str, Any], r: random.Random) -> str:
    entry["body"][r.choice(["kind", "store", "lane"])] = "lane-09"
    return "body_mismatch"


def _bad_body(entry: dict[str, Any], r: random.Random) -> str:
    entry["body"] = r.choice([None, [], "body", 1])
    return "bad_body"


def _bad_rules_version(entry: dict[str, Any], r: random.Random) -> str:
    entry["rules_version"] = r.choice(["", None, 2026, "x" * 65])
    return "bad_rules_version"


def _bad_member_version(entry: dict[str, Any], r: random.Random) -> str:
    entry["member_version"] = r.choice([-1, "7", None, 1.5, True])
    return "bad_member_version"


def _entry_version(entry: dict[str, Any], r: random.Random) -> str:
    entry["v"] = r.choice([0, 2, "1", None])
    return "bad_version"


BROKEN: dict[str, Callable[[dict[str, Any], random.Random], str]] = {
    "bad_id": _bad_id,
    "bad_kind": _bad_kind,
    "bad_at": _bad_at,
    "lane_mismatch": _other_lane,
    "body_mismatch": _body_mismatch,
    "bad_body": _bad_body,
    "bad_rules_version": _bad_rules_version,
    "bad_member_version": _bad_member_version,
    "bad_version": _entry_version,
}


# --- the test ---------------------------------------------------------------------------------


@pytest.fixture
def parts(tmp_path: Path) -> Iterator[tuple[Broker, Hq, Lane, HqReader, str]]:
    # A deep queue: the broker must not drop what head office is slow to take (REAL_COMPONENTS.md).
    with Broker(tmp_path / "broker", max_queued=1_000_000) as broker, fresh_database("lanehq_fuzz") as url:
        hq = Hq(tmp_path / "hq", broker_port=broker.port, db_url=url)
        lane = Lane(tmp_path / "lane", extra_config=sync_section(broker))
        reader = HqReader(url)
        try:
            hq.start()
            lane.import_members()
            lane.start()
            yield broker, hq, lane, reader, url
        finally:
            reader.close()
            lane.kill()
            hq.kill()


def summary(request: pytest.FixtureRequest, line: str) -> None:
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if capture is None or reporter is None:
        print(line)
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line("\n" + line)


def test_forged_and_malformed_traffic_is_dead_lettered_and_the_honest_lane_syncs_exactly_once(
    parts: tuple[Broker, Hq, Lane, HqReader, str], request: pytest.FixtureRequest
) -> None:
    broker, hq, lane, reader, _ = parts
    started = time.monotonic()
    with lane.client() as client:
        for number in range(3):
            sell(client, f"BEFORE-{number}", member=number != 1)
    wait_drained(lane)
    expected = Generator(random.Random(SEED), raw_entries(lane), lane_epoch(lane)).make(MESSAGES)
    sent_bytes = sum(len(payload) for _, payload in expected.messages)

    # The honest lane sells all through the storm.
    stop = threading.Event()
    sold: list[str] = []

    def till() -> None:
        with lane.client() as http:
            while not stop.is_set():
                sell(http, f"DURING-{len(sold)}", member=len(sold) % 2 == 0)
                sold.append("x")
                time.sleep(0.05)

    seller = threading.Thread(target=till, name="honest-till")
    seller.start()
    try:
        sent = [handled(hq), 0.0]  # head office's count before the storm; messages sent that it reads

        def pace(count: int) -> None:
            sent[1] += count
            wait_for(
                "head office to keep up", lambda: handled(hq) >= sent[0] + sent[1] - AHEAD, timeout=600 if LONG else 120
            )

        publish(broker, expected.messages, pace)
        published = time.monotonic()
        whole_total = sum(expected.whole.values())
        dead_total = whole_total + sum(expected.entry_dead.values())
        others_total = len(expected.applied) + len(expected.either)

        def settled() -> bool:
            if hq.metric('hq_batches_total{outcome="failed"}') > 0:
                return True  # a handler failed: reported below, with head office's log
            return (
                reader.scalar("SELECT count(*) FROM dead_letters") >= dead_total
                and hq.metric('hq_lane_states_total{outcome="invalid"}') >= expected.invalid_states
                and reader.scalar("SELECT count(*) FROM journal_entries WHERE lane <> :l", l=LANE) >= others_total
            )

        wait_for(
            f"{dead_total} dead letters, {expected.invalid_states} invalid states, {others_total} other entries",
            settled,
            timeout=1200 if LONG else 120,
        )
    finally:
        stop.set()
        seller.join(60)
    with lane.client() as client:
        sell(client, "AFTER")
    wait_drained(lane)
    drained = time.monotonic()

    # Head office is alive, healthy, and no message made a handler fail.
    assert hq.process is not None
    assert hq.process.poll() is None, hq.tail()
    assert httpx.get(f"{hq.url}/healthz", timeout=5).json() == {"status": "ok"}
    assert hq.metric('hq_batches_total{outcome="failed"}') == 0, hq.tail()
    hq_log = hq.log.read_text(errors="replace")
    assert "Traceback" not in hq_log
    assert "Message queue is full" not in hq_log  # the pacing above kept within head office's intake

    # Exactly the dead letters the protocol calls for: whole messages, then entries.
    whole = reader.rows("SELECT code, count(*) FROM dead_letters WHERE epoch IS NULL GROUP BY code")
    assert dict(whole) == dict(expected.whole)
    assert hq.metric("hq_messages_rejected_total") == whole_total
    entry_codes = reader.rows("SELECT code, count(*) FROM dead_letters WHERE epoch IS NOT NULL GROUP BY code")
    assert dict(entry_codes) == dict(expected.entry_dead)
    assert hq.metric('hq_lane_states_total{outcome="invalid"}') == expected.invalid_states

    # Nothing malformed or forged entered the books; what was valid did, once.
    others = {row[0] for row in reader.rows("SELECT id FROM journal_entries WHERE lane <> :l", l=LANE)}
    assert expected.applied <= others
    assert not (expected.refused & others)
    for pair in expected.either:
        assert len(pair & others) == 1, pair
    twins = set().union(*expected.either) if expected.either else set()
    assert others <= expected.applied | twins
    honest_ids = {row[0] for row in reader.rows("SELECT id FROM journal_entries WHERE lane = :l", l=LANE)}
    assert not (expected.refused & honest_ids)
    ledger_ids = {row[0] for row in reader.rows("SELECT DISTINCT entry_id FROM points_ledger")}
    assert ledger_ids <= others | honest_ids
    assert not (expected.refused & ledger_ids)
    sales_others = reader.scalar("SELECT count(*) FROM sales WHERE lane <> :l", l=LANE)
    assert sales_others == len(others)
    assert_exactly_once(lane, reader)

    # The wire cannot tell a lane that awards itself points; the audit behind it does.
    if expected.tampered_sales:
        wait_for(
            "the audit of the tampered sales",
            lambda: reader.scalar("SELECT count(*) FROM sales WHERE audit_status IS NULL") == 0,
            timeout=300 if LONG else 60,
        )
        statuses = dict(reader.rows("SELECT sale_id, audit_status FROM sales WHERE lane <> :l", l=LANE))
        assert {statuses[sale] for sale in expected.tampered_sales} == {"mismatch"}

    # The lane ignored what it must not trust, and counted it.
    lane_metrics = httpx.get(f"{lane.url}/metrics", timeout=5).text
    rejected = sum(
        float(line.rsplit(" ", 1)[1])
        for line in lane_metrics.splitlines()
        if line.startswith("lane_sync_acks_rejected_total")
    )
    assert lane.process is not None
    assert lane.process.poll() is None
    rules_rejected = sum(
        float(line.rsplit(" ", 1)[1])
        for line in lane_metrics.splitlines()
        if line.startswith("lane_rules_rejected_total")
    )
    assert rules_rejected == expected.forged_rules
    with lane.client() as client:
        assert client.get("/v1/status").json()["rules"]["source"] == "file"  # still the lane's own file
    # No forged ack or notice reached the lane's last-resort handlers (which would drop its connection).
    assert "uplink failed" not in lane.log()
    assert "failed on a" not in lane.log()
    summary(
        request,
        f"[fuzz] head office MQTT: {len(expected.messages)} messages ({sent_bytes / 2**20:.1f} MiB; "
        + ", ".join(f"{kind} {n}" for kind, n in sorted(expected.kinds.items()))
        + f"); dead-lettered {whole_total} whole + {sum(expected.entry_dead.values())} entries; "
        f"other lanes' entries applied {len(others)} ({len(expected.tampered_sales)} tampered, all audited mismatch); "
        f"invalid states {expected.invalid_states}; lane refused acks {rejected:.0f}, rulesets {rules_rejected:.0f}; "
        f"honest sales {len(sold) + 4} exactly once; handler failures 0; "
        f"published in {published - started:.0f} s, all settled in {drained - started:.0f} s (seed {SEED})",
    )
