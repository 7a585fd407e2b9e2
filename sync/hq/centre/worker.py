"""The centre worker: tier upgrades as journals arrive, and the member centre's batch jobs each day.

It runs behind ingest, like the audit worker: ingest only queues the entries
of members (``centre_queue``, in the batch's transaction) and acknowledges;
this worker looks at them every ``[centre] worker_interval_seconds``.  It has
its own ``HqDatabase`` and its own thread (one ``ThreadPoolExecutor`` of one
worker, as ``sync.hq.owner``), so its transactions never queue behind, or in
front of, ingest's on the database owner's thread; the database itself
orders the writers (SQLite: one at a time, with a busy timeout; PostgreSQL:
row locks taken in the documented order, sync/hq/members.py).

Once per programme-local day, and at start-up, the jobs due that day run
(``jobs.run_due``, skipping those already run): a daemon started late in the
day, or after days down, catches up.  Days missed while it was down (at most
``CATCH_UP_DAYS``, since the last day any job ran) are run first, oldest
first: an anniversary or a rebate date must not pass unnoticed.

Nothing here stops head office: no programme configured is logged once and
waited out; a round that fails is logged and tried again at the next
interval (arrivals) or after ``JOB_RETRY_SECONDS`` (jobs).  Cancelled on
shutdown, the round in progress runs to its commit, then the database closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from sqlalchemy import func, select

from sync.hq.audit import RulesetLibrary
from sync.hq.centre import jobs
from sync.hq.centre.programme import JobContext, Programme, ProgrammeError, live_programme
from sync.hq.centre.tiers import evaluate_arrivals
from sync.hq.config import HqConfig
from sync.hq.db import HqDatabase
from sync.hq.metrics import HqMetrics
from sync.hq.schema import job_runs

log = logging.getLogger(__name__)

T = TypeVar("T")

ARRIVALS_BATCH = 1000  # queued entries per transaction
MAX_BATCHES_PER_ROUND = 20  # then the day and the jobs are looked at again
CATCH_UP_DAYS = 31
JOB_RETRY_SECONDS = 60.0


class CentreWorker:
    """Runs ``evaluate_arrivals`` and the daily jobs on a database connection and thread of its own."""

    def __init__(self, config: HqConfig, library: RulesetLibrary, metrics: HqMetrics | None = None) -> None:
        self.config = config
        self.library = library
        self.metrics = metrics
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hq-centre")
        self._db: HqDatabase | None = None
        self._jobs_day: dt.date | None = None  # the last day whose jobs all ran
        self._jobs_retry_at = 0.0  # loop time before which failed jobs are not tried again
        self._missing_logged = False

    async def run(self) -> None:
        """Until cancelled: arrivals every interval, the day's jobs once a day."""
        loop = asyncio.get_running_loop()
        interval = self.config.centre.worker_interval_seconds
        try:
            while True:
                more = False
                try:
                    more = await self._call(loop, self._round)
                except Exception as exc:  # noqa: BLE001 - any failure of a round is retried; it must not end head office
                    log.warning(
                        "centre: a round failed (%s: %s); trying again in %.1f s", type(exc).__name__, exc, interval
                    )
                if not more:
                    await asyncio.sleep(interval)
        finally:
            # The round under way (if any) finishes on the thread first: work runs to its commit.
            closing = loop.run_in_executor(self._pool, self._close)
            self._pool.shutdown(wait=False)
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(closing)

    async def _call(self, loop: asyncio.AbstractEventLoop, fn: Callable[[float], T]) -> T:
        """``fn(the loop's time now)`` on the worker's thread."""
        return await loop.run_in_executor(self._pool, fn, loop.time())

    # --- on the worker's thread -------------------------------------------------------

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def _programme(self) -> Programme | None:
        try:
            programme = live_programme(self.library, self.config.centre.ruleset)
        except ProgrammeError as exc:
            if not self._missing_logged:
                log.warning("centre: idle: %s", exc.message)
                self._missing_logged = True
            return None
        if self._missing_logged:
            log.info("centre: running the programme of ruleset %s %s", programme.ruleset.id, programme.ruleset.version)
            self._missing_logged = False
        return programme

    def _round(self, loop_time: float) -> bool:
        """One round; whether arrivals are left over (then the next round starts at once)."""
        programme = self._programme()
        if programme is None:
            return False
        if self._db is None:
            self._db = HqDatabase.open(self.config.database.url)
        db = self._db
        today = programme.local_date(db.now())
        if today != self._jobs_day and loop_time >= self._jobs_retry_at:
            try:
                self._run_jobs(db, programme, today)
                self._jobs_day = today
            except Exception as exc:  # noqa: BLE001 - a failing job must not stop upgrades; it is retried
                self._jobs_retry_at = loop_time + JOB_RETRY_SECONDS
                log.warning(
                    "centre: the jobs of %s failed (%s: %s); trying again in %.0f s",
                    today,
                    type(exc).__name__,
                    exc,
                    JOB_RETRY_SECONDS,
                )
        for _ in range(MAX_BATCHES_PER_ROUND):
            done = evaluate_arrivals(db, programme, ARRIVALS_BATCH)
            if done["upgraded"]:
                log.info("centre: upgrades: %d, from %d queued entries", done["upgraded"], done["entries"])
            if done["entries"] < ARRIVALS_BATCH:
                return False
        return True

    def _run_jobs(self, db: HqDatabase, programme: Programme, today: dt.date) -> None:
        """The jobs of the days since the last run (at most ``CATCH_UP_DAYS``), then today's; each not run yet."""
        with db.reading() as conn:
            last = conn.execute(select(func.max(job_runs.c.on_date)).where(job_runs.c.on_date <= today)).scalar()
        first = today if last is None else max(last, today - dt.timedelta(days=CATCH_UP_DAYS - 1))
        day = first
        while day <= today:
            ctx = JobContext(db, programme, day, db.now())
            jobs.run_due(ctx, skip_done=True)  # each run is logged by jobs.run_job
            day += dt.timedelta(days=1)
