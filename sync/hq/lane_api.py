"""Head office's HTTP routes for lanes' member tables (docs/downlink.md): hello, deltas, snapshots.

Every route is under ``/v1/sync/{store}/{lane}/`` and guarded by
``sync.hq.lane_guard``: a lane's bearer token opens its own paths only;
without a configured secret they answer 503.

- ``GET …/hello``: versions and head office's clock, for polling and doctor.
- ``GET …/members/changes?after=V&limit=N``: one page of member changes
  (ndjson, header / member lines / trailer with count and SHA-256).
- ``GET …/members/snapshot``: the newest snapshot file, written first (in a
  worker thread, one at a time) when there is none or it is
  ``members.snapshot_every_changes`` versions old; ``ETag: "members-{version}"``
  and byte ranges with ``If-Range`` (Starlette's ``FileResponse``: a stale
  validator gets the whole new file).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query
from fastapi.responses import FileResponse, Response
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from agent.errors import Issue
from sync.hq.config import HqConfig
from sync.hq.lane_guard import lane_guard
from sync.hq.members import AheadOfHeadError, encode_delta, newest_snapshot, snapshot_version
from sync.hq.owner import DbOwner

log = logging.getLogger(__name__)

NDJSON = "application/x-ndjson"
_MAX_VERSION = 2**62


def snapshot_directory(config: HqConfig) -> Path | None:
    """Where member snapshots are written: ``members.snapshot_dir``, else beside an SQLite database file.

    None for PostgreSQL without ``snapshot_dir`` (``check_snapshot_directory``
    makes that a configuration error when head office has a card key, i.e.
    serves member tables).
    """
    if config.members.snapshot_dir is not None:
        return config.members.snapshot_dir
    url = make_url(config.database.url)
    if url.get_backend_name() == "sqlite" and url.database:
        database = Path(url.database).absolute()
        return database.parent / f"{database.stem}-snapshots"
    return None


def check_snapshot_directory(config: HqConfig, source: str) -> list[Issue]:
    """Configuration problems with the snapshot directory; creates it when missing.

    Only when head office has a card key: without one it serves no member
    tables and writes no snapshots.
    """
    if config.card_key() is None:
        return []
    directory = snapshot_directory(config)
    if directory is None:
        message = "head office on PostgreSQL needs a directory for lanes' member snapshots"
        return [Issue("members.snapshot_dir", "missing", message, source)]
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return [Issue("members.snapshot_dir", "unwritable", f"{directory}: {exc.strerror or exc}", source)]
    return []


def _error(status: int, code: str, message: str) -> HTTPException:
    return HTTPException(status, detail={"code": code, "message": message})


def _version_param(name: str, value: str | None, *, default: int | None = None, low: int = 0) -> int:
    """A query parameter that must be an integer from ``low``: 422 with a clear message otherwise."""
    if value is None:
        if default is None:
            raise _error(422, f"missing_{name}", f"give ?{name}=N (an integer from {low})")
        return default
    text = value.strip()
    if not text.isdigit() or not low <= int(text) <= _MAX_VERSION:
        raise _error(422, f"bad_{name}", f"{name}={value[:40]!r}: an integer from {low}")
    return int(text)


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class _MemberRoutes:
    """The handlers, with what they share: the card key, the snapshot directory, one snapshot writer at a time."""

    def __init__(
        self,
        config: HqConfig,
        owner: DbOwner,
        directory: Path | None,
        rules_version: Callable[[], str | None],
        now: Callable[[], dt.datetime],
    ) -> None:
        self.owner = owner
        self.card_key = config.card_key()
        self.directory = directory
        self.members = config.members
        self.rules_version = rules_version
        self.now = now
        self.building = asyncio.Lock()  # one snapshot written at a time; the others wait for it and share it

    def _key(self) -> bytes:
        if self.card_key is None:
            raise _error(503, "members_unconfigured", "head office has no members.card_hash_key: no member tables")
        return self.card_key

    async def _head(self) -> int:
        try:
            return await self.owner.call(lambda db: db.members.head_version())
        except SQLAlchemyError as exc:
            log.warning("member version: %s", exc)
            raise _error(503, "database_unavailable", "head office's database is not answering; retry") from exc

    async def hello(self) -> dict[str, Any]:
        """Head office's versions and clock (a lane polls this when it hears no notices)."""
        return {
            "v": 1,
            "now": self.now().isoformat(),
            "member_version": await self._head(),
            "snapshot_version": snapshot_version(self.directory),
            "rules_version": self.rules_version(),
        }

    async def changes(
        self,
        after: Annotated[str | None, Query(description="the lane's member version")] = None,
        limit: Annotated[str | None, Query(description="most members (capped by members.delta_page_members)")] = None,
    ) -> Response:
        """Every member whose last change is after ``after``, oldest change first, up to ``limit`` of them."""
        card = self._key()
        cap = self.members.delta_page_members
        since = _version_param("after", after)
        most = min(_version_param("limit", limit, default=cap, low=1), cap)
        try:
            page = await self.owner.call(lambda db: db.members.delta_page(since, most))
        except AheadOfHeadError as exc:
            raise _error(409, "ahead_of_head", str(exc)) from exc
        except SQLAlchemyError as exc:
            log.warning("member delta after %d: %s", since, exc)
            raise _error(503, "database_unavailable", "head office's database is not answering; retry") from exc
        body = encode_delta(page, card, self.now())
        return Response(body, media_type=NDJSON, headers={"Cache-Control": "no-store"})

    async def snapshot(self) -> FileResponse:
        """The whole member table at one version; resumable (``Range`` with ``If-Range``)."""
        card = self._key()
        directory = self.directory
        if directory is None:  # refused at start-up; a router built by hand may still lack it
            raise _error(503, "members_unconfigured", "head office has no members.snapshot_dir")
        version = await self._head()
        if version == 0:
            raise _error(404, "no_members", "head office's member table is empty: there is no snapshot to take")
        every = self.members.snapshot_every_changes
        newest = newest_snapshot(directory)
        if newest is None or version - newest[0] >= every:
            async with self.building:
                newest = newest_snapshot(directory)  # written by the request this one waited for?
                if newest is None or version - newest[0] >= every:
                    newest = await self._write(directory, card)
        number, path = newest
        try:
            stat = path.stat()
        except FileNotFoundError as exc:  # pruned between the listing and here: the lane retries
            raise _error(503, "snapshot_replaced", "a newer snapshot replaced this one; retry") from exc
        return FileResponse(
            path,
            media_type=NDJSON,
            stat_result=stat,
            headers={"ETag": f'"members-{number}"', "Cache-Control": "no-cache"},
        )

    async def _write(self, directory: Path, card: bytes) -> tuple[int, Path]:
        try:
            # Only reads, on its own connection: it may run beside the owner thread (tens of seconds a million).
            written = await asyncio.to_thread(self.owner.db.members.write_snapshot, directory, card)
        except (SQLAlchemyError, OSError) as exc:
            log.warning("member snapshot into %s failed: %s", directory, exc)
            raise _error(503, "snapshot_failed", "head office could not write a member snapshot; retry") from exc
        if written is None:
            raise _error(404, "no_members", "head office's member table is empty: there is no snapshot to take")
        return written.version, written.path


def router(
    config: HqConfig,
    owner: DbOwner,
    *,
    snapshot_dir: Path | None = None,
    rules_version: Callable[[], str | None] = lambda: None,
    now: Callable[[], dt.datetime] = _utcnow,
) -> APIRouter:
    """The lanes' member-table routes; ``snapshot_dir`` defaults to ``snapshot_directory(config)``."""
    directory = snapshot_dir if snapshot_dir is not None else snapshot_directory(config)
    routes = _MemberRoutes(config, owner, directory, rules_version, now)
    api = APIRouter(
        prefix="/v1/sync/{store}/{lane}",
        tags=["lanes"],
        dependencies=[Depends(lane_guard(config.lane_auth_secret()))],
    )
    ndjson: dict[int | str, dict[str, Any]] = {200: {"content": {NDJSON: {}}}}
    api.add_api_route("/hello", routes.hello, methods=["GET"])
    api.add_api_route("/members/changes", routes.changes, methods=["GET"], response_class=Response, responses=ndjson)
    api.add_api_route(
        "/members/snapshot", routes.snapshot, methods=["GET"], response_class=FileResponse, responses=ndjson
    )
    return api
