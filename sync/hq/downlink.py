"""Head office -> lanes over MQTT: the retained member notice and hot list (docs/downlink.md).

Every ``members.notify_interval_seconds`` the task reads two cheap things
from the database -- the member version and the hot list's fingerprint --
and publishes, retained at QoS 1:

- ``{root}/hq/members`` ``{"v":1,"kind":"members","version","at","snapshot_version"}``
  when the version or the newest snapshot file changed;
- ``{root}/hq/hotlist`` (the cards lost, replaced or cancelled in the last
  ``members.hotlist_days``) when the fingerprint changed.

Both once at every (re)connection.  It polls rather than being told, so that
changes made by ``lane-hq members …`` / ``cards …`` in another process, or by
another head-office process on the same database, are announced too.  Its own
MQTT client (``{broker.client_id}-downlink``, same address, credentials and
TLS as ingest) has its own reconnect loop; a database that does not answer
skips a round and never drops the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import random
from collections.abc import Callable
from pathlib import Path

import aiomqtt
from sqlalchemy.exc import SQLAlchemyError

from sync import wire
from sync.hq.config import BrokerSection, MembersSection
from sync.hq.ingest import broker_client
from sync.hq.members import Hotlist, hotlist_payload, members_payload, snapshot_version
from sync.hq.metrics import HqMetrics
from sync.hq.owner import DbOwner

log = logging.getLogger(__name__)


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Downlink:
    """Publishes the member notice and the hot list when they change; reconnects for ever."""

    def __init__(
        self,
        broker: BrokerSection,
        members: MembersSection,
        owner: DbOwner,
        metrics: HqMetrics,
        *,
        password: str | None = None,
        snapshot_dir: Path | None = None,
        now: Callable[[], dt.datetime] = _utcnow,
    ) -> None:
        self.broker = broker
        self.members = members
        self.owner = owner
        self.metrics = metrics
        self._password = password
        self._snapshot_dir = snapshot_dir
        self._now = now
        self.connected = asyncio.Event()

    async def run(self) -> None:
        """Connect, announce, and reconnect with capped, jittered backoff, until cancelled."""
        delay = 0.5
        while True:
            client = broker_client(
                self.broker,
                self._password,
                identifier=f"{self.broker.client_id}-downlink",
                clean_session=True,  # it only publishes: nothing to keep at the broker
            )
            try:
                async with client:
                    delay = 0.5
                    await self._session(client)
            except aiomqtt.MqttError as exc:
                self.connected.clear()
                wait = random.uniform(0, delay)  # noqa: S311 - jitter, not secrecy
                log.warning("downlink: broker %s:%d: %s; reconnecting in %.1f s", *self._where(), exc, wait)
                await asyncio.sleep(wait)
                delay = min(delay * 2, self.broker.reconnect_max_seconds)

    def _where(self) -> tuple[str, int]:
        return self.broker.host, self.broker.port

    async def _session(self, client: aiomqtt.Client) -> None:
        """Announce until the connection drops (the message iterator raises then, even with nothing to publish)."""
        announce = asyncio.create_task(self._announce(client), name="downlink-announce")
        watch = asyncio.create_task(self._watch(client), name="downlink-watch")
        try:
            done, _ = await asyncio.wait({announce, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (announce, watch):
                task.cancel()
            for task in (announce, watch):
                with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                    await task
        for task in done:
            task.result()  # MqttError: reconnect; anything else is a bug and tears the task group down
        raise aiomqtt.MqttError("the downlink's session ended")

    @staticmethod
    async def _watch(client: aiomqtt.Client) -> None:
        async for _message in client.messages:  # nothing is subscribed: this only waits for a disconnection
            pass

    async def _announce(self, client: aiomqtt.Client) -> None:
        root = self.broker.topic_root
        timeout = self.broker.connect_timeout_seconds
        days, most = self.members.hotlist_days, self.members.hotlist_max_cards
        interval = self.members.notify_interval_seconds
        notice: tuple[int, int] | None = None
        fingerprint: tuple[int, int] | None = None
        failing = False
        log.info("downlink: announcing %s and %s", wire.hq_topic(root, "members"), wire.hq_topic(root, "hotlist"))
        self.connected.set()
        while True:
            hot: Hotlist | None = None
            try:
                async with asyncio.timeout(timeout):
                    head, seen = await self.owner.call(lambda db: db.members.notice_state(days))
                    if seen != fingerprint:
                        hot = await self.owner.call(lambda db: db.members.hotlist(days, most))
            except (SQLAlchemyError, TimeoutError) as exc:
                if not failing:
                    log.warning("downlink: the database did not answer (%s); retrying every %.1f s", exc, interval)
                failing = True
                await asyncio.sleep(interval)
                continue
            if failing:
                log.info("downlink: the database answers again")
                failing = False
            self.metrics.member_version.set(head)
            current = (head, snapshot_version(self._snapshot_dir))
            at = self._now()
            if current != notice:
                payload = members_payload(current[0], current[1], at)
                await client.publish(wire.hq_topic(root, "members"), payload, qos=1, retain=True, timeout=timeout)
                self.metrics.downlink.labels("members").inc()
                log.debug("downlink: member version %d (snapshot %d)", *current)
                notice = current
            if hot is not None:
                payload = hotlist_payload(hot, at)
                await client.publish(wire.hq_topic(root, "hotlist"), payload, qos=1, retain=True, timeout=timeout)
                self.metrics.downlink.labels("hotlist").inc()
                log.info("downlink: hot list of %d card(s) at version %d", len(hot.cards), hot.version)
                fingerprint = seen
            await asyncio.sleep(interval)
