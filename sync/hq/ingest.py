"""Head office's journal ingest: lanes' batches in over MQTT, one database transaction each, then the ack.

For every message on ``{root}/{store}/{lane}/journal`` (a shared subscription
when ``broker.share_group`` is set, so consumers scale out):

1. decode and validate it (``sync.wire.decode_batch``): a message that cannot
   be taken at all is dead-lettered whole and not acknowledged;
2. apply it on the database's owner thread (``HqDatabase.apply_batch``): in
   one transaction, each entry exactly once (its global id is unique in the
   database), in the lane's seq order, invalid entries dead-lettered without
   blocking the stream;
3. only after that commit, publish the lane's acknowledgement (retained,
   QoS1): the highest seq durably committed.

A batch that starts past the lane's next seq (another consumer of the shared
subscription holds the one before it, or the broker dropped one) is retried
for a moment, then answered with the current position: the lane resends from
there.  Killed between its commit and its ack, head office loses nothing:
the lane resends, the entries are duplicates, and the ack follows.  At every
(re)connection head office re-publishes the acks of every lane it knows.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections import defaultdict
from collections.abc import Callable

import aiomqtt
from sqlalchemy.exc import SQLAlchemyError

from sync import wire
from sync.hq.config import BrokerSection
from sync.hq.db import Applied
from sync.hq.metrics import HqMetrics
from sync.hq.owner import DbOwner

log = logging.getLogger(__name__)

# Waits before a batch with a gap is answered with the lane's current position (~1.5 s in all).
GAP_RETRIES = (0.02, 0.05, 0.1, 0.2, 0.4, 0.7)
# Fault injection for the tests (docs/protocol.md): exit abruptly after the Nth committed batch, before its ack.
CRASH_AFTER_COMMIT_ENV = "LANE_HQ_CRASH_AFTER_COMMIT"
# Messages handled at once (each waits its turn per lane); bounds memory when a backlog floods in.
CONCURRENT_MESSAGES = 32


def broker_client(
    broker: BrokerSection, password: str | None, *, identifier: str, clean_session: bool
) -> aiomqtt.Client:
    """An MQTT client for head office's broker: its address, credentials and TLS (ingest's and the downlink's)."""
    b = broker
    tls = None
    # Any tls_* key turns TLS on, as on the lane (without a CA file: the system's trust store).
    if any(path is not None for path in (b.tls_ca_file, b.tls_cert_file, b.tls_key_file)):
        tls = aiomqtt.TLSParameters(
            ca_certs=None if b.tls_ca_file is None else str(b.tls_ca_file),
            certfile=None if b.tls_cert_file is None else str(b.tls_cert_file),
            keyfile=None if b.tls_key_file is None else str(b.tls_key_file),
        )
    return aiomqtt.Client(
        b.host,
        b.port,
        identifier=identifier,
        username=b.username,
        password=password,
        clean_session=clean_session,
        keepalive=b.keepalive_seconds,
        timeout=b.connect_timeout_seconds,
        tls_params=tls,
        max_queued_incoming_messages=10_000,
    )


