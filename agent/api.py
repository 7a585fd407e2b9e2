"""The POS API: loopback HTTP + JSON (and Server-Sent Events) over ``agent.service``.

Contract: ``docs/pos-api.md`` and the OpenAPI document at ``/docs``.  This
module only binds routes to the service and maps errors to HTTP:

* every error is ``{"error": {"code", "message", "field"}}`` (plus ``issues``
  when validation found several problems), 4xx for the caller's mistakes and
  never a 500 for bad input;
* request bodies are read whole, up to ``max_body_bytes`` (413 beyond it,
  before the rest is read), and must be JSON (415 otherwise);
* ``/v1/*`` needs ``Authorization: Bearer <token>`` (401);
* each request gets ``request_timeout_seconds`` (503 ``timeout`` beyond);
  a sale, return or void that timed out may still have committed, which the
  POS's retry with the same id then replays.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Any, TypeVar

from fastapi import Body, Depends, FastAPI, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from agent import __version__
from agent.basket import BasketIn, field_path
from agent.errors import (
    InputError,
    LaneError,
    SaleConflictError,
    SaleStateError,
    SpendRefusedError,
    StoreBusyError,
    StoreFullError,
    UnknownSaleError,
)
from agent.metrics import Metrics
from agent.pos_models import IdentifyIn, Key, ReturnIn, SaleIn, VoidIn
from agent.service import LaneService
from agent.store import json_text

log = logging.getLogger(__name__)

T = TypeVar("T")
SSE_PING_SECONDS = 15
# Module level: FastAPI resolves the routes' (string) annotations against this module's names.
_BEARER = HTTPBearer(auto_error=False, description="the lane's POS API token (lane.toml [api] token)")

_ERROR_SCHEMA = {
    "description": 'an error: `{"error": {"code", "message", "field"}}`',
    "content": {
        "application/json": {
            "example": {
                "error": {"code": "unknown_member", "message": "this lane has no member 'M9'", "field": "member_id"}
            }
        }
    },
}
_ERRORS: dict[int | str, dict[str, Any]] = dict.fromkeys((400, 401, 404, 409, 413, 415, 422, 503, 507), _ERROR_SCHEMA)


class JSONBody(Response):
    """A JSON answer encoded once with ``json`` (no pydantic round trip on the hot path)."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return json_text(content).encode("utf-8")


