"""Exactly-once sync end to end: real lanes, a real Mosquitto, real head offices on PostgreSQL and SQLite.

Every test compares what a lane's own journal holds (read from its SQLite
file) with what head office committed (read from its database): the same
entries, each once, in seq order, with the sale, return, void and ledger rows
that follow from them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import httpx
import pytest
from broker import Broker
from hq_harness import Hq, HqReader
from lane_harness import Lane, basket
from pgdb import fresh_database

from sync import wire

STORE, LANE = "store-0101", "lane-03"
pytestmark = pytest.mark.timeout(180)


# --- fixtures ------------------------------------------------------------------------


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    with Broker(tmp_path / "broker", max_queued=10_000) as running:
        yield running


@pytest.fixture
def pg_url() -> Iterator[str]:
    with fresh_database() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'hq.db'}"
    else:
        with fresh_database() as url:
            yield url


@pytest.fixture
def hqs() -> Iterator[list[Hq]]:
    started: list[Hq] = []
    yield started
    for hq in started:
        hq.kill()


@pytest.fixture
def lanes() -> Iterator[list[Lane]]:
    started: list[Lane] = []
    yield started
    for lane in started:
        lane.kill()


def sync_section(broker: Broker, **overrides: object) -> str:
    settings: dict[str, object] = {
        "enabled": True,
        "port": broker.port,
        "resend_after_seconds": 1.0,
        "state_interval_seconds": 1.0,
        "reconnect_min_seconds": 0.1,
        "reconnect_max_seconds": 0.5,
        **overrides,
    }
    lines = [f"{key} = {json.dumps(value)}" for key, value in settings.items()]
    return "\n[sync]\n" + "\n".join(lines) + "\n"


def start_hq(hqs: list[Hq], directory: Path, broker: Broker, db_url: str, **options: Any) -> Hq:
    hq = Hq(directory, broker_port=broker.port, db_url=db_url, **options)
    hq.start()
    hqs.append(hq)
    return hq


def start_lane(lanes: list[Lane], directory: Path, broker: Broker | None, **sync: object) -> Lane:
    """A lane agent syncing through ``broker``; without one, a lane that only journals."""
    lane = Lane(directory, extra_config="" if broker is None else sync_section(broker, **sync))
    lane.import_members()
    lane.start()
    lanes.append(lane)
    return lane


# --- what the lane and head office hold ---------------------------------------------------


def lane_journal(lane: Lane) -> list[tuple[int, str, str, dict[str, Any]]]:
    assert lane.db is not None
    with sqlite3.connect(f"file:{lane.db}?mode=ro", uri=True) as conn:
        rows = conn.execute("SELECT seq, id, kind, body FROM journal ORDER BY seq").fetchall()
    return [(seq, ident, kind, json.loads(body)) for seq, ident, kind, body in rows]


def lane_acked(lane: Lane) -> tuple[int, int]:
    """``(acked_seq, last_seq)`` from the lane's own database."""
    assert lane.db is not None
    with sqlite3.connect(f"file:{lane.db}?mode=ro", uri=True) as conn:
        acked = conn.execute("SELECT acked_seq FROM lane_state").fetchone()[0]
        last = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM journal").fetchone()[0]
    return int(acked), int(last)


