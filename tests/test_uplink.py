"""The lane's uplink against a real Mosquitto: what reaches head office, and what retires a journal entry.

Head office is played by ``FakeHq``, an aiomqtt client that subscribes to the
lane's journal topic, decodes every message with ``wire.decode_batch`` and
publishes acknowledgements (retained, as head office does) when the test says
so.  Most tests run a real ``LaneStore`` and ``Uplink`` in this process; the
ones about the Last Will, the daemon and ``GET /v1/status`` run the real
``lane-agent run`` (``tests/lane_harness.py``) with a ``[sync]`` section.

Every assertion is on what the lane produced: the messages that arrived at
the broker, the lane's own SQLite file, its status, metrics and retained state.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiomqtt
import httpx
import pytest
from broker import Broker
from lane_harness import KEY, TOKEN, Lane, basket

from agent.config import LaneConfig, parse_config
from agent.metrics import Metrics
from agent.store import LaneStore
from sync import wire
from sync.uplink import Uplink

STORE, LANE = "store-0101", "lane-03"
AT = dt.datetime(2026, 12, 10, 14, 5, tzinfo=dt.timezone(dt.timedelta(hours=8)))
JOURNAL = wire.lane_topic("retail", STORE, LANE, "journal")
ACK = wire.lane_topic("retail", STORE, LANE, "ack")
STATE = wire.lane_topic("retail", STORE, LANE, "state")

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    with Broker(tmp_path / "broker") as running:
        yield running


def sync_settings(broker: Broker, **overrides: object) -> dict[str, object]:
    return {
        "enabled": True,
        "port": broker.port,
        "resend_after_seconds": 30.0,
        "state_interval_seconds": 30.0,
        "reconnect_min_seconds": 0.05,
        "reconnect_max_seconds": 0.2,
        **overrides,
    }


def sync_toml(settings: dict[str, object]) -> str:
    return "\n[sync]\n" + "\n".join(f"{key} = {json.dumps(value)}" for key, value in settings.items()) + "\n"


def lane_config(db: Path, broker: Broker, **overrides: object) -> LaneConfig:
    text = f"""
[lane]
store = "{STORE}"
lane = "{LANE}"

[api]
token = "{TOKEN}"

