"""Member snapshot import: the steps that run on the store's connection thread.

The replacement cache is built beside the live one, in the same database, and
swapped in by renaming inside one transaction, so lookups see the old cache or
the new one, never a mixture, and a refused file leaves the old one in use.

Building is split into short transactions so that sales carry on between them:

1. ``create_staging``: empty ``members_next`` and ``cards_next`` shaped like
   the live tables (copied from their own ``CREATE TABLE`` text, whatever
   migrations made them), and sixteen append-only ``cards_stage_N`` tables.
2. ``stage_chunk`` per few thousand lines: members go straight into
   ``members_next`` (an append when the file is in member-id order, as
   head office writes it); cards are appended to the stage table of their
   hash's first hex digit.  Inserting random 32-byte keys one by one into a
   B-tree of a million rows churns the page cache (measured: 30 s for 1.2 M
   cards against 5 s for stage-then-sort).
3. ``build_cards`` per stage table: ``INSERT … ORDER BY card_hash`` into
   ``cards_next``; the partitions are in key order, so the whole build is an
   append.  Duplicate card hashes surface here, reported by line.
4. ``swap``: rename the live tables aside and the staging ones into place,
   record the version; then ``drop_retired`` drops the old tables, one per
   transaction.
"""

from __future__ import annotations

import datetime as dt
import re
import sqlite3
from collections.abc import Sequence

from agent.dbtx import transaction
from agent.errors import Issue, StaleSnapshotError, StoreError
from agent.snapshot import Chunk, SnapshotHeader

PARTITIONS = 16
MEMBERS_NEXT = "members_next"
CARDS_NEXT = "cards_next"
# The replaced cache, renamed in the swap and dropped after it, one table per transaction:
# dropping a million-row table walks all its pages (over a second here), too long to hold
# the write lock inside the swap.
RETIRED = ("members_old", "cards_old")
_CREATE_TABLE = re.compile(r'^\s*CREATE\s+TABLE\s+("?)(\w+)\1', re.IGNORECASE)
# Table names in this module's SQL are its own constants, never input (hence the S608 exemptions).
_MEMBERS_SQL = f"INSERT INTO {MEMBERS_NEXT} VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING"  # noqa: S608


def stage_table(partition: int) -> str:
    return f"cards_stage_{partition:x}"


def member_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT member_version FROM lane_state").fetchone()[0])


def check_fresh(header: SnapshotHeader, current: int, allow_older: bool) -> None:
    if header.version < current and not allow_older:
        raise StaleSnapshotError(
            f"the snapshot has member-table version {header.version}, older than the lane's {current}"
        )


def drop_staging(conn: sqlite3.Connection) -> None:
    """Drop what an import left behind (a refused file, or a crash mid-import)."""
    for table in (MEMBERS_NEXT, CARDS_NEXT, *RETIRED, *(stage_table(p) for p in range(PARTITIONS))):
        conn.execute(f"DROP TABLE IF EXISTS {table}")


def create_staging(conn: sqlite3.Connection) -> None:
    def create(conn: sqlite3.Connection) -> None:
        drop_staging(conn)
        for live, staging in (("members", MEMBERS_NEXT), ("cards", CARDS_NEXT)):
            sql = conn.execute("SELECT sql FROM sqlite_schema WHERE type = 'table' AND name = ?", (live,)).fetchone()
            ddl, count = _CREATE_TABLE.subn(f"CREATE TABLE {staging}", sql[0] if sql else "", count=1)
            if count != 1:
                raise StoreError(f"unexpected schema for table {live!r}")
            conn.execute(ddl)
        for partition in range(PARTITIONS):
            conn.execute(
                f"CREATE TABLE {stage_table(partition)} (card_hash BLOB, member_id TEXT, card_kind TEXT, state TEXT,"
                " valid_from TEXT, valid_until TEXT, line INTEGER, card_index INTEGER)"
            )

    transaction(conn, create)


class _DuplicateMemberError(Exception):
    """A chunk repeats a member id; raised to roll the bulk insert back."""


