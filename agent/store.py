"""The lane's local store: the member cache and the journal, in one SQLite file.

One ``LaneStore`` owns one aiosqlite connection, and aiosqlite's thread is the
only thread that touches it.  Every operation is one function run on that
thread, transaction and all (see ``_run``): one thread hop per call, and no
other coroutine's statements can slip into the middle of a transaction.

The journal is the outbox head office drains: each sale, return and void gets
a gapless per-lane sequence number (``max(seq) + 1`` under ``BEGIN IMMEDIATE``)
and a random global id, in the same transaction as its effects.  With WAL and
``synchronous=FULL`` a call that returned has been fsynced: a power cut or a
``kill -9`` keeps it, and one that did not return left nothing behind.

Idempotency: sales, returns and voids are keyed by the POS's ids.  The same
key with the same request digest replays the stored response and writes
nothing; the same key with another digest is a ``SaleConflictError``.

If the awaiting coroutine is cancelled, the work already queued on the
connection's thread still runs to its end (commit or rollback): a cancelled
``commit_sale`` may have committed, which the POS's retry with the same
``sale_id`` then replays.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import logging
import os
import sqlite3
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, NamedTuple, Self, TypeVar, cast

import aiosqlite

from agent import migrations, store_import
from agent.basket import Member
from agent.dbtx import transaction
from agent.errors import (
    AckError,
    InputError,
    Issue,
    MemberGapError,
    ReturnError,
    SaleConflictError,
    SaleHasReturnsError,
    SaleVoidedError,
    StoreBusyError,
    StoreCorruptError,
    StoreError,
    StoreFullError,
    UnknownSaleError,
)
from agent.money import format_qty
from agent.returns import Returned, SoldLine

# card_hash is re-exported: head office and the lanes share one definition.
from agent.snapshot import MIN_KEY_BYTES, IssueList, MemberDelta, SnapshotReader, card_hash, key_check, read_delta

__all__ = [
    "BacklogStats",
    "CardRecord",
    "DeltaResult",
    "HotCard",
    "HotlistResult",
    "ImportResult",
    "JournalEntry",
    "JournalRow",
    "LaneStore",
    "MemberSyncState",
    "SaleRecord",
    "StoreStatus",
    "card_hash",
    "json_text",
    "request_digest",
]

log = logging.getLogger(__name__)

T = TypeVar("T")
CardUse = Literal["ok", "lost", "replaced", "cancelled", "expired", "not_yet_valid"]

_SQLITE_CORRUPT = 11
_SQLITE_NOTADB = 26
_SQLITE_FULL = 13
_SQLITE_BUSY = 5
_SQLITE_LOCKED = 6
_QUICK_CHECK_ROWS = 20
# The WAL is reused, not shrunk, after checkpoints; cap what it keeps after a big import.
_JOURNAL_SIZE_LIMIT = 64 * 1024 * 1024


def request_digest(document: Any) -> str:
    """SHA-256 of a request's canonical JSON (sorted keys, compact, UTF-8): the idempotency fingerprint."""
    canonical = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def json_text(document: Any) -> str:
    """Compact JSON (UTF-8 text, no NaN): how documents are stored, and how the POS API sends them."""
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _text(document: Mapping[str, Any] | str) -> str:
    """A document as stored: JSON text given by the caller (encoded once, for a large sale) or encoded here."""
    return document if isinstance(document, str) else json_text(dict(document))


def _iso_at(at: dt.datetime) -> str:
    if at.utcoffset() is None:
        raise ValueError("'at' needs a UTC offset")
    return at.isoformat()


def _date(text: str | None) -> dt.date | None:
    return None if text is None else dt.date.fromisoformat(text)


def _birthday(text: str | None) -> tuple[int, int] | None:
    return None if text is None else (int(text[:2]), int(text[3:]))


# --- records ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CardRecord:
    """A cached card and its member, as one lookup returns them."""

    card_hash: bytes
    card_kind: str
    state: str
    valid_from: dt.date
    valid_until: dt.date | None
    member: Member
    member_version: int

    def use_on(self, day: dt.date) -> CardUse:
        """Whether the card may be used on ``day`` (the lane's local date), else why not."""
        if self.state in ("lost", "replaced", "cancelled"):
            return cast("CardUse", self.state)
        if self.state == "expired" or (self.valid_until is not None and day > self.valid_until):
            return "expired"
        if day < self.valid_from:
            return "not_yet_valid"
        return "ok"


@dataclass(frozen=True, slots=True)
class JournalEntry:
    """One journal entry, as the sync layer publishes it."""

    seq: int
    id: str
    kind: str
    at: str
    rules_version: str
    member_version: int
    body: dict[str, Any]


@dataclass(frozen=True, slots=True)
class JournalRow:
    """A journal row for the wire (``sync.wire.encode_batch``): ``body`` is the stored JSON text, not decoded."""

    seq: int
    id: str
    kind: str
    at: str
    rules_version: str
    member_version: int
    body: str


@dataclass(frozen=True, slots=True)
class SaleRecord:
    """A committed sale: its journal position, request fingerprint, response and sold lines."""

    sale_id: str
    seq: int
    journal_id: str
    at: str
    request_digest: str
    entry: dict[str, Any]
    response: dict[str, Any]
    member_id: str | None
    points_spent: int
    rebate_spent_fen: int
    lines: tuple[SoldLine, ...]
    void_seq: int | None

    @property
    def voided(self) -> bool:
        return self.void_seq is not None


@dataclass(frozen=True, slots=True)
class StoreStatus:
    """What ``GET /v1/status`` and the sync layer report about the store."""

    path: str
    schema_version: int
    journal_epoch: str
    last_seq: int
    acked_seq: int
    backlog: int
    db_bytes: int
    member_version: int
    members: int
    cards: int
    snapshot_created: str | None
    card_key_ok: bool


class BacklogStats(NamedTuple):
    """The unacknowledged part of the journal: entries, their bodies' bytes, the oldest one's ``at``."""

    entries: int
    bytes: int
    oldest_unacked_at: str | None


@dataclass(frozen=True, slots=True)
class ImportResult:
    """What a snapshot import replaced the member cache with."""

    source: str
    version: int
    members: int
    cards: int
    seconds: float


# --- the store --------------------------------------------------------------


