"""``lane-agent run``: the lane daemon, one supervised task group.

Start-up order: the configuration is already validated (``agent.config``);
then the ruleset is loaded, the store opened (integrity check, migrations),
the API's socket bound, and only then does systemd hear READY=1.  Anything
that fails before that exits with a clear message and code, and systemd's
``Restart=on-failure`` tries again.

Tasks, each named: ``pos-api`` (uvicorn), ``watchdog`` (WATCHDOG=1 only while
the store answers, so a wedged database thread gets the agent restarted),
``store-gauges`` (backlog and disk metrics, the low-disk warning),
``checkpoint`` (WAL into the database file every second, off the sales' path),
``device:<name>`` per configured card reader or scanner (``agent.devices``),
``rules`` (switches to a pending ruleset from head office at its time,
``sync.rules_downlink``), ``sync-uplink`` when ``[sync] enabled = true``
(``sync.uplink``), ``member-sync`` when ``hq_url`` is set too (``sync.downlink``)
and ``signals``.  SIGTERM or SIGINT stops the API from accepting, lets requests
in flight finish (their commits included) for up to ``GRACE_SECONDS``, ends
the event streams, stops the uplink (its offline state published, the
connection closed), then closes the store, which checkpoints the WAL.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import socket
from collections.abc import Generator
from typing import Any

import uvicorn

from agent.api import create_app
from agent.config import LaneConfig
from agent.devices import DeviceHub
from agent.errors import StoreError
from agent.events import EventBus
from agent.metrics import Metrics
from agent.ruleset import Ruleset
from agent.sdnotify import SystemdNotifier
from agent.service import LaneService
from agent.store import LaneStore
from drivers import registry
from sync.downlink import MemberSync
from sync.holds_client import HqHolds
from sync.rules_downlink import RulesKeeper
from sync.uplink import Uplink

log = logging.getLogger(__name__)

GRACE_SECONDS = 10.0
GAUGE_SECONDS = 5.0
CHECKPOINT_SECONDS = 1.0
UPLINK_STOP_SECONDS = 5.0


class ListenError(Exception):
    """The API's address cannot be bound (in use, or not on this host)."""


class _Server(uvicorn.Server):
    # The daemon owns the signals: uvicorn would otherwise take SIGTERM for itself and
    # re-raise it after its own shutdown, past the point where the store is closed cleanly.
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def bind(host: str, port: int) -> socket.socket:
    """The API's listening socket, bound before anything is announced."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto must say TCP: asyncio sets TCP_NODELAY only on sockets that do, and without it every
    # answer (headers, then body, in two writes) waits ~40 ms for the POS's delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ListenError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    sock.listen(512)
    sock.setblocking(False)  # noqa: FBT003 - the socket API
    return sock


async def serve(  # noqa: PLR0915 - the supervisor's wiring reads best in one place
    config: LaneConfig, ruleset: Ruleset, notifier: SystemdNotifier | None = None
) -> None:
    """Run the lane agent until SIGTERM or SIGINT."""
    notifier = notifier or SystemdNotifier.from_env()
    store_config = config.store
    async with await LaneStore.open(
        store_config.path,
        store_config.card_hash_key.reveal(),
        busy_timeout_ms=store_config.busy_timeout_ms,
        background_checkpoints=True,
    ) as store:
        events = EventBus()
        metrics = Metrics()
        # Head office's signed rulesets kept beside the database; one in force may win over rules.path.
        rules = RulesKeeper(config, metrics, store_config.path.parent / "rules", lambda new: _price_with(service, new))
        service = LaneService(config, store, rules.load(ruleset), events)
        service.rules_status = rules.status
        # Head office holds points, rebate and single-use coupons before a sale spends them (docs/downlink.md).
        holds = None if config.sync.hq_url is None else HqHolds(config, metrics)
        service.holds = holds
        hub = DeviceHub(service, config.devices, registry.build)
        uplink = None
        # The member table and the hot list from head office: with the uplink (the notices ride on its
        # connection) and head office's API (the data comes over HTTP).
        members = MemberSync(config, store, metrics) if config.sync.enabled and config.sync.hq_url else None
        if config.sync.enabled:
            uplink = Uplink(
                config,
                store,
                metrics,
                rules_version=lambda: service.ruleset.version,
                downlink={"rules": rules.on_message, **(members.downlink() if members is not None else {})},
                member_version=None if members is None else members.caught_up,
            )
            service.sync_status = uplink.status
            if members is not None:
                members.on_caught_up = uplink.members_reached
                service.members_status = members.status
        app = create_app(
            service,
            metrics,
            token=config.api.token.reveal(),
            max_body_bytes=config.api.max_body_bytes,
            request_timeout=config.api.request_timeout_seconds,
            devices=hub.status,
        )
        sock = bind(config.api.host, config.api.port)
        server = _Server(
            uvicorn.Config(
                app,
                log_config=None,
                access_log=False,
                lifespan="off",
                timeout_graceful_shutdown=int(GRACE_SECONDS),
                server_header=False,
                date_header=True,
            )
        )
        # Everything built so far lives as long as the process: keep it out of the collector's
        # full passes, which otherwise took 80-120 ms every few hundred requests (docs/performance.md).
        gc.collect()
        gc.freeze()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        try:
            async with asyncio.TaskGroup() as group:
                api = group.create_task(server.serve(sockets=[sock]), name="pos-api")
                helpers = [
                    group.create_task(_announce(server, service, notifier), name="ready"),
                    group.create_task(_watchdog(service, notifier), name="watchdog"),
                    group.create_task(_gauges(service, metrics), name="store-gauges"),
                    group.create_task(_checkpoints(store), name="checkpoint"),
                    group.create_task(rules.run(), name="rules"),
                    *hub.start(group),
                ]
                syncing = None if uplink is None else group.create_task(uplink.run(), name="sync-uplink")
                if syncing is not None:
                    helpers.append(syncing)
                if members is not None:
                    helpers.append(group.create_task(members.run(), name="member-sync"))
                signals = group.create_task(stop.wait(), name="signals")
                await asyncio.wait([api, signals], return_when=asyncio.FIRST_COMPLETED)
                log.info("stopping: finishing requests in flight")
                notifier.stopping()
                events.close()  # event streams end, so they do not hold the shutdown
                server.should_exit = True
                await api
                if uplink is not None and syncing is not None:
                    # The offline state, then a clean disconnect (which drops the Last Will).
                    uplink.stop()
                    await asyncio.wait([syncing], timeout=config.sync.connect_timeout_seconds + UPLINK_STOP_SECONDS)
                for task in (*helpers, signals):
                    task.cancel()
        finally:
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)
            sock.close()
            if holds is not None:
                await holds.aclose()
    log.info("stopped; the store is closed")


def _price_with(service: LaneService, ruleset: Ruleset) -> None:
    """Head office's ruleset took effect: replaced whole, so a sale being priced keeps the one it started with."""
    service.ruleset = ruleset


