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
    Migration(
        3,
        "member downlink: hot list, own earned points, member sync state",
        (
            # Lost, replaced and cancelled cards from head office's hot list, as the cards table keys
            # them.  An entry overrides the cached card while its version is above the cached member's:
            # a member delta at or above it supersedes it (and prunes it).  Small (the hot list's size).
            """CREATE TABLE hot_cards (
                card_hash BLOB PRIMARY KEY,
                member_id TEXT NOT NULL,
                state TEXT NOT NULL CHECK (state IN ('lost', 'replaced', 'cancelled')),
                version INTEGER NOT NULL CHECK (version >= 1),
                received_at TEXT NOT NULL
            ) STRICT, WITHOUT ROWID""",
            # Points this lane's entries earned (a sale, positive) or took back (a void, negative) that
            # head office has not acknowledged: the till shows cached + earned - spent.  A void's row
            # counts while the void itself is unacknowledged, whatever became of its sale.
            """CREATE TABLE own_earned (
                seq INTEGER PRIMARY KEY REFERENCES journal (seq),
                member_id TEXT NOT NULL,
                points INTEGER NOT NULL
            ) STRICT""",
            "CREATE INDEX own_earned_by_member ON own_earned (member_id, seq)",
            # What this lane's unacknowledged sales and voids earned before this migration.
            """INSERT INTO own_earned (seq, member_id, points)
                SELECT s.seq, s.member_id, SUM(l.points) FROM sales AS s
                JOIN sale_lines AS l ON l.sale_id = s.sale_id
                WHERE s.member_id IS NOT NULL AND s.seq > (SELECT acked_seq FROM lane_state)
                GROUP BY s.sale_id HAVING SUM(l.points) != 0""",
            """INSERT INTO own_earned (seq, member_id, points)
                SELECT s.void_seq, s.member_id, -SUM(l.points) FROM sales AS s
                JOIN sale_lines AS l ON l.sale_id = s.sale_id
                WHERE s.member_id IS NOT NULL AND s.void_seq > (SELECT acked_seq FROM lane_state)
                GROUP BY s.sale_id HAVING SUM(l.points) != 0""",
            # The member sync's last word, for GET /v1/status across restarts: head office's version as
            # last heard, when the cache last caught up with it, the last failure, the hot list's version.
            "ALTER TABLE lane_state ADD COLUMN member_head_version INTEGER NOT NULL DEFAULT 0",
            "ALTER TABLE lane_state ADD COLUMN member_synced_at TEXT",
            "ALTER TABLE lane_state ADD COLUMN member_sync_error TEXT",
            "ALTER TABLE lane_state ADD COLUMN hotlist_version INTEGER NOT NULL DEFAULT 0",
        ),
    ),
    Migration(
        4,
        "offline spends per member and local day",
        (
            # What this lane let a member spend without a hold from head office (docs/downlink.md), by
            # the sale's local day: the offline allowance (offline.points_per_day / rebate_per_day) is
            # checked against it in the sale's own transaction.  A voided sale's row stops counting
            # (joined with sales.void_seq).  Unlike own_spend it outlives head office's acknowledgement.
            """CREATE TABLE offline_spend (
                seq INTEGER PRIMARY KEY REFERENCES journal (seq),
                sale_id TEXT NOT NULL REFERENCES sales (sale_id),
                member_id TEXT NOT NULL,
                day TEXT NOT NULL,
                points INTEGER NOT NULL CHECK (points >= 0),
                rebate_fen INTEGER NOT NULL CHECK (rebate_fen >= 0)
            ) STRICT""",
            "CREATE INDEX offline_spend_by_member_day ON offline_spend (member_id, day)",
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
