"""The audit worker: re-prices every ingested sale with the ruleset version its lane reported.

It runs behind ingest, not inside it: the lanes' acknowledgements never wait
for re-pricing, and a backlog of days drains at the database's pace while the
audit catches up.  Re-pricing is CPU work: it runs on the worker's own thread,
the database calls on the database's owner thread.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from sync.hq.audit import RulesetLibrary, audit_journal_sale
from sync.hq.metrics import HqMetrics
from sync.hq.owner import DbOwner

log = logging.getLogger(__name__)

IDLE_SECONDS = 2.0
MAX_DIFFERENCES = 50


def audit_rows(library: RulesetLibrary, rows: list[Any]) -> list[tuple[str, str, str]]:
    """``(entry_id, status, detail JSON)`` for rows of ``HqDatabase.unaudited_sales``."""
    results: list[tuple[str, str, str]] = []
    for entry_id, at, _rules_id, _rules_version, _rules_digest, body in rows:
        moment = at if isinstance(at, dt.datetime) else dt.datetime.fromisoformat(str(at))
        status, differences = audit_journal_sale(library, moment, body)
        detail = [
            {"path": d.path, "reported": d.reported, "expected": d.expected} for d in differences[:MAX_DIFFERENCES]
        ]
        results.append((entry_id, status, json.dumps(detail, ensure_ascii=False, default=str)))
    return results


class Auditor:
    """Audits sales as they arrive; ``wake()`` after an ingest commit, else it looks every few seconds."""

    def __init__(self, owner: DbOwner, library: RulesetLibrary, metrics: HqMetrics, *, batch: int = 200) -> None:
        self.owner = owner
        self.library = library
        self.metrics = metrics
        self.batch = batch
        self._wake = asyncio.Event()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hq-audit")

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                try:
                    await self._round(loop)
                except SQLAlchemyError as exc:
                    # Nothing is lost: unaudited sales stay unaudited until a round succeeds.
                    log.warning("audit: the database failed (%s); trying again in %.0f s", exc, IDLE_SECONDS)
                    await asyncio.sleep(IDLE_SECONDS)
        finally:
            self._pool.shutdown(wait=False, cancel_futures=True)

    async def _round(self, loop: asyncio.AbstractEventLoop) -> None:
        rows = await self.owner.call(lambda db: db.unaudited_sales(self.batch))
        if not rows:
            self.metrics.audit_backlog.set(0)
            self._wake.clear()
            try:
                async with asyncio.timeout(IDLE_SECONDS):
                    await self._wake.wait()
            except TimeoutError:
                pass
            return
        results = await loop.run_in_executor(self._pool, audit_rows, self.library, rows)
        await self.owner.call(lambda db: db.record_audits(results))
        for _, status, _ in results:
            self.metrics.audits.labels(status).inc()
        mismatched = [entry_id for entry_id, status, _ in results if status != "ok"]
        if mismatched:
            log.warning(
                "audit: %d of %d sales did not re-price as reported (first: entry %s)",
                len(mismatched),
                len(results),
                mismatched[0],
            )
