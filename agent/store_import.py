"""Member snapshot import: the steps that run on the store's connection thread.

The replacement cache is built beside the live one, in the same database, and
swapped in by renaming inside one transaction, so lookups see the old cache or
the new one, never a mixture, and a refused file leaves the old one in use.

Building is split into short transactions so that sales carry on between them:

1. ``create_staging``: empty ``members_next`` and ``cards_next`` shaped like
   the live tables (copied from their own ``CREATE TABLE`` text, whatever
   migrations made them); and the card stage, a scratch database file beside
   the lane's (``lane.db-import-stage``), attached for the import.
2. ``stage_chunk`` per few thousand lines: members go straight into
   ``members_next`` (an append when the file is in member-id order, as
   head office writes it); cards are appended to the stage, numbered so that
   each of 32 partitions (the hash's first five bits) is one rowid range.
   Inserting random 32-byte keys one by one into a B-tree of a million rows
   churns the page cache (measured: 30 s for 1.2 M cards against 5 s for
   stage-then-sort).
3. ``build_cards`` per partition: ``INSERT … ORDER BY card_hash`` into
   ``cards_next``; the partitions are in key order, so the whole build is an
   append.  Duplicate card hashes surface here, reported by line.  Then
   ``detach_stage`` detaches the stage and deletes its file: dropping a
   staged million cards inside the lane's file took a second in one
   transaction.
4. ``swap``: rename the live tables aside and the staging ones into place,
   record the version; then ``drop_retired`` drops the old tables, one per
   transaction.

Step 2 takes its rows as JSON text (``StageEncoder``, run on the reading
thread), one statement per table and chunk: SQLite unpacks and inserts a whole
chunk without holding the GIL, on the other core, while the reading thread
checks the next chunk.  ``executemany`` holds the GIL for every row it binds,
so the two threads took turns and the import was the sum of both.
"""

from __future__ import annotations

import datetime as dt
import re
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import orjson

from agent.dbtx import transaction
from agent.errors import Issue, StaleSnapshotError, StoreError
from agent.snapshot import Chunk, SnapshotHeader

# 32 key ranges of about 40,000 cards per million members: each is built in one transaction of
# 0.1-0.2 s, which a sale may have to wait for.
PARTITIONS = 32
_PARTITION_BITS = 5
MEMBERS_NEXT = "members_next"
CARDS_NEXT = "cards_next"
# The card stage is scratch: a database file of its own beside the lane's, attached for one import
# and deleted after it (no WAL, no fsync, no freeing of its pages inside the lane's file).
STAGE_DB = "import_stage"
STAGE_SUFFIX = "-import-stage"
CARDS_STAGE = f"{STAGE_DB}.cards"
# The replaced cache, renamed in the swap and dropped after it, one table per transaction:
# dropping a million-row table walks all its pages (over a second here), too long to hold
# the write lock inside the swap.
RETIRED = ("members_old", "cards_old")
# What an import by an earlier version left behind (one stage table per partition): dropped alike.
_OLD_STAGES = tuple(f"cards_stage_{partition:x}" for partition in range(16))
# A staged card's rowid: partition, line, index among the line's cards (at most 64), high bits to low.
# Lines only grow, so each partition is one rowid range that only grows at its end, and a card's
# place in the file, for a duplicate's report, comes back from its rowid.
_INDEX_BITS = 6
_PARTITION_SHIFT = 58  # five bits of partition above it: every key stays below 2**63
_LINE_MASK = (1 << _PARTITION_SHIFT) - 1
_INDEX_MASK = (1 << _INDEX_BITS) - 1
_CREATE_TABLE = re.compile(r'^\s*CREATE\s+TABLE\s+("?)(\w+)\1', re.IGNORECASE)
# SQLite before 3.41 has no unhex(); bytes.fromhex as a function of the connection instead.
_UNHEX = "lane_unhex"
# Table names in this module's SQL are its own constants, never input (hence the S608 exemptions).
_MEMBERS_SQL = f"INSERT INTO {MEMBERS_NEXT} VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING"  # noqa: S608
_MEMBERS_JSON_SQL = (
    f"INSERT INTO {MEMBERS_NEXT} SELECT value->>0, value->>1, value->>2, value->>3, value->>4,"  # noqa: S608
    " value->>5, value->>6, value->>7, value->>8 FROM json_each(?) WHERE true ON CONFLICT DO NOTHING"
)
_STAGE_SQL = f"INSERT INTO {CARDS_STAGE} VALUES (?, ?, ?, ?, ?, ?, ?)"  # noqa: S608
_STAGE_JSON_SQL = (
    f"INSERT INTO {CARDS_STAGE} SELECT value->>0, value->>1, value->>2, value->>3, value->>4,"  # noqa: S608
    " value->>5, value->>6 FROM json_each(?)"
)
# (rowid, hash as hex, member_id, kind, state, valid_from, valid_until)
StageRow = tuple[int, str, str, str, str, str, str | None]


