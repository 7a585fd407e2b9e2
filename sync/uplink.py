"""The lane's uplink: its journal to head office over MQTT, exactly once with head office's help.

One ``Uplink`` runs as the daemon's ``sync-uplink`` task.  It owns its broker
connection and reconnect loop (capped exponential backoff, full jitter); a
dead broker costs the till nothing but a growing backlog, and the uplink's
store calls are each one short statement or transaction.

The exactly-once contract, lane side (docs/protocol.md):

- Entries go out in seq order on ``{root}/{store}/{lane}/journal``, QoS1, many
  per message when there is a backlog, at most ``in_flight_batches`` messages
  sent and not yet acknowledged by head office.
- A PUBACK proves nothing (a broker acknowledges publishes its ACL dropped, and
  drops messages for a slow subscriber).  Only head office's own ack on
  ``{root}/{store}/{lane}/ack`` (retained) moves the store's ``acked_seq``;
  with the member sync running, only once the member cache has reached the
  ack's ``member_version`` (``_hold_back``).
- After every (re)connection, and whenever acks stall for
  ``resend_after_seconds`` with batches in flight, sending starts again after
  the last ack; head office skips what it already has by seq and id.

The retained ``{root}/{store}/{lane}/state`` says ``online`` with figures,
republished every ``state_interval_seconds``, or ``offline``: the Last Will,
or published by the lane itself on a clean stop.  Each connection has its own
session number, persisted in the store, so head office can tell an older
connection's late will from the current state.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import aiomqtt

from agent.config import LaneConfig
from agent.errors import AckError, StoreError
from agent.metrics import Metrics
from agent.store import LaneStore
from sync import wire

log = logging.getLogger(__name__)

POLL_SECONDS = 1.0  # the fallback when a commit's wake-up is missed (a cancelled commit that committed)
STABLE_SECONDS = 10.0  # a connection that lasted this long resets the reconnect backoff
STOP_SECONDS = 5.0  # longest a clean stop spends publishing the offline state


@dataclass(frozen=True, slots=True)
class _Sent:
    first: int
    last: int
    at: float  # monotonic


class Uplink:
    """Drain the lane's journal to head office; ``run()`` until ``stop()``."""

    def __init__(
        self,
        config: LaneConfig,
        store: LaneStore,
        metrics: Metrics | None = None,
        *,
        rules_version: Callable[[], str] = lambda: "",
        rng: random.Random | None = None,
        downlink: Mapping[wire.HqLeaf, Callable[[bytes], Awaitable[None]]] | None = None,
        member_version: Callable[[], int] | None = None,
    ) -> None:
        self.config = config.sync
        self.store = store
        self.metrics = metrics or Metrics()
        self.store_id, self.lane_id = config.lane.store, config.lane.lane
        self.client_id = self.config.client_identifier(config.lane)
        root = self.config.topic_root
        self.journal_topic = wire.lane_topic(root, self.store_id, self.lane_id, "journal")
        self.ack_topic = wire.lane_topic(root, self.store_id, self.lane_id, "ack")
        self.state_topic = wire.lane_topic(root, self.store_id, self.lane_id, "state")
        # Head office's retained notices ({root}/hq/members, hotlist, rules) ride on this
        # connection: one session, one ACL identity per lane.  Each handler gets the raw payload.
        self._downlink = {wire.hq_topic(root, leaf): handler for leaf, handler in (downlink or {}).items()}
        # With the member sync running: the member-table version the cache has fully caught up with, and
        # the newest ack held back until it reaches the ack's member_version (see _hold_back).
        self._member_version = member_version
        self._held: wire.Ack | None = None
        host = self.config.host
        self.broker = f"[{host}]:{self.config.port}" if ":" in host else f"{host}:{self.config.port}"
        self._rules_version = rules_version
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not secrecy
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()
        self._epoch = ""
        self._reserved_session: int | None = None
        self.session: int | None = None
        self.connected = False
        # Per connection: what is sent and not acknowledged, and where sending goes on.
        self._acked = 0
        self._next = 1
        self._in_flight: deque[_Sent] = deque()
        self._window = self.config.in_flight_batches
        self._progress = 0.0  # monotonic time of the last ack that moved acked_seq (or of the connection)
        self._last_ack_at: dt.datetime | None = None
        self._last_ack_monotonic: float | None = None
        self._lag: float | None = None

    # --- what the status and the metrics show -------------------------------------------

    def status(self) -> dict[str, Any]:
        """The uplink's own figures for ``GET /v1/status`` (the backlog comes from the store)."""
        age = None if self._last_ack_monotonic is None else time.monotonic() - self._last_ack_monotonic
        return {
            "connected": self.connected,
            "session": self.session,
            "last_ack_at": None if self._last_ack_at is None else self._last_ack_at.isoformat(),
            "last_ack_age_seconds": None if age is None else round(age, 3),
            "sync_lag_seconds": None if self._lag is None else round(self._lag, 3),
            "in_flight_batches": len(self._in_flight),
        }

    def stop(self) -> None:
        """Ask ``run()`` to publish the offline state, disconnect and return."""
        self._stop.set()

    # --- the reconnect loop ---------------------------------------------------------------

    async def run(self) -> None:
        """Connect, drain, reconnect with backoff, until ``stop()`` (or cancellation)."""
        attempt = 0
        log.info("uplink to %s as %s: %s", self.broker, self.client_id, self.journal_topic)
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                await self._connection()
            except aiomqtt.MqttError as exc:
                log.warning("broker %s: %s", self.broker, exc)
            except StoreError as exc:
                log.warning("uplink: the store failed: %s", exc)
            except Exception:  # a bug: logged, and the till sells on; the uplink retries after backoff
                log.exception("uplink failed")
            self._set_connected(connected=False)
            if self._stop.is_set():
                break
            attempt = 0 if self.session is not None and time.monotonic() - started >= STABLE_SECONDS else attempt
            ceiling = min(self.config.reconnect_max_seconds, self.config.reconnect_min_seconds * 2**attempt)
            attempt = min(attempt + 1, 64)
            delay = self._rng.uniform(0, ceiling)  # full jitter: a store's lanes do not reconnect in step
            log.info("reconnecting to %s in %.1f s", self.broker, delay)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._stop.wait()
        log.info("uplink stopped")

    def _client(self, session: int) -> aiomqtt.Client:
        cfg = self.config
        tls = None
        if cfg.tls:
            tls = aiomqtt.TLSParameters(
                ca_certs=None if cfg.tls_ca_file is None else str(cfg.tls_ca_file),
                certfile=None if cfg.tls_cert_file is None else str(cfg.tls_cert_file),
                keyfile=None if cfg.tls_key_file is None else str(cfg.tls_key_file),
            )
        offline = wire.encode_state(self.store_id, self.lane_id, "offline", session)
        client = aiomqtt.Client(
            cfg.host,
            cfg.port,
            identifier=self.client_id,
            username=cfg.username,
            password=None if cfg.password is None else cfg.password.reveal(),
            will=aiomqtt.Will(self.state_topic, offline, qos=1, retain=True),
            # A persistent session: head office's acks published while the lane was away wait for it.
            clean_session=False,
            keepalive=cfg.keepalive_seconds,
            timeout=cfg.connect_timeout_seconds,
            tls_params=tls,
        )
        # Batches, states and the subscription may all be pending at once: no warning per call.
        client.pending_calls_threshold = cfg.in_flight_batches + 16
        return client

    async def _connection(self) -> None:
        """One connection: subscribe, announce, send and receive until it drops or a stop is asked."""
        if not self._epoch:
            self._epoch = (await self.store.status()).journal_epoch
        # The will carries the session, so it is chosen before connecting; a failed attempt keeps it
        # for the next one, and only a connection that succeeded uses a number up.
        if self._reserved_session is None:
            self._reserved_session = await self.store.next_sync_session()
        session = self._reserved_session
        async with self._client(session) as client:
            self._reserved_session = None
            self.session = session
            await client.subscribe(self.ack_topic, qos=1, timeout=self.config.connect_timeout_seconds)
            for topic in self._downlink:
                await client.subscribe(topic, qos=1, timeout=self.config.connect_timeout_seconds)
            status = await self.store.status()
            self._restart_from(status.acked_seq)
            await self._publish_state(client, "online")
            self._set_connected(connected=True)
            log.info(
                "connected to %s (session %d): %d entries to send from seq %d",
                self.broker,
                session,
                status.backlog,
                self._next,
            )
            await self._work(client)
            # Only a stop ends _work without an error: say so before the clean disconnect drops the will.
            await self._publish_state(client, "offline", within=STOP_SECONDS)
            log.info("offline state published (session %d); disconnecting", session)

    async def _work(self, client: aiomqtt.Client) -> None:
        tasks = [
            asyncio.create_task(self._receive(client), name="sync-acks"),
            asyncio.create_task(self._send(client), name="sync-send"),
            asyncio.create_task(self._republish_state(client), name="sync-state"),
        ]
        stopping = asyncio.create_task(self._stop.wait(), name="sync-stop")
        try:
            done, _ = await asyncio.wait([*tasks, stopping], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (*tasks, stopping):
                task.cancel()
            await asyncio.gather(*tasks, stopping, return_exceptions=True)
        for task in tasks:
            if task in done and not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]  # an MqttError or StoreError, to run()
        if not self._stop.is_set():
            raise aiomqtt.MqttError("the uplink's loops ended without a stop")

    def _set_connected(self, *, connected: bool) -> None:
        if connected != self.connected:
            self.connected = connected
            self.metrics.sync_connected.set(1 if connected else 0)
            if not connected:
                log.info("disconnected from %s", self.broker)

    # --- sending ------------------------------------------------------------------------------

    def _restart_from(self, acked: int, window: int | None = None) -> None:
        self._acked = max(self._acked, acked)
        self._next = self._acked + 1
        self._in_flight.clear()
        self._window = window or self.config.in_flight_batches
        self._progress = time.monotonic()

    async def _send(self, client: aiomqtt.Client) -> None:
        cfg = self.config
        appended = self.store.journal_appended
        while True:
            # Cleared before reading: a commit after the read sets them again, and the wait returns at once.
            appended.clear()
            self._wake.clear()
            self._check_stall()
            while len(self._in_flight) < self._window:
                rows = await self.store.journal_batch(self._next - 1, cfg.batch_entries)
                if not rows:
                    break
                rows, payload = self._cut(rows)
                await client.publish(self.journal_topic, payload, qos=1, timeout=cfg.connect_timeout_seconds)
                first, last = rows[0].seq, rows[-1].seq
                if last > self._acked:  # an ack may have overtaken the publish
                    self._in_flight.append(_Sent(first, last, time.monotonic()))
                self._next = max(self._next, last + 1)
                self.metrics.sync_batches.inc()
                self.metrics.sync_entries.inc(len(rows))
                log.debug("sent seq %d-%d (%d bytes)", first, last, len(payload))
            await self._idle(appended)

    async def _idle(self, appended: asyncio.Event) -> None:
        """Wait for a new entry, an ack, the poll interval, or the moment the acks count as stalled."""
        timeout = POLL_SECONDS
        if self._in_flight:
            since = max(self._progress, self._in_flight[0].at)
            timeout = min(timeout, max(since + self.config.resend_after_seconds - time.monotonic(), 0.0))
        waits = [asyncio.create_task(appended.wait()), asyncio.create_task(self._wake.wait())]
        try:
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in waits:
                task.cancel()

    def _check_stall(self) -> None:
        if not self._in_flight:
            return
        since = max(self._progress, self._in_flight[0].at)
        waited = time.monotonic() - since
        if waited < self.config.resend_after_seconds:
            return
        log.warning(
            "no ack from head office for %.1f s with %d batch(es) in flight (seq %d-%d): sending again from seq %d",
            waited,
            len(self._in_flight),
            self._in_flight[0].first,
            self._in_flight[-1].last,
            self._acked + 1,
        )
        self.metrics.sync_resends.inc()
        # One batch until head office acks again, as TCP does after a timeout: resending the whole window
        # repeats what was lost in step with its loss (a shared subscription's round robin handing every
        # window's first message to a consumer that is gone), and floods a head office that is behind.
        self._restart_from(self._acked, window=1)

    def _cut(self, rows: list[wire.RawEntry]) -> tuple[list[wire.RawEntry], bytes]:
        """The longest prefix of ``rows`` whose message fits ``batch_bytes`` (one entry at least), encoded."""
        limit = self.config.batch_bytes
        size = len(wire.join_batch(self.store_id, self.lane_id, self._epoch, []))
        encoded: list[bytes] = []
        for row in rows:
            item = wire.encode_entry(self.store_id, self.lane_id, row)
            grows = len(item) + (1 if encoded else 0)  # the comma before it
            if encoded and size + grows > limit:
                break
            size += grows
            encoded.append(item)
        if len(encoded) == 1 and size > limit:
            log.warning("journal entry seq %d alone is %d bytes, above sync.batch_bytes: sent alone", rows[0].seq, size)
        return rows[: len(encoded)], wire.join_batch(self.store_id, self.lane_id, self._epoch, encoded)

    # --- acknowledgements -----------------------------------------------------------------------

    async def _receive(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            payload = message.payload
            data = payload if isinstance(payload, bytes) else str(payload).encode()
            topic = message.topic.value
            if topic == self.ack_topic:
                await self._on_ack(data)
                continue
            handler = self._downlink.get(topic)
            if handler is None:
                continue
            try:
                await handler(data)
            except Exception:
                # A handler's bug must not take the journal's acks down with it; it reports its own
                # refusals (bad signature, malformed notice) and this is only the last resort.
                log.exception("the handler of %s failed on a %d-byte message", topic, len(data))

    async def _on_ack(self, payload: bytes) -> None:
        try:
            ack = wire.decode_ack(self.store_id, self.lane_id, payload)
        except wire.WireError as exc:
            self._reject("malformed", "an unreadable ack on %s ignored: %s", self.ack_topic, exc.message)
            return
        if ack.epoch != self._epoch:
            # Another database's journal (this lane's before a reinstall, or another PC's): not ours to retire.
            self._reject(
                "wrong_epoch", "ack of seq %d for epoch %s ignored: this journal is %s", ack.seq, ack.epoch, self._epoch
            )
            return
        acked = await self._record(ack)
        if acked is None:
            return
        if acked <= self._acked:
            log.debug("ack of seq %d: nothing new (acked %d)", ack.seq, acked)
            return
        now = time.monotonic()
        for sent in self._in_flight:
            if sent.first <= acked <= sent.last:
                self._lag = now - sent.at
                self.metrics.sync_lag.set(self._lag)
                break
        while self._in_flight and self._in_flight[0].last <= acked:
            self._in_flight.popleft()
        self._acked = acked
        self._next = max(self._next, acked + 1)
        self._window = self.config.in_flight_batches
        self._progress = now
        self._last_ack_monotonic = now
        self._last_ack_at = dt.datetime.now(dt.UTC)
        self.metrics.sync_acks.inc()
        self.metrics.sync_last_ack_age.set(0)
        log.debug("head office acknowledged seq %d", acked)
        self._wake.set()  # room in flight

    async def _record(self, ack: wire.Ack) -> int | None:
        """Record ``ack`` in the store, or hold it back for the member cache; the seq it acknowledges, or None."""
        wanted = ack.member_version
        if self._member_version is not None and wanted is not None and self._member_version() < wanted:
            return await self._hold_back(ack)
        try:
            acked = await self.store.mark_acked(ack.seq)
        except AckError as exc:
            self._reject("beyond_last", "ack ignored: %s", exc)
            return None
        if self._held is not None and self._held.seq <= acked:
            self._held = None
        return acked

    async def _hold_back(self, ack: wire.Ack) -> int | None:
        """Take ``ack`` for the send window now, and record it in the store only once the cache has caught up.

        docs/lane-store.md, "Own spend": a recorded ack stops counting the
        entries' spend and earned points as this lane's own, but the cached
        balance shows them only once the member cache reaches the version head
        office committed them at (the ack's ``member_version``).  Recording it
        earlier would let a member spend the same points twice meanwhile (the
        cache not yet less them, the lane no longer counting them).  So the
        newest such ack waits here, and ``members_reached`` records it.
        """
        last = (await self.store.status()).last_seq
        if ack.seq > last:
            self._reject("beyond_last", "ack of seq %d ignored: this lane's journal ends at %d", ack.seq, last)
            return None
        if self._held is None or ack.seq >= self._held.seq:
            self._held = ack
        log.debug("ack of seq %d held until the member table reaches version %s", ack.seq, ack.member_version)
        if self._member_version is not None:
            await self.members_reached(self._member_version())  # it may have got there while the status was read
        return ack.seq

    async def members_reached(self, version: int) -> None:
        """The member cache has caught up with head office's ``version``: record the ack held back for it."""
        held = self._held
        if held is None or held.member_version is None or held.member_version > version:
            return
        if self._held is held:
            self._held = None
        try:
            acked = await self.store.mark_acked(held.seq)
        except AckError as exc:
            self._reject("beyond_last", "held ack ignored: %s", exc)
            return
        log.debug("held ack of seq %d recorded (member table at version %d): acked %d", held.seq, version, acked)

    def _reject(self, reason: str, message: str, *args: object) -> None:
        self.metrics.sync_acks_rejected.labels(reason).inc()
        log.warning(message, *args)

    # --- state -------------------------------------------------------------------------------------

    async def _republish_state(self, client: aiomqtt.Client) -> None:
        # Fresh figures, and a late will of an older connection overwritten within one interval.
        while True:
            await asyncio.sleep(self.config.state_interval_seconds)
            await self._publish_state(client, "online")

    async def _publish_state(
        self, client: aiomqtt.Client, state: Literal["online", "offline"], *, within: float | None = None
    ) -> None:
        session = self.session or 0
        if state == "offline":
            payload = wire.encode_state(self.store_id, self.lane_id, "offline", session)
        else:
            status = await self.store.status()
            backlog = await self.store.backlog_stats()
            payload = wire.encode_state(
                self.store_id,
                self.lane_id,
                "online",
                session,
                backlog=status.backlog,
                backlog_bytes=backlog.bytes,
                last_seq=status.last_seq,
                acked_seq=status.acked_seq,
                rules_version=self._rules_version(),
                member_version=status.member_version,
                at=dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
            )
        await client.publish(
            self.state_topic, payload, qos=1, retain=True, timeout=within or self.config.connect_timeout_seconds
        )