def stage_chunk(conn: sqlite3.Connection, chunk: Chunk, source: str) -> list[Issue]:
    """Stage one chunk of parsed lines; returns the duplicate member ids found, by line."""
    partitions: list[list[tuple[object, ...]]] = [[] for _ in range(PARTITIONS)]
    for card, (line, index) in zip(chunk.cards, chunk.card_where, strict=True):
        partitions[card[0][0] >> 4].append((*card, line, index))

    def bulk(conn: sqlite3.Connection) -> None:
        if conn.executemany(_MEMBERS_SQL, chunk.members).rowcount != len(chunk.members):
            raise _DuplicateMemberError
        _stage_cards(conn, partitions)

    try:
        transaction(conn, bulk)
    except _DuplicateMemberError:
        pass  # rolled back: redo row by row to say which lines repeat a member (the import fails anyway)
    else:
        return []

    def row_by_row(conn: sqlite3.Connection) -> list[Issue]:
        issues = [
            Issue("member_id", "duplicate_member", f"member {row[0]!r} appears on an earlier line", f"{source}:{line}")
            for row, line in zip(chunk.members, chunk.member_lines, strict=True)
            if conn.execute(_MEMBERS_SQL, row).rowcount == 0
        ]
        _stage_cards(conn, partitions)
        return issues

    return transaction(conn, row_by_row)


def _stage_cards(conn: sqlite3.Connection, partitions: Sequence[Sequence[tuple[object, ...]]]) -> None:
    for partition, rows in enumerate(partitions):
        if rows:
            conn.executemany(f"INSERT INTO {stage_table(partition)} VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)  # noqa: S608


def build_cards(conn: sqlite3.Connection, partition: int, source: str) -> list[Issue]:
    """Move one stage table into ``cards_next`` in key order; returns duplicate card hashes, by line."""
    stage = stage_table(partition)

    def build(conn: sqlite3.Connection) -> list[Issue]:
        staged = conn.execute(f"SELECT count(*) FROM {stage}").fetchone()[0]  # noqa: S608
        inserted = conn.execute(
            f"INSERT INTO {CARDS_NEXT} SELECT card_hash, member_id, card_kind, state, valid_from, valid_until"  # noqa: S608
            f" FROM {stage} WHERE true ORDER BY card_hash ON CONFLICT DO NOTHING"
        ).rowcount
        issues = [] if inserted == staged else _duplicate_cards(conn, stage, source)
        conn.execute(f"DROP TABLE {stage}")
        return issues

    return transaction(conn, build)


def _duplicate_cards(conn: sqlite3.Connection, stage: str, source: str) -> list[Issue]:
    rows = conn.execute(
        f"SELECT card_hash, line, card_index, member_id FROM {stage} WHERE card_hash IN"  # noqa: S608
        f" (SELECT card_hash FROM {stage} GROUP BY card_hash HAVING count(*) > 1) ORDER BY card_hash, line, card_index"
    ).fetchall()
    issues = []
    first: tuple[bytes, int, str] | None = None
    for card, line, index, member_id in rows:
        if first is None or first[0] != card:
            first = (card, line, member_id)
            continue
        issues.append(
            Issue(
                f"cards[{index}].card_hash",
                "duplicate_card",
                f"card {card.hex()[:12]}… was already given on line {first[1]} (member {first[2]!r})",
                f"{source}:{line}",
            )
        )
    return issues


def swap(conn: sqlite3.Connection, header: SnapshotHeader, members: int, cards: int, allow_older: bool) -> None:
    """Replace the live cache with the staging tables and record the snapshot, in one transaction.

    The replaced tables are renamed aside, for ``drop_retired`` to drop afterwards.
    """

    def run(conn: sqlite3.Connection) -> None:
        # Checked again under the write lock: a newer member table may have arrived meanwhile.
        check_fresh(header, member_version(conn), allow_older)
        for live, staging, retired in (("members", MEMBERS_NEXT, RETIRED[0]), ("cards", CARDS_NEXT, RETIRED[1])):
            conn.execute(f"DROP TABLE IF EXISTS {retired}")
            conn.execute(f"ALTER TABLE {live} RENAME TO {retired}")
            conn.execute(f"ALTER TABLE {staging} RENAME TO {live}")
        conn.execute(
            "UPDATE lane_state SET member_version = ?, snapshot_created = ?, snapshot_imported = ?,"
            " member_count = ?, card_count = ?, card_key_check = ?",
            (
                header.version,
                header.created.isoformat(),
                dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                members,
                cards,
                header.key_check,
            ),
        )

    transaction(conn, run)


def drop_retired(conn: sqlite3.Connection, table: str) -> None:
    """Drop one table of the cache an import replaced (after the swap, in its own transaction)."""
    if table not in RETIRED:
        raise ValueError(f"not a retired cache table: {table!r}")
    transaction(conn, lambda conn: conn.execute(f"DROP TABLE IF EXISTS {table}"))
