"""Explicit transactions on an autocommit ``sqlite3`` connection, run on its owner thread."""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


def transaction(conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], T]) -> T:
    """``fn(conn)`` inside BEGIN IMMEDIATE … COMMIT; any exception rolls it back and propagates.

    IMMEDIATE takes the write lock up front, so reads inside ``fn`` (the next
    sequence number, an idempotency key) cannot be invalidated by another
    writer before the commit.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        result = fn(conn)
        conn.execute("COMMIT")
    except BaseException:
        # SQLite may already have rolled back (a full disk can do that); never mask the cause.
        if conn.in_transaction:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                log.exception("rollback failed")
        raise
    return result
