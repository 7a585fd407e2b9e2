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
    Date,
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
CARD_STATES = ("active", "lost", "replaced", "expired", "cancelled")
# The card states lanes are told about at once (the retained hot list, docs/downlink.md).
HOT_CARD_STATES = ("lost", "replaced", "cancelled")
MEMBER_VERSION = "member_version"  # hq_counters row: the member table's version
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

# --- migration 2: the member table head office keeps and sends to lanes (docs/downlink.md) ----

members = Table(
    "members",
    metadata,
    Column("member_id", Text, primary_key=True),
    Column("tier", Text, nullable=False),
    Column("next_tier", Text),
    Column("next_tier_from", Date),
    Column("birthday", Text),  # "MM-DD": month and day only
    Column("card_kind", Text),  # NULL: lanes take the kind of the member's newest active card
    # Head office's balances: what the lanes' batches moved (and adjustments), exact.
    Column("points_balance", BigInteger, nullable=False),
    Column("rebate_fen", BigInteger, nullable=False),
    # The member version of this member's last change; one member per version, so unique.
    Column("version", BigInteger, nullable=False),
    Column("updated_at", UtcDateTime, nullable=False),
)
Index("members_version", members.c.version, unique=True)

member_cards = Table(
    "member_cards",
    metadata,
    Column("card_hash", Text, primary_key=True),  # HMAC-SHA256 of the card number, 64 lower-case hex digits
    Column("member_id", Text, ForeignKey("members.member_id"), nullable=False),
    Column("kind", Text, nullable=False),
    Column("state", Text, nullable=False),
    Column("valid_from", Date, nullable=False),
    Column("valid_until", Date),
    Column("version", BigInteger, nullable=False),  # the member version at this card's last change
    Column("changed_at", UtcDateTime, nullable=False),  # when its state last changed
    CheckConstraint("length(card_hash) = 64", name="member_cards_hash"),
    CheckConstraint(
        "state IN ('active', 'lost', 'replaced', 'expired', 'cancelled')",
        name="member_cards_state",
    ),
)
Index("member_cards_member", member_cards.c.member_id)
# The hot list: recently lost, replaced or cancelled cards, by when that happened.
_hot = member_cards.c.state.in_(HOT_CARD_STATES)
Index("member_cards_hot", member_cards.c.changed_at, postgresql_where=_hot, sqlite_where=_hot)

member_changes = Table(
    "member_changes",
    metadata,
    Column("version", BigInteger, primary_key=True, autoincrement=False),
    Column("member_id", Text, ForeignKey("members.member_id"), nullable=False),
    Column("reason", Text, nullable=False),
    # The member's line (docs/member-snapshot.md, with "version") after this change: what deltas send.
    Column("line", Text, nullable=False),
    Column("at", UtcDateTime, nullable=False),
)
Index("member_changes_member", member_changes.c.member_id, member_changes.c.version)

hq_counters = Table(
    "hq_counters",
    metadata,
    Column("name", Text, primary_key=True),
    Column("value", BigInteger, nullable=False),
)

# What migration 1 creates.  When a later migration changes one of these tables,
# migration 1 must keep creating the version-1 shape: give it a frozen copy then.
_V1_TABLES = [journal_entries, sales, returns, voids, points_ledger, lane_cursors, dead_letters, lane_states]


def _create_v1(conn: Connection) -> None:
    metadata.create_all(conn, tables=_V1_TABLES, checkfirst=False)


# What migration 2 creates (the same rule: a later change to these tables freezes a copy here).
_V2_TABLES = [members, member_cards, member_changes, hq_counters]


def _create_v2(conn: Connection) -> None:
    metadata.create_all(conn, tables=_V2_TABLES, checkfirst=False)
    conn.execute(hq_counters.insert().values(name=MEMBER_VERSION, value=0))


# --- migration 3: redemption holds, coupon uses, spend flags (docs/downlink.md, sync/hq/holds.py) ----