class LaneStore:
    """The member cache and the journal; open with ``await LaneStore.open(...)`` or ``async with``."""

    def __init__(self, db: aiosqlite.Connection, path: Path, card_key: bytes) -> None:
        self._db = db
        self.path = path
        self._card_key = card_key
        self._key_check = key_check(card_key)
        self._import_lock = asyncio.Lock()
        self._default_max_pages = 0
        self._closed = False
        self._busy_timeout_ms = 5000
        self._checkpointer: aiosqlite.Connection | None = None
        # Set after every sale, return or void actually written (never for a replay): the uplink's wake-up.
        self.journal_appended = asyncio.Event()
        # (acked_seq, last_seq, bytes) of the last backlog_stats: the next one only reads what changed.
        # Touched on the connection's thread only.
        self._backlog_bytes: tuple[int, int, int] | None = None

    @classmethod
    async def open(
        cls,
        path: str | os.PathLike[str],
        card_key: bytes,
        *,
        busy_timeout_ms: int = 5000,
        max_db_bytes: int | None = None,
        background_checkpoints: bool = False,
    ) -> LaneStore:
        """Open (creating if needed) and migrate the database at ``path``.

        Checks the file with ``PRAGMA quick_check`` first: a damaged file raises
        StoreCorruptError naming it, and is left exactly as found.

        ``background_checkpoints``: the caller runs ``checkpoint()`` now and
        then (the daemon does, every second), and commits never do.  SQLite's
        automatic checkpoint otherwise runs inside whichever commit crosses
        1,000 WAL pages, which made every 40th or so sale several times
        slower than the rest.
        """
        path = Path(path)
        if len(card_key) < MIN_KEY_BYTES:
            raise ValueError(f"the card key must be at least {MIN_KEY_BYTES} bytes")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create the directory of {path}: {exc}", path=str(path)) from exc
        try:
            db = await aiosqlite.connect(str(path), isolation_level=None, timeout=busy_timeout_ms / 1000)
        except sqlite3.Error as exc:
            raise _translate(exc, path, "open") from exc
        store = cls(db, path, card_key)
        store._busy_timeout_ms = busy_timeout_ms
        try:
            store._default_max_pages = await store._run(lambda conn: _prepare(conn, path, busy_timeout_ms), "open")
            if max_db_bytes is not None:
                await store.set_size_limit(max_db_bytes)
            if background_checkpoints:
                await store._run(lambda conn: conn.execute("PRAGMA wal_autocheckpoint = 0"), "open")
        except BaseException:
            await db.close()
            raise
        return store

    async def close(self) -> None:
        """Close the connection (and its thread); the last close checkpoints the WAL.  Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._checkpointer is not None:
                await self._checkpointer.close()
            await self._run(lambda conn: conn.execute("PRAGMA optimize"), "optimize")
        except (StoreError, sqlite3.Error) as exc:
            log.warning("closing the store: %s", exc)
        finally:
            await self._db.close()

    async def checkpoint(self) -> tuple[int, int]:
        """Copy committed WAL pages into the database file: ``(wal_pages, checkpointed_pages)``.

        PASSIVE, on a connection (and thread) of its own: it never waits for,
        nor blocks, a sale being committed meanwhile; what it cannot copy yet
        it copies next time.
        """
        if self._closed:
            raise StoreError(f"{self.path}: the store is closed", path=str(self.path))
        try:
            if self._checkpointer is None:
                self._checkpointer = await aiosqlite.connect(
                    str(self.path), isolation_level=None, timeout=self._busy_timeout_ms / 1000
                )
            async with self._checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)") as cursor:
                row = await cursor.fetchone()
        except sqlite3.Error as exc:
            raise _translate(exc, self.path, "checkpoint") from exc
        return (0, 0) if row is None else (int(row[1]), int(row[2]))

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def _run(self, fn: Callable[[sqlite3.Connection], T], what: str) -> T:
        """Run ``fn(connection)`` on the connection's own thread, translating SQLite's errors.

        aiosqlite's public calls each take one statement and one thread hop; a
        transaction built from them pays a hop per statement and lets other
        coroutines' statements interleave with it on the shared connection.
        Its ``_execute`` queues one function instead, as aiosqlite's own helpers
        do; it and ``_conn`` are the same in 0.20 to 0.22, the range pinned in
        pyproject.toml, and every store test goes through them.
        """
        db = self._db

        def work() -> T:
            return fn(db._conn)  # noqa: SLF001 - see above

        try:
            return cast("T", await db._execute(work))  # type: ignore[no-untyped-call]  # noqa: SLF001
        except sqlite3.Error as exc:
            raise _translate(exc, self.path, what) from exc
        except ValueError as exc:
            if "closed" in str(exc) or "no active connection" in str(exc):
                raise StoreError(f"{self.path}: the store is closed", path=str(self.path)) from exc
            raise

    async def _write(self, fn: Callable[[sqlite3.Connection], T], what: str) -> T:
        """Run ``fn`` inside BEGIN IMMEDIATE … COMMIT on the owner thread; roll back on any error."""
        return await self._run(lambda conn: transaction(conn, fn), what)

    def card_hash(self, number: str) -> bytes:
        """The keyed hash of a card number with this lane's card key."""
        return card_hash(self._card_key, number)

    async def set_size_limit(self, max_db_bytes: int | None) -> None:
        """Cap the database size (SQLite's ``max_page_count``); ``None`` lifts the cap.

        A write that would grow the file beyond it fails as a full disk would,
        with StoreFullError.  SQLite never sets the cap below the current size.
        """

        def apply(conn: sqlite3.Connection) -> None:
            if max_db_bytes is None:
                pages = self._default_max_pages
            else:
                page_size = conn.execute("PRAGMA page_size").fetchone()[0]
                pages = max(1, max_db_bytes // page_size)
            conn.execute(f"PRAGMA max_page_count = {int(pages)}")

        await self._run(apply, "set size limit")

    # --- member cache -------------------------------------------------------

    async def lookup_card(self, card_hash: bytes) -> CardRecord | None:
        """The card with this keyed hash and its member, or None if the lane does not know it."""
        row = await self._run(lambda conn: conn.execute(_LOOKUP_CARD, (card_hash,)).fetchone(), "card lookup")
        if row is None:
            return None
        kind, state, valid_from, valid_until = row[:4]
        member = _member(row[4:], card_kind=kind)
        return CardRecord(
            card_hash=card_hash,
            card_kind=kind,
            state=state,
            valid_from=dt.date.fromisoformat(valid_from),
            valid_until=_date(valid_until),
            member=member,
            member_version=row[-1],
        )

    async def get_member(self, member_id: str) -> Member | None:
        """A member by id (typed at the POS), with the kind of their newest active card."""
        row = await self._run(lambda conn: conn.execute(_GET_MEMBER, (member_id,)).fetchone(), "member lookup")
        return None if row is None else _member(row[1:], card_kind=row[0])

    async def card_for_sale(self, card_hash: bytes) -> tuple[CardRecord, tuple[int, int]] | None:
        """``lookup_card`` and the member's ``unsynced_spend`` read together: one thread hop, one snapshot."""

        def read(conn: sqlite3.Connection) -> tuple[Any, Any] | None:
            row = conn.execute(_LOOKUP_CARD, (card_hash,)).fetchone()
            if row is None:
                return None
            return row, conn.execute(_UNSYNCED_SPEND, (row[4],)).fetchone()

        found = await self._run(read, "card lookup")
        if found is None:
            return None
        row, spend = found
        kind, state, valid_from, valid_until = row[:4]
        record = CardRecord(
            card_hash=card_hash,
            card_kind=kind,
            state=state,
            valid_from=dt.date.fromisoformat(valid_from),
            valid_until=_date(valid_until),
            member=_member(row[4:], card_kind=kind),
            member_version=row[-1],
        )
        return record, (int(spend[0]), int(spend[1]))

    async def member_for_sale(self, member_id: str) -> tuple[Member, tuple[int, int]] | None:
        """``get_member`` and ``unsynced_spend`` read together: one thread hop, one snapshot."""

        def read(conn: sqlite3.Connection) -> tuple[Any, Any] | None:
            row = conn.execute(_GET_MEMBER, (member_id,)).fetchone()
            if row is None:
                return None
            return row, conn.execute(_UNSYNCED_SPEND, (member_id,)).fetchone()

        found = await self._run(read, "member lookup")
        if found is None:
            return None
        row, spend = found
        return _member(row[1:], card_kind=row[0]), (int(spend[0]), int(spend[1]))

    async def import_snapshot(
        self, path: str | os.PathLike[str], *, allow_older: bool = False, chunk_members: int = 5000
    ) -> ImportResult:
        """Replace the member cache with a snapshot file, all or nothing.

        Every line is validated and loaded into staging tables first, in short
        transactions so that sales carry on meanwhile; only a file without a
        single problem is swapped in, in one transaction.  Raises InputError
        listing the problems (file:line, field, reason); the cache in use is
        then untouched.  A snapshot older than the cached member table raises
        StaleSnapshotError unless ``allow_older``.
        """
        started = time.perf_counter()
        async with self._import_lock:
            with SnapshotReader(path) as reader:
                header = await asyncio.to_thread(reader.header, self._card_key)
                store_import.check_fresh(header, await self._run(store_import.member_version, "import"), allow_older)
                await self._run(store_import.create_staging, "import")
                try:
                    members, cards = await self._stage(reader, chunk_members)
                    await self._run(lambda conn: store_import.swap(conn, header, members, cards, allow_older), "import")
                except asyncio.CancelledError:
                    raise  # the next import (or open) drops the staging tables
                except BaseException:
                    await self._drop_staging()
                    raise
            await self._drop_retired()
        seconds = time.perf_counter() - started
        log.info(
            "member snapshot %s imported: version %d, %d members, %d cards in %.1f s",
            reader.name,
            header.version,
            members,
            cards,
            seconds,
        )
        return ImportResult(reader.name, header.version, members, cards, seconds)

    async def _stage(self, reader: SnapshotReader, chunk_members: int) -> tuple[int, int]:
        issues = IssueList()
        members = cards = 0
        encoder = store_import.StageEncoder()
        reader.gil_pause = 0.0001  # hands the GIL to this thread and to sales every 256 lines (SnapshotReader.chunk)

        def read() -> store_import.EncodedChunk:
            return encoder.encode(reader.chunk(chunk_members))

        # Double-buffered: the next chunk is read and checked (Python, holding the GIL) in a worker
        # thread while this one is inserted, which SQLite does from JSON without the GIL.
        reading = asyncio.ensure_future(asyncio.to_thread(read))
        try:
            while True:
                encoded = await reading
                chunk = encoded.chunk
                if not chunk.done:
                    reading = asyncio.ensure_future(asyncio.to_thread(read))
                issues.extend(chunk.issues)
                if chunk.members or chunk.cards:
                    staged = partial(store_import.stage_chunk, encoded=encoded, source=reader.name)
                    issues.extend(await self._run(staged, "import"))
                    members += len(chunk.members)
                    cards += len(chunk.cards)
                if chunk.done:
                    break
        finally:
            if not reading.done():
                await asyncio.wait([reading])  # the worker reads the file, which the caller closes next
            if not reading.cancelled():
                reading.exception()  # retrieved: a failure of a read nobody waits for any more is not news
        for partition in range(store_import.PARTITIONS):
            build = partial(
                store_import.build_cards, partition=partition, staged=encoder.counts[partition], source=reader.name
            )
            issues.extend(await self._run(build, "import"))
        await self._run(store_import.detach_stage, "import")
        if issues:
            raise InputError(issues.report(), what="member snapshot")
        return members, cards

    async def _drop_retired(self) -> None:
        try:
            for table in store_import.RETIRED:
                await self._run(partial(store_import.drop_retired, table=table), "import cleanup")
        except StoreError as exc:
            log.warning("could not drop the replaced member cache (dropped at the next import or start): %s", exc)

    async def _drop_staging(self) -> None:
        try:
            await self._run(store_import.detach_stage, "import cleanup")
            await self._run(lambda conn: transaction(conn, store_import.drop_staging), "import cleanup")
        except StoreError as exc:
            log.warning("could not drop the import's staging tables (dropped at the next import): %s", exc)

    # --- sales, returns, voids --------------------------------------------

    async def commit_sale(
        self,
        sale_id: str,
        request_digest: str,
        entry: Mapping[str, Any] | str,
        response: Mapping[str, Any] | str,
        *,
        at: dt.datetime,
        rules_version: str,
        member_id: str | None = None,
        points_spent: int = 0,
        rebate_spent_fen: int = 0,
        lines: Sequence[SoldLine] = (),
        member_version: int | None = None,
        offline_day: dt.date | None = None,
        offline_check: Callable[[tuple[int, int]], None] | None = None,
    ) -> tuple[dict[str, Any], bool]:
        """Journal a sale durably; returns ``(response, replayed)``.

        ``entry`` is the journal body head office receives; ``response`` what
        the POS gets on every retry (the caller may keep it small and rebuild
        the rest from the entry, see ``find_sale``).  Either may be given as
        JSON text already encoded, stored as it is.  ``lines`` (what each line sold,
        net and earned) let returns be checked against the sale in the same
        transaction.  ``points_spent``/``rebate_spent_fen`` are the member's
        own spend, counted by ``unsynced_spend`` until head office acknowledges
        it.  ``member_version`` defaults to the cached member table's version.
        Raises SaleConflictError for a known ``sale_id`` with another digest.

        ``offline_day``: the member's points and rebate are spent without a
        hold from head office, on that local day (``offline_spent``);
        ``offline_check(spent that day so far)`` runs in the same transaction
        and raises to refuse the sale (the lane's offline allowance).
        """
        if points_spent < 0 or rebate_spent_fen < 0:
            raise ValueError("spends are not negative")
        if (points_spent or rebate_spent_fen) and member_id is None:
            raise ValueError("a points or rebate spend needs the member_id")
        if len({line.line_id for line in lines}) != len(lines):
            raise ValueError("sold line ids must be unique")
        body, stored = _text(entry), _text(response)
        at_text = _iso_at(at)
        line_rows = [
            (sale_id, line.line_id, position, line.qty, line.net_fen, line.points)
            for position, line in enumerate(lines)
        ]
        earned = sum(line.points for line in lines)

        def commit(conn: sqlite3.Connection) -> tuple[dict[str, Any], bool]:
            row = conn.execute("SELECT request_digest, response FROM sales WHERE sale_id = ?", (sale_id,)).fetchone()
            if row is not None:
                return _replay(row, request_digest, "sale", sale_id, self.path)
            seq = _append(conn, "sale", at_text, rules_version, member_version, body)
            conn.execute(
                "INSERT INTO sales (sale_id, seq, request_digest, response, member_id, points_spent, rebate_spent_fen)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (sale_id, seq, request_digest, stored, member_id, points_spent, rebate_spent_fen),
            )
            conn.executemany("INSERT INTO sale_lines VALUES (?, ?, ?, ?, ?, ?)", line_rows)
            if member_id is not None and (points_spent or rebate_spent_fen):
                conn.execute(
                    "INSERT INTO own_spend VALUES (?, ?, ?, ?, ?)",
                    (seq, member_id, points_spent, rebate_spent_fen, seq),
                )
            if member_id is not None and earned:
                conn.execute("INSERT INTO own_earned VALUES (?, ?, ?)", (seq, member_id, earned))
            if offline_day is not None and member_id is not None:
                spent = (points_spent, rebate_spent_fen)
                _spend_offline(conn, seq, sale_id, member_id, offline_day, spent, offline_check)
            return json.loads(stored), False

        return self._appended(await self._write(commit, "sale commit"))

    async def offline_spent(self, member_id: str, day: dt.date) -> tuple[int, int]:
        """``(points, rebate_fen)`` this lane let the member spend without a hold on local ``day`` (voids excepted)."""
        return await self._run(lambda conn: _offline_spent(conn, member_id, day), "offline spend lookup")

    async def find_sale(self, sale_id: str) -> SaleRecord | None:
        """A committed sale by the POS's id, or None."""
        return await self._run(lambda conn: _find_sale(conn, sale_id), "sale lookup")

    async def sale_context(
        self, sale_id: str, member_id: str | None
    ) -> tuple[SaleRecord | None, tuple[Member, tuple[int, int]] | None]:
        """What a new sale needs, in one thread hop: the sale if its id is taken, and the member with its spend.

        The member is looked up only when the id is free (a retry is answered
        from the journal and needs no member).
        """

        def read(conn: sqlite3.Connection) -> tuple[SaleRecord | None, tuple[Member, tuple[int, int]] | None]:
            sale = _find_sale(conn, sale_id)
            if sale is not None or member_id is None:
                return sale, None
            row = conn.execute(_GET_MEMBER, (member_id,)).fetchone()
            if row is None:
                return None, None
            spend = conn.execute(_UNSYNCED_SPEND, (member_id,)).fetchone()
            return None, (_member(row[1:], card_kind=row[0]), (int(spend[0]), int(spend[1])))

        return await self._run(read, "sale lookup")

    async def commit_return(
        self,
        return_id: str,
        sale_id: str,
        request_digest: str,
        entry: Mapping[str, Any],
        response: Mapping[str, Any],
        lines_returned: Mapping[str, Returned],
        *,
        at: dt.datetime,
        rules_version: str,
        member_version: int | None = None,
    ) -> tuple[dict[str, Any], bool]:
        """Journal a return against a sale durably; returns ``(response, replayed)``.

        ``lines_returned`` is what this return takes back per line (quantity,
        refund, points reversed), as the engine priced it.  In the same
        transaction: the sale must exist (UnknownSaleError) and not be voided
        (SaleVoidedError), and when the sale recorded its lines, the returns so
        far plus this one must not exceed any line's quantity, net or points
        (ReturnError).  Points reversed count as the member's own spend until
        acknowledged: the balance head office holds still includes them.
        """
        if not lines_returned:
            raise ReturnError([Issue("lines", "empty_return", "a return takes back at least one line")], what="return")
        bad = [
            Issue(f"lines.{line_id}", "bad_quantity", "quantity must be > 0, refund and points >= 0")
            for line_id, back in lines_returned.items()
            if back.qty <= 0 or back.refund_fen < 0 or back.points < 0
        ]
        if bad:
            raise ReturnError(bad, what="return")
        body, stored = json_text(dict(entry)), json_text(dict(response))
        at_text = _iso_at(at)
        rows = [
            (return_id, line_id, sale_id, back.qty, back.refund_fen, back.points)
            for line_id, back in lines_returned.items()
        ]
        points_reversed = sum(back.points for back in lines_returned.values())

        def commit(conn: sqlite3.Connection) -> tuple[dict[str, Any], bool]:
            row = conn.execute(
                "SELECT request_digest, response, sale_id FROM returns WHERE return_id = ?", (return_id,)
            ).fetchone()
            if row is not None:
                if row[2] != sale_id:
                    raise SaleConflictError(
                        f"return {return_id!r} was already used for sale {row[2]!r}", key=return_id, path=str(self.path)
                    )
                return _replay(row, request_digest, "return", return_id, self.path)
            sale = conn.execute("SELECT member_id, void_seq FROM sales WHERE sale_id = ?", (sale_id,)).fetchone()
            if sale is None:
                raise UnknownSaleError(f"no sale {sale_id!r} on this lane", sale_id=sale_id, path=str(self.path))
            if sale[1] is not None:
                raise SaleVoidedError(
                    f"sale {sale_id!r} was voided: nothing to return", sale_id=sale_id, path=str(self.path)
                )
            _check_return_limits(conn, sale_id, lines_returned)
            seq = _append(conn, "return", at_text, rules_version, member_version, body)
            conn.execute(
                "INSERT INTO returns VALUES (?, ?, ?, ?, ?)", (return_id, sale_id, seq, request_digest, stored)
            )
            conn.executemany("INSERT INTO return_lines VALUES (?, ?, ?, ?, ?, ?)", rows)
            if sale[0] is not None and points_reversed:
                conn.execute("INSERT INTO own_spend VALUES (?, ?, ?, 0, ?)", (seq, sale[0], points_reversed, seq))
            return json.loads(stored), False

        return self._appended(await self._write(commit, "return commit"))

    async def find_return(self, return_id: str) -> tuple[str, str, dict[str, Any]] | None:
        """A committed return by the POS's id: ``(sale_id, request_digest, response)``, or None."""
        row = await self._run(
            lambda conn: conn.execute(
                "SELECT sale_id, request_digest, response FROM returns WHERE return_id = ?", (return_id,)
            ).fetchone(),
            "return lookup",
        )
        return None if row is None else (row[0], row[1], json.loads(row[2]))

    async def returned_so_far(self, sale_id: str) -> dict[str, Returned]:
        """What the sale's returns took back so far, per line: the engine's ``previous``."""
        rows = await self._run(
            lambda conn: conn.execute(
                "SELECT line_id, SUM(qty), SUM(refund_fen), SUM(points) FROM return_lines"
                " WHERE sale_id = ? GROUP BY line_id",
                (sale_id,),
            ).fetchall(),
            "returns lookup",
        )
        return {line_id: Returned(qty, refund, points) for line_id, qty, refund, points in rows}

    async def void_sale(
        self,
        sale_id: str,
        request_digest: str,
        entry: Mapping[str, Any],
        response: Mapping[str, Any],
        *,
        at: dt.datetime,
        rules_version: str,
        member_version: int | None = None,
    ) -> tuple[dict[str, Any], bool]:
        """Journal the void of a sale durably; returns ``(response, replayed)``.

        A retry of the same void (same digest) replays; a second, different
        void raises SaleVoidedError; a sale with returns cannot be voided
        (SaleHasReturnsError).  The sale's own spend is credited back.
        """
        body, stored = json_text(dict(entry)), json_text(dict(response))
        at_text = _iso_at(at)

        def void(conn: sqlite3.Connection) -> tuple[dict[str, Any], bool]:
            sale = conn.execute(
                "SELECT seq, member_id, points_spent, rebate_spent_fen, void_digest, void_response"
                " FROM sales WHERE sale_id = ?",
                (sale_id,),
            ).fetchone()
            if sale is None:
                raise UnknownSaleError(f"no sale {sale_id!r} on this lane", sale_id=sale_id, path=str(self.path))
            sale_seq, member_id, points, rebate, void_digest, void_response = sale
            if void_digest is not None:
                if void_digest == request_digest:
                    return json.loads(void_response), True
                raise SaleVoidedError(f"sale {sale_id!r} is already voided", sale_id=sale_id, path=str(self.path))
            if conn.execute("SELECT 1 FROM returns WHERE sale_id = ? LIMIT 1", (sale_id,)).fetchone():
                raise SaleHasReturnsError(
                    f"sale {sale_id!r} has returns: return the remaining lines instead of voiding",
                    sale_id=sale_id,
                    path=str(self.path),
                )
            seq = _append(conn, "void", at_text, rules_version, member_version, body)
            conn.execute(
                "UPDATE sales SET void_seq = ?, void_digest = ?, void_response = ? WHERE sale_id = ?",
                (seq, request_digest, stored, sale_id),
            )
            if member_id is not None and (points or rebate):
                # Points at the sale: the credit counts only while the sale's own spend still does.
                conn.execute(
                    "INSERT INTO own_spend VALUES (?, ?, ?, ?, ?)", (seq, member_id, -points, -rebate, sale_seq)
                )
            if member_id is not None:
                _take_back_earned(conn, seq, sale_id, member_id)
            return json.loads(stored), False

        return self._appended(await self._write(void, "void commit"))

    def _appended(self, result: tuple[dict[str, Any], bool]) -> tuple[dict[str, Any], bool]:
        if not result[1]:  # written, not replayed
            self.journal_appended.set()
        return result

    # --- sync -----------------------------------------------------------------

    async def unsynced_spend(self, member_id: str) -> tuple[int, int]:
        """``(points, rebate_fen)`` this lane spent for the member in entries head office has not acknowledged."""
        row = await self._run(lambda conn: conn.execute(_UNSYNCED_SPEND, (member_id,)).fetchone(), "spend lookup")
        return int(row[0]), int(row[1])

    async def mark_acked(self, seq: int) -> int:
        """Record head office's acknowledgement of every entry up to ``seq``; returns the acked seq.

        Acknowledgements only move forward (a late, lower one is ignored); one
        beyond the last entry written raises AckError.
        """

        if seq < 0:
            raise ValueError("a sequence number is not negative")

        def ack(conn: sqlite3.Connection) -> int:
            last = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM journal").fetchone()[0]
            if seq > last:
                raise AckError(
                    f"head office acknowledged seq {seq}, but this lane's journal ends at {last}", path=str(self.path)
                )
            conn.execute("UPDATE lane_state SET acked_seq = max(acked_seq, ?)", (seq,))
            return int(conn.execute("SELECT acked_seq FROM lane_state").fetchone()[0])

        return await self._write(ack, "ack")

    async def journal_after(self, seq: int, limit: int = 500) -> list[JournalEntry]:
        """Journal entries with a sequence number above ``seq``, oldest first, at most ``limit``."""
        rows = await self._run(
            lambda conn: conn.execute(
                "SELECT seq, id, kind, at, rules_version, member_version, body FROM journal"
                " WHERE seq > ? ORDER BY seq LIMIT ?",
                (seq, limit),
            ).fetchall(),
            "journal read",
        )
        return [
            JournalEntry(
                seq=seq,
                id=entry_id,
                kind=kind,
                at=at,
                rules_version=rules_version,
                member_version=member_version,
                body=json.loads(body),
            )
            for seq, entry_id, kind, at, rules_version, member_version, body in rows
        ]

    async def journal_batch(self, after_seq: int, limit: int) -> list[JournalRow]:
        """Up to ``limit`` journal rows after ``after_seq``, oldest first, bodies as the stored JSON text.

        One store call, for the uplink: the rows go onto the wire without being decoded.
        """
        if limit < 1:
            raise ValueError("a batch holds at least one entry")
        rows = await self._run(
            lambda conn: conn.execute(
                "SELECT seq, id, kind, at, rules_version, member_version, body FROM journal"
                " WHERE seq > ? ORDER BY seq LIMIT ?",
                (after_seq, limit),
            ).fetchall(),
            "journal read",
        )
        return [JournalRow(*row) for row in rows]

    async def backlog_stats(self) -> BacklogStats:
        """Unacknowledged entries, their bodies' size in bytes (UTF-8) and the oldest one's ``at``.

        The byte count is kept from call to call and only the entries acknowledged or
        written since the last call are read, so a large backlog is not summed anew each
        time on the thread the sales wait for.
        """

        def read(conn: sqlite3.Connection) -> BacklogStats:
            acked = int(conn.execute("SELECT acked_seq FROM lane_state").fetchone()[0])
            last = int(conn.execute("SELECT COALESCE(MAX(seq), 0) FROM journal").fetchone()[0])
            size = "SELECT COALESCE(SUM(LENGTH(CAST(body AS BLOB))), 0) FROM journal WHERE seq > ? AND seq <= ?"
            known = self._backlog_bytes
            if known is None or known[0] > acked or known[1] > last:
                total = int(conn.execute(size, (acked, last)).fetchone()[0])
            else:
                old_acked, old_last, total = known
                total -= int(conn.execute(size, (old_acked, min(acked, old_last))).fetchone()[0])
                total += int(conn.execute(size, (max(old_last, acked), last)).fetchone()[0])
            self._backlog_bytes = (acked, last, total)
            oldest = conn.execute("SELECT at FROM journal WHERE seq = ?", (acked + 1,)).fetchone()
            return BacklogStats(last - acked, total, None if oldest is None else str(oldest[0]))

        return await self._run(read, "backlog")

    async def sync_session(self) -> int:
        """The last sync session number handed out (0: none yet)."""
        row = await self._run(lambda conn: conn.execute("SELECT sync_session FROM lane_state").fetchone(), "session")
        return int(row[0])

    async def next_sync_session(self) -> int:
        """A new sync session number, durably one above the last: one per broker connection."""

        def bump(conn: sqlite3.Connection) -> int:
            conn.execute("UPDATE lane_state SET sync_session = sync_session + 1")
            return int(conn.execute("SELECT sync_session FROM lane_state").fetchone()[0])

        return await self._write(bump, "session")

    async def status(self) -> StoreStatus:
        """Sequence numbers, backlog, size and member-table version."""

        def read(conn: sqlite3.Connection) -> StoreStatus:
            epoch, acked, version, created, members, cards, check = conn.execute(
                "SELECT journal_epoch, acked_seq, member_version, snapshot_created, member_count, card_count,"
                " card_key_check FROM lane_state"
            ).fetchone()
            last = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM journal").fetchone()[0]
            pages = conn.execute("PRAGMA page_count").fetchone()[0]
            page_size = conn.execute("PRAGMA page_size").fetchone()[0]
            schema = conn.execute("PRAGMA user_version").fetchone()[0]
            return StoreStatus(
                path=str(self.path),
                schema_version=schema,
                journal_epoch=epoch,
                last_seq=last,
                acked_seq=acked,
                backlog=last - acked,  # gapless: the count of unacknowledged entries
                db_bytes=pages * page_size,
                member_version=version,
                members=members,
                cards=cards,
                snapshot_created=created,
                card_key_ok=check is None or check == self._key_check,
            )

        return await self._run(read, "status")

    async def integrity_check(self) -> list[str]:
        """SQLite's full ``PRAGMA integrity_check``: ``["ok"]`` or the problems found (slow on a big cache)."""
        rows = await self._run(lambda conn: conn.execute("PRAGMA integrity_check").fetchall(), "integrity check")
        return [str(row[0]) for row in rows]

    # --- member downlink (docs/downlink.md) ------------------------------------------

    async def apply_member_delta(self, path: str | os.PathLike[str]) -> DeltaResult:
        """Apply one page of head office's member changes (a ``member-delta`` file), all or nothing.

        The page is read and checked whole first (InputError lists every
        problem; nothing changes).  Then, in one transaction: each member line
        whose version is above the cached member's replaces the member and all
        its cards (a card another member had moves), a line at or below it is
        skipped (a re-delivery), superseded hot-list entries are dropped and
        the member-table version becomes the page's ``to`` (never lower).  A
        page starting above the cached version raises MemberGapError.
        """
        started = time.perf_counter()
        async with self._import_lock:  # never in the middle of a snapshot import
            delta = await asyncio.to_thread(read_delta, path, self._card_key)
            existing = await self._run(partial(_members_to_replace, delta=delta), "member delta")
            # The card table has no index by member (agent/migrations.py says why): finding the replaced
            # members' cards reads it whole, on a connection of its own so that sales do not wait for it.
            old_cards = await asyncio.to_thread(_cards_of, self.path, existing, self._busy_timeout_ms)
            apply = partial(_apply_delta, delta=delta, old_cards=old_cards, path=self.path)
            result = await self._write(apply, "member delta")
        result = replace(result, seconds=time.perf_counter() - started)
        log.info(
            "member delta %s applied: versions %d-%d (head %d), %d member(s) replaced, %d skipped, in %.3f s",
            delta.source,
            result.after,
            result.to,
            result.head,
            result.applied,
            result.skipped,
            result.seconds,
        )
        return result

    async def apply_hotlist(self, version: int, cards: Sequence[HotCard]) -> HotlistResult:
        """Keep head office's lost / replaced / cancelled cards (one transaction).

        An entry replaces a kept one for the same card only with a higher
        version.  Entries the cache already reflects (the card's member cached
        at the entry's version or later) are dropped at once.
        """

        def apply(conn: sqlite3.Connection) -> HotlistResult:
            now = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")
            rows = [(c.card_hash, c.member_id, c.state, c.version, now) for c in cards]
            stored = conn.executemany(_UPSERT_HOT, rows).rowcount if rows else 0
            pruned = conn.execute(_PRUNE_HOT).rowcount
            conn.execute("UPDATE lane_state SET hotlist_version = ?", (version,))
            active = int(conn.execute("SELECT count(*) FROM hot_cards").fetchone()[0])
            return HotlistResult(version, len(rows), max(stored, 0), pruned, active)

        return await self._write(apply, "hot list")

    async def prune_hot_cards(self) -> int:
        """Drop the hot-list entries the member cache has caught up with (after a snapshot import); how many."""
        return await self._write(lambda conn: conn.execute(_PRUNE_HOT).rowcount, "hot list")

    async def unsynced_earned(self, member_id: str) -> int:
        """Points this lane's unacknowledged sales earned the member, less what its unacknowledged voids took back."""
        row = await self._run(lambda conn: conn.execute(_UNSYNCED_EARNED, (member_id,)).fetchone(), "earned lookup")
        return int(row[0])

    async def member_sync_state(self) -> MemberSyncState:
        """What the member sync last recorded, and the hot list kept."""

        def read(conn: sqlite3.Connection) -> MemberSyncState:
            version, head, synced, error, hotlist = conn.execute(
                "SELECT member_version, member_head_version, member_synced_at, member_sync_error, hotlist_version"
                " FROM lane_state"
            ).fetchone()
            hot = int(conn.execute("SELECT count(*) FROM hot_cards").fetchone()[0])
            return MemberSyncState(version, head, synced, None if error is None else json.loads(error), hotlist, hot)

        return await self._run(read, "member sync state")

    async def note_member_sync(self, *, head: int | None = None, error: Mapping[str, Any] | None = None) -> None:
        """Record head office's version as heard, and the outcome: ``error`` (code, message, at), or success now."""

        def note(conn: sqlite3.Connection) -> None:
            if head is not None:
                conn.execute("UPDATE lane_state SET member_head_version = ?", (head,))
            if error is None:
                now = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")
                conn.execute("UPDATE lane_state SET member_synced_at = ?, member_sync_error = NULL", (now,))
            else:
                conn.execute("UPDATE lane_state SET member_sync_error = ?", (json_text(dict(error)),))

        await self._write(note, "member sync state")


# --- on the connection's thread ------------------------------------------------

_LOOKUP_CARD = (
    "SELECT c.card_kind, COALESCE(h.state, c.state), c.valid_from, c.valid_until, m.member_id, m.tier, m.next_tier,"
    " m.next_tier_from, m.birthday, m.points_balance, m.rebate_fen, m.member_version"
    " FROM cards AS c JOIN members AS m ON m.member_id = c.member_id"
    # A hot-list entry newer than the cached member overrides the card's cached state (docs/downlink.md).
    " LEFT JOIN hot_cards AS h ON h.card_hash = c.card_hash AND h.version > m.member_version"
    " WHERE c.card_hash = ?"
)
_GET_MEMBER = (
    "SELECT card_kind, member_id, tier, next_tier, next_tier_from, birthday, points_balance, rebate_fen, member_version"
    " FROM members WHERE member_id = ?"
)
_FIND_SALE = (
    "SELECT s.seq, j.id, j.at, j.body, s.request_digest, s.response, s.member_id, s.points_spent,"
    " s.rebate_spent_fen, s.void_seq FROM sales AS s JOIN journal AS j ON j.seq = s.seq WHERE s.sale_id = ?"
)
_UNSYNCED_SPEND = (
    "SELECT COALESCE(SUM(o.points), 0), COALESCE(SUM(o.rebate_fen), 0) FROM own_spend AS o, lane_state AS s"
    " WHERE o.member_id = ? AND o.seq > s.acked_seq AND o.origin_seq > s.acked_seq"
)


_OFFLINE_SPENT = (
    "SELECT COALESCE(SUM(o.points), 0), COALESCE(SUM(o.rebate_fen), 0) FROM offline_spend AS o"
    " JOIN sales AS s ON s.sale_id = o.sale_id WHERE o.member_id = ? AND o.day = ? AND s.void_seq IS NULL"
)


def _offline_spent(conn: sqlite3.Connection, member_id: str, day: dt.date) -> tuple[int, int]:
    row = conn.execute(_OFFLINE_SPENT, (member_id, day.isoformat())).fetchone()
    return int(row[0]), int(row[1])


def _spend_offline(
    conn: sqlite3.Connection,
    seq: int,
    sale_id: str,
    member_id: str,
    day: dt.date,
    spend: tuple[int, int],
    check: Callable[[tuple[int, int]], None] | None,
) -> None:
    """Inside a sale's transaction: check the day's offline allowance, then count this sale against it."""
    if check is not None:
        check(_offline_spent(conn, member_id, day))
    if spend[0] or spend[1]:
        conn.execute(
            "INSERT INTO offline_spend VALUES (?, ?, ?, ?, ?, ?)", (seq, sale_id, member_id, day.isoformat(), *spend)
        )


def _find_sale(conn: sqlite3.Connection, sale_id: str) -> SaleRecord | None:
    row = conn.execute(_FIND_SALE, (sale_id,)).fetchone()
    if row is None:
        return None
    lines = conn.execute(
        "SELECT line_id, qty, net_fen, points FROM sale_lines WHERE sale_id = ? ORDER BY position", (sale_id,)
    ).fetchall()
    return SaleRecord(
        sale_id=sale_id,
        seq=row[0],
        journal_id=row[1],
        at=row[2],
        entry=json.loads(row[3]),
        request_digest=row[4],
        response=json.loads(row[5]),
        member_id=row[6],
        points_spent=row[7],
        rebate_spent_fen=row[8],
        void_seq=row[9],
        lines=tuple(SoldLine(*line) for line in lines),
    )


def _member(row: Sequence[Any], *, card_kind: str) -> Member:
    member_id, tier, next_tier, next_tier_from, birthday, points, rebate = row[:7]
    return Member(
        member_id=member_id,
        tier=tier,
        card_kind=card_kind,
        birthday=_birthday(birthday),
        points_balance=points,
        rebate_fen=rebate,
        next_tier=next_tier,
        next_tier_from=_date(next_tier_from),
    )


def _translate(exc: sqlite3.Error, path: Path, what: str) -> StoreError:
    code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
    message = f"{path}: {what} failed: {exc}"
    if code == _SQLITE_FULL or "database or disk is full" in str(exc):
        log.warning("store full: %s", message)
        return StoreFullError(f"{path}: the disk is full ({what} rolled back, nothing written)", path=str(path))
    if code in (_SQLITE_CORRUPT, _SQLITE_NOTADB):
        return StoreCorruptError(f"{path} is damaged ({exc}); it was left as found", path=str(path))
    if code in (_SQLITE_BUSY, _SQLITE_LOCKED):
        return StoreBusyError(f"{path}: another process holds the database ({what}): {exc}", path=str(path))
    return StoreError(message, path=str(path))


def _prepare(conn: sqlite3.Connection, path: Path, busy_timeout_ms: int) -> int:
    """Pragmas, integrity check, migrations; returns SQLite's default max_page_count."""
    conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
    problems = [str(row[0]) for row in conn.execute(f"PRAGMA quick_check({_QUICK_CHECK_ROWS})")]
    if problems != ["ok"]:
        raise StoreCorruptError(
            f"{path} fails SQLite's integrity check; it was left as found: " + "; ".join(problems[:5]), path=str(path)
        )
    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        raise StoreError(f"{path}: cannot use WAL journaling here (got {mode!r})", path=str(path))
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute(f"PRAGMA journal_size_limit = {_JOURNAL_SIZE_LIMIT}")
    current = conn.execute("PRAGMA user_version").fetchone()[0]
    if current > migrations.latest():
        raise StoreError(
            f"{path} has schema version {current}, newer than this program's {migrations.latest()}: upgrade the agent",
            path=str(path),
        )
    for migration in migrations.pending(current):
        migrations.apply(conn, migration)
        log.info("%s: schema migrated to version %d (%s)", path, migration.version, migration.description)
    transaction(conn, store_import.drop_staging)
    return int(conn.execute("PRAGMA max_page_count").fetchone()[0])


def _append(
    conn: sqlite3.Connection, kind: str, at: str, rules_version: str, member_version: int | None, body: str
) -> int:
    """Append a journal entry inside the caller's BEGIN IMMEDIATE; returns its seq."""
    seq, cached_version = conn.execute(
        "SELECT COALESCE((SELECT MAX(seq) FROM journal), 0) + 1, member_version FROM lane_state"
    ).fetchone()
    version = cached_version if member_version is None else member_version
    conn.execute(
        "INSERT INTO journal (seq, id, kind, at, rules_version, member_version, body) VALUES (?, ?, ?, ?, ?, ?, ?)",
        (seq, str(uuid.uuid4()), kind, at, rules_version, version, body),
    )
    return int(seq)


def _replay(row: Sequence[Any], digest: str, what: str, key: str, path: Path) -> tuple[dict[str, Any], bool]:
    if row[0] != digest:
        raise SaleConflictError(
            f"{what} {key!r} was already committed with a different request", key=key, path=str(path)
        )
    return json.loads(row[1]), True


def _check_return_limits(conn: sqlite3.Connection, sale_id: str, back: Mapping[str, Returned]) -> None:
    sold = {
        row[0]: row[1:]
        for row in conn.execute("SELECT line_id, qty, net_fen, points FROM sale_lines WHERE sale_id = ?", (sale_id,))
    }
    if not sold:
        return  # the sale did not record its lines; the caller's engine checked against the response
    done = {
        row[0]: row[1:]
        for row in conn.execute(
            "SELECT line_id, SUM(qty), SUM(refund_fen), SUM(points) FROM return_lines"
            " WHERE sale_id = ? GROUP BY line_id",
            (sale_id,),
        )
    }
    issues = []
    for line_id, this in back.items():
        where = f"lines.{line_id}"
        if line_id not in sold:
            issues.append(Issue(where, "unknown_line", f"the sale has no line {line_id!r}"))
            continue
        qty, net, points = sold[line_id]
        before_qty, before_refund, before_points = done.get(line_id, (0, 0, 0))
        if before_qty + this.qty > qty:
            left = format_qty(max(qty - before_qty, 0))
            issues.append(Issue(where, "over_return", f"{format_qty(this.qty)} asked back, {left} left to return"))
        elif before_refund + this.refund_fen > net or before_points + this.points > points:
            issues.append(
                Issue(where, "over_refund", "the refund or points reversed exceed what the line paid or earned")
            )
    if issues:
        raise ReturnError(issues, what="return")


# --- member downlink (docs/downlink.md) ----------------------------------------------


@dataclass(frozen=True, slots=True)
class HotCard:
    """One card of head office's hot list: lost, replaced or cancelled as of member version ``version``."""

    card_hash: bytes
    member_id: str
    state: Literal["lost", "replaced", "cancelled"]
    version: int


@dataclass(frozen=True, slots=True)
class HotlistResult:
    """What ``apply_hotlist`` did: entries received, new or newer ones kept, superseded ones dropped, now kept."""

    version: int
    received: int
    stored: int
    pruned: int
    active: int


@dataclass(frozen=True, slots=True)
class DeltaResult:
    """What one member-delta page did to the cache."""

    source: str
    after: int
    to: int
    head: int
    version: int  # the member-table version now
    applied: int  # member lines that replaced the cached member
    skipped: int  # member lines the cache already had (at their version or newer)
    cards: int  # cards the applied lines carry
    hot_pruned: int
    seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class MemberSyncState:
    """The member sync's record in the store (``lane_state``), for the status across restarts."""

    version: int
    head_version: int
    synced_at: str | None
    error: dict[str, Any] | None
    hotlist_version: int
    hot_cards: int


_UNSYNCED_EARNED = (
    "SELECT COALESCE(SUM(e.points), 0) FROM own_earned AS e, lane_state AS s"
    " WHERE e.member_id = ? AND e.seq > s.acked_seq"
)
_UPSERT_HOT = (
    "INSERT INTO hot_cards (card_hash, member_id, state, version, received_at) VALUES (?, ?, ?, ?, ?)"
    " ON CONFLICT (card_hash) DO UPDATE SET member_id = excluded.member_id, state = excluded.state,"
    " version = excluded.version, received_at = excluded.received_at WHERE excluded.version > hot_cards.version"
)
# An entry is superseded once the card's member (or, for a card the cache no longer has, the member the entry
# names) is cached at the entry's version or later: the cached card state then already says what it says.
_PRUNE_HOT = (
    "DELETE FROM hot_cards WHERE version <= COALESCE("
    "(SELECT m.member_version FROM cards AS c JOIN members AS m ON m.member_id = c.member_id"
    " WHERE c.card_hash = hot_cards.card_hash),"
    " (SELECT m.member_version FROM members AS m WHERE m.member_id = hot_cards.member_id), 0)"
)
_MEMBER_COLUMNS = (
    "member_id, tier, card_kind, next_tier, next_tier_from, birthday, points_balance, rebate_fen, member_version"
)
_CARD_COLUMNS = "card_hash, member_id, card_kind, state, valid_from, valid_until"


def _take_back_earned(conn: sqlite3.Connection, seq: int, sale_id: str, member_id: str) -> None:
    """A void takes back what its sale earned: counted while the void is unacknowledged (head office's
    balance has the sale's points once the sale is acknowledged, until the void reaches it)."""
    earned = conn.execute("SELECT COALESCE(SUM(points), 0) FROM sale_lines WHERE sale_id = ?", (sale_id,)).fetchone()
    if earned[0]:
        conn.execute("INSERT INTO own_earned (seq, member_id, points) VALUES (?, ?, ?)", (seq, member_id, -earned[0]))


def _members_to_replace(conn: sqlite3.Connection, delta: MemberDelta) -> list[str]:
    """The page's members the cache holds at an older version: those whose cached cards must go."""
    lines = {row[0]: row[8] for row in delta.members}
    if not lines:
        return []
    cached = conn.execute(
        "SELECT member_id, member_version FROM members WHERE member_id IN (SELECT value FROM json_each(?))",
        (json.dumps(list(lines)),),
    ).fetchall()
    return [member_id for member_id, version in cached if version < lines[member_id]]


def _cards_of(path: Path, member_ids: Sequence[str], busy_timeout_ms: int) -> dict[str, list[bytes]]:
    """The cached cards of ``member_ids`` (blocking: one scan of the card table on a connection of its own)."""
    if not member_ids:
        return {}
    try:
        conn = sqlite3.connect(str(path), timeout=busy_timeout_ms / 1000, isolation_level=None)
        try:
            rows = conn.execute(
                "SELECT card_hash, member_id FROM cards WHERE member_id IN (SELECT value FROM json_each(?))",
                (json.dumps(list(member_ids)),),
            ).fetchall()
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise _translate(exc, path, "member delta") from exc
    found: dict[str, list[bytes]] = {}
    for card, member_id in rows:
        found.setdefault(member_id, []).append(card)
    return found


def _apply_delta(
    conn: sqlite3.Connection, delta: MemberDelta, old_cards: Mapping[str, Sequence[bytes]], path: Path
) -> DeltaResult:
    """One page, inside the caller's BEGIN IMMEDIATE (any error rolls all of it back)."""
    header = delta.header
    have = int(conn.execute("SELECT member_version FROM lane_state").fetchone()[0])
    if header.from_ > have:
        raise MemberGapError(
            f"{path}: the member delta starts after version {header.from_}, but the cache is at {have}:"
            " the changes between would be missing; fetch from the cache's version",
            have=have,
            start=header.from_,
            path=str(path),
        )
    cards_of: dict[str, list[tuple[Any, ...]]] = {}
    for card_row in delta.cards:
        cards_of.setdefault(card_row[1], []).append(card_row)
    applied = skipped = added = cards = card_change = 0
    for row in delta.members:
        member_id, version = row[0], row[8]
        cached = conn.execute("SELECT member_version FROM members WHERE member_id = ?", (member_id,)).fetchone()
        if cached is not None and cached[0] >= version:
            skipped += 1  # a re-delivery, or a page older than what a later one brought
            continue
        added += cached is None
        for old in old_cards.get(member_id, ()):
            # Re-checked by member: a card an earlier line of this page moved away stays where it went.
            card_change -= conn.execute(
                "DELETE FROM cards WHERE card_hash = ? AND member_id = ?", (old, member_id)
            ).rowcount
        conn.execute(f"INSERT OR REPLACE INTO members ({_MEMBER_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", row)  # noqa: S608
        for card_row in cards_of.get(member_id, ()):
            # A card another member had moves to this one.
            card_change -= conn.execute("DELETE FROM cards WHERE card_hash = ?", (card_row[0],)).rowcount
            conn.execute(f"INSERT INTO cards ({_CARD_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)", card_row)  # noqa: S608
            card_change += 1
            cards += 1
        applied += 1
    pruned = conn.execute(_PRUNE_HOT).rowcount
    version = max(have, header.to)
    conn.execute(
        "UPDATE lane_state SET member_version = ?, member_head_version = ?, member_synced_at = ?,"
        " member_sync_error = NULL, member_count = member_count + ?, card_count = card_count + ?,"
        " card_key_check = COALESCE(card_key_check, ?)",
        (
            version,
            header.head,
            dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
            added,
            card_change,
            header.key_check,
        ),
    )
    return DeltaResult(
        source=delta.source,
        after=header.from_,
        to=header.to,
        head=header.head,
        version=version,
        applied=applied,
        skipped=skipped,
        cards=cards,
        hot_pruned=pruned,
    )