def error_response(
    status: int,
    code: str,
    message: str,
    field: str = "",
    *,
    issues: list[dict[str, str]] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONBody:
    """The API's one error shape."""
    error: dict[str, Any] = {"code": code, "message": message, "field": field}
    if issues is not None and len(issues) > 1:
        error["issues"] = issues
    return JSONBody({"error": error}, status_code=status, headers=headers)


# --- the ASGI layer: body limit, media type, metrics ---------------------------


class Gate:
    """Pure ASGI middleware: reads request bodies whole under a size cap, checks the media type, times requests.

    Reading the body here (it is a few KiB) means an oversized request is
    refused with 413 as soon as it passes the cap, whether it announced a
    Content-Length or not, and the app sees a body that is already complete.
    """

    def __init__(self, app: ASGIApp, *, max_body_bytes: int, metrics: Metrics) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        sent_start = False

        async def send_timed(message: Message) -> None:
            nonlocal status, sent_start
            if message["type"] == "http.response.start":
                status = message["status"]
                sent_start = True
            await send(message)

        try:
            if scope["method"] in ("POST", "PUT", "PATCH"):
                refused, receive = await self._read_body(scope, receive)
                if refused is not None:
                    await refused(scope, receive, send_timed)
                    return
            await self.app(scope, receive, send_timed)
        finally:
            route = scope.get("route")
            # path_format: "/v1/sales/{sale_id}/void", without the route's ":path" converter.
            template = getattr(route, "path_format", "unmatched")
            if template != "/v1/events":  # a stream's lifetime is not a latency
                self.metrics.latency.labels(template).observe(time.perf_counter() - started)
            if sent_start:
                self.metrics.requests.labels(template, scope["method"], str(status)).inc()

    async def _read_body(self, scope: Scope, receive: Receive) -> tuple[ASGIApp | None, Receive]:
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            return self._too_large(), receive
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return Response(status_code=400), receive
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return self._too_large(), receive
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        media = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        if body and media != b"application/json":
            return (
                error_response(
                    415,
                    "unsupported_media_type",
                    "send the body as JSON with Content-Type: application/json",
                    "Content-Type",
                ),
                receive,
            )
        delivered = False

        async def replay() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: wait for the disconnect, as the server would

        return None, replay

    def _too_large(self) -> ASGIApp:
        self.metrics.errors.labels("body_too_large").inc()
        return error_response(
            413,
            "body_too_large",
            f"the request body is larger than {self.max_body_bytes} bytes",
            headers={"Connection": "close"},
        )


# --- errors -----------------------------------------------------------------------


def _status_of(exc: LaneError) -> int:
    if isinstance(exc, InputError):
        return 422
    if isinstance(exc, UnknownSaleError):
        return 404
    if isinstance(exc, SaleConflictError | SaleStateError | SpendRefusedError):
        return 409
    if isinstance(exc, StoreFullError):
        return 507
    if isinstance(exc, StoreBusyError):
        return 503
    return 500


def _lane_error(metrics: Metrics, exc: LaneError) -> JSONBody:
    status = _status_of(exc)
    metrics.errors.labels(exc.code).inc()
    if isinstance(exc, InputError):
        issues = [{"code": i.code, "message": i.message, "field": i.field} for i in exc.issues]
        first = exc.first
        return error_response(status, first.code, first.message, first.field, issues=issues)
    headers = {"Retry-After": "1"} if status in (503, 507) else None
    if status == 500:
        log.error("store failure: %s", exc)
    field = "sale_id" if isinstance(exc, SaleStateError | SaleConflictError) else ""
    if isinstance(exc, SpendRefusedError):
        field = exc.field
    return error_response(status, exc.code, str(exc), field, headers=headers)


def _validation_error(metrics: Metrics, exc: RequestValidationError) -> JSONBody:
    issues = []
    for error in exc.errors():
        # FastAPI puts where the value came from ("body") in front of the model's own location.
        path = field_path([part for part in error.get("loc", ()) if part != "body"])
        code = str(error.get("type", "invalid"))
        if code == "document_check":
            code = "duplicate"
        message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
        issues.append({"code": code, "message": message, "field": path})
    if not issues:
        issues = [{"code": "invalid", "message": "the request is invalid", "field": ""}]
    if issues[0]["code"] == "json_invalid":
        metrics.errors.labels("json_syntax").inc()
        return error_response(400, "json_syntax", f"the body is not valid JSON: {issues[0]['message']}", "")
    if issues[0]["code"] == "missing" and issues[0]["field"] == "":
        issues[0] = {"code": "missing", "message": "a JSON body is required", "field": ""}
    metrics.errors.labels(issues[0]["code"]).inc()
    return error_response(422, issues[0]["code"], issues[0]["message"], issues[0]["field"], issues=issues)


_HTTP_CODES = {
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
}


# --- the app ------------------------------------------------------------------


def create_app(  # noqa: C901 - one nested function per route reads best
    service: LaneService,
    metrics: Metrics,
    *,
    token: str,
    max_body_bytes: int,
    request_timeout: float,
    devices: Callable[[], list[dict[str, Any]]] | None = None,
) -> FastAPI:
    """The POS API application for ``service``; serve it with any ASGI server (the daemon uses uvicorn)."""
    app = FastAPI(
        title="Lane agent POS API",
        version=__version__,
        description="The checkout lane's membership agent: identify members, price baskets, commit sales, "
        "returns and voids. Money is a decimal string; times are ISO 8601 with offset. See docs/pos-api.md.",
        docs_url="/docs",
        redoc_url=None,
    )
    expected = token.encode("utf-8")

    async def authorised(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)]) -> None:
        given = b"" if credentials is None else credentials.credentials.encode("utf-8")
        # compare_digest: the token is not leaked by how long a wrong guess takes to refuse.
        if credentials is None or credentials.scheme.lower() != "bearer" or not hmac.compare_digest(given, expected):
            raise StarletteHTTPException(401, "a valid 'Authorization: Bearer <token>' header is required")

    async def bounded(work: Awaitable[T]) -> T:
        try:
            async with asyncio.timeout(request_timeout):
                return await work
        except TimeoutError:
            raise _Timeout from None

    _install_error_handlers(app, metrics, request_timeout)

    v1 = [Depends(authorised)]

    @app.get("/v1/status", dependencies=v1, responses=_ERRORS, tags=["lane"])
    async def status() -> Response:
        """The lane, versions (rules, member table), journal backlog and acknowledgement, disk, devices."""
        return JSONBody(await bounded(service.status(devices() if devices else None)))

    @app.get("/v1/events", dependencies=v1, responses=_ERRORS, tags=["lane"])
    async def events() -> EventSourceResponse:
        """Server-Sent Events: member.identified, card.rejected, coupon.scanned, device.changed (and stream.lost)."""
        return EventSourceResponse(_sse(service, metrics), ping=SSE_PING_SECONDS)

    @app.post("/v1/identify", dependencies=v1, responses=_ERRORS, tags=["members"])
    async def identify(request: IdentifyIn) -> Response:
        """A card number or member id typed or scanned at the POS: a member summary, or a refusal with its reason."""
        found = await bounded(service.identify(request))
        metrics.identifications.labels(found.document.get("reason", "identified")).inc()
        return JSONBody(found.document)

    @app.post("/v1/price", dependencies=v1, responses=_ERRORS, tags=["sales"])
    async def price(request: BasketIn) -> Response:
        """Price a basket for a member (or a guest): discounts per line with their rules, totals, points."""
        return JSONBody(await bounded(service.price(request)))

    @app.post("/v1/sales", dependencies=v1, responses=_ERRORS, tags=["sales"])
    async def sales(request: SaleIn, raw: Request) -> Response:
        """Commit a sale, durably, before answering. Idempotent on `sale_id`: a retry replays; another body is 409."""
        text, replayed = await bounded(service.sale(request, await raw.json()))
        _count(metrics, "sale", replayed)
        headers = {"Idempotent-Replay": "true"} if replayed else None
        return Response(text.encode("utf-8"), media_type="application/json", headers=headers)

    @app.post("/v1/returns", dependencies=v1, responses=_ERRORS, tags=["sales"])
    async def returns(request: ReturnIn, raw: Request) -> Response:
        """Return lines of a sale: refunds their allocated net, reverses their points. Idempotent on `return_id`."""
        response, replayed = await bounded(service.return_goods(request, await raw.json()))
        _count(metrics, "return", replayed)
        return JSONBody(response, headers={"Idempotent-Replay": "true"} if replayed else None)

    # ":path": a sale id may hold "/" (any printable ASCII, pos_models.Key), which the client sends as %2F
    # and the server decodes before routing; the OpenAPI document still reads /v1/sales/{sale_id}/void.
    @app.post("/v1/sales/{sale_id:path}/void", dependencies=v1, responses=_ERRORS, tags=["sales"])
    async def void(
        raw: Request,
        sale_id: Annotated[Key, Path(description="the sale's POS id")],
        request: Annotated[VoidIn | None, Body()] = None,
    ) -> Response:
        """Void a sale of today: everything refunded, points and spends undone. A retry replays."""
        body = await raw.json() if request is not None else {}
        response, replayed = await bounded(service.void(sale_id, request or VoidIn(), body))
        _count(metrics, "void", replayed)
        return JSONBody(response, headers={"Idempotent-Replay": "true"} if replayed else None)

    @app.get("/metrics", include_in_schema=False)
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(Gate, max_body_bytes=max_body_bytes, metrics=metrics)
    return app