HOLD_STATUSES = ("held", "consumed", "released", "expired")
SPEND_FLAG_CODES = ("overspend", "coupon_reuse")

holds = Table(
    "holds",
    metadata,
    Column("hold_id", Text, primary_key=True),  # chosen by the lane (a UUID): the idempotency key
    Column("store", Text, nullable=False),
    Column("lane", Text, nullable=False),
    Column("sale_id", Text, nullable=False),
    Column("member_id", Text),  # NULL: a guest's hold of coupons only
    Column("points", BigInteger, nullable=False),
    Column("rebate_fen", BigInteger, nullable=False),
    Column("coupons", Text, nullable=False),  # JSON list of coupon codes, sorted: '[]' for none
    Column("status", Text, nullable=False),
    Column("created_at", UtcDateTime, nullable=False),
    Column("expires_at", UtcDateTime, nullable=False),
    Column("consumed_entry_id", Text, ForeignKey("journal_entries.id")),
    CheckConstraint("status IN ('held', 'consumed', 'released', 'expired')", name="holds_status"),
    CheckConstraint("points >= 0 AND rebate_fen >= 0", name="holds_amounts"),
)
# What is held right now: per member (availability), and the holds with coupons (coupon_held).
_held = holds.c.status == "held"
Index("holds_held_member", holds.c.member_id, holds.c.expires_at, postgresql_where=_held, sqlite_where=_held)
_held_coupons = _held & (holds.c.coupons != "[]")
Index("holds_held_coupons", holds.c.expires_at, postgresql_where=_held_coupons, sqlite_where=_held_coupons)

coupon_uses = Table(
    "coupon_uses",
    metadata,
    Column("code", Text, primary_key=True),  # a single-use coupon is used once: its first use is kept
    Column("entry_id", Text, ForeignKey("journal_entries.id"), nullable=False),
    Column("store", Text, nullable=False),
    Column("lane", Text, nullable=False),
    Column("at", UtcDateTime, nullable=False),  # the sale's time
)

spend_flags = Table(
    "spend_flags",
    metadata,
    Column("id", _RowId, primary_key=True, autoincrement=True),
    Column("entry_id", Text, ForeignKey("journal_entries.id"), nullable=False),
    Column("member_id", Text),
    Column("code", Text, nullable=False),
    Column("detail", Text, nullable=False),  # JSON: what was spent, the balance it left, the hold
    Column("at", UtcDateTime, nullable=False),  # when head office raised it
    CheckConstraint("code IN ('overspend', 'coupon_reuse')", name="spend_flags_code"),
)
Index("spend_flags_entry", spend_flags.c.entry_id)
Index("spend_flags_member", spend_flags.c.member_id)

_V3_TABLES = [holds, coupon_uses, spend_flags]


def _create_v3(conn: Connection) -> None:
    metadata.create_all(conn, tables=_V3_TABLES, checkfirst=False)


# --- migration 4: the member centre (docs/member-centre.md, sync/hq/centre/) -------------------

PROFILE_STATES = ("active", "cancelled")
CARD_ROLES = ("owner", "family")
CENTRE_LEDGER_KINDS = ("adjust", "claim", "expire", "rebate_credit", "import")
TIER_CHANGE_KINDS = ("upgrade", "retain", "downgrade", "terminate", "manual", "effective")

