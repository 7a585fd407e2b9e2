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