[store]
path = "{db}"
card_hash_key = "hex:{KEY.hex()}"
"""
    return parse_config(text + sync_toml(sync_settings(broker, **overrides)), environ={})


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels or None)
    return 0.0 if value is None else value


async def eventually(what: str, condition: Callable[[], bool | Awaitable[bool]], within: float = 8.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        result = condition()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out after {within} s waiting for {what}")


async def commit(store: LaneStore, sale_id: str, pad: str = "") -> int:
    body = {"kind": "sale", "store": STORE, "lane": LANE, "sale_id": sale_id, "pad": pad}
    await store.commit_sale(sale_id, "digest-" + sale_id, body, {"sale_id": sale_id}, at=AT, rules_version="r1")
    return (await store.status()).last_seq


class FakeHq:
    """Head office as far as the lane can tell: a subscriber to its journal that acks when told to.

    With ``auto_ack`` it acknowledges, after each message, the highest seq up to
    which it holds every entry, as head office commits them.
    """

    def __init__(self, broker: Broker, *, auto_ack: bool = True, identifier: str | None = None) -> None:
        self.broker = broker
        self.auto_ack = auto_ack
        self.payloads: list[bytes] = []
        self.batches: list[wire.Batch] = []
        self.arrived: list[float] = []
        self.committed = 0
        self.client = aiomqtt.Client(
            broker.host,
            broker.port,
            identifier=identifier or f"fake-hq-{uuid.uuid4().hex[:8]}",
            # A named head office keeps its session: what the lane sends while it is away waits for it.
            clean_session=None if identifier is None else False,
        )

    @property
    def seqs(self) -> list[int]:
        return [entry.seq for batch in self.batches for entry in batch.entries]

    async def consume(self) -> None:
        async for message in self.client.messages:
            payload = message.payload
            assert isinstance(payload, bytes)
            batch = wire.decode_batch(STORE, LANE, payload)
            assert not batch.rejects, batch.rejects
            self.payloads.append(payload)
            self.batches.append(batch)
            self.arrived.append(time.monotonic())
            for entry in batch.entries:
                if entry.seq == self.committed + 1:
                    self.committed = entry.seq
            if self.auto_ack:
                await self.ack(batch.epoch, self.committed)

    async def ack(self, epoch: str, seq: int) -> None:
        await self.publish_ack(wire.encode_ack(STORE, LANE, epoch, seq))

    async def publish_ack(self, payload: bytes) -> None:
        await self.client.publish(ACK, payload, qos=1, retain=True)


@asynccontextmanager
async def fake_hq(broker: Broker, *, auto_ack: bool = True, identifier: str | None = None) -> AsyncIterator[FakeHq]:
    hq = FakeHq(broker, auto_ack=auto_ack, identifier=identifier)
    async with hq.client:
        await hq.client.subscribe(JOURNAL, qos=1)
        task = asyncio.create_task(hq.consume())
        try:
            yield hq
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


@asynccontextmanager
async def running(uplink: Uplink, *, wait_connected: bool = True) -> AsyncIterator[Uplink]:
    task = asyncio.create_task(uplink.run(), name="sync-uplink")
    try:
        if wait_connected:
            await eventually("the uplink to connect", lambda: uplink.connected)
        yield uplink
    finally:
        uplink.stop()
        await asyncio.wait_for(task, 10)


@asynccontextmanager
async def lane_store(tmp_path: Path) -> AsyncIterator[LaneStore]:
    async with await LaneStore.open(tmp_path / "lane.db", KEY) as store:
        yield store


def raw_entries(db: Path) -> list[wire.RawEntry]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        rows = conn.execute("SELECT seq, id, kind, at, rules_version, member_version, body FROM journal ORDER BY seq")
        return [wire.RawEntry(*row) for row in rows]


def journal_rows(db: Path) -> list[tuple[int, str, str]]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return conn.execute("SELECT seq, id, body FROM journal ORDER BY seq").fetchall()


# --- in-process: LaneStore + Uplink ---------------------------------------------------------------


def test_batches_arrive_in_seq_order_and_hold_the_committed_entries(tmp_path: Path, broker: Broker) -> None:
    config = lane_config(tmp_path / "lane.db", broker, batch_entries=3)

    async def main() -> None:
        async with lane_store(tmp_path) as store, fake_hq(broker) as hq:
            for number in range(7):
                await commit(store, f"S{number}", pad="收银台" * number)
            metrics = Metrics()
            async with running(Uplink(config, store, metrics)):
                await eventually("the backlog to be sent and acked", lambda: hq.seqs == list(range(1, 8)))
                assert [[e.seq for e in b.entries] for b in hq.batches] == [[1, 2, 3], [4, 5, 6], [7]]
                epoch = (await store.status()).journal_epoch
                assert {batch.epoch for batch in hq.batches} == {epoch}
                await eventually("acked 7", lambda: _acked(store, 7))
                # A new sale wakes the uplink at once, not at the next one-second poll.
                committed = time.monotonic()
                await commit(store, "NEW")
                await eventually("the new entry", lambda: hq.seqs[-1:] == [8], within=0.6)
                assert hq.arrived[-1] - committed < 0.6
                await eventually("acked 8", lambda: _acked(store, 8))
                assert sample(metrics, "lane_sync_batches_sent_total") == 4
                assert sample(metrics, "lane_sync_entries_sent_total") == 8
                assert sample(metrics, "lane_sync_connected") == 1
                assert sample(metrics, "lane_sync_resends_total") == 0
                assert uplink_lag(metrics) > 0

    asyncio.run(main())
    assert len(journal_rows(tmp_path / "lane.db")) == 8


def uplink_lag(metrics: Metrics) -> float:
    return sample(metrics, "lane_sync_lag_seconds")


async def _acked(store: LaneStore, seq: int) -> bool:
    return (await store.status()).acked_seq == seq


def test_what_arrives_is_the_store_s_rows_byte_for_byte(tmp_path: Path, broker: Broker) -> None:
    db = tmp_path / "lane.db"
    config = lane_config(db, broker)
    received: list[wire.Batch] = []

    async def main() -> None:
        async with lane_store(tmp_path) as store, fake_hq(broker) as hq:
            for number in range(3):
                await commit(store, f"S{number}", pad="会员" * 5)
            async with running(Uplink(config, store)):
                await eventually("three entries", lambda: len(hq.seqs) == 3)
            received.extend(hq.batches)

    asyncio.run(main())
    entries = [entry for batch in received for entry in batch.entries]
    assert [(e.seq, e.id, e.body) for e in entries] == [
        (seq, ident, json.loads(body)) for seq, ident, body in journal_rows(db)
    ]


def test_batches_are_cut_before_batch_bytes_and_a_big_entry_goes_alone(tmp_path: Path, broker: Broker) -> None:
    config = lane_config(tmp_path / "lane.db", broker, batch_bytes=4096)

    async def main() -> FakeHq:
        async with lane_store(tmp_path) as store, fake_hq(broker) as hq:
            for number in range(6):
                await commit(store, f"S{number}", pad="x" * 1200)
            await commit(store, "BIG", pad="y" * 6000)
            await commit(store, "AFTER", pad="z" * 10)
            async with running(Uplink(config, store)):
                await eventually("eight entries", lambda: len(hq.seqs) == 8)
            return hq

    hq = asyncio.run(main())
    assert hq.seqs == list(range(1, 9))
    raw = raw_entries(tmp_path / "lane.db")
    epoch = hq.batches[0].epoch
    groups = [[entry.seq for entry in batch.entries] for batch in hq.batches]
    assert [7] in groups  # the 6 KB entry, alone
    assert max(len(group) for group in groups) >= 2  # small entries share a message
    for index, (payload, group) in enumerate(zip(hq.payloads, groups, strict=True)):
        assert payload == wire.encode_batch(STORE, LANE, epoch, [raw[seq - 1] for seq in group])
        if group == [7]:
            continue
        assert len(payload) <= 4096, group
        if index + 1 < len(groups):  # cut where the next entry would have crossed the limit, not earlier
            bigger = wire.encode_batch(STORE, LANE, epoch, [raw[seq - 1] for seq in [*group, groups[index + 1][0]]])
            assert len(bigger) > 4096, group


def test_a_puback_retires_nothing_and_in_flight_is_bounded(tmp_path: Path, broker: Broker) -> None:
    config = lane_config(tmp_path / "lane.db", broker, batch_entries=1, in_flight_batches=2)

    async def main() -> None:
        async with lane_store(tmp_path) as store, fake_hq(broker, auto_ack=False) as hq:
            for number in range(5):
                await commit(store, f"S{number}")
            before = await store.backlog_stats()
            async with running(Uplink(config, store)) as uplink:
                await eventually("two batches", lambda: len(hq.batches) == 2)
                await asyncio.sleep(1.5)  # past the one-second poll: still no room in flight
                assert hq.seqs == [1, 2]
                assert uplink.status()["in_flight_batches"] == 2
                # The broker acknowledged both publishes; head office did not: nothing is retired.
                assert (await store.status()).acked_seq == 0
                assert await store.backlog_stats() == before
                await hq.ack(hq.batches[0].epoch, 1)
                await eventually("the next batch once one is acked", lambda: hq.seqs == [1, 2, 3])
                assert (await store.status()).acked_seq == 1

    asyncio.run(main())


def test_sales_made_while_the_broker_is_down_are_sent_when_it_starts(tmp_path: Path, broker: Broker) -> None:
    config = lane_config(tmp_path / "lane.db", broker, batch_entries=4)

    async def main() -> None:
        async with fake_hq(broker, identifier="hq-1"):
            pass  # head office's subscription, kept by the broker while it is away
        await asyncio.to_thread(broker.stop)
        async with lane_store(tmp_path) as store:
            uplink = Uplink(config, store)
            async with running(uplink, wait_connected=False):
                for number in range(10):
                    await commit(store, f"OFFLINE-{number}")
                await asyncio.sleep(0.5)  # a few refused connection attempts; the sales were committed anyway
                assert uplink.connected is False
                assert uplink.status()["session"] is None
                assert (await store.status()).backlog == 10
                await asyncio.to_thread(broker.start)
                async with fake_hq(broker, identifier="hq-1") as hq:
                    await eventually("all ten entries", lambda: hq.seqs == list(range(1, 11)))
                    await eventually("acked 10", lambda: _acked(store, 10))
                    assert uplink.connected
                    assert [len(batch.entries) for batch in hq.batches] == [4, 4, 2]

    asyncio.run(main())


def test_a_broker_restart_resends_from_the_last_ack(tmp_path: Path, broker: Broker) -> None:
    config = lane_config(tmp_path / "lane.db", broker, batch_entries=1)

    async def main() -> None:
        async with lane_store(tmp_path) as store:
            uplink = Uplink(config, store)
            async with running(uplink):
                async with fake_hq(broker, identifier="hq-1") as hq:
                    await commit(store, "A")
                    await commit(store, "B")
                    await eventually("acked 2", lambda: _acked(store, 2))
                first_session = uplink.session
                await asyncio.to_thread(broker.stop)
                await eventually("the disconnect", lambda: not uplink.connected)
                await commit(store, "C")
                await asyncio.to_thread(broker.start)
                async with fake_hq(broker, auto_ack=False, identifier="hq-1") as hq:
                    await eventually("the reconnect", lambda: uplink.connected)
                    await eventually("seq 3 after the restart", lambda: hq.seqs == [3])
                    await asyncio.sleep(0.3)
                    assert hq.seqs == [3]  # 1 and 2 were acknowledged before: not sent again
                    assert first_session is not None
                    assert uplink.session == first_session + 1

    asyncio.run(main())


def test_stalled_acks_resend_from_the_last_ack(tmp_path: Path, broker: Broker) -> None:
    config = lane_config(tmp_path / "lane.db", broker, batch_entries=2, resend_after_seconds=1.0)

    async def main() -> None:
        async with lane_store(tmp_path) as store, fake_hq(broker, auto_ack=False) as hq:
            for number in range(6):
                await commit(store, f"S{number}")
            metrics = Metrics()
            async with running(Uplink(config, store, metrics)):
                await eventually("the first round", lambda: hq.seqs[:6] == [1, 2, 3, 4, 5, 6])
                await hq.ack(hq.batches[0].epoch, 2)  # head office committed the first batch only
                await eventually("acked 2", lambda: _acked(store, 2))
                sent = len(hq.seqs)
                await eventually("a resend", lambda: len(hq.seqs) > sent, within=3.0)
                # Sent again from the last ack (3), not from 1 nor from where sending had got to, and one
                # batch only until head office acks again.
                await asyncio.sleep(0.3)
                assert hq.seqs[sent:] == [3, 4]
                assert sample(metrics, "lane_sync_resends_total") == 1
                await hq.ack(hq.batches[0].epoch, 4)
                await eventually("the rest after the ack", lambda: hq.seqs[sent:] == [3, 4, 5, 6])
                await hq.ack(hq.batches[0].epoch, 6)
                await eventually("acked 6", lambda: _acked(store, 6))

    asyncio.run(main())


def test_wrong_malformed_and_impossible_acks_are_ignored_and_counted(tmp_path: Path, broker: Broker) -> None:
    config = lane_config(tmp_path / "lane.db", broker)

    async def main() -> None:
        async with lane_store(tmp_path) as store, fake_hq(broker, auto_ack=False) as hq:
            for number in range(4):
                await commit(store, f"S{number}")
            epoch = (await store.status()).journal_epoch
            metrics = Metrics()
            async with running(Uplink(config, store, metrics)):
                await eventually("four entries", lambda: len(hq.seqs) == 4)
                await hq.ack("0" * 32, 4)  # another database's journal
                await hq.publish_ack(b"\x00 not json")
                await hq.publish_ack(
                    json.dumps({"v": 1, "store": STORE, "lane": "lane-04", "epoch": epoch, "seq": 4}).encode()
                )
                await hq.ack(epoch, 99)  # beyond the last entry
                await eventually(
                    "four rejections",
                    lambda: (
                        sum(
                            sample(metrics, "lane_sync_acks_rejected_total", reason=reason)
                            for reason in ("wrong_epoch", "malformed", "beyond_last")
                        )
                        == 4
                    ),
                )
                assert sample(metrics, "lane_sync_acks_rejected_total", reason="wrong_epoch") == 1
                assert sample(metrics, "lane_sync_acks_rejected_total", reason="malformed") == 2
                assert sample(metrics, "lane_sync_acks_rejected_total", reason="beyond_last") == 1
                assert (await store.status()).acked_seq == 0
                # A good ack still works; a later, lower one moves nothing back and resends nothing.
                await hq.ack(epoch, 3)
                await eventually("acked 3", lambda: _acked(store, 3))
                await hq.ack(epoch, 1)
                await asyncio.sleep(0.3)
                assert (await store.status()).acked_seq == 3
                assert hq.seqs == [1, 2, 3, 4]
                assert sample(metrics, "lane_sync_acks_total") == 1

    asyncio.run(main())


# --- the real daemon: Last Will, sessions, status -----------------------------------------------------


def read_retained(broker: Broker, topic: str, timeout: float = 5.0) -> wire.LaneState | None:
    async def main() -> wire.LaneState | None:
        async with aiomqtt.Client(broker.host, broker.port, identifier=f"reader-{uuid.uuid4().hex[:8]}") as client:
            await client.subscribe(topic, qos=1)
            try:
                async with asyncio.timeout(timeout):
                    async for message in client.messages:
                        assert isinstance(message.payload, bytes)
                        return wire.decode_state(STORE, LANE, message.payload)
            except TimeoutError:
                return None
        return None

    return asyncio.run(main())


def wait_state(broker: Broker, predicate: Callable[[wire.LaneState], bool], timeout: float = 8.0) -> wire.LaneState:
    deadline = time.monotonic() + timeout
    state = None
    while time.monotonic() < deadline:
        state = read_retained(broker, STATE, timeout=1.0)
        if state is not None and predicate(state):
            return state
        time.sleep(0.05)
    raise AssertionError(f"no such retained state within {timeout} s; last {state}")


def sell(client: httpx.Client, sale_id: str) -> None:
    doc = basket(sale_id=sale_id, member_id="M000123")
    priced = client.post("/v1/price", json={k: v for k, v in doc.items() if k != "sale_id"})
    assert priced.status_code == 200, priced.text
    doc["tenders"] = [{"kind": "cash", "amount": priced.json()["totals"]["net"]}]
    answer = client.post("/v1/sales", json=doc)
    assert answer.status_code == 200, answer.text


@pytest.fixture
def lanes() -> Iterator[list[Lane]]:
    started: list[Lane] = []
    yield started
    for lane in started:
        lane.kill()


def start_lane(lanes: list[Lane], tmp_path: Path, broker: Broker, **overrides: object) -> Lane:
    lane = Lane(tmp_path / "lane", extra_config=sync_toml(sync_settings(broker, **overrides)))
    lane.import_members()
    lane.start()
    lanes.append(lane)
    return lane


def test_online_state_last_will_after_sigkill_and_a_higher_session_after_restart(
    tmp_path: Path, broker: Broker, lanes: list[Lane]
) -> None:
    lane = start_lane(lanes, tmp_path, broker, state_interval_seconds=1.0)
    online = wait_state(broker, lambda s: s.state == "online")
    first = online.session
    assert first >= 1
    assert {"backlog", "last_seq", "acked_seq", "rules_version", "member_version", "at"} <= set(online.info)
    assert online.info["member_version"] == 7  # the members the harness imported
    with lane.client() as client:
        sell(client, "S1")
    # Republished with fresh figures within one state interval.
    fresh = wait_state(broker, lambda s: s.state == "online" and s.info["last_seq"] == 1)
    assert (fresh.session, fresh.info["backlog"]) == (first, 1)
    lane.kill()  # SIGKILL: no offline message of its own; the broker publishes the Last Will
    will = wait_state(broker, lambda s: s.state == "offline")
    assert will.session == first
    lane.start()
    again = wait_state(broker, lambda s: s.state == "online")
    assert again.session > first
    # SIGTERM: the lane says offline itself, for its current session, and exits cleanly.
    assert lane.stop() == 0
    said = wait_state(broker, lambda s: s.state == "offline")
    assert said.session == again.session
    assert "uplink stopped" in lane.log()


def test_status_and_metrics_show_the_backlog_sync_figures_and_warnings(
    tmp_path: Path, broker: Broker, lanes: list[Lane]
) -> None:
    lane = start_lane(lanes, tmp_path, broker, backlog_warn_entries=3)
    with lane.client() as client:
        sync = client.get("/v1/status").json()["sync"]
        assert (sync["enabled"], sync["broker"], sync["backlog"], sync["warnings"]) == (
            True,
            f"127.0.0.1:{broker.port}",
            0,
            [],
        )
        for number in range(3):
            sell(client, f"S{number}")
        sync = client.get("/v1/status").json()["sync"]
        assert sync["connected"] is True
        assert (sync["backlog"], sync["acked_seq"], sync["last_seq"]) == (3, 0, 3)
        assert lane.db is not None
        with sqlite3.connect(f"file:{lane.db}?mode=ro", uri=True) as conn:
            size = conn.execute("SELECT SUM(LENGTH(CAST(body AS BLOB))) FROM journal").fetchone()[0]
        assert sync["backlog_bytes"] == size
        assert sync["oldest_unacked_age_seconds"] is not None
        assert sync["oldest_unacked_age_seconds"] >= 0
        assert sync["last_ack_at"] is None
        assert sync["sync_lag_seconds"] is None
        assert [warning["code"] for warning in sync["warnings"]] == ["backlog_entries"]

        epoch = client.get("/v1/status").json()["journal"]["epoch"]

        async def acknowledge() -> None:
            async with aiomqtt.Client(broker.host, broker.port, identifier="hq-status") as hq:
                await hq.publish(ACK, wire.encode_ack(STORE, LANE, epoch, 3), qos=1, retain=True)

        asyncio.run(acknowledge())
        deadline = time.monotonic() + 8
        while client.get("/v1/status").json()["sync"]["backlog"] and time.monotonic() < deadline:
            time.sleep(0.05)
        sync = client.get("/v1/status").json()["sync"]
        assert (sync["backlog"], sync["backlog_bytes"], sync["acked_seq"], sync["warnings"]) == (0, 0, 3, [])
        assert sync["oldest_unacked_age_seconds"] is None
        assert dt.datetime.fromisoformat(sync["last_ack_at"]).tzinfo is not None
        assert sync["sync_lag_seconds"] >= 0
        metrics = client.get("/metrics").text
        assert "lane_sync_connected 1.0" in metrics
        assert "lane_sync_batches_sent_total" in metrics
        assert "lane_sync_acks_total 1.0" in metrics
    # The warning was logged once when the backlog reached it, and its end once.
    log = lane.log()
    assert log.count("reached sync.backlog_warn_entries") == 1
    assert log.count("backlog back below its warning level") == 1
    assert lane.stop() == 0


def test_a_lane_without_sync_reports_it_disabled(tmp_path: Path, lanes: list[Lane]) -> None:
    lane = Lane(tmp_path / "lane")
    lane.import_members()
    lane.start()
    lanes.append(lane)
    with lane.client() as client:
        sell(client, "S1")
        sync: dict[str, Any] = client.get("/v1/status").json()["sync"]
    assert (sync["enabled"], sync["connected"], sync["backlog"], sync["last_seq"]) == (False, False, 1, 1)
    assert "uplink to" not in lane.log()
    assert lane.stop() == 0
