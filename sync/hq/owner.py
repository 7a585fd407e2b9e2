"""The database's owner thread: every call on ``HqDatabase`` runs on this one thread, in order.

SQLAlchemy connections (and SQLite's in particular) are not to be shared
between threads; one worker thread owns them, and coroutines queue work on it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from sync.hq.db import HqDatabase

T = TypeVar("T")


class DbOwner:
    """Runs functions of the database on its owner thread."""

    def __init__(self, db: HqDatabase) -> None:
        self.db = db
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hq-db")

    async def call(self, fn: Callable[[HqDatabase], T]) -> T:
        """``fn(db)`` on the owner thread.  A cancelled caller does not cancel the work: it runs to its commit."""
        loop = asyncio.get_running_loop()
        return await asyncio.shield(loop.run_in_executor(self._pool, fn, self.db))

    def close(self) -> None:
        """Finish queued work, then close the database."""
        self._pool.shutdown(wait=True)
        self.db.close()