class Ingest:
    """The MQTT side of head office: subscribe, apply, acknowledge; reconnects for ever."""

    def __init__(
        self,
        broker: BrokerSection,
        owner: DbOwner,
        metrics: HqMetrics,
        *,
        password: str | None = None,
        on_applied: Callable[[Applied], None] | None = None,
    ) -> None:
        self.broker = broker
        self.owner = owner
        self.metrics = metrics
        self._password = password
        self._on_applied = on_applied
        self._lane_locks: defaultdict[tuple[str, str], asyncio.Lock] = defaultdict(asyncio.Lock)
        self._slots = asyncio.Semaphore(CONCURRENT_MESSAGES)
        self.connected = asyncio.Event()
        crash = os.environ.get(CRASH_AFTER_COMMIT_ENV, "")
        self._crash_after = int(crash) if crash.isdigit() else None
        self._commits = 0

    def _client(self) -> aiomqtt.Client:
        client = broker_client(
            self.broker,
            self._password,
            identifier=self.broker.client_id,
            # Alone, a persistent session: what lanes sent while head office was away waits at the broker.
            # Sharing a subscription, a clean one: a dead consumer's persistent session would stay in the
            # group and keep receiving its share of the batches, to be delivered only if it ever returns.
            clean_session=self.broker.share_group is not None,
        )
        client.pending_calls_threshold = 1000
        return client

    async def run(self) -> None:
        """Connect, consume, and reconnect with capped, jittered backoff, until cancelled."""
        delay = 0.5
        while True:
            try:
                async with self._client() as client:
                    delay = 0.5
                    await self._consume(client)
            except (aiomqtt.MqttError, SQLAlchemyError) as exc:
                # A database failure while connecting (the acks re-published at start) is retried like the broker's.
                self.connected.clear()
                self.metrics.connected.set(0)
                wait = random.uniform(0, delay)  # noqa: S311 - jitter, not secrecy
                where = (
                    "database" if isinstance(exc, SQLAlchemyError) else f"broker {self.broker.host}:{self.broker.port}"
                )
                log.warning("%s: %s; reconnecting in %.1f s", where, exc, wait)
                await asyncio.sleep(wait)
                delay = min(delay * 2, self.broker.reconnect_max_seconds)

    async def _consume(self, client: aiomqtt.Client) -> None:
        root = self.broker.topic_root
        timeout = self.broker.connect_timeout_seconds
        await client.subscribe(wire.journal_filter(root, self.broker.share_group), qos=1, timeout=timeout)
        await client.subscribe(wire.state_filter(root), qos=1, timeout=timeout)
        cursors, member_version = await self.owner.call(lambda db: (db.cursors(), db.members.head_version()))
        for store, lane, epoch, seq in cursors:
            await self._ack(client, store, lane, epoch, seq, member_version)
        log.info("consuming %s (%d lanes known)", wire.journal_filter(root, self.broker.share_group), len(cursors))
        self.metrics.connected.set(1)
        self.connected.set()
        lost: aiomqtt.MqttError | None = None
        async with asyncio.TaskGroup() as group:
            try:
                async for message in client.messages:
                    await self._slots.acquire()
                    group.create_task(self._handle(client, message))
            except aiomqtt.MqttError as exc:
                lost = exc  # raised after the messages in hand are done (their acks fail; the lanes resend)
        if lost is not None:
            raise lost

    async def _handle(self, client: aiomqtt.Client, message: aiomqtt.Message) -> None:
        """One message; never raises, so that one failure cannot stop the consumer.

        The broker already counts the message delivered: whatever fails here
        (the database restarting, the connection dropping before the ack) is
        mended by the lane, which resends what head office has not acknowledged.
        """
        try:
            await self._dispatch(client, message)
        except aiomqtt.MqttError as exc:
            log.warning("could not acknowledge on %s: %s (the lane resends)", message.topic.value, exc)
        except Exception:
            self.metrics.batches.labels("failed").inc()
            log.exception("handling a message on %s failed (the lane resends)", message.topic.value)
        finally:
            self._slots.release()

    async def _dispatch(self, client: aiomqtt.Client, message: aiomqtt.Message) -> None:
        topic = message.topic.value
        payload = message.payload if isinstance(message.payload, bytes) else str(message.payload).encode()
        parsed = wire.parse_lane_topic(self.broker.topic_root, topic)
        if parsed is None:
            await self._dead_message(topic, None, None, "bad_topic", "not a lane topic", payload)
        elif parsed[2] == "journal":
            await self._journal(client, topic, parsed[0], parsed[1], payload)
        elif parsed[2] == "state":
            await self._state(parsed[0], parsed[1], payload)

    async def _journal(self, client: aiomqtt.Client, topic: str, store: str, lane: str, payload: bytes) -> None:
        started = time.perf_counter()
        try:
            batch = wire.decode_batch(store, lane, payload)
        except wire.WireError as exc:
            await self._dead_message(topic, store, lane, exc.code, exc.message, payload)
            return
        for attempt in (*GAP_RETRIES, None):
            async with self._lane_locks[store, lane]:
                applied = await self.owner.call(lambda db: db.apply_batch(batch, topic))
            if not applied.gap or attempt is None:
                break
            # The batch before this one may be in another consumer's hands right now.
            await asyncio.sleep(attempt)
        self.metrics.batch_seconds.observe(time.perf_counter() - started)
        self.metrics.entries.labels("applied").inc(applied.applied)
        self.metrics.entries.labels("duplicate").inc(applied.duplicates)
        self.metrics.entries.labels("dead_letter").inc(applied.dead)
        for code in applied.spend_flags:
            self.metrics.spend_flags.labels(code).inc()
        if applied.gap:
            self.metrics.gaps.inc()
            self.metrics.batches.labels("gap").inc()
            log.info("%s/%s: batch past seq %d held back; lane resends from there", store, lane, applied.acked_seq)
        else:
            self.metrics.batches.labels("applied" if applied.applied else "duplicate").inc()
        self.metrics.unknown_members.inc(applied.unknown_members)
        if applied.dead:
            log.warning("%s/%s: %d entries dead-lettered (see lane-hq dead-letters)", store, lane, applied.dead)
        if self._on_applied is not None and applied.applied:
            self._on_applied(applied)
        if applied.applied:
            self._commits += 1
            if self._crash_after is not None and self._commits >= self._crash_after:
                log.error("%s=%d: exiting after the commit, before the ack", CRASH_AFTER_COMMIT_ENV, self._crash_after)
                os._exit(70)
        await self._ack(client, store, lane, applied.epoch, applied.acked_seq, applied.member_version)

    async def _ack(
        self, client: aiomqtt.Client, store: str, lane: str, epoch: str, seq: int, member_version: int
    ) -> None:
        topic = wire.lane_topic(self.broker.topic_root, store, lane, "ack")
        payload = wire.encode_ack(store, lane, epoch, seq, member_version=member_version)
        await client.publish(topic, payload, qos=1, retain=True, timeout=self.broker.connect_timeout_seconds)
        self.metrics.acks.inc()

    async def _state(self, store: str, lane: str, payload: bytes) -> None:
        if not payload:  # a retained state being cleared
            return
        try:
            state = wire.decode_state(store, lane, payload)
        except wire.WireError as exc:
            self.metrics.states.labels("invalid").inc()
            log.warning("%s/%s: invalid state message (%s): %s", store, lane, exc.code, exc.message)
            return
        taken = await self.owner.call(
            lambda db: db.record_state(store, lane, state.session, state.state, dict(state.info))
        )
        self.metrics.states.labels("taken" if taken else "stale").inc()

    async def _dead_message(
        self, topic: str, store: str | None, lane: str | None, code: str, message: str, payload: bytes
    ) -> None:
        self.metrics.rejected.labels(code).inc()
        self.metrics.batches.labels("rejected").inc()
        log.error("dead-lettered a message on %s: %s (%s)", topic, message[:200], code)
        await self.owner.call(lambda db: db.dead_letter_message(topic, store, lane, code, message, payload))