# Personal data: each *_enc column is sync.hq.centre.pii's "v1.<key id>.<base64url(nonce|ciphertext|tag)>"
# (AES-256-GCM, the member id as associated data); look-ups go through keyed hashes, never the text.
member_profiles = Table(
    "member_profiles",
    metadata,
    Column("member_id", Text, ForeignKey("members.member_id"), primary_key=True),
    Column("status", Text, nullable=False),
    Column("name_enc", Text),
    Column("phone_enc", Text),
    Column("id_number_enc", Text),
    Column("address_enc", Text),
    Column("email_enc", Text),
    Column("phone_hash", Text),  # HMAC-SHA256 of the normalised phone number under the personal-data key
    Column("id_number_hash", Text),  # the same for the ID number: the service desk checks ID for a lost card
    Column("marketing_consent", Integer, nullable=False),  # 0 or 1
    Column("registered_at", UtcDateTime, nullable=False),
    Column("registered_store", Text),
    Column("updated_at", UtcDateTime, nullable=False),
    Column("cancelled_at", UtcDateTime),
    CheckConstraint("status IN ('active', 'cancelled')", name="member_profiles_status"),
    CheckConstraint("marketing_consent IN (0, 1)", name="member_profiles_consent"),
)
Index("member_profiles_phone", member_profiles.c.phone_hash)
Index("member_profiles_id_number", member_profiles.c.id_number_hash)

# What the service desk knows of each card it issued (member_cards is what lanes see of it).
card_register = Table(
    "card_register",
    metadata,
    Column("card_hash", Text, primary_key=True),
    Column("member_id", Text, ForeignKey("members.member_id"), nullable=False),
    Column("number_masked", Text, nullable=False),  # "************1234": the last four digits only
    Column("role", Text, nullable=False),  # owner, or a family card on the same account
    Column("holder_enc", Text),  # a family card's holder's name, encrypted like the profile
    Column("issued_on", Date, nullable=False),  # the programme's local date; valid from the day after
    Column("issued_at", UtcDateTime, nullable=False),
    Column("issued_by", Text, nullable=False),
    Column("replaces", Text),  # the card hash this one replaced (lost, damaged, renewed)
    Column("fee_fen", BigInteger, nullable=False),
    CheckConstraint("role IN ('owner', 'family')", name="card_register_role"),
)
Index("card_register_member", card_register.c.member_id)

# Movements of balances that no lane journal entry caused; with points_ledger, the whole ledger.
# Append-only; ``key`` makes each movement happen once (a job run twice writes nothing new).
centre_ledger = Table(
    "centre_ledger",
    metadata,
    Column("id", _RowId, primary_key=True, autoincrement=True),
    Column("key", Text, nullable=False, unique=True),
    Column("member_id", Text, ForeignKey("members.member_id"), nullable=False),
    Column("kind", Text, nullable=False),
    Column("points", BigInteger, nullable=False),
    Column("rebate_fen", BigInteger, nullable=False),
    Column("on_date", Date, nullable=False),  # the programme-local business day it belongs to
    Column("at_utc", UtcDateTime, nullable=False),
    Column("actor", Text, nullable=False),  # a staff name, a job ("job:expiry"), "import"
    Column("reason", Text, nullable=False),
    Column("ref", Text),  # what it refers to: the claimed sale's entry id, the expired lots' date, …
    CheckConstraint(
        "kind IN ('adjust', 'claim', 'expire', 'rebate_credit', 'import')",
        name="centre_ledger_kind",
    ),
)
Index("centre_ledger_member", centre_ledger.c.member_id, centre_ledger.c.on_date)
Index("centre_ledger_date", centre_ledger.c.on_date, centre_ledger.c.kind)

# A receipt attached to a member after the sale (补积分): counts as the member's spend from then on.
sale_claims = Table(
    "sale_claims",
    metadata,
    Column("entry_id", Text, ForeignKey("journal_entries.id"), primary_key=True),  # a receipt is claimed once
    Column("member_id", Text, ForeignKey("members.member_id"), nullable=False),
    Column("points", BigInteger, nullable=False),
    Column("claimed_at", UtcDateTime, nullable=False),
    Column("actor", Text, nullable=False),
)
Index("sale_claims_member", sale_claims.c.member_id)

