"""Audit re-pricing: head office re-runs the lane's engine and compares.

A lane reports, with every sale, the basket, the member state it priced
with, the moment, the ruleset version and its priced result.  Re-pricing the
same inputs with the same ruleset version must reproduce the result exactly;
any difference means a buggy or tampered lane (or a ruleset mix-up).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError

from agent.basket import parse_basket, parse_member
from agent.engine import price
from agent.errors import InputError, Issue, TenderError
from agent.pos_models import SaleIn
from agent.render import to_wire
from agent.ruleset import Ruleset, load_ruleset
from agent.store import json_text

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Difference:
    """One value that differs between the lane's report and head office's re-pricing."""

    path: str
    reported: object
    expected: object


def _diff(path: str, reported: object, expected: object, out: list[Difference]) -> None:
    if isinstance(reported, Mapping) and isinstance(expected, Mapping):
        for key in sorted(set(reported) | set(expected), key=str):
            _diff(f"{path}.{key}" if path else str(key), reported.get(key), expected.get(key), out)
    elif isinstance(reported, list) and isinstance(expected, list) and len(reported) == len(expected):
        for index, (left, right) in enumerate(zip(reported, expected, strict=True)):
            _diff(f"{path}[{index}]", left, right, out)
    elif reported != expected:
        out.append(Difference(path, reported, expected))


def audit_sale(ruleset: Ruleset, sale: Mapping[str, Any]) -> list[Difference]:
    """Re-price ``sale`` (keys: basket, member, result) and list every difference.

    Raises InputError when the sale's basket or member cannot be parsed, and
    reports a ``rules`` difference first when the lane priced with another
    ruleset version than the one given.
    """
    basket = parse_basket(sale.get("basket"), source="sale.basket")
    member_doc = sale.get("member")
    member = None if member_doc is None else parse_member(member_doc, source="sale.member")
    reported = sale.get("result")
    expected = to_wire(price(basket, member, ruleset))
    out: list[Difference] = []
    _diff("", reported if isinstance(reported, Mapping) else {}, expected, out)
    return out


# --- auditing the lanes' journal -------------------------------------------------

AuditStatus = Literal["ok", "mismatch", "unknown_rules", "unreadable"]


def version_key(version: str) -> tuple[tuple[int, int | str], ...]:
    """A ruleset version as a sort key: runs of digits compare as numbers, the rest as text."""
    return tuple((0, int(part)) if part.isdigit() else (1, part) for part in re.findall(r"[0-9]+|[^0-9]+", version))


class RulesetLibrary:
    """Every ruleset version head office has published, by ``(id, version)``, each checked by its digest.

    Loaded from ``rules.directory`` at start-up; a version not found is looked for again among
    the directory's new or changed files, so a ruleset ``lane-hq rules publish`` copied there
    while ``lane-hq run`` is running is audited without a restart.
    """

    def __init__(self, rulesets: Iterable[Ruleset] = (), directory: Path | None = None) -> None:
        self._by_version: dict[tuple[str, str], Ruleset] = {}
        for ruleset in rulesets:
            self._by_version[ruleset.id, ruleset.version] = ruleset
        self._directory = directory
        self._seen: dict[Path, int] = {}  # file -> st_mtime_ns when last read (valid or not)

    @classmethod
    def load(cls, directory: Path | None) -> RulesetLibrary:
        """Every ``*.toml`` ruleset in ``directory`` (none when None); InputError lists files that do not validate."""
        if directory is None:
            return cls()
        library = cls(directory=directory)
        issues = library._scan()
        if issues:
            raise InputError(issues, what="ruleset")
        return library

    def _scan(self) -> list[Issue]:
        """Read the directory's files not read yet (or changed since); the problems of those that do not validate."""
        assert self._directory is not None
        issues: list[Issue] = []
        for path in sorted(self._directory.glob("*.toml")):
            try:
                stamp = path.stat().st_mtime_ns
            except OSError:
                continue
            if self._seen.get(path) == stamp:
                continue
            self._seen[path] = stamp
            try:
                ruleset = load_ruleset(path)
            except InputError as exc:
                issues.extend(exc.issues)
                continue
            self._by_version[ruleset.id, ruleset.version] = ruleset
        return issues

    def __len__(self) -> int:
        return len(self._by_version)

    def newest(self, ruleset_id: str) -> Ruleset | None:
        """The highest version of ``ruleset_id`` (versions compare by their numbers: 2026.12.10 > 2026.12.9)."""
        if self._directory is not None:
            for issue in self._scan():
                log.warning("ruleset library: %s", issue)
        versions = [ruleset for (rid, _), ruleset in self._by_version.items() if rid == ruleset_id]
        return max(versions, key=lambda ruleset: version_key(ruleset.version), default=None)

    def find(self, ruleset_id: str, version: str, digest: str | None = None) -> Ruleset | None:
        """The ruleset a lane reported, or None when head office has no such version (or another text of it)."""
        ruleset = self._by_version.get((ruleset_id, version))
        if ruleset is None and self._directory is not None:
            # Published since start-up?  Files that do not validate stay out, as they would fail start-up.
            for issue in self._scan():
                log.warning("ruleset library: %s", issue)
            ruleset = self._by_version.get((ruleset_id, version))
        if ruleset is None or (digest is not None and digest != ruleset.digest):
            return None
        return ruleset


def audit_journal_sale(
    library: RulesetLibrary, at: dt.datetime, body: Mapping[str, Any]
) -> tuple[AuditStatus, list[Difference]]:
    """Re-price a sale's journal body (its POS request, member state and moment) and compare with its result.

    ``unknown_rules``: head office has no ruleset of that id, version and
    digest; ``unreadable``: the request or member cannot be parsed again (a
    lane cannot have priced it, so it is as suspect as a mismatch).
    """
    rules = body.get("rules")
    if not isinstance(rules, Mapping):
        return "unreadable", [Difference("rules", rules, "an object {id, version, digest}")]
    ruleset = library.find(str(rules.get("id")), str(rules.get("version")), rules.get("digest"))
    if ruleset is None:
        return "unknown_rules", []
    try:
        request = SaleIn.model_validate_json(json_text(body.get("request")))
        basket = dataclasses.replace(request.to_basket(), at=at)
        member_doc = body.get("member")
        member = None if member_doc is None else parse_member(member_doc, source="sale.member")
        expected = to_wire(price(basket, member, ruleset, at))
    except TenderError as exc:
        # The tenders the lane took do not fit the basket as re-priced: the amounts differ.
        return "mismatch", [Difference("tenders", body.get("request", {}).get("tenders"), str(exc)[:500])]
    except (ValidationError, InputError) as exc:
        return "unreadable", [Difference("request", None, str(exc)[:500])]
    reported = body.get("result")
    out: list[Difference] = []
    _diff("", reported if isinstance(reported, Mapping) else {}, expected, out)
    return ("mismatch" if out else "ok"), out
