"""Who is calling: the lane a request to ``/v1/sync/{store}/{lane}/...`` comes from (docs/downlink.md).

A FastAPI dependency for head office's lane routes (member deltas and
snapshots, holds).  The bearer token must be that lane's
(``sync.lane_auth.lane_token``); a token opens its own lane's paths only, so a
lane cannot fetch or hold as another.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, NamedTuple

from fastapi import Header, HTTPException, Path

from sync.lane_auth import check_token

_ID = r"^[A-Za-z0-9_-]{1,32}$"


class LaneId(NamedTuple):
    """The authenticated caller."""

    store: str
    lane: str


def lane_guard(secret: bytes | None) -> Callable[..., LaneId]:
    """The dependency checking a lane's token against ``secret`` (None: lanes' routes are closed)."""

    def authorized_lane(
        store: Annotated[str, Path(pattern=_ID)],
        lane: Annotated[str, Path(pattern=_ID)],
        authorization: Annotated[str | None, Header()] = None,
    ) -> LaneId:
        if secret is None:
            raise HTTPException(
                503,
                detail={
                    "code": "lane_auth_unconfigured",
                    "message": "head office has no lanes.auth_secret_env / auth_secret_file: lanes cannot be served",
                },
            )
        if not check_token(secret, store, lane, authorization):
            raise HTTPException(
                401,
                detail={"code": "unauthorized", "message": f"no valid token for lane {store}/{lane}"},
                headers={"WWW-Authenticate": "Bearer"},
            )
        return LaneId(store, lane)

    return authorized_lane