def member_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT member_version FROM lane_state").fetchone()[0])


def check_fresh(header: SnapshotHeader, current: int, allow_older: bool) -> None:
    if header.version < current and not allow_older:
        raise StaleSnapshotError(
            f"the snapshot has member-table version {header.version}, older than the lane's {current}"
        )


def drop_staging(conn: sqlite3.Connection) -> None:
    """Drop what an import left behind (a refused file, or a crash mid-import), in the caller's transaction.

    A stage file still attached is ``detach_stage``'s (outside a transaction); one left by a crash is deleted here.
    """
    for table in (MEMBERS_NEXT, CARDS_NEXT, *RETIRED, *_OLD_STAGES):
        conn.execute(f"DROP TABLE IF EXISTS {table}")
    stage = _stage_path(conn)
    if stage is not None and not _stage_attached(conn):
        stage.unlink(missing_ok=True)


def _stage_path(conn: sqlite3.Connection) -> Path | None:
    for _, name, file in conn.execute("PRAGMA database_list"):
        if name == "main":
            return Path(file + STAGE_SUFFIX) if file else None
    return None


def _stage_attached(conn: sqlite3.Connection) -> bool:
    return any(name == STAGE_DB for _, name, _ in conn.execute("PRAGMA database_list"))


def detach_stage(conn: sqlite3.Connection) -> None:
    """Detach and delete the card stage (outside a transaction): the whole of dropping it."""
    if _stage_attached(conn):
        conn.execute(f"DETACH DATABASE {STAGE_DB}")
    stage = _stage_path(conn)
    if stage is not None:
        stage.unlink(missing_ok=True)


def create_staging(conn: sqlite3.Connection) -> None:
    def create(conn: sqlite3.Connection) -> None:
        drop_staging(conn)
        for live, staging in (("members", MEMBERS_NEXT), ("cards", CARDS_NEXT)):
            sql = conn.execute("SELECT sql FROM sqlite_schema WHERE type = 'table' AND name = ?", (live,)).fetchone()
            ddl, count = _CREATE_TABLE.subn(f"CREATE TABLE {staging}", sql[0] if sql else "", count=1)
            if count != 1:
                raise StoreError(f"unexpected schema for table {live!r}")
            conn.execute(ddl)

    detach_stage(conn)
    transaction(conn, create)
    stage = _stage_path(conn)
    conn.execute(f"ATTACH DATABASE ? AS {STAGE_DB}", (str(stage) if stage else "",))
    # Durability is the lane file's business, not the stage's: nothing ever reads a stage written by an
    # earlier run (a crash mid-import leaves the live cache in use, and the next start or import deletes
    # the file), so it has no journal on disk and is never synced.  The live cache, the *_next tables
    # and the swap stay in the lane's file under WAL and synchronous=FULL.  The journal is kept in
    # memory so that a rolled-back chunk still rolls back here too.
    conn.execute(f"PRAGMA {STAGE_DB}.journal_mode = MEMORY")
    conn.execute(f"PRAGMA {STAGE_DB}.synchronous = OFF")
    # The lane's size limit (max_db_bytes) holds for the stage too.
    limit = int(conn.execute("PRAGMA main.max_page_count").fetchone()[0])
    conn.execute(f"PRAGMA {STAGE_DB}.max_page_count = {limit}")
    conn.execute(
        f"CREATE TABLE {CARDS_STAGE} (k INTEGER PRIMARY KEY, card_hash TEXT, member_id TEXT, card_kind TEXT,"
        " state TEXT, valid_from TEXT, valid_until TEXT)"
    )
    conn.create_function(_UNHEX, 1, bytes.fromhex, deterministic=True)


@dataclass(frozen=True, slots=True)
class EncodedChunk:
    """A chunk with its rows as the JSON text ``stage_chunk`` inserts; None: insert the tuples instead."""

    chunk: Chunk
    stage_rows: list[StageRow]
    members_json: str | None
    cards_json: str | None


