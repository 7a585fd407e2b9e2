"""The project's small exception tree.

Every error a caller can act on carries a machine-readable ``code`` and, where
it concerns one input field, the ``field`` path (``lines[3].qty``).  Boundary
modules translate third-party exceptions into these with ``raise ... from``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Issue:
    """One problem found in an input: where it is, what kind, and why."""

    field: str
    code: str
    message: str
    source: str = ""

    def __str__(self) -> str:
        where = f"{self.source}: " if self.source else ""
        key = self.field or "(top level)"
        return f"{where}{key}: {self.message} [{self.code}]"


class LaneError(Exception):
    """Root of every error this project raises on purpose."""

    code = "lane_error"


class InputError(LaneError):
    """An input (file, request body, ruleset) is invalid; lists every problem found."""

    code = "invalid_input"

    def __init__(self, issues: list[Issue] | tuple[Issue, ...], *, what: str = "input") -> None:
        self.issues = tuple(issues)
        self.what = what
        lines = "\n".join(f"  {issue}" for issue in self.issues)
        super().__init__(f"invalid {what} ({len(self.issues)} problem(s)):\n{lines}")

    @property
    def first(self) -> Issue:
        """The first problem, for APIs that report one error at a time."""
        return self.issues[0]


class RulesetError(InputError):
    """A ruleset file is malformed or inconsistent."""

    code = "invalid_ruleset"


class TenderError(InputError):
    """Tenders do not fit the bill, the member's balances or the programme's rules."""

    code = "invalid_tender"


class ReturnError(InputError):
    """A return asks for more than was sold, or names unknown lines."""

    code = "invalid_return"


class ConfigError(InputError):
    """A lane configuration file is unreadable, malformed or inconsistent."""

    code = "invalid_config"


class SpendRefusedError(LaneError):
    """A tender head office refused to hold, or one this lane may not take without it (POS API: 409).

    ``code`` is the reason (``insufficient_points``, ``insufficient_rebate``,
    ``coupon_used``, ``coupon_held``, ``unknown_member``, ``offline_limit``);
    the message is the cashier's.  Nothing was committed.
    """

    code = "spend_refused"

    def __init__(self, code: str, message: str, *, field: str = "tenders") -> None:
        super().__init__(message)
        self.code = code
        self.field = field


class StoreError(LaneError):
    """The lane's SQLite store failed; ``path`` names the database file when known."""

    code = "store_error"

    def __init__(self, message: str, *, path: str = "") -> None:
        self.path = path
        super().__init__(message)


class StoreFullError(StoreError):
    """The disk (or the store's size limit) is full: the transaction was rolled back whole."""

    code = "disk_full"


class StoreCorruptError(StoreError):
    """The database file fails SQLite's integrity check; it is left as found, never recreated."""

    code = "store_corrupt"


class StoreBusyError(StoreError):
    """Another process held the database's write lock longer than the busy timeout."""

    code = "store_busy"


class StaleSnapshotError(StoreError):
    """A member snapshot is older than the member table the lane already has."""

    code = "stale_snapshot"


class AckError(StoreError):
    """Head office acknowledged a sequence number this lane never wrote."""

    code = "bad_ack"


class MemberGapError(StoreError):
    """A member delta starts above the lane's member-table version: the changes between would be missing."""

    code = "member_gap"

    def __init__(self, message: str, *, have: int, start: int, path: str = "") -> None:
        self.have = have
        self.start = start
        super().__init__(message, path=path)


class SaleConflictError(StoreError):
    """An idempotency key (sale, return or void) was reused with a different request."""

    code = "sale_conflict"

    def __init__(self, message: str, *, key: str, path: str = "") -> None:
        self.key = key
        super().__init__(message, path=path)


class SaleStateError(StoreError):
    """The request does not fit the sale's recorded state (the caller's mistake, not a store failure)."""

    code = "sale_state"

    def __init__(self, message: str, *, sale_id: str, path: str = "") -> None:
        self.sale_id = sale_id
        super().__init__(message, path=path)


class UnknownSaleError(SaleStateError):
    """A return or void names a sale this lane has no record of."""

    code = "unknown_sale"


class SaleVoidedError(SaleStateError):
    """The sale was voided: it cannot be returned, nor voided again with another request."""

    code = "sale_voided"


class SaleHasReturnsError(SaleStateError):
    """The sale already has returns: voiding it would refund those lines twice."""

    code = "sale_has_returns"
