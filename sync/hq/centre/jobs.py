"""The member centre's batch jobs: which exist, which are due on a day, and running one for a date.

A job is ``run(ctx: JobContext) -> dict[str, int]`` (what it did, counted).
Every write a job makes carries a key derived from the job, the day and the
member (``expire:2026-12-31:M1``, ``rebate:2026-12-10:M1``, a tier decision's
key), inserted only when new: running a job again for the same day changes
nothing, and a run that crashed half-way is finished by running it again.
``job_runs`` keeps the last run of each job for each day, for the dashboard
and ``lane-hq jobs list``.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy import select, update

from agent.errors import LaneError
from sync.hq.centre import expiry, rebates, tiers
from sync.hq.centre.programme import JobContext, Programme
from sync.hq.schema import job_runs

if TYPE_CHECKING:
    from sync.hq.db import HqDatabase

log = logging.getLogger(__name__)

JobFn = Callable[[JobContext], Mapping[str, int]]


@dataclass(frozen=True, slots=True)
class Job:
    name: str
    help: str
    run: JobFn
    due: Callable[[Programme, dt.date], bool]


def _daily(_programme: Programme, _day: dt.date) -> bool:
    return True


def _screening_day(programme: Programme, day: dt.date) -> bool:
    return day.day == programme.centre.screening_day


def _rebate_day(programme: Programme, day: dt.date) -> bool:
    rebate = programme.centre.rebate
    return rebate is not None and f"{day:%m-%d}" in rebate.dates


JOBS: dict[str, Job] = {
    job.name: job
    for job in (
        Job("tiers", "next-day tier changes take effect; anniversary retention; inactivity", tiers.run_daily, _daily),
        Job("screening", "the monthly qualification screening of every member", tiers.run_screening, _screening_day),
        Job("expiry", "points lots past their expiry date lapse", expiry.run, _daily),
        Job("rebates", "rebate money settled on the programme's dates", rebates.run, _rebate_day),
    )
}


class JobError(LaneError):
    """An unknown job name."""

    code = "unknown_job"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True, slots=True)
class JobResult:
    job: str
    day: dt.date
    runs: int
    summary: dict[str, int]


def run_job(ctx_base: JobContext, name: str) -> JobResult:
    """Run job ``name`` for ``ctx_base.day`` and record the run; the job decides nothing by the clock."""
    job = JOBS.get(name)
    if job is None:
        raise JobError(f"no job {name!r}: one of {', '.join(JOBS)}")
    ctx = JobContext(ctx_base.db, ctx_base.programme, ctx_base.day, ctx_base.now, actor=f"job:{name}")
    started = ctx.db.now()
    summary = {key: int(value) for key, value in job.run(ctx).items()}
    finished = ctx.db.now()
    j = job_runs.c
    with ctx.db.transaction() as conn:
        runs = conn.execute(select(j.runs).where(j.job == name, j.on_date == ctx.day)).scalar()
        values = {"started_at": started, "finished_at": finished, "summary": json.dumps(summary, sort_keys=True)}
        if runs is None:
            conn.execute(job_runs.insert().values(job=name, on_date=ctx.day, runs=1, **values))
        else:
            conn.execute(update(job_runs).where(j.job == name, j.on_date == ctx.day).values(runs=j.runs + 1, **values))
    log.info("job %s for %s: %s", name, ctx.day, summary)
    return JobResult(name, ctx.day, int(runs or 0) + 1, summary)


def due_jobs(programme: Programme, day: dt.date) -> list[str]:
    """The jobs due on ``day``, in the order they run (tiers before screening: a screening sees today's tiers)."""
    return [name for name, job in JOBS.items() if job.due(programme, day)]


def run_due(ctx: JobContext, *, skip_done: bool = False) -> list[JobResult]:
    """Every job due on ``ctx.day``; ``skip_done``: not those already run for that day (the daemon's catch-up)."""
    done: set[str] = set()
    if skip_done:
        j = job_runs.c
        with ctx.db.reading() as conn:
            done = set(conn.execute(select(j.job).where(j.on_date == ctx.day)).scalars())
    return [run_job(ctx, name) for name in due_jobs(ctx.programme, ctx.day) if name not in done]


def recent_runs(db: HqDatabase, limit: int = 50) -> list[dict[str, object]]:
    """The latest job runs, newest day first (the dashboard's list)."""
    j = job_runs.c
    query = select(job_runs).order_by(j.on_date.desc(), j.job).limit(limit)
    with db.reading() as conn:
        return [
            {
                "job": row.job,
                "day": row.on_date.isoformat(),
                "runs": int(row.runs),
                "finished_at": row.finished_at.isoformat(),
                "summary": json.loads(row.summary),
            }
            for row in conn.execute(query)
        ]
