"""``POST /v1/centre/whatif``: what a draft ruleset would have given over a period, for head-office staff.

The body is ``{"draft": "<ruleset TOML>", "from": "2026-12-01", "to":
"2026-12-31", "store": "s01"?}``; the answer is the report of
``sync.hq.centre.whatif`` (``WhatIfReport.doc()``: per rule, discount and
points live and draft; totals; the sales left out and why).  Errors are
``{"error": {"code", "message", "issues"?}}``: 400 a body that is not JSON,
422 a body or draft ruleset that does not validate (every problem of the
draft listed in ``issues``), 409 no live ruleset to compare with, 429 while
another replay runs (one at a time: a replay keeps a CPU busy).

The replay never blocks the event loop, nor the database's owner thread for
long: entries are fetched a chunk at a time through ``DbOwner.call`` (one
consistent read held open between the calls) and priced on a worker thread,
the next chunk being fetched while one is priced.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent.basket import issues_from_validation
from agent.errors import InputError, RulesetError
from agent.ruleset import Ruleset
from sync.hq.audit import RulesetLibrary
from sync.hq.centre.programme import ProgrammeError
from sync.hq.centre.staff import staff_guard
from sync.hq.centre.whatif import (
    CHUNK,
    Period,
    SaleEntry,
    SaleReader,
    WhatIf,
    WhatIfReport,
    check_period,
    issues_doc,
    live_ruleset,
    parse_draft,
)
from sync.hq.config import HqConfig
from sync.hq.db import HqDatabase
from sync.hq.owner import DbOwner

log = logging.getLogger(__name__)

MAX_DRAFT_CHARS = 1_000_000


class WhatIfIn(BaseModel):
    """The body of ``POST /v1/centre/whatif``."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=False)

    draft: str = Field(min_length=1, max_length=MAX_DRAFT_CHARS, description="the draft ruleset, TOML text")
    first: dt.date = Field(alias="from", description="first programme-local day, YYYY-MM-DD")
    last: dt.date = Field(alias="to", description="last day, included")
    store: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,32}$")] | None = Field(
        default=None, description="one store only; every store when absent"
    )


def _error(status: int, code: str, message: str, issues: list[Any] | None = None) -> JSONResponse:
    detail: dict[str, Any] = {"code": code, "message": message}
    if issues is not None:
        detail["issues"] = issues
    return JSONResponse({"error": detail}, status_code=status)


async def replay_async(owner: DbOwner, whatif: WhatIf, chunk: int = CHUNK) -> WhatIfReport:
    """Run ``whatif`` over its period: chunks read on the owner thread, priced on a worker thread."""
    live, period = whatif.live, whatif.period
    reader = await owner.call(lambda db: SaleReader(db, live, period, chunk))

    def fetch(_db: HqDatabase) -> list[SaleEntry]:
        return reader.next_chunk()

    pending: asyncio.Future[list[SaleEntry]] | None = asyncio.ensure_future(owner.call(fetch))
    try:
        while pending is not None:
            entries = await pending
            pending = None
            if not entries:
                break
            pending = asyncio.ensure_future(owner.call(fetch))  # read the next chunk while this one is priced
            await asyncio.to_thread(whatif.add_all, entries)
    finally:
        if pending is not None:
            # The owner thread runs calls in order: let the fetch finish before the read is closed.
            await asyncio.gather(pending, return_exceptions=True)
        await owner.call(lambda _db: reader.close())
    return whatif.report()


class _RefusedError(Exception):
    def __init__(self, response: JSONResponse) -> None:
        super().__init__(response.status_code)
        self.response = response


def _inputs(raw: bytes, config: HqConfig, library: RulesetLibrary) -> tuple[Ruleset, Ruleset, Period]:
    """The live and draft rulesets and the period of a request body; _RefusedError with the error answer."""
    try:
        document: Any = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise _RefusedError(_error(400, "json_syntax", f"the body is not valid JSON: {exc}")) from None
    try:
        body = WhatIfIn.model_validate(document)
    except ValidationError as exc:
        issues = issues_from_validation(exc)
        raise _RefusedError(_error(422, issues[0].code, str(issues[0]), issues_doc(issues))) from None
    try:
        draft = parse_draft(body.draft)
        period = check_period(body.first, body.last, body.store)
        live = live_ruleset(library, config.centre.ruleset, draft)
    except RulesetError as exc:
        message = f"the draft ruleset is invalid ({len(exc.issues)} problem(s)): {exc.first}"
        raise _RefusedError(_error(422, "invalid_ruleset", message, issues_doc(exc.issues))) from None
    except InputError as exc:
        raise _RefusedError(_error(422, exc.first.code, str(exc.first), issues_doc(exc.issues))) from None
    except ProgrammeError as exc:
        raise _RefusedError(_error(409, exc.code, exc.message)) from None
    return live, draft, period


def router(config: HqConfig, owner: DbOwner, library: RulesetLibrary) -> APIRouter:
    """The what-if route, open to staff tokens under ``config``'s staff secret (sync/hq/centre/staff.py)."""
    routes = APIRouter(tags=["centre"], dependencies=[Depends(staff_guard(config.staff_secret()))])
    running = asyncio.Lock()

    @routes.post("/v1/centre/whatif", response_model=None)
    async def whatif(request: Request) -> JSONResponse | dict[str, Any]:
        """Replay a period's sales against a draft ruleset: per rule, discount and points compared with live."""
        try:
            live, draft, period = _inputs(await request.body(), config, library)
        except _RefusedError as exc:
            return exc.response
        if running.locked():
            return _error(429, "busy", "another what-if replay is running; ask again when it has finished")
        async with running:
            started = time.monotonic()
            report = await replay_async(owner, WhatIf(live, draft, period))
        log.info(
            "what-if %s %s vs %s %s, %s..%s: %d sales in %.1f s",
            live.id,
            live.version,
            draft.id,
            draft.version,
            period.first,
            period.last,
            report.read,
            time.monotonic() - started,
        )
        return report.doc()

    return routes
