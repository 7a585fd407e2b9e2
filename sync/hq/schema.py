"""Head office's tables (SQLAlchemy Core, one definition for PostgreSQL and SQLite) and their migrations.

The tables are described in docs/hq-database.md.  Money is BIGINT fen, points
BIGINT; times are kept twice where reports need them: ``at`` as the lane sent
it (ISO 8601 with the lane's offset, which the audit re-prices with) and
``at_utc`` as a real timestamp.

Migrations are numbered; each runs in its own transaction together with the
row that records it in ``hq_schema_version``, so a crash leaves the database
at one version or the next, never in between.  On PostgreSQL an advisory lock
serializes two processes migrating at once; on SQLite ``BEGIN IMMEDIATE``
does.  A database whose version is newer than this program is refused.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    Connection,
    DateTime,
    Dialect,
    Engine,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    Table,
    Text,
    TypeDecorator,
    UniqueConstraint,
    func,
    select,
    text,
)

from agent.errors import LaneError

AUDIT_STATUSES = ("ok", "mismatch", "unknown_rules", "unreadable")
LEDGER_KINDS = ("earn", "redeem", "rebate_spend", "return", "void")
# pg_advisory_xact_lock key for migrations: any constant the application uses for nothing else.
_MIGRATION_LOCK = 0x6C616E65_6871  # "lanehq"


class SchemaError(LaneError):
    """The database cannot be used by this program (too new, or not a database head office reads)."""

    code = "schema_error"

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class UtcDateTime(TypeDecorator[dt.datetime]):
    """An aware datetime in UTC: timestamptz on PostgreSQL, naive-UTC text on SQLite (which has no zones)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.utcoffset() is None:
            raise ValueError(f"{value!r}: a time with its UTC offset is required")
        value = value.astimezone(dt.UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:  # noqa: ARG002
        if value is None:
            return None
        return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


# SQLite autoincrements only an INTEGER PRIMARY KEY (the rowid); PostgreSQL gets a BIGINT identity.
_RowId = BigInteger().with_variant(Integer(), "sqlite")

metadata = MetaData()

schema_version = Table(
    "hq_schema_version",
    metadata,
    Column("version", Integer, primary_key=True, autoincrement=False),
    Column("description", Text, nullable=False),
    Column("applied_at", UtcDateTime, nullable=False),
)

journal_entries = Table(
    "journal_entries",
    metadata,
    # The entry's global UUID: this primary key is what makes ingest exactly-once.
    Column("id", Text, primary_key=True),
    Column("store", Text, nullable=False),
    Column("lane", Text, nullable=False),
    Column("epoch", Text, nullable=False),
    Column("seq", BigInteger, nullable=False),
    Column("kind", Text, nullable=False),
    Column("at", Text, nullable=False),
    Column("at_utc", UtcDateTime, nullable=False),
    Column("rules_version", Text, nullable=False),
    Column("member_version", BigInteger, nullable=False),
    Column("body", Text, nullable=False),
    Column("received_at", UtcDateTime, nullable=False),
    UniqueConstraint("store", "lane", "epoch", "seq", name="journal_entries_position"),
)

sales = Table(
    "sales",
    metadata,
    Column("entry_id", Text, ForeignKey("journal_entries.id"), primary_key=True),
    Column("store", Text, nullable=False),
    Column("lane", Text, nullable=False),
    Column("sale_id", Text, nullable=False),
    Column("member_id", Text),
    Column("at", Text, nullable=False),
    Column("at_utc", UtcDateTime, nullable=False),
    Column("gross_fen", BigInteger, nullable=False),
    Column("discount_fen", BigInteger, nullable=False),
    Column("net_fen", BigInteger, nullable=False),
    Column("points_earned", BigInteger, nullable=False),
    Column("points_spent", BigInteger, nullable=False),
    Column("rebate_spent_fen", BigInteger, nullable=False),
    Column("rules_id", Text, nullable=False),
    Column("rules_version", Text, nullable=False),
    Column("rules_digest", Text),
    Column("audit_status", Text),
    Column("audit_detail", Text),
    Column("audited_at", UtcDateTime),
    CheckConstraint(
        "audit_status IS NULL OR audit_status IN ('ok', 'mismatch', 'unknown_rules', 'unreadable')",
        name="sales_audit_status",
    ),
)
# The audit worker's queue: only the rows still to audit are in this index, oldest first.
Index(
    "sales_unaudited",
    sales.c.at_utc,
    sales.c.entry_id,
    postgresql_where=sales.c.audit_status.is_(None),
    sqlite_where=sales.c.audit_status.is_(None),
)
Index("sales_lane_sale", sales.c.store, sales.c.lane, sales.c.sale_id)

returns = Table(
    "returns",
    metadata,
    Column("entry_id", Text, ForeignKey("journal_entries.id"), primary_key=True),
    Column("store", Text, nullable=False),
    Column("lane", Text, nullable=False),
    Column("return_id", Text, nullable=False),
    Column("sale_id", Text, nullable=False),
    Column("sale_entry_id", Text, nullable=False),
    Column("member_id", Text),
    Column("at", Text, nullable=False),
    Column("at_utc", UtcDateTime, nullable=False),
    Column("refund_fen", BigInteger, nullable=False),
    Column("points_reversed", BigInteger, nullable=False),
)
Index("returns_sale_entry", returns.c.sale_entry_id)

voids = Table(
    "voids",
    metadata,
    Column("entry_id", Text, ForeignKey("journal_entries.id"), primary_key=True),
    Column("store", Text, nullable=False),
    Column("lane", Text, nullable=False),
    Column("sale_id", Text, nullable=False),
    Column("sale_entry_id", Text, nullable=False),
    Column("member_id", Text),
    Column("at", Text, nullable=False),
    Column("at_utc", UtcDateTime, nullable=False),
    Column("refund_fen", BigInteger, nullable=False),
    Column("points_reversed", BigInteger, nullable=False),
    Column("points_restored", BigInteger, nullable=False),
    Column("rebate_restored_fen", BigInteger, nullable=False),
)
Index("voids_sale_entry", voids.c.sale_entry_id)

points_ledger = Table(
    "points_ledger",
    metadata,
    Column("id", _RowId, primary_key=True, autoincrement=True),
    Column("member_id", Text, nullable=False),
    Column("entry_id", Text, ForeignKey("journal_entries.id"), nullable=False),
    Column("kind", Text, nullable=False),
    Column("points", BigInteger, nullable=False),
    Column("rebate_fen", BigInteger, nullable=False),
    Column("store", Text, nullable=False),
    Column("lane", Text, nullable=False),
    Column("at", Text, nullable=False),
    Column("at_utc", UtcDateTime, nullable=False),
    UniqueConstraint("entry_id", "kind", name="points_ledger_entry_kind"),
    CheckConstraint(
        "kind IN ('earn', 'redeem', 'rebate_spend', 'return', 'void')",
        name="points_ledger_kind",
    ),
)
Index("points_ledger_member", points_ledger.c.member_id)

lane_cursors = Table(
    "lane_cursors",
    metadata,
    Column("store", Text, nullable=False),
    Column("lane", Text, nullable=False),
    Column("epoch", Text, nullable=False),
    # Highest seq applied or dead-lettered; every seq from 1 up to it has been taken.
    Column("last_seq", BigInteger, nullable=False),
    # Entries received again at or below last_seq (resends, overlapping batches).
    Column("duplicates", BigInteger, nullable=False),
    Column("updated_at", UtcDateTime, nullable=False),
    PrimaryKeyConstraint("store", "lane", "epoch", name="lane_cursors_pkey"),
)

dead_letters = Table(
    "dead_letters",
    metadata,
    Column("id", _RowId, primary_key=True, autoincrement=True),
    Column("received_at", UtcDateTime, nullable=False),
    Column("topic", Text, nullable=False),
    Column("store", Text),
    Column("lane", Text),
    Column("epoch", Text),
    Column("seq", BigInteger),
    Column("entry_id", Text),
    Column("code", Text, nullable=False),
    Column("message", Text, nullable=False),
    # The raw entry (JSON text) or message (text, or repr of bytes that are not UTF-8), capped.
    Column("payload", Text, nullable=False),
    Column("payload_size", BigInteger, nullable=False),
)
Index("dead_letters_lane", dead_letters.c.store, dead_letters.c.lane)

lane_states = Table(
    "lane_states",
    metadata,
    Column("store", Text, nullable=False),
    Column("lane", Text, nullable=False),
    Column("session", BigInteger, nullable=False),
    Column("state", Text, nullable=False),
    Column("info", Text, nullable=False),
    Column("updated_at", UtcDateTime, nullable=False),
    PrimaryKeyConstraint("store", "lane", name="lane_states_pkey"),
)

# What migration 1 creates.  When a later migration changes one of these tables,
# migration 1 must keep creating the version-1 shape: give it a frozen copy then.
_V1_TABLES = [journal_entries, sales, returns, voids, points_ledger, lane_cursors, dead_letters, lane_states]


def _create_v1(conn: Connection) -> None:
    metadata.create_all(conn, tables=_V1_TABLES, checkfirst=False)


Migration = tuple[int, str, Callable[[Connection], None]]
MIGRATIONS: tuple[Migration, ...] = ((1, "journal, sales, returns, voids, points ledger, cursors", _create_v1),)
LATEST = MIGRATIONS[-1][0]


def _lock(conn: Connection) -> None:
    # SQLite's write transaction (BEGIN IMMEDIATE) already excludes every other writer.
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})


def _current(conn: Connection) -> int:
    version: Any = conn.execute(select(func.max(schema_version.c.version))).scalar()
    return int(version or 0)


def migrate(engine: Engine, now: Callable[[], dt.datetime]) -> int:
    """Bring the database up to ``LATEST``; the version it is at afterwards.

    ``engine`` must begin write transactions (BEGIN IMMEDIATE on SQLite).
    Raises SchemaError when the database is newer than this program.
    """
    with engine.begin() as conn:
        _lock(conn)
        schema_version.create(conn, checkfirst=True)
        current = _current(conn)
    if current > LATEST:
        raise SchemaError(
            "schema_too_new",
            f"the database is at schema version {current}; this lane-hq knows versions up to {LATEST}: "
            "upgrade lane-hq (never run an older program against a migrated database)",
        )
    for number, description, step in MIGRATIONS:
        if number <= current:
            continue
        with engine.begin() as conn:
            _lock(conn)
            if _current(conn) >= number:  # another process migrated meanwhile
                continue
            step(conn)
            conn.execute(schema_version.insert().values(version=number, description=description, applied_at=now()))
    return max(current, LATEST)