# Every tier decision: what the member had, what it gets and from which day, and why.
tier_history = Table(
    "tier_history",
    metadata,
    Column("id", _RowId, primary_key=True, autoincrement=True),
    Column("key", Text, nullable=False, unique=True),
    Column("member_id", Text, ForeignKey("members.member_id"), nullable=False),
    Column("kind", Text, nullable=False),
    Column("from_tier", Text),
    Column("to_tier", Text),  # NULL: membership terminated
    Column("effective_from", Date, nullable=False),
    Column("decided_on", Date, nullable=False),
    Column("reason", Text, nullable=False),
    Column("at_utc", UtcDateTime, nullable=False),
    CheckConstraint(
        "kind IN ('upgrade', 'retain', 'downgrade', 'terminate', 'manual', 'effective')",
        name="tier_history_kind",
    ),
)
Index("tier_history_member", tier_history.c.member_id, tier_history.c.effective_from)

# Messages owed to members (a tier reached, a rebate credited); sending them is another system's job.
notifications = Table(
    "notifications",
    metadata,
    Column("id", _RowId, primary_key=True, autoincrement=True),
    Column("key", Text, nullable=False, unique=True),
    Column("member_id", Text, ForeignKey("members.member_id"), nullable=False),
    Column("kind", Text, nullable=False),
    Column("detail", Text, nullable=False),  # JSON, no personal data
    Column("created_at", UtcDateTime, nullable=False),
    Column("sent_at", UtcDateTime),
)
Index("notifications_member", notifications.c.member_id)

# Who changed what at the service desk or by a job; details name no personal data.
centre_audit = Table(
    "centre_audit",
    metadata,
    Column("id", _RowId, primary_key=True, autoincrement=True),
    Column("at", UtcDateTime, nullable=False),
    Column("actor", Text, nullable=False),
    Column("action", Text, nullable=False),
    Column("member_id", Text),
    Column("card_hash", Text),
    Column("reason", Text, nullable=False),
    Column("detail", Text, nullable=False),  # JSON
)
Index("centre_audit_member", centre_audit.c.member_id, centre_audit.c.at)

# Journal entries of members whose tier head office has not yet looked at (the centre worker's queue).
centre_queue = Table(
    "centre_queue",
    metadata,
    Column("entry_id", Text, ForeignKey("journal_entries.id"), primary_key=True),
    Column("member_id", Text, nullable=False),
    Column("at_utc", UtcDateTime, nullable=False),
)

# The last run of each batch job for each day (a run again recomputes; its writes are keyed).
job_runs = Table(
    "job_runs",
    metadata,
    Column("job", Text, nullable=False),
    Column("on_date", Date, nullable=False),
    Column("runs", Integer, nullable=False),
    Column("started_at", UtcDateTime, nullable=False),
    Column("finished_at", UtcDateTime, nullable=False),
    Column("summary", Text, nullable=False),  # JSON: what the last run did
    PrimaryKeyConstraint("job", "on_date", name="job_runs_pkey"),
)

_V4_TABLES = [
    member_profiles,
    card_register,
    centre_ledger,
    sale_claims,
    tier_history,
    notifications,
    centre_audit,
    centre_queue,
    job_runs,
]


def _create_v4(conn: Connection) -> None:
    metadata.create_all(conn, tables=_V4_TABLES, checkfirst=False)
    # The centre reads sales by member and by day (tiers, rebates, churn, reports).  Written as DDL
    # rather than declared on ``sales``, which would make migration 1 create them too.
    conn.execute(text("CREATE INDEX sales_member_at ON sales (member_id, at_utc)"))
    conn.execute(text("CREATE INDEX sales_at ON sales (at_utc)"))
    conn.execute(text("CREATE INDEX returns_member_at ON returns (member_id, at_utc)"))


Migration = tuple[int, str, Callable[[Connection], None]]
MIGRATIONS: tuple[Migration, ...] = (
    (1, "journal, sales, returns, voids, points ledger, cursors", _create_v1),
    (2, "member table, cards, change log, counters", _create_v2),
    (3, "redemption holds, coupon uses, spend flags", _create_v3),
    (4, "member centre: profiles, card register, centre ledger, claims, tiers, notifications, audit, jobs", _create_v4),
)
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
