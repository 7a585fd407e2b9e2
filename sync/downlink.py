"""The member table and the hot list from head office, lane side (docs/downlink.md).

``MemberSync`` keeps the lane's member cache at head office's version:

- ``on_members(payload)`` and ``on_hotlist(payload)`` are the uplink's
  handlers of ``{root}/hq/members`` and ``{root}/hq/hotlist`` (retained, so
  every (re)connection delivers the latest first).  A members notice only
  says which version head office is at; the hot list carries the lost,
  replaced and cancelled cards themselves, kept in the store at once, so an
  online lane refuses such a card within a second or two.  A malformed notice
  is counted (``lane_member_notices_rejected_total{topic,code}``) and
  logged, never raised.
- ``run()``, the daemon's ``member-sync`` task: fetches over HTTP when a
  notice says head office is ahead, and asks ``GET …/hello`` every
  ``sync.member_poll_seconds`` in case a notice was missed.  Deltas page by
  page (each one transaction in the store) until the cache is at head
  office's version; a whole snapshot when the cache is empty, when it is
  ``sync.snapshot_after_changes`` or more behind, or when head office says
  the lane is ahead of it.  A snapshot downloads to ``{db}.snapshot.part``
  and resumes a cut download with ``Range`` / ``If-Range``.  Failures back
  off (capped exponential, full jitter, as the uplink's reconnects) and are
  shown in ``GET /v1/status`` (``members.last_error``).
- ``caught_up()``: the version the cache last fully caught up with head
  office at.  The uplink holds back head office's acks that carry a higher
  ``member_version`` (``Uplink._hold_back`` says why) and ``on_caught_up``
  tells it when they may be recorded.

The till never waits for any of it: lookups read whatever the cache holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import logging
import os
import random
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import IO, Annotated, Any, Literal, TypeVar

import httpx
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError, model_validator

from agent.basket import Code
from agent.config import LaneConfig
from agent.errors import InputError, MemberGapError, StaleSnapshotError, StoreError
from agent.metrics import Metrics
from agent.store import HotCard, LaneStore
from sync import wire
from sync.hq_http import make_client

log = logging.getLogger(__name__)

MAX_NOTICE_BYTES = 8 * 1024 * 1024  # the wire's limit (agent/topics.py)
MAX_HOT_CARDS = 100_000
MAX_PAGE_BYTES = 256 * 1024 * 1024  # one delta page; head office's pages are far smaller
WRITE_BYTES = 1024 * 1024  # a snapshot download is written to disk this much at a time, off the event loop
_ERROR_TEXT = 300
UNSERVED = 2**62  # caught_up() when head office serves no member table: acks then wait for nothing
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_UNSATISFIED_RANGE = re.compile(r"bytes \*/(\d+)")
_SNAPSHOT_ETAG = re.compile(r'(?:W/)?"members-(\d+)"')

N = TypeVar("N", bound=BaseModel)
Version = Annotated[int, Field(ge=0, le=2**62)]


# --- what head office sends -------------------------------------------------------------------


class _Notice(BaseModel):
    # strict: "12" is not a version; unknown fields are refused (a v1 notice has exactly these).
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class MembersNotice(_Notice):
    """``{root}/hq/members``: head office's member version, and its newest snapshot's."""

    v: Literal[1]
    kind: Literal["members"]
    version: Version
    at: AwareDatetime
    snapshot_version: Version

    @model_validator(mode="after")
    def _snapshot_not_ahead(self) -> MembersNotice:
        if self.snapshot_version > self.version:
            raise ValueError("snapshot_version is above version")
        return self


class HotlistCard(_Notice):
    """One hot-list card: its keyed hash, member, new state, and the member version of that change."""

    card_hash: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    member_id: Code
    state: Literal["lost", "replaced", "cancelled"]
    version: Annotated[int, Field(ge=1, le=2**62)]


class HotlistNotice(_Notice):
    """``{root}/hq/hotlist``: cards whose state became lost, replaced or cancelled lately, newest first."""

    v: Literal[1]
    kind: Literal["hotlist"]
    version: Version
    at: AwareDatetime
    cards: tuple[HotlistCard, ...] = Field(max_length=MAX_HOT_CARDS)

    @model_validator(mode="after")
    def _consistent(self) -> HotlistNotice:
        seen: set[str] = set()
        for index, card in enumerate(self.cards):
            if card.version > self.version:
                raise ValueError(f"cards[{index}].version {card.version} is above the list's version {self.version}")
            if card.card_hash in seen:
                raise ValueError(f"cards[{index}]: card {card.card_hash[:12]}… is listed twice")
            seen.add(card.card_hash)
        return self


class Hello(BaseModel):
    """``GET …/hello``: head office's versions (other fields, for ``lane-agent doctor``, are not read here)."""

    model_config = ConfigDict(extra="ignore", frozen=True, strict=True)

    v: Literal[1]
    member_version: Version
    snapshot_version: Version


