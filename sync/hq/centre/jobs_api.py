"""The member centre's batch jobs over HTTP, for staff (docs/member-centre.md "Jobs").

``POST /v1/centre/jobs/{name}/run?date=YYYY-MM-DD`` runs one job for a day
(default: today in the programme's zone) and answers what it did;
``GET /v1/centre/jobs`` lists the latest runs.  Both need a staff token
(``sync.hq.centre.staff``); a run by hand is recorded in ``centre_audit``
under the staff member's name.  Errors are ``{"error": {"code", "message"}}``:
404 ``unknown_job``, 422 ``bad_date``, 409 ``no_programme`` or a refused
change.

A job runs on the database's owner thread (``DbOwner.call``), where every
use of the database runs: its SQLite connections must not be shared with
another thread.  Ingest waits meanwhile; the daemon's own scheduling runs
jobs the same way.

No ``from __future__ import annotations`` here, unlike the rest of the
package: FastAPI resolves string annotations in the module's globals, and
the staff dependency is built per router from the configuration (a local
name), so the route annotations must be evaluated where they are written.
"""

import datetime as dt
import json
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query

from sync.hq.audit import RulesetLibrary
from sync.hq.centre import jobs
from sync.hq.centre.programme import JobContext, ProgrammeError, live_programme
from sync.hq.centre.staff import staff_guard
from sync.hq.config import HqConfig
from sync.hq.db import HqDatabase
from sync.hq.members import MemberError
from sync.hq.owner import DbOwner
from sync.hq.schema import centre_audit


def _error(status: int, code: str, message: str) -> HTTPException:
    return HTTPException(status, detail={"code": code, "message": message})


def _day(text: str | None) -> dt.date | None:
    if text is None:
        return None
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise _error(422, "bad_date", f"{text[:40]!r} is not a date (YYYY-MM-DD)") from None


def _result_doc(result: jobs.JobResult) -> dict[str, Any]:
    return {"job": result.job, "day": result.day.isoformat(), "runs": result.runs, "summary": result.summary}


def router(config: HqConfig, owner: DbOwner, library: RulesetLibrary) -> APIRouter:
    """The jobs' routes; the programme is looked up at each run (a newly published version is live at once)."""
    api = APIRouter(tags=["member centre: jobs"])
    staff = Annotated[str, Depends(staff_guard(config.staff_secret()))]

    def run_as(name: str, day: dt.date | None, actor: str) -> Callable[[HqDatabase], jobs.JobResult]:
        def work(db: HqDatabase) -> jobs.JobResult:
            programme = live_programme(library, config.centre.ruleset)
            now = db.now()
            result = jobs.run_job(JobContext(db, programme, day or programme.local_date(now), now), name)
            with db.transaction() as conn:
                conn.execute(
                    centre_audit.insert().values(
                        at=now,
                        actor=actor,
                        action="job_run",
                        member_id=None,
                        card_hash=None,
                        reason=f"job {name} run for {result.day.isoformat()}",
                        detail=json.dumps({"job": name, "day": result.day.isoformat(), "summary": result.summary}),
                    )
                )
            return result

        return work

    @api.post("/v1/centre/jobs/{name}/run")
    async def run_job(
        name: str,
        who: staff,
        date: Annotated[str | None, Query(description="the day, YYYY-MM-DD (default: today, local)")] = None,
    ) -> dict[str, Any]:
        """Run job ``name`` for ``date``: what it did.  Running it again for a day changes nothing."""
        if name not in jobs.JOBS:
            raise _error(404, "unknown_job", f"no job {name[:40]!r}: one of {', '.join(jobs.JOBS)}")
        day = _day(date)
        try:
            result = await owner.call(run_as(name, day, who))
        except ProgrammeError as exc:
            raise _error(409, exc.code, exc.message) from None
        except MemberError as exc:
            raise _error(409, exc.code, exc.message) from None
        return _result_doc(result)

    @api.get("/v1/centre/jobs")
    async def list_runs(
        _who: staff, limit: Annotated[int, Query(ge=1, le=500, description="at most this many")] = 50
    ) -> dict[str, Any]:
        """The latest job runs, newest day first."""
        return {"runs": await owner.call(lambda db: jobs.recent_runs(db, limit))}

    return api
