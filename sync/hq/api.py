"""Head office's HTTP API (part 1): per-lane figures, a dashboard page and the metrics.

Read-only for now; the member centre's administration comes with its issue.
OpenAPI at ``/docs``.
"""

from __future__ import annotations

import html
from collections.abc import Iterable
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import HTTPException
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from agent.money import format_fen
from sync.hq.metrics import HqMetrics
from sync.hq.owner import DbOwner

_COLUMNS = (
    ("lane", "lane"),
    ("sales", "sales"),
    ("net", "net"),
    ("discount", "discount"),
    ("points_earned", "points"),
    ("returns", "returns"),
    ("voids", "voids"),
    ("duplicates", "duplicates skipped"),
    ("dead_letters", "dead letters"),
    ("audit_mismatches", "audit mismatches"),
    ("last_seq", "last seq"),
    ("state", "state"),
)


def _lane_doc(row: dict[str, Any]) -> dict[str, Any]:
    doc = dict(row)
    for key in ("net_fen", "discount_fen"):
        if key in doc:
            doc[key.removesuffix("_fen")] = format_fen(int(doc.pop(key)))
    doc["lane"] = f"{doc.get('store')}/{doc.get('lane')}"
    return doc


async def _http_error(_request: Request, exc: HTTPException) -> JSONResponse:
    # Errors as the lanes' POS API gives them: {"error": {"code", "message"}}.
    detail: Any = exc.detail
    if not isinstance(detail, dict):
        detail = {"code": f"http_{exc.status_code}", "message": str(detail)}
    return JSONResponse({"error": detail}, status_code=exc.status_code, headers=exc.headers)


def create_hq_app(owner: DbOwner, metrics: HqMetrics, routers: Iterable[APIRouter] = ()) -> FastAPI:
    """The API; ``routers`` add the lanes' routes (member table, holds) and the administration."""
    app = FastAPI(title="lane-hq", version="1", description="Head office of the lane membership agents")
    for router in routers:
        app.include_router(router)

    app.add_exception_handler(HTTPException, _http_error)  # type: ignore[arg-type]

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/lanes")
    async def lanes() -> dict[str, Any]:
        """Every lane head office has heard from: sales, discounts, points, duplicates, dead letters, audit."""
        rows = await owner.call(lambda db: db.lane_summary())
        return {"lanes": [_lane_doc(row) for row in rows]}

    @app.get("/v1/totals")
    async def totals() -> dict[str, Any]:
        """The same figures across all lanes."""
        doc = dict(await owner.call(lambda db: db.totals()))
        for key in ("net_fen", "discount_fen"):
            if key in doc:
                doc[key.removesuffix("_fen")] = format_fen(int(doc.pop(key)))
        return doc

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse)
    async def dashboard() -> str:
        rows = [_lane_doc(row) for row in await owner.call(lambda db: db.lane_summary())]
        head = "".join(f"<th>{html.escape(title)}</th>" for _, title in _COLUMNS)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(str(row.get(key, '')))}</td>" for key, _ in _COLUMNS) + "</tr>"
            for row in rows
        )
        return (
            '<!doctype html><html><head><meta charset="utf-8"><meta http-equiv="refresh" content="5">'
            "<title>lane-hq</title><style>body{font-family:sans-serif}td,th{padding:4px 10px;text-align:right}"
            "</style></head><body><h1>Lanes</h1>"
            f"<table><tr>{head}</tr>{body}</table>"
            '<p><a href="/centre">member centre</a> · <a href="/v1/lanes">/v1/lanes</a> · '
            '<a href="/metrics">/metrics</a> · <a href="/docs">/docs</a></p>'
            "</body></html>"
        )

    return app