class FetchError(Exception):
    """A member-table fetch failed; ``code`` goes to the status and the metrics, ``remote`` is head office's."""

    def __init__(self, code: str, message: str, remote: str | None = None) -> None:
        self.code = code
        self.message = message
        self.remote = remote
        super().__init__(f"{message} [{code}]")


# --- the member sync -----------------------------------------------------------------------------


class MemberSync:
    """Keep the member cache at head office's version; ``run()`` is the daemon's ``member-sync`` task."""

    def __init__(
        self,
        config: LaneConfig,
        store: LaneStore,
        metrics: Metrics | None = None,
        *,
        on_caught_up: Callable[[int], Awaitable[None]] | None = None,
        client: Callable[[], httpx.AsyncClient] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config.sync
        self.store = store
        self.metrics = metrics or Metrics()
        # Called with the version each time the cache has fully caught up with head office.
        self.on_caught_up = on_caught_up
        self._client = client or (lambda: make_client(config))
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not secrecy
        self.part_path = Path(f"{store.path}.snapshot.part")
        self._etag_path = Path(f"{store.path}.snapshot.part.etag")
        self._delta_path = Path(f"{store.path}.delta.part")
        self._wake = asyncio.Event()
        self._loaded = False
        self._version = 0  # the cache's member-table version
        self._caught_up = 0  # the version at which the cache last fully caught up with head office
        self._head: int | None = None  # head office's version, as last heard
        self._snapshot_version: int | None = None
        self._last_sync_at: str | None = None
        self._last_error: dict[str, Any] | None = None
        self._snapshot_in_progress = False
        self._snapshot_bytes = 0
        self._hotlist_digest: bytes | None = None
        self._hotlist_version: int | None = None
        self._hot_cards = 0

    # --- what the uplink, the status and the metrics see -------------------------------------

    def downlink(self) -> dict[wire.HqLeaf, Callable[[bytes], Awaitable[None]]]:
        """The uplink's handlers for ``{root}/hq/members`` and ``{root}/hq/hotlist``."""
        return {"members": self.on_members, "hotlist": self.on_hotlist}

    def caught_up(self) -> int:
        """The member-table version the cache last fully caught up with head office at (0: not yet)."""
        return self._caught_up

    def status(self) -> dict[str, Any]:
        """The ``members`` object of ``GET /v1/status`` (the service puts the store's own version in)."""
        behind = None if self._head is None else max(self._head - self._version, 0)
        return {
            "version": self._version,
            "head_version": self._head,
            "behind": behind,
            "last_sync_at": self._last_sync_at,
            "last_error": self._last_error,
            "snapshot_in_progress": self._snapshot_in_progress,
            "snapshot_bytes": self._snapshot_bytes if self._snapshot_in_progress else None,
            "hotlist_version": self._hotlist_version,
            "hot_cards": self._hot_cards,
        }

    # --- notices (the uplink's handlers) ---------------------------------------------------------

    async def on_members(self, payload: bytes) -> None:
        """A members notice: head office is at ``version``; fetch when that is above the cache's."""
        notice = self._parse(MembersNotice, payload, "members")
        if notice is None:
            return
        self._snapshot_version = notice.snapshot_version
        self._set_head(notice.version)
        if notice.version > self._version:
            log.debug("members notice: head office at version %d, the cache at %d", notice.version, self._version)
            self._wake.set()

    async def on_hotlist(self, payload: bytes) -> None:
        """The hot list: keep its cards (the store refuses them from the next lookup on)."""
        digest = hashlib.sha256(payload).digest()
        if digest == self._hotlist_digest:
            return  # republished unchanged
        notice = self._parse(HotlistNotice, payload, "hotlist")
        if notice is None:
            return
        cards = [HotCard(bytes.fromhex(c.card_hash), c.member_id, c.state, c.version) for c in notice.cards]
        try:
            result = await self.store.apply_hotlist(notice.version, cards)
        except StoreError as exc:
            # Not remembered as applied: the next republication tries again.
            self.metrics.member_fetch_errors.labels("hotlist_store").inc()
            log.warning("hot list version %d not kept: %s", notice.version, exc)
            return
        self._hotlist_digest = digest
        self._hotlist_version = notice.version
        self._hot_cards = result.active
        self.metrics.member_hot_cards.set(result.active)
        log.info(
            "hot list version %d: %d card(s), %d new or changed, %d kept ahead of the member cache",
            notice.version,
            result.received,
            result.stored,
            result.active,
        )

    def _parse(self, model: type[N], payload: bytes, topic: str) -> N | None:
        if len(payload) > MAX_NOTICE_BYTES:
            self._refuse(topic, "too_large", f"{len(payload)} bytes")
            return None
        try:
            return model.model_validate_json(payload)
        except ValidationError as exc:
            errors = exc.errors(include_url=False)
            code = "bad_json" if errors and errors[0]["type"] == "json_invalid" else "bad_envelope"
            first = errors[0] if errors else {"loc": (), "msg": str(exc)}
            where = ".".join(str(part) for part in first["loc"]) or "(top level)"
            self._refuse(topic, code, f"{where}: {first['msg']}")
            return None

    def _refuse(self, topic: str, code: str, detail: str) -> None:
        self.metrics.member_notices_rejected.labels(topic, code).inc()
        log.warning("a %s notice from head office refused (%s): %s", topic, code, detail[:_ERROR_TEXT])

    def _set_head(self, head: int) -> None:
        self._head = head
        self.metrics.member_head_version.set(head)
        self.metrics.member_behind.set(max(head - self._version, 0))

    def _set_version(self, version: int) -> None:
        self._version = version
        self.metrics.member_version.set(version)
        if self._head is not None:
            self.metrics.member_behind.set(max(self._head - version, 0))

    # --- the fetch loop --------------------------------------------------------------------------

    async def run(self) -> None:
        """Fetch when told or polled, back off on failures; until cancelled."""
        await self._load()
        attempt = 0
        poll = True
        log.info("member sync with %s: cache at version %d", self.config.hq_url, self._version)
        async with self._client() as client:
            while True:
                self._wake.clear()  # a notice arriving during the cycle sets it again
                if await self._attempt(client, poll=poll):
                    attempt = 0
                    poll = not await self._wait(self.config.member_poll_seconds)
                    continue
                # A notice does not cut a backoff short: head office's API may be down while its broker is up.
                ceiling = min(self.config.reconnect_max_seconds, self.config.reconnect_min_seconds * 2**attempt)
                attempt = min(attempt + 1, 32)
                await asyncio.sleep(self._rng.uniform(ceiling / 2, ceiling))
                poll = True

    async def _attempt(self, client: httpx.AsyncClient, *, poll: bool) -> bool:
        """One cycle; False (the failure recorded) when it failed."""
        try:
            await self._cycle(client, poll=poll)
        except FetchError as exc:
            await self._failed(exc.code, exc.message)
            if exc.remote == "members_unconfigured":
                await self._unserved()
        except (StoreError, InputError) as exc:
            await self._failed(_store_code(exc), str(exc))
        except httpx.TimeoutException as exc:
            await self._failed("timeout", f"head office did not answer in time: {exc!r}")
        except httpx.RemoteProtocolError as exc:
            await self._failed("interrupted", f"the transfer was cut: {exc}")
        except httpx.HTTPError as exc:
            await self._failed("unreachable", f"head office's API: {exc}")
        except OSError as exc:
            await self._failed("file_error", f"beside the database: {exc}")
        except Exception as exc:  # a bug: logged, and the till sells on (as the uplink's loop does)
            log.exception("member sync failed")
            await self._failed("internal", repr(exc))
        else:
            return True
        return False

    async def _wait(self, seconds: float) -> bool:
        """Until a notice wakes the loop (True) or ``seconds`` pass (False)."""
        try:
            async with asyncio.timeout(seconds):
                await self._wake.wait()
        except TimeoutError:
            return False
        return True

    async def _load(self) -> None:
        if self._loaded:
            return
        state = await self.store.member_sync_state()
        self._set_version(state.version)
        if state.synced_at is not None or state.head_version:
            self._set_head(state.head_version)
        self._last_sync_at = state.synced_at
        self._last_error = state.error
        self._hot_cards = state.hot_cards
        self._hotlist_version = state.hotlist_version or None
        self.metrics.member_hot_cards.set(state.hot_cards)
        self._loaded = True
        # A lane stopped in the middle of a catch-up holds a mixture of two versions: not caught up.
        if state.synced_at is not None and state.version >= state.head_version:
            self._caught_up = state.version
            if self.on_caught_up is not None:
                await self.on_caught_up(state.version)

    async def _cycle(self, client: httpx.AsyncClient, *, poll: bool) -> None:
        if poll or self._head is None:
            await self._hello(client)
        head = self._head
        assert head is not None
        if self._version > head:
            # Head office is behind this cache (its database restored, or this lane's from elsewhere).
            if head == 0:
                raise FetchError("ahead_of_head", f"head office has no member table; this lane's is at {self._version}")
            log.warning("the cache (version %d) is ahead of head office (%d): taking its snapshot", self._version, head)
            await self._snapshot(client, allow_older=True)
        elif head > 0 and (self._version == 0 or head - self._version >= self.config.snapshot_after_changes):
            await self._snapshot(client, allow_older=False)
        if self._version < (self._head or 0):
            await self._deltas(client)
        await self._reached()

    async def _hello(self, client: httpx.AsyncClient) -> None:
        response = await client.get("hello")
        if response.status_code != httpx.codes.OK:
            raise _http_error(response, "hello")
        try:
            hello = Hello.model_validate_json(response.content)
        except ValidationError as exc:
            raise FetchError("bad_hello", f"head office's hello: {exc.errors(include_url=False)[0]['msg']}") from exc
        self._snapshot_version = hello.snapshot_version
        self._set_head(hello.member_version)

    async def _reached(self) -> None:
        """The cache is at head office's version (as last heard): record it, tidy up, release held acks."""
        if self._head is None or self._head != self._version:
            return
        await self.store.note_member_sync(head=self._head)
        self._last_sync_at = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")
        if self._last_error is not None:
            log.info("member table in step with head office again (version %d)", self._version)
        self._last_error = None
        self._caught_up = self._version
        self.metrics.member_behind.set(0)
        for leftover in (self.part_path, self._etag_path, self._delta_path):
            # A snapshot download no longer needed (the cache caught up by deltas meanwhile).
            with contextlib.suppress(FileNotFoundError):
                await asyncio.to_thread(leftover.unlink)
        if self.on_caught_up is not None:
            await self.on_caught_up(self._version)

    async def _unserved(self) -> None:
        """Head office serves no member table (no card key there): no ack can wait for one."""
        if self._caught_up == UNSERVED:
            return
        log.warning("head office serves no member table: its acks are recorded without waiting for one")
        self._caught_up = UNSERVED
        if self.on_caught_up is not None:
            await self.on_caught_up(UNSERVED)

    async def _failed(self, code: str, message: str) -> None:
        self.metrics.member_fetch_errors.labels(code).inc()
        at = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")
        repeated = self._last_error is not None and self._last_error.get("code") == code
        self._last_error = {"code": code, "message": message[:_ERROR_TEXT], "at": at}
        # Once per kind of failure (each one is counted): a head office down for hours is not a log line a minute.
        log.log(
            logging.DEBUG if repeated else logging.WARNING, "member sync failed (%s): %s", code, message[:_ERROR_TEXT]
        )
        try:
            await self.store.note_member_sync(error=self._last_error)
        except StoreError as exc:
            log.warning("could not record the member sync's failure: %s", exc)

    # --- deltas ------------------------------------------------------------------------------------

    async def _deltas(self, client: httpx.AsyncClient) -> None:
        """Pages of changes from the cache's version until the cache is at head office's."""
        snapshot_taken = False
        while self._head is None or self._version < self._head:
            after = self._version
            body = await self._page(client, after)
            if body is None:  # 409 ahead_of_head: this cache is from another head office's history
                if snapshot_taken:
                    raise FetchError("ahead_of_head", "head office still says the cache is ahead after a snapshot")
                await self._snapshot(client, allow_older=True)
                snapshot_taken = True
                continue
            await asyncio.to_thread(self._delta_path.write_bytes, body)
            try:
                result = await self.store.apply_member_delta(self._delta_path)
            except InputError as exc:
                raise FetchError("bad_delta", _first_issue(exc)) from exc
            finally:
                with contextlib.suppress(FileNotFoundError):
                    await asyncio.to_thread(self._delta_path.unlink)
            self.metrics.member_deltas.inc()
            self.metrics.member_delta_members.inc(result.applied)
            self._set_version(result.version)
            self._set_head(result.head)
            self._last_sync_at = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")
            if result.version <= after and result.version < result.head:
                raise FetchError("no_progress", f"a page after version {after} moved the cache to {result.version}")
        log.info("member table at version %d (head office's)", self._version)

    async def _page(self, client: httpx.AsyncClient, after: int) -> bytes | None:
        async with client.stream("GET", "members/changes", params={"after": after}) as response:
            if response.status_code == httpx.codes.CONFLICT:
                await response.aread()
                if _error_code(response) == "ahead_of_head":
                    return None
                raise _http_error(response, "member changes")
            if response.status_code != httpx.codes.OK:
                await response.aread()
                raise _http_error(response, "member changes")
            chunks: list[bytes] = []
            size = 0
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > MAX_PAGE_BYTES:
                    raise FetchError("too_large", f"a member-delta page above {MAX_PAGE_BYTES} bytes")
                chunks.append(chunk)
        return b"".join(chunks)

    # --- snapshots ---------------------------------------------------------------------------------

    async def _snapshot(self, client: httpx.AsyncClient, *, allow_older: bool) -> bool:
        """Download (resuming a cut download) and import head office's snapshot; False when it was not newer."""
        self._snapshot_in_progress = True
        try:
            if not await self._download(client, allow_older=allow_older):
                return False
            try:
                result = await self.store.import_snapshot(self.part_path, allow_older=allow_older)
            except StaleSnapshotError as exc:
                log.info("head office's snapshot is not newer than the cache: %s; taking deltas", exc)
                await self._drop_part()
                return False
            except InputError as exc:
                await self._drop_part()  # damaged: the next attempt downloads it afresh
                raise FetchError("bad_snapshot", _first_issue(exc)) from exc
            await self._drop_part()
            pruned = await self.store.prune_hot_cards()
        finally:
            self._snapshot_in_progress = False
        self.metrics.member_snapshots.inc()
        self._set_version(result.version)
        log.info(
            "member snapshot version %d imported: %d members, %d cards (%d hot-list entries superseded)",
            result.version,
            result.members,
            result.cards,
            pruned,
        )
        return True

    async def _download(self, client: httpx.AsyncClient, *, allow_older: bool) -> bool:
        """The snapshot into ``{db}.snapshot.part``, resumed where a cut download stopped; False: not needed."""
        offset, etag = await asyncio.to_thread(self._partial)
        headers = {"Range": f"bytes={offset}-", "If-Range": etag} if offset and etag else {}
        if not headers:
            offset = 0
        async with client.stream("GET", "members/snapshot", headers=headers) as response:
            status = response.status_code
            if status == httpx.codes.REQUESTED_RANGE_NOT_SATISFIABLE:
                await response.aread()
                complete = _UNSATISFIED_RANGE.fullmatch(response.headers.get("content-range", ""))
                if complete is not None and int(complete.group(1)) == offset:
                    log.info("member snapshot already downloaded in full (%d bytes)", offset)
                    return True
                await self._drop_part()
                raise FetchError("range_not_satisfiable", f"head office cannot resume at byte {offset}")
            if status == httpx.codes.PARTIAL_CONTENT and offset:
                found = _CONTENT_RANGE.fullmatch(response.headers.get("content-range", ""))
                if found is None or int(found.group(1)) != offset:
                    await self._drop_part()
                    raise FetchError(
                        "bad_range", f"asked from byte {offset}, got {response.headers.get('content-range')}"
                    )
                log.info("member snapshot download resumed at byte %d (%s)", offset, etag)
            elif status == httpx.codes.OK:
                offset = 0
                etag = response.headers.get("etag")
                await asyncio.to_thread(self._start_part, etag)
            else:
                await response.aread()
                raise _http_error(response, "member snapshot")
            version = _etag_version(etag)
            if version is not None and not allow_older and version <= self._version:
                log.info("head office's snapshot (version %d) is not newer than the cache; taking deltas", version)
                await self._drop_part()
                return False
            await self._receive(response, offset)
        return True

    async def _receive(self, response: httpx.Response, offset: int) -> None:
        self._snapshot_bytes = offset
        handle = await asyncio.to_thread(self.part_path.open, "ab")
        buffer = bytearray()
        try:
            async for chunk in response.aiter_bytes():
                buffer += chunk
                if len(buffer) >= WRITE_BYTES:
                    await asyncio.to_thread(handle.write, bytes(buffer))
                    self._snapshot_bytes += len(buffer)
                    buffer.clear()
        finally:
            # What arrived before a cut is a valid prefix: kept, so the next attempt resumes after it.
            try:
                await asyncio.to_thread(_append, handle, bytes(buffer))
                self._snapshot_bytes += len(buffer)
            finally:
                await asyncio.to_thread(handle.close)

    def _partial(self) -> tuple[int, str | None]:
        """Bytes already downloaded and the validator they came with (blocking)."""
        try:
            etag = self._etag_path.read_text(encoding="utf-8").strip() or None
            size = self.part_path.stat().st_size
        except FileNotFoundError:
            return 0, None
        return size, etag

    def _start_part(self, etag: str | None) -> None:
        """An empty ``.part`` and its validator, written before the first byte (blocking)."""
        self.part_path.write_bytes(b"")
        if etag is None:
            self._etag_path.unlink(missing_ok=True)  # without a validator a cut download starts again
        else:
            self._etag_path.write_text(etag + "\n", encoding="utf-8")

    async def _drop_part(self) -> None:
        def drop() -> None:
            self.part_path.unlink(missing_ok=True)
            self._etag_path.unlink(missing_ok=True)

        await asyncio.to_thread(drop)


# --- helpers --------------------------------------------------------------------------------------


def _append(handle: IO[bytes], data: bytes) -> None:
    handle.write(data)
    handle.flush()
    os.fsync(handle.fileno())


def _etag_version(etag: str | None) -> int | None:
    found = None if etag is None else _SNAPSHOT_ETAG.fullmatch(etag)
    return None if found is None else int(found.group(1))


def _error_code(response: httpx.Response) -> str | None:
    try:
        doc = response.json()
    except ValueError:
        return None
    error = doc.get("error") if isinstance(doc, dict) else None
    code = error.get("code") if isinstance(error, dict) else None
    return code if isinstance(code, str) else None


def _http_error(response: httpx.Response, what: str) -> FetchError:
    code = _error_code(response)
    detail = f" ({code})" if code else ""
    message = f"{what}: head office answered {response.status_code}{detail}"
    return FetchError(f"http_{response.status_code}", message, code)


def _first_issue(exc: InputError) -> str:
    return f"{exc.first} ({len(exc.issues)} problem(s))"


def _store_code(exc: StoreError | InputError) -> str:
    if isinstance(exc, MemberGapError):
        return exc.code
    return f"store_{exc.code}" if isinstance(exc, StoreError) else exc.code


__all__ = ["FetchError", "Hello", "HotlistNotice", "MemberSync", "MembersNotice"]