class StageEncoder:
    """Numbers the staged cards by partition and encodes each chunk's rows; runs on the reading thread.

    ``counts[p]``: how many cards partition ``p`` has had so far.
    """

    def __init__(self) -> None:
        self.counts = [0] * PARTITIONS

    def encode(self, chunk: Chunk) -> EncodedChunk:
        counts = self.counts
        rows: list[StageRow] = []
        append = rows.append
        for card, (line, index) in zip(chunk.cards, chunk.card_where, strict=True):
            partition = card[0][0] >> (8 - _PARTITION_BITS)
            counts[partition] += 1
            key = partition << _PARTITION_SHIFT | line << _INDEX_BITS | index
            append((key, card[0].hex(), card[1], card[2], card[3], card[4], card[5]))
        return EncodedChunk(chunk, rows, _json(chunk.members), _json(rows))


def _json(rows: object) -> str | None:
    try:
        text = orjson.dumps(rows)
    except orjson.JSONEncodeError:
        return None  # e.g. a lone surrogate in a string: the tuples say what becomes of it
    # SQLite's JSON functions end a text at an escaped NUL, where a bound parameter keeps it whole.
    return None if b"\\u0000" in text else text.decode()


class _DuplicateMemberError(Exception):
    """A chunk repeats a member id; raised to roll the bulk insert back."""


def stage_chunk(conn: sqlite3.Connection, encoded: EncodedChunk, source: str) -> list[Issue]:
    """Stage one chunk of parsed lines; returns the duplicate member ids found, by line."""
    chunk = encoded.chunk

    def bulk(conn: sqlite3.Connection) -> None:
        if encoded.members_json is None:
            inserted = conn.executemany(_MEMBERS_SQL, chunk.members).rowcount
        else:
            inserted = conn.execute(_MEMBERS_JSON_SQL, (encoded.members_json,)).rowcount
        if inserted != len(chunk.members):
            raise _DuplicateMemberError
        _stage_cards(conn, encoded)

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
        _stage_cards(conn, encoded)
        return issues

    return transaction(conn, row_by_row)


def _stage_cards(conn: sqlite3.Connection, encoded: EncodedChunk) -> None:
    if encoded.cards_json is not None:
        conn.execute(_STAGE_JSON_SQL, (encoded.cards_json,))
    elif encoded.stage_rows:
        conn.executemany(_STAGE_SQL, encoded.stage_rows)


def _key_range(partition: int) -> tuple[int, int]:
    low = partition << _PARTITION_SHIFT
    return low, low | ((1 << _PARTITION_SHIFT) - 1)


def build_cards(conn: sqlite3.Connection, partition: int, staged: int, source: str) -> list[Issue]:
    """Move one partition of ``cards_stage`` (``staged`` cards) into ``cards_next`` in key order.

    Returns the duplicate card hashes, by line.  Lower-case hex sorts as the
    bytes do, so ordering by the staged text is ordering by the key.
    """

    def build(conn: sqlite3.Connection) -> list[Issue]:
        inserted = conn.execute(
            f"INSERT INTO {CARDS_NEXT} SELECT {_UNHEX}(card_hash), member_id, card_kind, state, valid_from,"  # noqa: S608
            f" valid_until FROM {CARDS_STAGE} WHERE k BETWEEN ? AND ? ORDER BY card_hash ON CONFLICT DO NOTHING",
            _key_range(partition),
        ).rowcount
        return [] if inserted == staged else _duplicate_cards(conn, partition, source)

    return transaction(conn, build)


def _duplicate_cards(conn: sqlite3.Connection, partition: int, source: str) -> list[Issue]:
    low, high = _key_range(partition)
    rows = conn.execute(
        f"SELECT card_hash, k, member_id FROM {CARDS_STAGE} WHERE k BETWEEN ?1 AND ?2"  # noqa: S608
        f" AND card_hash IN (SELECT card_hash FROM {CARDS_STAGE} WHERE k BETWEEN ?1 AND ?2"
        " GROUP BY card_hash HAVING count(*) > 1) ORDER BY card_hash, k",
        (low, high),
    ).fetchall()
    issues = []
    first: tuple[str, int, str] | None = None
    for card, key, member_id in rows:
        line, index = (key & _LINE_MASK) >> _INDEX_BITS, key & _INDEX_MASK
        if first is None or first[0] != card:
            first = (card, line, member_id)
            continue
        issues.append(
            Issue(
                f"cards[{index}].card_hash",
                "duplicate_card",
                f"card {card[:12]}… was already given on line {first[1]} (member {first[2]!r})",
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