def _install_error_handlers(app: FastAPI, metrics: Metrics, request_timeout: float) -> None:
    """Every failure becomes the API's error document; a bug is logged and answered 500, never a traceback."""

    @app.exception_handler(LaneError)
    async def on_lane_error(_: Request, exc: LaneError) -> Response:
        return _lane_error(metrics, exc)

    @app.exception_handler(RequestValidationError)
    async def on_validation(_: Request, exc: RequestValidationError) -> Response:
        return _validation_error(metrics, exc)

    @app.exception_handler(StarletteHTTPException)
    async def on_http(_: Request, exc: StarletteHTTPException) -> Response:
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        metrics.errors.labels(code).inc()
        headers = {"WWW-Authenticate": "Bearer"} if exc.status_code == 401 else dict(exc.headers or {})
        return error_response(exc.status_code, code, str(exc.detail), headers=headers)

    @app.exception_handler(_Timeout)
    async def on_timeout(_: Request, __: _Timeout) -> Response:
        metrics.errors.labels("timeout").inc()
        return error_response(
            503,
            "timeout",
            f"the lane did not answer within {request_timeout:g} s; retry with the same id (a commit may have landed)",
            headers={"Retry-After": "1"},
        )

    @app.exception_handler(Exception)
    async def on_bug(request: Request, exc: Exception) -> Response:
        # A programming error: logged with its traceback (masked by the log formatter), never shown to the POS.
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        metrics.errors.labels("internal").inc()
        return error_response(500, "internal", "the lane agent failed on this request; see its log")


class _Timeout(Exception):  # noqa: N818 - internal signal, never raised outside this module
    pass


def _count(metrics: Metrics, kind: str, replayed: bool) -> None:
    (metrics.replays if replayed else metrics.journal).labels(kind).inc()


async def _sse(service: LaneService, metrics: Metrics) -> AsyncIterator[ServerSentEvent]:
    metrics.event_streams.inc()
    try:
        async for event in service.events.stream():
            if event.kind == "stream.lost":
                metrics.events_dropped.inc(event.data.get("missed", 0))
            yield ServerSentEvent(
                data=json_text(event.to_wire()),
                event=event.kind,
                id=str(event.id) if event.id else None,
            )
    finally:
        metrics.event_streams.dec()
