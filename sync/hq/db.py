"""Head office's database: the lanes' journals applied exactly once, in order, one transaction per batch.

One code path for PostgreSQL (production, psycopg 3) and SQLite (the embedded
default), written in SQLAlchemy Core; the tables and migrations are in
``sync.hq.schema``, the pure body -> rows extraction in ``sync.hq.facts``, the
guarantees in docs/hq-database.md.

Threading: an ``HqDatabase`` is used from ONE owner thread (``sync.hq.owner``)
-- every method is synchronous and runs its own transaction to its commit.
Several ``HqDatabase`` objects, in one process or many, may share a
database: ``apply_batch`` locks the lane's cursor row (``SELECT ... FOR
UPDATE`` on PostgreSQL; SQLite's ``BEGIN IMMEDIATE`` takes the write lock at
once), so two consumers applying batches of the same lane serialize.

Exactly-once: ``journal_entries.id`` (the entry's global UUID) is the primary
key; an entry is inserted with ``ON CONFLICT (id) DO NOTHING RETURNING id``,
and its sale/return/void row and points-ledger rows are written only when that
insert took it, in the same transaction that moves the lane's cursor.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import orjson
from sqlalchemy import (
    Column,
    Connection,
    Engine,
    Table,
    TypeDecorator,
    bindparam,
    create_engine,
    event,
    func,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import ConnectionPoolEntry

from sync.hq import schema
from sync.hq.facts import FactError, Facts, ReturnFacts, SaleFacts, VoidFacts, extract, ledger_moves, storable
from sync.hq.holds import settle_sales
from sync.hq.members import MemberTable, apply_movements
from sync.hq.schema import (
    AUDIT_STATUSES,
    SchemaError,
    dead_letters,
    journal_entries,
    lane_cursors,
    lane_states,
    points_ledger,
    returns,
    sales,
    voids,
)
from sync.wire import Batch, Entry, Reject

log = logging.getLogger(__name__)

# A dead letter keeps at most this much of its payload (the size of the whole is kept beside it).
MAX_DEAD_PAYLOAD = 1 << 20
# PostgreSQL's deadlock_detected and serialization_failure: the transaction is retried from the start.
_RETRY_SQLSTATES = frozenset({"40P01", "40001"})
_ATTEMPTS = 3
_WRITE = "hq_write"  # execution option: begin this connection's transactions for writing
_MAX_SESSION = 2**63 - 1

__all__ = ["Applied", "HqDatabase", "SchemaError", "UnauditedSale"]


@dataclass(frozen=True, slots=True)
class Applied:
    """What ``apply_batch`` did, committed.

    ``acked_seq`` is the lane's position afterwards: every seq of ``epoch`` up
    to it is applied or dead-lettered (the ack to publish).  ``gap``: the
    batch went past the next seq, and nothing from there on was taken.
    """

    store: str
    lane: str
    epoch: str
    acked_seq: int
    applied: int
    duplicates: int
    dead: int
    gap: bool
    sales_applied: int
    #: head office's member version after the commit (the ack carries it; docs/downlink.md)
    member_version: int = 0
    #: members the batch moved points or rebate for that head office's member table does not hold
    unknown_members: int = 0
    #: the codes of the spend flags the batch raised (sync/hq/holds.py)
    spend_flags: tuple[str, ...] = ()


class UnauditedSale(NamedTuple):
    """A sale the audit worker has still to re-price."""

    entry_id: str
    at: dt.datetime  # the sale's local time, with the lane's offset (the engine prices by local date and time)
    rules_id: str
    rules_version: str
    rules_digest: str | None
    body: dict[str, Any]


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _insert(conn: Connection, table: Table) -> postgresql.Insert | sqlite.Insert:
    """The dialect's INSERT, which has ``on_conflict_do_nothing`` / ``_do_update`` (same API on both)."""
    if conn.dialect.name == "postgresql":
        return postgresql.insert(table)
    return sqlite.insert(table)


