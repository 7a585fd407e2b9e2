"""``lane-hq run``: head office's ingest, audit and HTTP API, one supervised task group.

Start-up order: the configuration is validated, the rulesets loaded, the
database opened and migrated; then the tasks start: ``ingest`` (MQTT, with its
own reconnect loop), ``downlink`` (the member notice and hot list, its own
MQTT client), ``audit``, ``centre`` (the member centre's tier upgrades as
journals arrive and its daily jobs, on a database connection of its own) and
``api``.  SIGTERM or SIGINT cancels them;
work queued on the database thread runs to its commit before the database
closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from collections.abc import Generator

import uvicorn

from sync.hq import holds_api, lane_api
from sync.hq.api import create_hq_app
from sync.hq.audit import RulesetLibrary
from sync.hq.auditor import Auditor
from sync.hq.centre import jobs_api, members_api, reports_api, whatif_api
from sync.hq.centre.worker import CentreWorker
from sync.hq.config import HqConfig
from sync.hq.db import HqDatabase
from sync.hq.downlink import Downlink
from sync.hq.ingest import Ingest
from sync.hq.metrics import HqMetrics
from sync.hq.owner import DbOwner

log = logging.getLogger(__name__)

GC_GEN0_THRESHOLD = 50_000


class _Server(uvicorn.Server):
    # The task group owns the signals (see agent/daemon.py).
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


async def serve(config: HqConfig, library: RulesetLibrary) -> None:
    """Run head office until SIGTERM or SIGINT."""
    db = await asyncio.to_thread(HqDatabase.open, config.database.url)
    owner = DbOwner(db)
    metrics = HqMetrics()
    auditor = Auditor(owner, library, metrics, batch=config.audit.batch) if config.audit.enabled else None
    ingest = Ingest(
        config.broker,
        owner,
        metrics,
        password=config.password(),
        on_applied=None if auditor is None else (lambda _applied: auditor.wake()),
    )
    snapshot_dir = lane_api.snapshot_directory(config)  # checked (and created) with the configuration
    downlink = Downlink(
        config.broker, config.members, owner, metrics, password=config.password(), snapshot_dir=snapshot_dir
    )
    # A batch of 500 sales decodes into ~80,000 containers: with the default thresholds the cyclic
    # collector ran ~100 times per batch and took three quarters of its decoding time
    # (docs/performance.md).  What start-up built lives as long as the process: frozen.
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_GEN0_THRESHOLD, 20, 100)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(ingest.run(), name="ingest")]
            tasks.append(group.create_task(downlink.run(), name="downlink"))
            if auditor is not None:
                tasks.append(group.create_task(auditor.run(), name="audit"))
            tasks.append(group.create_task(CentreWorker(config, library, metrics).run(), name="centre"))
            server = None
            if config.api.enabled:
                routers = [
                    holds_api.router(config, owner, metrics),
                    lane_api.router(config, owner, snapshot_dir=snapshot_dir),
                    members_api.router(config, owner, library),
                    jobs_api.router(config, owner, library),
                    reports_api.router(config, owner, library),
                    whatif_api.router(config, owner, library),
                ]
                server = _Server(
                    uvicorn.Config(
                        create_hq_app(owner, metrics, routers=routers),
                        host=config.api.host,
                        port=config.api.port,
                        log_config=None,
                        access_log=False,
                        lifespan="off",
                        # HTTPS when both are set (the configuration checks they come as a pair).
                        ssl_certfile=config.api.tls_cert_file,
                        ssl_keyfile=config.api.tls_key_file,
                    )
                )
                tasks.append(group.create_task(server.serve(), name="api"))
            scheme = "http" if config.api.tls_cert_file is None else "https"
            log.info(
                "head office: database %s, broker %s:%d, %d ruleset versions%s",
                db.dialect,
                config.broker.host,
                config.broker.port,
                len(library),
                "" if server is None else f", API on {scheme}://{config.api.host}:{config.api.port}/",
            )
            await stop.wait()
            log.info("stopping")
            if server is not None:
                server.should_exit = True
            for task in tasks:
                if task.get_name() != "api":
                    task.cancel()
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        await asyncio.to_thread(owner.close)
    log.info("stopped; the database is closed")
