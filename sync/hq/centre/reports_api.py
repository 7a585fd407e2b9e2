"""The member centre's reports over HTTP, and the dashboard page that charts them.

| route | what |
| --- | --- |
| ``GET /v1/reports`` | the reports, what each shows and which parameters it reads; the live programme |
| ``GET /v1/reports/{name}?from=&to=&period=&format=`` | one report as JSON (money as decimal strings) or CSV |
| ``GET /centre`` | the dashboard: charts and tables of the reports, CSV links, a date-range form |
| ``GET /centre/plotly.min.js`` | plotly.js as the installed ``plotly`` package ships it |

``from`` / ``to`` are the programme's local dates (default: the 30 days ending
today), ``period`` is ``day``, ``week`` or ``month``.  Errors are
``{"error": {"code", "message"}}``: 404 ``unknown_report``, 422 ``bad_date``,
``bad_range``, ``range_too_long``, ``bad_period``, ``bad_format``; 503
``no_programme`` when ``[centre] ruleset`` names no ruleset in the rules
directory (the reports need its calendar).

Access: these routes take no staff token, like the lanes' figures at ``/``
and ``/v1/lanes`` beside them.  Every report is an aggregate except the churn
warning, which lists member ids, tiers and visit dates: no name, phone, card
number or other personal data, and a member id leads to a person only
through the member centre's staff-only routes with the personal-data key.
The API listens on ``api.host`` (127.0.0.1 by default): who may reach it is
the network's and HTTPS's business, as for the rest of the read-only API.

plotly.js (4-5 MB) is read from the installed package once, kept in memory
with its gzip form, and served with an ETag and a day's caching; it is never
copied into this repository.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import threading
from importlib import resources
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.exceptions import HTTPException
from fastapi.responses import HTMLResponse, Response

from sync.hq.audit import RulesetLibrary
from sync.hq.centre.programme import Programme, ProgrammeError, live_programme
from sync.hq.centre.reports import REPORTS, Report, ReportError, catalogue, make_query, run_report, to_csv
from sync.hq.config import HqConfig
from sync.hq.db import HqDatabase
from sync.hq.owner import DbOwner

FORMATS = ("json", "csv")
PLOTLY_PATH = "/centre/plotly.min.js"
_PLOTLY_CACHE = "public, max-age=86400"


def _error(status: int, code: str, message: str) -> HTTPException:
    return HTTPException(status, {"code": code, "message": message})


class PlotlyAsset:
    """plotly.js from the installed ``plotly`` package, read once: plain, gzipped, and its ETag."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loaded: tuple[bytes, bytes, str] | None = None

    def load(self) -> tuple[bytes, bytes, str]:
        """``(plain, gzipped, etag)``; the first call reads and compresses (a fraction of a second)."""
        with self._lock:
            if self._loaded is None:
                # The file plotly.offline.get_plotlyjs() reads, without importing plotly's Python side.
                plain = resources.files("plotly").joinpath("package_data", "plotly.min.js").read_bytes()
                etag = f'"plotly-{hashlib.sha256(plain).hexdigest()[:20]}"'
                self._loaded = (plain, gzip.compress(plain, compresslevel=6, mtime=0), etag)
            return self._loaded

    async def response(self, request: Request) -> Response:
        plain, zipped, etag = await asyncio.to_thread(self.load)
        headers = {"ETag": etag, "Cache-Control": _PLOTLY_CACHE, "Vary": "Accept-Encoding"}
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=headers)
        media = "text/javascript; charset=utf-8"
        if "gzip" in request.headers.get("accept-encoding", ""):
            return Response(zipped, media_type=media, headers={**headers, "Content-Encoding": "gzip"})
        return Response(plain, media_type=media, headers=headers)


def _dashboard_html() -> str:
    return resources.files("sync.hq.centre").joinpath("dashboard.html").read_text(encoding="utf-8")


def _programme_doc(programme: Programme) -> dict[str, Any]:
    ruleset = programme.ruleset
    return {
        "ruleset": ruleset.id,
        "version": ruleset.version,
        "timezone": str(programme.tz),
        "tiers": list(programme.tiers),
    }


def _csv_response(result: Report) -> Response:
    span = "_".join(day.isoformat() for day in (result.first, result.last) if day is not None)
    filename = f"{result.name}_{span}.csv" if span else f"{result.name}.csv"
    return Response(
        to_csv(result),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )


class _Reports:
    """What the routes share: the configuration, the database's owner, the rulesets."""

    def __init__(self, config: HqConfig, owner: DbOwner, library: RulesetLibrary) -> None:
        self.config = config
        self.owner = owner
        self.library = library

    def programme(self) -> Programme:
        try:
            return live_programme(self.library, self.config.centre.ruleset)
        except ProgrammeError as exc:
            raise _error(503, exc.code, exc.message) from None

    async def listing(self) -> dict[str, Any]:
        try:
            live: dict[str, Any] | None = _programme_doc(await asyncio.to_thread(self.programme))
        except HTTPException:
            live = None
        return {"reports": catalogue(), "programme": live, "churn_factor": self.config.centre.churn_factor}

    async def report(
        self, name: str, first: str | None, last: str | None, period: str | None, fmt: str | None
    ) -> Response | dict[str, Any]:
        if name not in REPORTS:
            raise _error(404, "unknown_report", f"no report {name[:60]!r}: one of {', '.join(REPORTS)}")
        chosen = fmt or "json"
        if chosen not in FORMATS:
            raise _error(422, "bad_format", "format: json or csv")
        live = await asyncio.to_thread(self.programme)
        factor = self.config.centre.churn_factor

        def read(db: HqDatabase) -> Report:
            query = make_query(live, db.now(), first=first, last=last, period=period, churn_factor=factor)
            with db.reading() as conn:
                return run_report(conn, live, name, query)

        try:
            result = await self.owner.call(read)
        except ReportError as exc:
            raise _error(422, exc.code, exc.message) from None
        return result.to_json() if chosen == "json" else _csv_response(result)


def router(config: HqConfig, owner: DbOwner, library: RulesetLibrary) -> APIRouter:
    """The reports' routes and the dashboard (see the module docstring)."""
    api = APIRouter()
    reports = _Reports(config, owner, library)
    plotly = PlotlyAsset()
    page = _dashboard_html()

    @api.get("/v1/reports", tags=["reports"])
    async def list_reports() -> dict[str, Any]:
        """Every report: name, title, what it shows, the parameters it reads; and the programme they follow."""
        return await reports.listing()

    @api.get("/v1/reports/{name}", tags=["reports"], response_model=None)
    async def report(
        name: str,
        first: Annotated[str | None, Query(alias="from", description="first local date, YYYY-MM-DD")] = None,
        last: Annotated[str | None, Query(alias="to", description="last local date (default today)")] = None,
        period: Annotated[str | None, Query(description="day, week or month (default day)")] = None,
        fmt: Annotated[str | None, Query(alias="format", description="json (default) or csv")] = None,
    ) -> Response | dict[str, Any]:
        """One report for a range of the programme's local dates, as JSON or as a CSV attachment."""
        return await reports.report(name, first, last, period, fmt)

    @api.get("/centre", response_class=HTMLResponse, include_in_schema=False)
    async def dashboard() -> HTMLResponse:
        return HTMLResponse(page, headers={"Cache-Control": "no-cache"})

    @api.get(PLOTLY_PATH, include_in_schema=False)
    async def plotly_js(request: Request) -> Response:
        return await plotly.response(request)

    return api


__all__ = ["FORMATS", "PLOTLY_PATH", "PlotlyAsset", "router"]