def _jsonable(value: object) -> str:
    if isinstance(value, dt.datetime):
        return value.isoformat()
    return repr(value)


def _json_text(value: Any) -> str:
    """Compact JSON, readable (not ASCII-escaped) unless it holds text no database takes (a lone surrogate).

    orjson (5-10x json.dumps on a batch of bodies) writes a NUL as an escape and
    refuses a lone surrogate, which then goes ASCII-escaped by the standard library.
    """
    try:
        return orjson.dumps(value, default=_jsonable).decode()
    except orjson.JSONEncodeError:
        return json.dumps(value, ensure_ascii=True, separators=(",", ":"), default=_jsonable)


def _bulk_insert(
    conn: Connection,
    table: Table,
    rows: list[dict[str, Any]],
    *,
    unless_exists: Column[Any] | None = None,
    returning: Column[Any] | None = None,
) -> list[Any]:
    """Insert ``rows`` (all with the same keys) in one statement; the ``returning`` values of the rows inserted.

    ``unless_exists``: skip rows whose value in that unique column is taken
    (``ON CONFLICT (col) DO NOTHING``).  A value that is a dict (a journal
    body) is stored as its JSON text.

    On PostgreSQL the whole batch travels as **one JSON parameter**, unpacked
    by ``json_to_recordset``: one orjson call builds it, and the parsing
    happens in the database server's process, on another core, instead of
    under this process's GIL.  A ``json`` column keeps its input text as is,
    so a body is stored exactly as encoded.  (A multi-row VALUES statement
    has a bind parameter per value, which psycopg parses in Python on every
    call; binary arrays per column cost ~20 ms of Python per 500 journal rows,
    the JSON document ~4 ms.)  On SQLite, in process, executemany is the fast way.
    """
    if not rows:
        return []
    names = list(rows[0])
    if conn.dialect.name == "postgresql":
        try:
            document = orjson.dumps(rows, default=_jsonable).decode()
        except orjson.JSONEncodeError:
            # Text with a lone surrogate (which PostgreSQL's json refuses): bodies go as ASCII-escaped text.
            rows = [{k: _json_text(v) if isinstance(v, dict) else v for k, v in row.items()} for row in rows]
            document = orjson.dumps(rows, default=_jsonable).decode()
        sample = rows[0]
        defs, picks = [], []
        for name in names:
            if isinstance(sample[name], dict):
                defs.append(f"{name} json")
                picks.append(f"r.{name}::text")
            else:
                kind = table.c[name].type
                base = kind.impl_instance if isinstance(kind, TypeDecorator) else kind
                defs.append(f"{name} {base.compile(dialect=conn.dialect)}")
                picks.append(f"r.{name}")
        sql = (
            f"INSERT INTO {table.name} ({', '.join(names)}) SELECT {', '.join(picks)}"  # noqa: S608 - our own names
            f" FROM json_to_recordset(CAST(:rows AS json)) AS r({', '.join(defs)})"
        )
        if unless_exists is not None:
            sql += f" ON CONFLICT ({unless_exists.name}) DO NOTHING"
        if returning is not None:
            sql += f" RETURNING {returning.name}"
        result = conn.execute(text(sql), {"rows": document})
        return [] if returning is None else list(result.scalars())
    rows = [{k: _json_text(v) if isinstance(v, dict) else v for k, v in row.items()} for row in rows]
    stmt = sqlite.insert(table)
    if unless_exists is not None:
        stmt = stmt.on_conflict_do_nothing(index_elements=[unless_exists])
    result = conn.execute(stmt if returning is None else stmt.returning(returning), rows)
    return [] if returning is None else list(result.scalars())


def _clean(value: str) -> str:
    """``value`` made storable as text: NUL and unpaired surrogates written as escapes."""
    if storable(value):
        return value
    return value.replace("\x00", "\\x00").encode("utf-8", "backslashreplace").decode("utf-8")


