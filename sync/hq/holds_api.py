"""Head office's hold routes for lanes (docs/downlink.md, "Redemption holds").

``POST /v1/sync/{store}/{lane}/holds`` takes a hold, ``DELETE
/v1/sync/{store}/{lane}/holds/{hold_id}`` releases one; both open only with
that lane's token (``sync.hq.lane_guard``).  Errors are
``{"error": {"code", "message", "field"}}``: 422 for a body that does not
validate, 409 for a refusal (``insufficient_points``, ``insufficient_rebate``,
``coupon_used``, ``coupon_held``, ``unknown_member``, ``hold_conflict``), 404
for a hold this lane does not have.  The work runs on the database's owner
thread (``sync.hq.holds``).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Path, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from agent.basket import Code, Money, issues_from_validation
from agent.pos_models import Key
from sync.hq import holds
from sync.hq.config import HqConfig
from sync.hq.lane_guard import LaneId, lane_guard
from sync.hq.metrics import HqMetrics
from sync.hq.owner import DbOwner

log = logging.getLogger(__name__)

# Holds past their time are marked expired (and counted) at most this often, besides lazily.
SWEEP_SECONDS = 60.0
MAX_POINTS = 10**12
# Path parameters (the guard has checked them against the token); module level, for FastAPI's annotations.
LaneStore = Annotated[str, Path(description="the lane's store id")]
LaneName = Annotated[str, Path(description="the lane's id")]
HoldId = Annotated[str, Path(pattern=r"^[!-~]{1,64}$", description="the hold's id, as the lane chose it")]


class HoldIn(BaseModel):
    """The body of ``POST …/holds``: what one sale is about to spend."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)

    hold_id: Key = Field(description="chosen by the lane (a UUID); asking again with it answers the same hold")
    sale_id: Key = Field(description="the POS's sale id")
    member_id: Code | None = Field(default=None, description="whose points and rebate; none for coupons alone")
    points: int = Field(default=0, ge=0, le=MAX_POINTS, strict=True)
    rebate: Money = Field(default=0, description='decimal string, "12.00"')
    coupons: list[Code] = Field(default_factory=list, max_length=20, description="single-use coupon codes")

    @model_validator(mode="after")
    def _something_for_someone(self) -> HoldIn:
        if (self.points or self.rebate) and self.member_id is None:
            raise ValueError("points and rebate are held for a member: give member_id")
        if not (self.points or self.rebate or self.coupons):
            raise ValueError("nothing to hold: give points, rebate or coupons")
        if len(set(self.coupons)) != len(self.coupons):
            raise ValueError("each coupon appears once")
        return self


def _error(status: int, code: str, message: str, field: str = "") -> HTTPException:
    return HTTPException(status, detail={"code": code, "message": message, "field": field})


async def _body(request: Request) -> HoldIn:
    raw = await request.body()
    try:
        document: Any = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise _error(400, "json_syntax", f"the body is not valid JSON: {exc}") from None
    try:
        return HoldIn.model_validate(document)
    except ValidationError as exc:
        first = issues_from_validation(exc)[0]
        raise _error(422, first.code, first.message, first.field) from None


def router(config: HqConfig, owner: DbOwner, metrics: HqMetrics) -> APIRouter:
    """The hold routes, guarded by the lanes' tokens under ``config``'s secret."""
    # The guard authenticates the caller as the {store}/{lane} of the path (401 otherwise).
    routes = APIRouter(tags=["lanes"], dependencies=[Depends(lane_guard(config.lane_auth_secret()))])
    hold_seconds = config.lanes.hold_seconds
    swept = time.monotonic()

    async def sweep() -> None:
        nonlocal swept
        if time.monotonic() - swept < SWEEP_SECONDS:
            return
        swept = time.monotonic()
        expired = await owner.call(lambda db: holds.expire_holds(db, dt.datetime.now(dt.UTC)))
        if expired:
            metrics.holds.labels("expired").inc(expired)
            log.info("%d holds expired unused", expired)

    @routes.post("/v1/sync/{store}/{lane}/holds", status_code=201)
    async def take(store: LaneStore, lane: LaneName, request: Request) -> JSONResponse:
        """Hold points, rebate money and single-use coupons for one sale: 201, or 409 with the reason."""
        caller = LaneId(store, lane)
        body = await _body(request)
        wanted = holds.HoldRequest(
            hold_id=body.hold_id,
            store=caller.store,
            lane=caller.lane,
            sale_id=body.sale_id,
            member_id=body.member_id,
            points=body.points,
            rebate_fen=body.rebate,
            coupons=tuple(sorted(body.coupons)),
        )
        now = dt.datetime.now(dt.UTC)
        try:
            taken = await owner.call(lambda db: holds.take_hold(db, wanted, hold_seconds=hold_seconds, now=now))
        except holds.HoldRefused as exc:
            metrics.holds.labels(exc.code).inc()
            log.info("%s/%s: hold for sale %s refused: %s", caller.store, caller.lane, body.sale_id, exc.code)
            raise _error(409, exc.code, exc.message, exc.field) from None
        if taken.expired:
            metrics.holds.labels("expired").inc(taken.expired)
        metrics.holds.labels("replayed" if taken.replayed else "held").inc()
        await sweep()
        return JSONResponse(taken.hold.document(), status_code=201)

    @routes.delete("/v1/sync/{store}/{lane}/holds/{hold_id}")
    async def release(store: LaneStore, lane: LaneName, hold_id: HoldId) -> dict[str, Any]:
        """Release a hold whose sale did not happen; a consumed or expired hold is answered as it is."""
        caller = LaneId(store, lane)
        now = dt.datetime.now(dt.UTC)
        found = await owner.call(lambda db: holds.release_hold(db, caller.store, caller.lane, hold_id, now))
        if found is None:
            raise _error(404, "unknown_hold", f"lane {caller.store}/{caller.lane} has no hold {hold_id}", "hold_id")
        hold, released = found
        if released:
            metrics.holds.labels("released").inc()
        return hold.document()

    return routes