async def _announce(server: uvicorn.Server, service: LaneService, notifier: SystemdNotifier) -> None:
    while not server.started:  # noqa: ASYNC110 - uvicorn offers a flag, not an event
        await asyncio.sleep(0.01)
    status = await service.store.status()
    cfg = service.config
    log.info(
        "lane %s/%s ready on http://%s:%d: rules %s %s, member table version %d (%d members), journal seq %d",
        cfg.lane.store,
        cfg.lane.lane,
        cfg.api.host,
        cfg.api.port,
        service.ruleset.id,
        service.ruleset.version,
        status.member_version,
        status.members,
        status.last_seq,
    )
    notifier.ready(f"serving; backlog {status.backlog}")


async def _watchdog(service: LaneService, notifier: SystemdNotifier) -> None:
    interval = notifier.watchdog_interval()
    if interval is None:
        return
    while True:
        try:
            # Only a store that answers keeps the watchdog fed: a hung database thread means a restart.
            async with asyncio.timeout(max(interval, 1.0)):
                status = await service.store.status()
        except Exception as exc:  # noqa: BLE001 - any failure (a timeout included) means: do not ping
            log.warning("watchdog: the store did not answer (%s); not pinging systemd", exc)
        else:
            notifier.watchdog()
            notifier.status(f"serving; backlog {status.backlog}, last seq {status.last_seq}")
        await asyncio.sleep(interval)


async def _checkpoints(store: LaneStore) -> None:
    """WAL pages into the database file, off the sales' path (the store was opened without auto-checkpoints)."""
    failing = False
    while True:
        await asyncio.sleep(CHECKPOINT_SECONDS)
        try:
            await store.checkpoint()
        except StoreError as exc:
            if not failing:
                log.warning("checkpoint failed (retried every %.0f s): %s", CHECKPOINT_SECONDS, exc)
            failing = True
        else:
            if failing:
                log.info("checkpoints work again")
            failing = False


async def _gauges(service: LaneService, metrics: Metrics) -> None:
    low = False
    while True:
        try:
            document: dict[str, Any] = await service.status()
        except Exception as exc:  # noqa: BLE001 - a failing store is logged and retried, never fatal here
            log.warning("status for metrics failed: %s", exc)
        else:
            journal, store = document["journal"], document["store"]
            metrics.backlog.set(journal["backlog"])
            metrics.last_seq.set(journal["last_seq"])
            metrics.db_bytes.set(store["db_bytes"])
            metrics.member_version.set(document["member_table"]["version"])
            if store["disk_free_bytes"] is not None:
                metrics.disk_free.set(store["disk_free_bytes"])
            if store["disk_low"] != low:
                low = store["disk_low"]
                if low:
                    log.warning("disk space low: %d bytes free beside %s", store["disk_free_bytes"], service.store.path)
                else:
                    log.info("disk space back above the warning level")
            _sync_gauges(document["sync"], metrics)
        await asyncio.sleep(GAUGE_SECONDS)


def _sync_gauges(sync: dict[str, Any], metrics: Metrics) -> None:
    """The backlog's and the uplink's gauges (the status logs the backlog warnings)."""
    metrics.sync_backlog_bytes.set(sync["backlog_bytes"])
    metrics.sync_oldest_unacked_age.set(sync["oldest_unacked_age_seconds"] or 0)
    age = sync["last_ack_age_seconds"]
    metrics.sync_last_ack_age.set(float("nan") if age is None else age)