def _message_text(payload: bytes) -> str:
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        return repr(payload)
    return text if "\x00" not in text else repr(payload)


def _sqlite_engine(url: str) -> Engine:
    # check_same_thread: the database is opened on one thread and then used on its owner thread.
    engine = create_engine(url, connect_args={"timeout": 30.0, "check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: DBAPIConnection, _record: ConnectionPoolEntry) -> None:
        # SQLAlchemy's documented recipe: pysqlite must not issue BEGIN itself (it would defer it
        # past SELECTs and DDL); the "begin" hook below does.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # A writer takes the write lock at BEGIN: a deferred transaction that reads and then
        # writes can fail with SQLITE_BUSY at its first write, whatever the busy timeout.
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get(_WRITE) else "BEGIN")

    return engine


def _engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        return _sqlite_engine(url)
    if url.startswith("postgresql"):
        # pre_ping: a connection dropped by a server restart is replaced, not handed out.
        return create_engine(url, pool_pre_ping=True, pool_size=2, max_overflow=2)

    raise SchemaError("unsupported_database", f"{url.split(':', 1)[0]}: head office runs on PostgreSQL or SQLite")


def _retryable(exc: DBAPIError) -> bool:
    return getattr(exc.orig, "sqlstate", None) in _RETRY_SQLSTATES


@dataclass(slots=True)
class _Walk:
    """One batch walked in seq order against the lane's cursor, before anything is written."""

    cursor: int
    duplicates: int = 0
    gap: bool = False
    dead: list[dict[str, Any]] = field(default_factory=list)
    candidates: list[tuple[Entry, Facts]] = field(default_factory=list)


def _walk(batch: Batch, cursor: int, dead_row: _DeadRows) -> _Walk:
    """Classify a batch's items by seq: duplicates, the entries to insert, dead letters, and where a gap stops it."""
    walk = _Walk(cursor)
    claimed: set[str] = set()
    items: list[Entry | Reject] = [*batch.entries, *(r for r in batch.rejects if r.seq is not None)]
    for item in sorted(items, key=_seq):
        seq = _seq(item)
        if seq <= walk.cursor:
            walk.duplicates += 1
            continue
        if seq > walk.cursor + 1:
            walk.gap = True
            break
        walk.cursor = seq
        if isinstance(item, Reject):
            walk.dead.append(dead_row.reject(item))
        elif item.id in claimed:
            walk.dead.append(dead_row.entry(item, "duplicate_id", f"id {item.id} appears twice in this batch"))
        else:
            claimed.add(item.id)
            try:
                walk.candidates.append((item, extract(item)))
            except FactError as exc:
                walk.dead.append(dead_row.entry(item, exc.code, exc.message))
    walk.dead.extend(dead_row.reject(r) for r in batch.rejects if r.seq is None)
    return walk


class HqDatabase:
    """Head office's database; see the module docstring for threading and guarantees."""

    def __init__(self, engine: Engine, now: Callable[[], dt.datetime] = _utcnow) -> None:
        self._engine = engine
        self._writer = engine.execution_options(**{_WRITE: True})
        self._now = now
        #: the member table lanes cache (sync/hq/members.py)
        self.members = MemberTable(engine, self._writer, now)

    @classmethod
    def open(cls, url: str, *, now: Callable[[], dt.datetime] = _utcnow) -> HqDatabase:
        """Connect to ``url`` (``sqlite:///...`` or ``postgresql+psycopg://...``), creating or migrating it.

        Raises SchemaError for a database newer than this program (or another kind of database).
        """
        engine = _engine(url)
        db = cls(engine, now)
        try:
            version = schema.migrate(db._writer, now)
        except BaseException:
            engine.dispose()
            raise
        log.info("head office database %s at schema version %d", engine.url.render_as_string(), version)
        return db

    @property
    def dialect(self) -> str:
        """``postgresql`` or ``sqlite``."""
        return self._engine.dialect.name

    def close(self) -> None:
        """Close every pooled connection."""
        self._engine.dispose()

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        with self._writer.begin() as conn:
            yield conn

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """One write transaction, committed when the block ends (BEGIN IMMEDIATE on SQLite)."""
        with self._writer.begin() as conn:
            yield conn

    @contextmanager
    def reading(self) -> Iterator[Connection]:
        """One consistent read: REPEATABLE READ on PostgreSQL; SQLite's read transaction is one already."""
        with self._engine.connect() as conn:
            if conn.dialect.name == "postgresql":
                conn.execution_options(isolation_level="REPEATABLE READ")
            with conn.begin():
                yield conn

    def now(self) -> dt.datetime:
        """The database's clock (tests give one of their own)."""
        return self._now()

    # --- journal ingest ---------------------------------------------------------

    def apply_batch(self, batch: Batch, topic: str) -> Applied:
        """Apply a decoded batch in one transaction: each entry once, in seq order; committed on return.

        For each seq, in order: at or below the lane's cursor, a duplicate
        (counted, skipped); the next one, applied (or dead-lettered, when the
        wire rejected it, its body lacks what its kind needs, or its id was
        seen before) and the cursor moves on; past the next one, a gap: the
        rest of the batch is left for the lane to resend.  Rejects without a
        readable seq are dead-lettered and move nothing.
        """
        for attempt in range(1, _ATTEMPTS + 1):
            try:
                with self._write() as conn:
                    return self._apply(conn, batch, topic)
            except DBAPIError as exc:
                if attempt == _ATTEMPTS or not _retryable(exc):
                    raise
                log.warning("%s/%s: batch retried after %s", batch.store, batch.lane, exc.orig)
        raise AssertionError("unreachable")  # pragma: no cover

    def _lock_cursor(self, conn: Connection, batch: Batch, now: dt.datetime) -> int:
        c = lane_cursors.c
        locked = (
            select(c.last_seq)
            .where(c.store == batch.store, c.lane == batch.lane, c.epoch == batch.epoch)
            .with_for_update()
        )
        last = conn.execute(locked).scalar()
        if last is None:
            conn.execute(
                _insert(conn, lane_cursors)
                .values(store=batch.store, lane=batch.lane, epoch=batch.epoch, last_seq=0, duplicates=0, updated_at=now)
                .on_conflict_do_nothing(index_elements=[c.store, c.lane, c.epoch])
            )
            last = conn.execute(locked).scalar_one()
        return int(last)

    def _apply(self, conn: Connection, batch: Batch, topic: str) -> Applied:
        now = self._now()
        start = self._lock_cursor(conn, batch, now)
        dead_row = _DeadRows(batch, topic, now)
        walk = _walk(batch, start, dead_row)
        dead, candidates = walk.dead, walk.candidates
        taken = self._insert_journal(conn, batch, candidates, now)
        applied: list[tuple[Entry, Facts]] = []
        for entry, facts in candidates:
            if entry.id in taken:
                applied.append((entry, facts))
            else:
                message = f"id {entry.id} was applied before under another position; not applied again"
                dead.append(dead_row.entry(entry, "duplicate_id", message))
        self._insert_facts(conn, batch, applied)
        # The member centre looks at these members' tiers after the commit (sync/hq/centre/tiers.py).
        queued = [
            {"entry_id": entry.id, "member_id": facts.member_id, "at_utc": entry.at}
            for entry, facts in applied
            if facts.member_id is not None
        ]
        if queued:
            _bulk_insert(conn, schema.centre_queue, queued)
        # Holds consumed, coupon uses, spend flags: against the balances before this batch moves them.
        flags = settle_sales(conn, batch.store, batch.lane, applied, now)
        if dead:
            dead.sort(key=lambda row: (row["seq"] is None, row["seq"] or 0))
            _bulk_insert(conn, dead_letters, dead)
        c = lane_cursors.c
        conn.execute(
            update(lane_cursors)
            .where(c.store == batch.store, c.lane == batch.lane, c.epoch == batch.epoch)
            .values(last_seq=walk.cursor, duplicates=c.duplicates + walk.duplicates, updated_at=now)
        )
        if dead:
            log.debug("%s/%s: %d dead letters (first: %s)", batch.store, batch.lane, len(dead), dead[0]["code"])
        log.debug("%s/%s@%s: %d -> %d", batch.store, batch.lane, batch.epoch, start, walk.cursor)
        # Last: the member version's counter row stays locked from here to the commit.
        moves = (move for _, facts in applied for move in ledger_moves(facts))
        moved = apply_movements(conn, moves, now, f"{batch.store}/{batch.lane}")
        return Applied(
            store=batch.store,
            lane=batch.lane,
            epoch=batch.epoch,
            acked_seq=walk.cursor,
            applied=len(applied),
            duplicates=walk.duplicates,
            dead=len(dead),
            gap=walk.gap,
            sales_applied=sum(isinstance(facts, SaleFacts) for _, facts in applied),
            member_version=moved.head,
            unknown_members=moved.unknown,
            spend_flags=flags,
        )

    def _insert_journal(
        self, conn: Connection, batch: Batch, candidates: list[tuple[Entry, Facts]], now: dt.datetime
    ) -> set[str]:
        """Insert the journal rows in one statement; the ids it took (the others were there already)."""
        if not candidates:
            return set()
        rows = [
            {
                "id": entry.id,
                "store": batch.store,
                "lane": batch.lane,
                "epoch": batch.epoch,
                "seq": entry.seq,
                "kind": entry.kind,
                "at": entry.at.isoformat(),
                "at_utc": entry.at,
                "rules_version": entry.rules_version,
                "member_version": entry.member_version,
                "body": entry.body,  # stored as its JSON text (_bulk_insert)
                "received_at": now,
            }
            for entry, _ in candidates
        ]
        c = journal_entries.c
        return set(_bulk_insert(conn, journal_entries, rows, unless_exists=c.id, returning=c.id))

    def _insert_facts(self, conn: Connection, batch: Batch, applied: list[tuple[Entry, Facts]]) -> None:
        """The sale/return/void rows and points-ledger rows of newly inserted entries, one statement per table."""
        sale_rows: list[dict[str, Any]] = []
        return_rows: list[dict[str, Any]] = []
        void_rows: list[dict[str, Any]] = []
        ledger_rows: list[dict[str, Any]] = []
        for entry, facts in applied:
            at = entry.at.isoformat()
            common = {"entry_id": entry.id, "store": batch.store, "lane": batch.lane, "at": at, "at_utc": entry.at}
            if isinstance(facts, SaleFacts):
                sale_rows.append(
                    {
                        **common,
                        "sale_id": facts.sale_id,
                        "member_id": facts.member_id,
                        "gross_fen": facts.gross_fen,
                        "discount_fen": facts.discount_fen,
                        "net_fen": facts.net_fen,
                        "points_earned": facts.points_earned,
                        "points_spent": facts.points_spent,
                        "rebate_spent_fen": facts.rebate_spent_fen,
                        "rules_id": facts.rules_id,
                        "rules_version": facts.rules_version,
                        "rules_digest": facts.rules_digest,
                    }
                )
            elif isinstance(facts, ReturnFacts):
                return_rows.append(
                    {
                        **common,
                        "return_id": facts.return_id,
                        "sale_id": facts.sale_id,
                        "sale_entry_id": facts.sale_entry_id,
                        "member_id": facts.member_id,
                        "refund_fen": facts.refund_fen,
                        "points_reversed": facts.points_reversed,
                    }
                )
            elif isinstance(facts, VoidFacts):
                void_rows.append(
                    {
                        **common,
                        "sale_id": facts.sale_id,
                        "sale_entry_id": facts.sale_entry_id,
                        "member_id": facts.member_id,
                        "refund_fen": facts.refund_fen,
                        "points_reversed": facts.points_reversed,
                        "points_restored": facts.points_restored,
                        "rebate_restored_fen": facts.rebate_restored_fen,
                    }
                )
            for move in ledger_moves(facts):
                ledger_rows.append(
                    {
                        **common,
                        "member_id": move.member_id,
                        "kind": move.kind,
                        "points": move.points,
                        "rebate_fen": move.rebate_fen,
                    }
                )
        for table, rows in (
            (sales, sale_rows),
            (returns, return_rows),
            (voids, void_rows),
            (points_ledger, ledger_rows),
        ):
            _bulk_insert(conn, table, rows)

    def dead_letter_message(
        self, topic: str, store: str | None, lane: str | None, code: str, message: str, payload: bytes
    ) -> None:
        """Keep a whole message that could not be decoded (``sync.wire.WireError``): nothing in it is applied."""
        text = _message_text(payload)
        row = {
            "received_at": self._now(),
            "topic": _clean(topic),
            "store": None if store is None else _clean(store),
            "lane": None if lane is None else _clean(lane),
            "epoch": None,
            "seq": None,
            "entry_id": None,
            "code": _clean(code),
            "message": _clean(message),
            "payload": text[:MAX_DEAD_PAYLOAD],
            "payload_size": len(payload),
        }
        with self._write() as conn:
            conn.execute(dead_letters.insert(), [row])

    def cursors(self) -> list[tuple[str, str, str, int]]:
        """``(store, lane, epoch, last_seq)``: each lane's current position, to re-publish as its ack.

        One per lane: the epoch heard from last (a lane whose database was
        recreated moved on to a new epoch; its retained ack must be the new one).
        """
        c = lane_cursors.c
        with self._engine.connect() as conn:
            rows = conn.execute(select(c.store, c.lane, c.epoch, c.last_seq).order_by(c.updated_at, c.last_seq)).all()
        latest: dict[tuple[str, str], tuple[str, str, str, int]] = {}
        for store, lane, epoch, last_seq in rows:
            latest[store, lane] = (store, lane, epoch, int(last_seq))
        return sorted(latest.values())

    # --- lane state ----------------------------------------------------------------

    def record_state(self, store: str, lane: str, session: int, state: str, info: Mapping[str, Any]) -> bool:
        """Keep a lane's state message unless it is older than the one kept; whether it was taken.

        The higher session wins; at equal session the later message; a lower
        session never overwrites (an old connection's late Last Will cannot
        pass for the lane's current state).
        """
        if not 0 <= session <= _MAX_SESSION:
            log.warning("%s/%s: state session %d out of range; ignored", store, lane, session)
            return False
        values = {
            "store": store,
            "lane": lane,
            "session": session,
            "state": _clean(state),
            "info": _json_text(dict(info)),
            "updated_at": self._now(),
        }
        with self._write() as conn:
            stmt = _insert(conn, lane_states).values(values)
            excluded = stmt.excluded
            stmt_upsert = stmt.on_conflict_do_update(
                index_elements=[lane_states.c.store, lane_states.c.lane],
                set_={
                    "session": excluded.session,
                    "state": excluded.state,
                    "info": excluded.info,
                    "updated_at": excluded.updated_at,
                },
                where=lane_states.c.session <= excluded.session,
            ).returning(lane_states.c.session)
            return conn.execute(stmt_upsert).first() is not None

    # --- audit -------------------------------------------------------------------------

    def unaudited_sales(self, limit: int) -> list[UnauditedSale]:
        """Up to ``limit`` sales not audited yet, oldest first, with their journal bodies."""
        s = sales.c
        query = (
            select(s.entry_id, s.at, s.rules_id, s.rules_version, s.rules_digest, journal_entries.c.body)
            .join(journal_entries, journal_entries.c.id == s.entry_id)
            .where(s.audit_status.is_(None))
            .order_by(s.at_utc, s.entry_id)
            .limit(limit)
        )
        with self._engine.connect() as conn:
            rows = conn.execute(query).all()
        return [
            UnauditedSale(entry_id, dt.datetime.fromisoformat(at), rules_id, rules_version, digest, json.loads(body))
            for entry_id, at, rules_id, rules_version, digest, body in rows
        ]

    def record_audits(self, results: Iterable[tuple[str, str, str]]) -> None:
        """Record ``(entry_id, status, detail JSON)`` for audited sales, in one transaction."""
        now = self._now()
        rows = []
        for entry_id, status, detail in results:
            if status not in AUDIT_STATUSES:
                raise ValueError(f"audit status {status!r}: one of {', '.join(AUDIT_STATUSES)}")
            rows.append({"b_entry_id": entry_id, "b_status": status, "b_detail": _clean(detail), "b_at": now})
        if not rows:
            return
        s = sales.c
        stmt = (
            update(sales)
            .where(s.entry_id == bindparam("b_entry_id"))
            .values(
                audit_status=bindparam("b_status"), audit_detail=bindparam("b_detail"), audited_at=bindparam("b_at")
            )
        )
        with self._write() as conn:
            conn.execute(stmt, rows)

    # --- figures -----------------------------------------------------------------------

    def lane_summary(self) -> list[dict[str, Any]]:
        """Per lane: sales, money and points, returns, voids, duplicates, dead letters, audit, position, state."""
        lanes: dict[tuple[str, str], dict[str, Any]] = {}

        def lane(store: str, name: str) -> dict[str, Any]:
            return lanes.setdefault((store, name), _empty_lane(store, name))

        s = sales.c
        with self._engine.connect() as conn:
            for row in conn.execute(
                select(
                    s.store,
                    s.lane,
                    func.count(),
                    func.coalesce(func.sum(s.net_fen), 0),
                    func.coalesce(func.sum(s.discount_fen), 0),
                    func.coalesce(func.sum(s.points_earned), 0),
                    func.count().filter(s.audit_status.is_(None)),
                    func.count().filter(s.audit_status == "mismatch"),
                    func.count().filter(s.audit_status == "unknown_rules"),
                    func.count().filter(s.audit_status == "unreadable"),
                ).group_by(s.store, s.lane)
            ):
                doc = lane(row[0], row[1])
                keys = (
                    *("sales", "net_fen", "discount_fen", "points_earned"),
                    *("audit_pending", "audit_mismatches", "audit_unknown_rules", "audit_unreadable"),
                )
                doc.update({key: int(value) for key, value in zip(keys, row[2:], strict=True)})
            for table, key in ((returns, "returns"), (voids, "voids")):
                grouped = select(table.c.store, table.c.lane, func.count()).group_by(table.c.store, table.c.lane)
                for store, name, count in conn.execute(grouped):
                    lane(store, name)[key] = int(count)
            d = dead_letters.c
            dead = select(d.store, d.lane, func.count()).where(d.store.is_not(None), d.lane.is_not(None))
            for store, name, count in conn.execute(dead.group_by(d.store, d.lane)):
                lane(store, name)["dead_letters"] = int(count)
            c = lane_cursors.c
            cursor_rows = conn.execute(
                select(c.store, c.lane, c.epoch, c.last_seq, c.duplicates, c.updated_at).order_by(c.updated_at)
            )
            for store, name, epoch, last_seq, duplicates, updated_at in cursor_rows:
                doc = lane(store, name)
                doc["duplicates"] += int(duplicates)
                doc.update(epoch=epoch, last_seq=int(last_seq), last_received_at=updated_at.isoformat())
            st = lane_states.c
            for store, name, state, session, updated_at in conn.execute(
                select(st.store, st.lane, st.state, st.session, st.updated_at)
            ):
                lane(store, name).update(state=state, session=int(session), state_at=updated_at.isoformat())
        return [lanes[key] for key in sorted(lanes)]

    def totals(self) -> dict[str, Any]:
        """``lane_summary``'s figures summed over every lane (dead letters: also those of no known lane)."""
        doc: dict[str, Any] = dict.fromkeys(_COUNTED, 0)
        rows = self.lane_summary()
        for row in rows:
            for key in _COUNTED:
                doc[key] += row[key]
        with self._engine.connect() as conn:
            doc["dead_letters"] = int(conn.execute(select(func.count()).select_from(dead_letters)).scalar_one())
        doc["lanes"] = len(rows)
        return doc

    def member_balance(self, member_id: str) -> tuple[int, int]:
        """``(points, rebate fen)`` a member's ledger adds up to (what the lanes reported moving)."""
        p = points_ledger.c
        query = select(func.coalesce(func.sum(p.points), 0), func.coalesce(func.sum(p.rebate_fen), 0)).where(
            p.member_id == member_id
        )
        with self._engine.connect() as conn:
            points, rebate = conn.execute(query).one()
        return int(points), int(rebate)

    def recent_dead_letters(self, limit: int = 50) -> list[dict[str, Any]]:
        """The newest dead letters, newest first (payload cut to 2,000 characters)."""
        d = dead_letters.c
        query = select(dead_letters).order_by(d.id.desc()).limit(limit)
        with self._engine.connect() as conn:
            rows = conn.execute(query).mappings().all()
        return [{**row, "payload": row["payload"][:2000]} for row in rows]


_COUNTED = (
    "sales",
    "net_fen",
    "discount_fen",
    "points_earned",
    "returns",
    "voids",
    "duplicates",
    "dead_letters",
    "audit_pending",
    "audit_mismatches",
    "audit_unknown_rules",
    "audit_unreadable",
)


def _empty_lane(store: str, lane: str) -> dict[str, Any]:
    return {
        "store": store,
        "lane": lane,
        **dict.fromkeys(_COUNTED, 0),
        "epoch": None,
        "last_seq": 0,
        "last_received_at": None,
        "state": None,
        "session": None,
        "state_at": None,
    }


def _seq(item: Entry | Reject) -> int:
    assert item.seq is not None  # rejects without a seq are kept apart
    return item.seq


class _DeadRows:
    """Dead-letter rows for one batch's entries."""

    def __init__(self, batch: Batch, topic: str, now: dt.datetime) -> None:
        self.base = {
            "received_at": now,
            "topic": _clean(topic),
            "store": batch.store,
            "lane": batch.lane,
            "epoch": batch.epoch,
        }

    def _row(self, seq: int | None, entry_id: str | None, code: str, message: str, raw: Any) -> dict[str, Any]:
        payload = _json_text(raw)
        return {
            **self.base,
            "seq": seq,
            "entry_id": None if entry_id is None else _clean(entry_id),
            "code": _clean(code),
            "message": _clean(message),
            "payload": payload[:MAX_DEAD_PAYLOAD],
            "payload_size": len(payload.encode()),
        }

    def reject(self, reject: Reject) -> dict[str, Any]:
        return self._row(reject.seq, reject.id, reject.code, reject.message, reject.raw)

    def entry(self, entry: Entry, code: str, message: str) -> dict[str, Any]:
        raw = {
            "v": 1,
            "store": self.base["store"],
            "lane": self.base["lane"],
            "seq": entry.seq,
            "id": entry.id,
            "kind": entry.kind,
            "at": entry.at.isoformat(),
            "rules_version": entry.rules_version,
            "member_version": entry.member_version,
            "body": entry.body,
        }
        return self._row(entry.seq, entry.id, code, message, raw)
