"""The lane's client for head office's redemption holds (docs/downlink.md): ``agent.holds.HoldPort`` over HTTP.

``POST …/holds`` answers 201 (held) or 409 (refused, with head office's
code).  Anything else is *offline* for that sale: no answer within
``sync.hold_timeout_seconds`` (the whole exchange, connecting included),
a network error, a 5xx, or an answer this lane cannot use (a 401 means its
``hq_token`` is wrong: logged as an error, and the lane keeps selling within
its offline allowance).  Releases are best effort: a hold nobody releases
lapses at head office after ``lanes.hold_seconds``.

Counted in ``lane_holds_total{result}``: ``held``, ``refused``, ``offline``,
``released``, ``release_failed``.
"""

from __future__ import annotations

import asyncio
import logging
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote

import httpx

from agent.config import LaneConfig
from agent.holds import HoldAnswer, HoldRequest
from agent.metrics import Metrics
from agent.money import format_fen
from sync.hq_http import make_client

log = logging.getLogger(__name__)


class HqHolds:
    """Holds at head office for one lane; use as ``async with`` or ``aclose()`` it."""

    def __init__(self, config: LaneConfig, metrics: Metrics, *, client: httpx.AsyncClient | None = None) -> None:
        self.timeout = config.sync.hold_timeout_seconds
        self._metrics = metrics
        self._client = client or make_client(config, timeout=self.timeout)
        self._lane = f"{config.lane.store}/{config.lane.lane}"

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._client.aclose()

    async def hold(self, request: HoldRequest) -> HoldAnswer:
        """Head office's answer within the hold timeout; ``offline`` when there is none to use."""
        body = {
            "hold_id": request.hold_id,
            "sale_id": request.sale_id,
            "member_id": request.member_id,
            "points": request.spend.points,
            "rebate": format_fen(request.spend.rebate_fen),
            "coupons": list(request.spend.coupons),
        }
        try:
            async with asyncio.timeout(self.timeout):
                response = await self._client.post("holds", json=body)
        except TimeoutError:
            return self._offline(request, f"no answer within {self.timeout:g} s")
        except httpx.HTTPError as exc:
            return self._offline(request, f"{type(exc).__name__}: {exc}")
        if response.status_code == 201 and _document(response).get("status") == "held":
            self._metrics.holds.labels("held").inc()
            log.debug("sale %s: hold %s taken", request.sale_id, request.hold_id)
            return HoldAnswer("held")
        if response.status_code == 409:
            error = _document(response).get("error")
            code = error.get("code") if isinstance(error, dict) else None
            if isinstance(code, str) and code:
                message = error.get("message") if isinstance(error, dict) else None
                self._metrics.holds.labels("refused").inc()
                log.info("sale %s: head office refused the hold (%s)", request.sale_id, code)
                return HoldAnswer("refused", code, message if isinstance(message, str) else "")
        if response.status_code in (401, 403):
            log.error(
                "head office refuses lane %s's token (%d): check sync.hq_token; selling offline meanwhile",
                self._lane,
                response.status_code,
            )
        return self._offline(request, f"HTTP {response.status_code}: {response.text[:200]}")

    async def release(self, hold_id: str) -> None:
        """Release a hold (its sale was not committed); failures are logged, never raised."""
        try:
            async with asyncio.timeout(self.timeout):
                response = await self._client.delete(f"holds/{quote(hold_id, safe='')}")
        except (TimeoutError, httpx.HTTPError, RuntimeError) as exc:  # RuntimeError: the client closed at shutdown
            self._metrics.holds.labels("release_failed").inc()
            why = str(exc) or type(exc).__name__
            log.warning("hold %s not released (%s): it lapses at head office by itself", hold_id, why)
            return
        if response.status_code != 200:
            self._metrics.holds.labels("release_failed").inc()
            log.warning("hold %s not released: HTTP %d %s", hold_id, response.status_code, response.text[:200])
            return
        self._metrics.holds.labels("released").inc()
        log.info("hold %s released", hold_id)

    def _offline(self, request: HoldRequest, why: str) -> HoldAnswer:
        self._metrics.holds.labels("offline").inc()
        log.warning("sale %s: head office cannot hold (%s); the lane's offline allowance applies", request.sale_id, why)
        return HoldAnswer("offline", message=why)


def _document(response: httpx.Response) -> dict[str, Any]:
    try:
        document = response.json()
    except ValueError:
        return {}
    return document if isinstance(document, dict) else {}


__all__ = ["HqHolds"]