def wait_for(what: str, condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def wait_drained(lane: Lane, timeout: float = 40.0) -> None:
    def drained() -> bool:
        acked, last = lane_acked(lane)
        return acked == last

    wait_for(f"lane backlog to drain ({lane_acked(lane)})", drained, timeout)


def assert_exactly_once(lane: Lane, reader: HqReader, store: str = STORE, lane_id: str = LANE) -> None:
    """Head office holds exactly the lane's journal: each entry once, the derived rows once each."""
    journal = lane_journal(lane)
    held = reader.rows(
        "SELECT seq, id, kind FROM journal_entries WHERE store = :s AND lane = :l ORDER BY seq", s=store, l=lane_id
    )
    assert [tuple(row) for row in held] == [(seq, ident, kind) for seq, ident, kind, _ in journal]
    kinds = [kind for _, _, kind, _ in journal]
    for table, kind in (("sales", "sale"), ("returns", "return"), ("voids", "void")):
        count = reader.scalar(f"SELECT count(*) FROM {table} WHERE store = :s AND lane = :l", s=store, l=lane_id)
        assert count == kinds.count(kind), table
    earned = sum(
        body["result"]["totals"]["points"] for _, _, kind, body in journal if kind == "sale" and body["member"]
    )
    ledger = reader.scalar(
        "SELECT COALESCE(SUM(points), 0) FROM points_ledger WHERE kind = 'earn' AND store = :s AND lane = :l",
        s=store,
        l=lane_id,
    )
    assert int(ledger) == earned
    per_entry = reader.rows("SELECT entry_id, kind, count(*) FROM points_ledger GROUP BY entry_id, kind")
    assert all(row[2] == 1 for row in per_entry)


def sell(client: httpx.Client, sale_id: str, *, member: bool = True) -> dict[str, Any]:
    doc = basket(sale_id=sale_id, **({"member_id": "M000123"} if member else {}))
    priced = client.post("/v1/price", json={k: v for k, v in doc.items() if k != "sale_id"})
    assert priced.status_code == 200, priced.text
    doc["tenders"] = [{"kind": "cash", "amount": priced.json()["totals"]["net"]}]
    answer = client.post("/v1/sales", json=doc)
    assert answer.status_code == 200, answer.text
    return doc


# --- raw MQTT, for what no honest lane sends --------------------------------------------------


def publish(broker: Broker, messages: list[tuple[str, bytes]]) -> None:
    async def run() -> None:
        async with aiomqtt.Client(broker.host, broker.port, identifier=f"test-{uuid.uuid4().hex[:8]}") as client:
            for topic, payload in messages:
                await client.publish(topic, payload, qos=1)

    asyncio.run(run())


def _acked_seq(payload: bytes | None, epoch: str) -> int | None:
    """The seq a retained ack acknowledges for ``epoch`` (None: no ack, or another epoch's)."""
    if payload is None:
        return None
    ack = wire.decode_ack(STORE, LANE, payload)
    return ack.seq if ack.epoch == epoch else None


def retained(broker: Broker, topic: str, timeout: float = 5.0) -> bytes | None:
    async def run() -> bytes | None:
        async with aiomqtt.Client(broker.host, broker.port, identifier=f"test-{uuid.uuid4().hex[:8]}") as client:
            await client.subscribe(topic, qos=1)
            try:
                async with asyncio.timeout(timeout):
                    async for message in client.messages:
                        payload = message.payload
                        return payload if isinstance(payload, bytes) else str(payload).encode()
            except TimeoutError:
                return None
        return None

    return asyncio.run(run())


def raw_entries(lane: Lane) -> list[wire.RawEntry]:
    assert lane.db is not None
    with sqlite3.connect(f"file:{lane.db}?mode=ro", uri=True) as conn:
        rows = conn.execute(
            "SELECT seq, id, kind, at, rules_version, member_version, body FROM journal ORDER BY seq"
        ).fetchall()
    return [wire.RawEntry(*row) for row in rows]


def lane_epoch(lane: Lane) -> str:
    assert lane.db is not None
    with sqlite3.connect(f"file:{lane.db}?mode=ro", uri=True) as conn:
        return str(conn.execute("SELECT journal_epoch FROM lane_state").fetchone()[0])


# --- the tests ------------------------------------------------------------------------------


def test_sales_made_while_the_broker_is_down_arrive_exactly_once(
    tmp_path: Path, broker: Broker, db_url: str, hqs: list[Hq], lanes: list[Lane]
) -> None:
    start_hq(hqs, tmp_path / "hq", broker, db_url)
    lane = start_lane(lanes, tmp_path / "lane", broker)
    reader = HqReader(db_url)
    try:
        with lane.client() as client:
            sell(client, "ONLINE-1")
            wait_drained(lane)
            broker.stop()
            for number in range(12):
                sell(client, f"OFFLINE-{number}", member=number % 3 != 0)
            give_back = client.post(
                "/v1/returns",
                json={
                    "return_id": "R-1",
                    "sale_id": "OFFLINE-1",
                    "member_id": "M000123",
                    "lines": [{"line_id": "2", "qty": "0.100"}],
                },
            )
            assert give_back.status_code == 200, give_back.text
            assert client.post("/v1/sales/OFFLINE-0/void", json={"reason": "test"}).status_code == 200
            status = client.get("/v1/status").json()
            assert status["journal"]["backlog"] == 14  # 12 sales, a return, a void: none acknowledged
            assert status["sync"]["connected"] is False
            assert reader.scalar("SELECT count(*) FROM journal_entries") == 1
            broker.start()
            wait_drained(lane)
        assert_exactly_once(lane, reader)
        # Every honest sale re-prices as the lane reported it.
        wait_for("the audit", lambda: reader.scalar("SELECT count(*) FROM sales WHERE audit_status IS NULL") == 0)
        statuses = reader.rows("SELECT audit_status, count(*) FROM sales GROUP BY audit_status")
        assert [tuple(row) for row in statuses] == [("ok", 13)]
    finally:
        reader.close()


def test_head_office_killed_after_its_commit_and_before_its_ack_applies_nothing_twice(
    tmp_path: Path, broker: Broker, pg_url: str, hqs: list[Hq], lanes: list[Lane]
) -> None:
    crashing = Hq(tmp_path / "hq", broker_port=broker.port, db_url=pg_url, env={"LANE_HQ_CRASH_AFTER_COMMIT": "1"})
    crashing.start()
    hqs.append(crashing)
    lane = start_lane(lanes, tmp_path / "lane", broker)
    reader = HqReader(pg_url)
    try:
        with lane.client() as client:
            for number in range(5):
                sell(client, f"S-{number}")
        assert crashing.wait_exit(30) == 70
        committed = reader.scalar("SELECT count(*) FROM journal_entries")
        acked, last = lane_acked(lane)
        assert committed >= 1  # head office committed a batch...
        assert acked < committed  # ...and the lane never heard of it
        time.sleep(1.5)  # past the lane's resend_after: it resends into the void, then to the new head office
        start_hq(hqs, tmp_path / "hq2", broker, pg_url)
        wait_drained(lane)
        assert_exactly_once(lane, reader)
        assert last == 5
    finally:
        reader.close()


def test_duplicate_and_out_of_order_batches_are_applied_once_and_in_order(
    tmp_path: Path, broker: Broker, db_url: str, hqs: list[Hq], lanes: list[Lane]
) -> None:
    # A lane without sync makes the entries; the test delivers them as a misbehaving network would.
    lane = start_lane(lanes, tmp_path / "lane", None)
    with lane.client() as client:
        for number in range(6):
            sell(client, f"S-{number}", member=number % 2 == 0)
    entries, epoch = raw_entries(lane), lane_epoch(lane)
    batches = [wire.encode_batch(STORE, LANE, epoch, entries[i : i + 2]) for i in (0, 2, 4)]
    hq = start_hq(hqs, tmp_path / "hq", broker, db_url)
    topic = wire.lane_topic("retail", STORE, LANE, "journal")
    order = [1, 2, 0, 0, 1, 2, 2]
    publish(broker, [(topic, batches[index]) for index in order])
    reader = HqReader(db_url)
    try:
        wait_for("all six entries", lambda: reader.scalar("SELECT count(*) FROM journal_entries") == 6)
        ack_topic = wire.lane_topic("retail", STORE, LANE, "ack")
        # The ack follows the commit: wait for the retained one to reach the end.
        wait_for("the ack of seq 6", lambda: _acked_seq(retained(broker, ack_topic), epoch) == 6)
        assert_exactly_once(lane, reader)
        # Applied in seq order: the ledger's own ids grow with the lane's seq.
        ledger = reader.rows(
            "SELECT j.seq FROM points_ledger AS p JOIN journal_entries AS j ON j.id = p.entry_id ORDER BY p.id"
        )
        assert [row[0] for row in ledger] == sorted(row[0] for row in ledger)
        wait_for("duplicates counted", lambda: hq.metric('hq_entries_total{outcome="duplicate"}') >= 6)
    finally:
        reader.close()


def test_two_consumers_on_a_shared_subscription_one_killed_lose_and_double_nothing(
    tmp_path: Path, broker: Broker, pg_url: str, hqs: list[Hq], lanes: list[Lane]
) -> None:
    first = start_hq(hqs, tmp_path / "hq-a", broker, pg_url, client_id="hq-a", share_group="ingest")
    second = start_hq(hqs, tmp_path / "hq-b", broker, pg_url, client_id="hq-b", share_group="ingest")
    lane = start_lane(lanes, tmp_path / "lane", broker, batch_entries=3, in_flight_batches=4)
    reader = HqReader(pg_url)
    stop = threading.Event()
    sold: list[str] = []

    def till() -> None:
        with lane.client() as client:
            number = 0
            while not stop.is_set():
                sell(client, f"T-{number}", member=number % 2 == 0)
                sold.append(f"T-{number}")
                number += 1

    seller = threading.Thread(target=till)
    seller.start()
    try:
        wait_for("both consumers to apply batches", lambda: second.metric('hq_entries_total{outcome="applied"}') > 0)
        assert first.metric('hq_entries_total{outcome="applied"}') > 0
        second.kill()
        time.sleep(1.5)
        stop.set()
        seller.join(30)
        assert len(sold) > 20
        wait_drained(lane, timeout=60)
        assert_exactly_once(lane, reader)
    finally:
        stop.set()
        seller.join(30)
        reader.close()


def test_a_malformed_batch_is_dead_lettered_and_the_stream_continues(
    tmp_path: Path, broker: Broker, db_url: str, hqs: list[Hq], lanes: list[Lane]
) -> None:
    start_hq(hqs, tmp_path / "hq", broker, db_url)
    lane = start_lane(lanes, tmp_path / "lane", broker)
    reader = HqReader(db_url)
    topic = wire.lane_topic("retail", STORE, LANE, "journal")
    try:
        with lane.client() as client:
            sell(client, "BEFORE")
            wait_drained(lane)
            epoch = lane_epoch(lane)
            forged = raw_entries(lane)[0]
            publish(
                broker,
                [
                    (topic, b"\x00 not json"),
                    (topic, json.dumps({"v": 9}).encode()),
                    # Names another lane than its topic: somebody publishing under lane-03's name.
                    (topic, wire.encode_batch(STORE, "lane-04", epoch, [forged])),
                ],
            )
            # Another lane's batch whose middle entry is malformed: dead-lettered, the rest applied.
            other = wire.lane_topic("retail", STORE, "lane-09", "journal")
            entries = [
                wire.RawEntry(seq, str(uuid.uuid4()), "sale", forged.at, "x", 0, forged.body.replace(LANE, "lane-09"))
                for seq in (1, 2, 3)
            ]
            broken = wire.RawEntry(2, entries[1].id, "sale", "yesterday", "x", 0, entries[1].body)
            publish(broker, [(other, wire.encode_batch(STORE, "lane-09", "ab" * 16, [entries[0], broken, entries[2]]))])
            sell(client, "AFTER-1")
            sell(client, "AFTER-2")
            wait_drained(lane)
        wait_for("four dead letters", lambda: reader.scalar("SELECT count(*) FROM dead_letters") == 4)
        codes = sorted(row[0] for row in reader.rows("SELECT code FROM dead_letters"))
        assert codes == ["bad_at", "bad_version", "lane_mismatch", "not_json"]
        assert_exactly_once(lane, reader)
        seqs = reader.rows("SELECT seq FROM journal_entries WHERE lane = 'lane-09' ORDER BY seq")
        assert [row[0] for row in seqs] == [1, 3]
        cursor = reader.scalar("SELECT last_seq FROM lane_cursors WHERE lane = 'lane-09'")
        assert cursor == 3
    finally:
        reader.close()


def test_a_lane_killed_mid_drain_resumes_without_loss_or_duplicates(
    tmp_path: Path, broker: Broker, pg_url: str, hqs: list[Hq], lanes: list[Lane]
) -> None:
    lane = start_lane(lanes, tmp_path / "lane", broker, batch_entries=1, in_flight_batches=1)
    with lane.client() as client:
        for number in range(120):
            sell(client, f"K-{number}", member=number % 2 == 0)
    assert lane_acked(lane) == (0, 120)  # nobody acknowledges yet: head office is not running
    start_hq(hqs, tmp_path / "hq", broker, pg_url)
    wait_for("the drain to start", lambda: lane_acked(lane)[0] >= 10, timeout=30)
    lane.kill()
    acked_at_kill = lane_acked(lane)[0]
    assert acked_at_kill < 120, "the drain finished before the kill: the test proves nothing"
    lane.start()
    wait_drained(lane)
    reader = HqReader(pg_url)
    try:
        assert_exactly_once(lane, reader)
    finally:
        reader.close()


def test_a_tampered_sale_is_caught_by_the_audit(
    tmp_path: Path, broker: Broker, db_url: str, hqs: list[Hq], lanes: list[Lane]
) -> None:
    lane = start_lane(lanes, tmp_path / "lane", None)
    with lane.client() as client:
        sell(client, "HONEST")
        sell(client, "TAMPERED")
    honest, tampered = raw_entries(lane)
    body = json.loads(tampered.body)
    body["result"]["totals"]["points"] += 500  # a lane awarding itself points
    forged = dataclasses.replace(tampered, body=json.dumps(body))
    hq = start_hq(hqs, tmp_path / "hq", broker, db_url)
    topic = wire.lane_topic("retail", STORE, LANE, "journal")
    publish(broker, [(topic, wire.encode_batch(STORE, LANE, lane_epoch(lane), [honest, forged]))])
    reader = HqReader(db_url)
    try:
        wait_for("the audit", lambda: reader.scalar("SELECT count(*) FROM sales WHERE audit_status IS NOT NULL") == 2)
        rows = dict(tuple(row) for row in reader.rows("SELECT sale_id, audit_status FROM sales"))
        assert rows == {"HONEST": "ok", "TAMPERED": "mismatch"}
        detail = json.loads(reader.scalar("SELECT audit_detail FROM sales WHERE sale_id = 'TAMPERED'"))
        assert [d["path"] for d in detail] == ["totals.points"]
        assert hq.metric('hq_audits_total{status="mismatch"}') == 1
    finally:
        reader.close()
