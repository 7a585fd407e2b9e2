"""The lane database's schema, as numbered migrations keyed by ``PRAGMA user_version``.

Each migration runs in its own transaction together with the ``user_version``
bump, so a crash or a full disk leaves the database at the previous version,
never in between.  Migrations are append-only: once released, a migration's
statements never change (databases in the field already ran them); a new
shape is a new migration.

The member cache tables (``members``, ``cards``) have no secondary indexes on
purpose: a snapshot import builds replacement tables from the live tables' own
``CREATE TABLE`` text and swaps them in by renaming, which carries the table
but not separately created indexes.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

from agent.dbtx import transaction


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    description: str
    statements: tuple[str, ...]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "member cache, journal, sales, returns, own spend",
        (
            # One row of lane-wide state.  journal_epoch is random per database: a lane whose
            # database was lost restarts at seq 1, and head office tells the two runs apart by it.
            """CREATE TABLE lane_state (
                id INTEGER PRIMARY KEY CHECK (id = 1),
                journal_epoch TEXT NOT NULL,
                acked_seq INTEGER NOT NULL DEFAULT 0 CHECK (acked_seq >= 0),
                member_version INTEGER NOT NULL DEFAULT 0 CHECK (member_version >= 0),
                snapshot_created TEXT,
                snapshot_imported TEXT,
                member_count INTEGER NOT NULL DEFAULT 0,
                card_count INTEGER NOT NULL DEFAULT 0,
                card_key_check TEXT
            ) STRICT""",
            "INSERT INTO lane_state (id, journal_epoch) VALUES (1, lower(hex(randomblob(16))))",
            # The minimal projection: no names, phones, ID numbers or raw card numbers.
            # members.card_kind is the kind of the member's newest active card, for a member
            # identified by id (typed at the POS) rather than by a card.
            """CREATE TABLE members (
                member_id TEXT PRIMARY KEY,
                tier TEXT NOT NULL,
                card_kind TEXT NOT NULL,
                next_tier TEXT,
                next_tier_from TEXT,
                birthday TEXT,
                points_balance INTEGER NOT NULL,
                rebate_fen INTEGER NOT NULL,
                member_version INTEGER NOT NULL
            ) STRICT, WITHOUT ROWID""",
            """CREATE TABLE cards (
                card_hash BLOB PRIMARY KEY,
                member_id TEXT NOT NULL,
                card_kind TEXT NOT NULL,
                state TEXT NOT NULL CHECK (state IN ('active', 'lost', 'replaced', 'expired', 'cancelled')),
                valid_from TEXT NOT NULL,
                valid_until TEXT
            ) STRICT, WITHOUT ROWID""",
            # seq is the rowid, assigned as max(seq) + 1 inside BEGIN IMMEDIATE: gapless, and
            # never AUTOINCREMENT (which may skip numbers after a rollback).  id is a random UUID,
            # head office's idempotency key; no UNIQUE index on it (nor on the sales' and returns'
            # seq columns): every index is one more page written and fsynced per sale.
            """CREATE TABLE journal (
                seq INTEGER PRIMARY KEY CHECK (seq >= 1),
                id TEXT NOT NULL,
                kind TEXT NOT NULL CHECK (kind IN ('sale', 'return', 'void')),
                at TEXT NOT NULL,
                rules_version TEXT NOT NULL,
                member_version INTEGER NOT NULL,
                body TEXT NOT NULL
            ) STRICT""",
            """CREATE TABLE sales (
                sale_id TEXT PRIMARY KEY,
                seq INTEGER NOT NULL REFERENCES journal (seq),
                request_digest TEXT NOT NULL,
                response TEXT NOT NULL,
                member_id TEXT,
                points_spent INTEGER NOT NULL CHECK (points_spent >= 0),
                rebate_spent_fen INTEGER NOT NULL CHECK (rebate_spent_fen >= 0),
                void_seq INTEGER REFERENCES journal (seq),
                void_digest TEXT,
                void_response TEXT
            ) STRICT, WITHOUT ROWID""",
            """CREATE TABLE sale_lines (
                sale_id TEXT NOT NULL REFERENCES sales (sale_id),
                line_id TEXT NOT NULL,
                position INTEGER NOT NULL,
                qty INTEGER NOT NULL CHECK (qty > 0),
                net_fen INTEGER NOT NULL,
                points INTEGER NOT NULL,
                PRIMARY KEY (sale_id, line_id)
            ) STRICT, WITHOUT ROWID""",
            """CREATE TABLE returns (
                return_id TEXT PRIMARY KEY,
                sale_id TEXT NOT NULL REFERENCES sales (sale_id),
                seq INTEGER NOT NULL REFERENCES journal (seq),
                request_digest TEXT NOT NULL,
                response TEXT NOT NULL
            ) STRICT, WITHOUT ROWID""",
            "CREATE INDEX returns_by_sale ON returns (sale_id)",
            """CREATE TABLE return_lines (
                return_id TEXT NOT NULL REFERENCES returns (return_id),
                line_id TEXT NOT NULL,
                sale_id TEXT NOT NULL,
                qty INTEGER NOT NULL CHECK (qty > 0),
                refund_fen INTEGER NOT NULL,
                points INTEGER NOT NULL,
                PRIMARY KEY (return_id, line_id)
            ) STRICT, WITHOUT ROWID""",
            "CREATE INDEX return_lines_by_sale ON return_lines (sale_id, line_id)",
            # Points and rebate this lane spent (or credited back, negative) per journal entry, so
            # tenders can be checked against the cached balance less what head office has not seen.
            # origin_seq is the entry whose spend this row belongs to (a void's credit points at its
            # sale): a credit only counts while the spend it undoes still counts.
            """CREATE TABLE own_spend (
                seq INTEGER PRIMARY KEY REFERENCES journal (seq),
                member_id TEXT NOT NULL,
                points INTEGER NOT NULL,
                rebate_fen INTEGER NOT NULL,
                origin_seq INTEGER NOT NULL REFERENCES journal (seq)
            ) STRICT""",
            "CREATE INDEX own_spend_by_member ON own_spend (member_id, seq)",
        ),
    ),
    Migration(
        2,
        "sync session counter",
        (
            # Grows once per broker connection: the lane's retained state carries it, so head office
            # can tell a late Last Will of an older connection from the current connection's state.
            "ALTER TABLE lane_state ADD COLUMN sync_session INTEGER NOT NULL DEFAULT 0",
        ),
    ),
)


def latest() -> int:
    """The schema version this program writes."""
    return MIGRATIONS[-1].version


def pending(current: int) -> list[Migration]:
    """The migrations a database at ``current`` still needs, in order."""
    return [migration for migration in MIGRATIONS if migration.version > current]


def apply(conn: sqlite3.Connection, migration: Migration) -> None:
    """Run one migration and its ``user_version`` bump in one transaction (autocommit connection)."""

    def run(conn: sqlite3.Connection) -> None:
        for statement in migration.statements:
            conn.execute(statement)
        # PRAGMA user_version writes the database header inside the transaction: atomic with the rest.
        conn.execute(f"PRAGMA user_version = {int(migration.version)}")

    transaction(conn, run)
