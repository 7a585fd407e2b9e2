"""The lane's side of signed rulesets from head office (docs/downlink.md, "Rulesets").

``RulesKeeper`` owns which ruleset the lane prices with:

- ``load(file_ruleset)`` at start-up, before the service exists: re-verifies
  the envelopes kept in ``rules/`` beside the store database with the
  configured keys and picks the one in force (the newest serial whose
  ``effective_from`` has passed), unless ``rules.path`` was modified after
  that ruleset took effect here; the log says which was chosen and why.
- ``on_message(payload)``, the uplink's handler of ``{root}/hq/rules``:
  verifies (``sync.signing``), compiles, keeps the envelope on disk (atomic
  write and fsync) as ``current.json`` (effective now) or ``pending.json``;
  a refusal is counted, logged on one line and shown in the status.
- ``run()``, the daemon's ``rules`` task: switches to the pending ruleset at
  its ``effective_from``.  It sleeps until then but never longer than
  ``RECHECK_SECONDS``, so a wall clock set forward (or back) is noticed.

Only ``on_switch`` touches the service: it gets each new ruleset whole.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.config import LaneConfig
from agent.metrics import Metrics
from agent.ruleset import Ruleset
from sync.signing import (
    MAX_ENVELOPE_BYTES,
    Envelope,
    EnvelopeError,
    check_serial,
    check_signature,
    compile_envelope,
    decode_envelope,
    public_keys,
)

log = logging.getLogger(__name__)

RECHECK_SECONDS = 60.0  # the longest the switch task sleeps without looking at the wall clock again
CURRENT, PREVIOUS, PENDING = "current.json", "previous.json", "pending.json"

Source = Literal["file", "head_office"]


@dataclass(frozen=True, slots=True)
class Held:
    """A ruleset the lane has, and where it came from (an envelope, or the ``rules.path`` file)."""

    ruleset: Ruleset
    source: Source
    envelope: Envelope | None = None
    raw: bytes = b""  # the envelope as received, kept byte for byte

    @property
    def serial(self) -> int | None:
        return None if self.envelope is None else self.envelope.serial

    def summary(self) -> dict[str, Any]:
        """What ``GET /v1/status`` shows of it."""
        env = self.envelope
        return {
            "id": self.ruleset.id,
            "version": self.ruleset.version,
            "digest": self.ruleset.digest,
            "source": self.source,
            "serial": None if env is None else env.serial,
            "effective_from": None if env is None else env.effective_from_text,
        }


def _verified(envelope: Envelope, raw: bytes) -> Held:
    ruleset = compile_envelope(envelope, source=f"head office ruleset serial {envelope.serial}")
    return Held(ruleset, "head_office", envelope, raw)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    """Write, fsync, rename over, fsync the directory: the file is the old one or the new one, whole."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(path)
    _fsync_dir(path.parent)


def _unlink(path: Path) -> None:
    if path.exists():
        path.unlink()
        _fsync_dir(path.parent)


class RulesKeeper:
    """The ruleset in force, the previous one and a pending one; head office's envelopes verified and kept."""

    def __init__(
        self,
        config: LaneConfig,
        metrics: Metrics,
        state_dir: Path,
        on_switch: Callable[[Ruleset], None],
        *,
        clock: Callable[[], dt.datetime] | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.state_dir = state_dir
        self._on_switch = on_switch
        self._clock = clock or (lambda: dt.datetime.now(dt.UTC))
        self._keys: dict[str, Ed25519PublicKey] = public_keys(config.sync.rules_keys)
        self._current: Held | None = None
        self._previous: Held | None = None
        self._pending: Held | None = None
        # The newest envelope taken (in force, pending, or in force but displaced by a newer rules.path):
        # a retained message identical to it is a re-delivery, anything not above its serial a replay.
        self._newest: Envelope | None = None
        self._last_rejected: dict[str, str] | None = None
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()

    # --- what the lane has ----------------------------------------------------------------

    @property
    def ruleset(self) -> Ruleset:
        """The ruleset in force."""
        assert self._current is not None, "load() first"
        return self._current.ruleset

    @property
    def previous(self) -> Held | None:
        """The ruleset in force before this one (for returns and audits of older sales), if known."""
        return self._previous

    @property
    def pending(self) -> Held | None:
        return self._pending

    def status(self) -> dict[str, Any]:
        """The ``rules`` object of ``GET /v1/status``."""
        assert self._current is not None, "load() first"
        return {
            **self._current.summary(),
            "previous": None if self._previous is None else self._previous.summary(),
            "pending": None if self._pending is None else self._pending.summary(),
            "last_rejected": None if self._last_rejected is None else dict(self._last_rejected),
        }

    # --- start-up -------------------------------------------------------------------------------

    def load(self, file_ruleset: Ruleset) -> Ruleset:
        """Choose the ruleset in force at start-up from ``rules.path`` and the envelopes kept; returns it."""
        self.state_dir.mkdir(mode=0o750, parents=True, exist_ok=True)
        file_held = Held(file_ruleset, "file")
        current, previous, pending = (self._read_kept(name) for name in (CURRENT, PREVIOUS, PENDING))
        now = self._clock()
        if pending is not None and current is not None and (pending.serial or 0) <= (current.serial or 0):
            _unlink(self.state_dir / PENDING)  # already switched to (a stop between two writes)
            pending = None
        since = None
        if pending is not None and pending.envelope is not None and pending.envelope.effective_from <= now:
            log.info("rules: pending serial %s took effect while the lane was stopped", pending.serial)
            self._persist_switch(pending, current)
            previous, current, pending = current, pending, None
            since = current.envelope.effective_from.timestamp() if current.envelope is not None else None
        self._pending = pending
        self._newest = max(
            (h.envelope for h in (current, pending, previous) if h is not None and h.envelope is not None),
            key=lambda env: env.serial,
            default=None,
        )
        if current is None:
            self._current, self._previous = file_held, None
            log.info(
                "rules: %s %s from rules.path %s (no ruleset from head office kept)",
                file_ruleset.id,
                file_ruleset.version,
                self.config.rules.path,
            )
        else:
            self._choose(file_held, current, previous, since)
        if pending is not None:
            self._log_pending(pending)
        self._update_gauge()
        return self.ruleset

    def _choose(self, file_held: Held, current: Held, previous: Held | None, since: float | None) -> None:
        """Head office's ruleset in force, or ``rules.path`` if it was modified after that one took effect here.

        ``since``: when it took effect; None: when current.json was written, or its effective_from if later.
        """
        assert current.envelope is not None
        path = self.config.rules.path
        if since is None:
            since = max(current.envelope.effective_from.timestamp(), self._mtime(self.state_dir / CURRENT))
        modified = self._mtime(path)
        file_rs, hq_rs = file_held.ruleset, current.ruleset
        if modified > since and file_rs.digest != hq_rs.digest:
            self._current, self._previous = file_held, current
            log.info(
                "rules: %s %s from rules.path %s: the file was modified (%s) after head office's %s %s "
                "(serial %d) took effect here (%s)",
                file_rs.id,
                file_rs.version,
                path,
                _stamp(modified),
                hq_rs.id,
                hq_rs.version,
                current.envelope.serial,
                _stamp(since),
            )
            return
        self._current, self._previous = current, previous or file_held
        log.info(
            "rules: head office's %s %s (serial %d, effective %s, key %s) kept in %s; it took effect here "
            "(%s) after rules.path %s (%s %s) was last modified (%s)",
            hq_rs.id,
            hq_rs.version,
            current.envelope.serial,
            current.envelope.effective_from_text,
            current.envelope.key_id,
            self.state_dir,
            _stamp(since),
            path,
            file_rs.id,
            file_rs.version,
            _stamp(modified),
        )

    @staticmethod
    def _mtime(path: Path) -> float:
        try:
            return path.stat().st_mtime
        except OSError:
            return 0.0

    def _read_kept(self, name: str) -> Held | None:
        """A kept envelope, verified again with today's keys (a key withdrawn since withdraws its rulesets)."""
        path = self.state_dir / name
        try:
            with path.open("rb") as handle:
                raw = handle.read(MAX_ENVELOPE_BYTES + 1)
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("rules: cannot read %s: %s; ignored", path, exc)
            return None
        try:
            envelope = decode_envelope(raw)
            check_signature(envelope, self._keys)
            return _verified(envelope, raw)
        except EnvelopeError as exc:
            self._refuse(exc, f"{path} (kept)")
            return None

    # --- messages from head office ------------------------------------------------------------

    async def on_message(self, payload: bytes) -> None:
        """A message on ``{root}/hq/rules``: verify, compile, keep, and switch now or schedule the switch."""
        async with self._lock:
            try:
                envelope = decode_envelope(payload)
                check_signature(envelope, self._keys)
            except EnvelopeError as exc:
                self._refuse(exc)
                return
            if self._newest is not None and envelope.same_as(self._newest):
                # The retained message again, delivered at every (re)connection: nothing to do or write.
                log.debug("rules: serial %d re-delivered; already taken", envelope.serial)
                return
            try:
                check_serial(envelope, None if self._newest is None else self._newest.serial)
                held = await asyncio.to_thread(_verified, envelope, payload)
            except EnvelopeError as exc:
                self._refuse(exc)
                return
            self._newest = envelope
            if envelope.effective_from <= self._clock():
                await self._switch(held)
                return
            superseded = self._pending
            try:
                await asyncio.to_thread(_write_atomic, self.state_dir / PENDING, payload)
            except OSError as exc:
                log.warning("rules: cannot keep %s: %s (held in memory only)", self.state_dir / PENDING, exc)
            self._pending = held
            if superseded is not None:
                log.info("rules: pending serial %s replaced by serial %d", superseded.serial, envelope.serial)
            self._log_pending(held)
            self._wake.set()

    def _refuse(self, exc: EnvelopeError, what: str = "head office ruleset") -> None:
        self.metrics.rules_rejected.labels(exc.code).inc()
        at = dt.datetime.now(self.config.lane.zone).isoformat(timespec="seconds")
        self._last_rejected = {"code": exc.code, "message": exc.message, "at": at}
        log.warning("rules: %s refused [%s]: %s", what, exc.code, exc.message)

    def _log_pending(self, held: Held) -> None:
        assert held.envelope is not None
        log.info(
            "rules: %s %s (serial %d) pending, in force from %s",
            held.ruleset.id,
            held.ruleset.version,
            held.envelope.serial,
            held.envelope.effective_from_text,
        )

    # --- switching -----------------------------------------------------------------------------

    def _persist_switch(self, new: Held, current: Held | None) -> None:
        """previous.json ← the head-office ruleset in force (none: the file was), current.json ← ``new``."""
        directory = self.state_dir
        try:
            if current is not None and current.source == "head_office":
                _write_atomic(directory / PREVIOUS, current.raw)
            else:
                _unlink(directory / PREVIOUS)
            _write_atomic(directory / CURRENT, new.raw)
            _unlink(directory / PENDING)  # promoted, or superseded by ``new``
        except OSError as exc:
            log.warning("rules: cannot keep serial %s in %s: %s (in force in memory only)", new.serial, directory, exc)

    async def _switch(self, new: Held) -> None:
        await asyncio.to_thread(self._persist_switch, new, self._current)
        old = self._current
        self._previous, self._current, self._pending = old, new, None
        self._on_switch(new.ruleset)
        self._update_gauge()
        assert new.envelope is not None
        log.info(
            "rules: now pricing with %s %s (serial %d, effective %s); previous %s",
            new.ruleset.id,
            new.ruleset.version,
            new.envelope.serial,
            new.envelope.effective_from_text,
            "none" if old is None else f"{old.ruleset.id} {old.ruleset.version} ({old.source})",
        )

    def _update_gauge(self) -> None:
        serial = None if self._current is None else self._current.serial
        self.metrics.rules_serial.set(serial or 0)

    async def run(self) -> None:
        """Switch to the pending ruleset at its ``effective_from``; until cancelled."""
        while True:
            self._wake.clear()  # before looking: a message taken after this sets it again
            pending = self._pending
            timeout = RECHECK_SECONDS
            if pending is not None and pending.envelope is not None:
                left = (pending.envelope.effective_from - self._clock()).total_seconds()
                if left <= 0:
                    async with self._lock:
                        if self._pending is pending:
                            await self._switch(pending)
                    continue
                timeout = min(timeout, left)
            try:
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
            except TimeoutError:
                pass


def _stamp(timestamp: float) -> str:
    if timestamp <= 0:
        return "never"
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).isoformat(timespec="seconds")


__all__ = ["RECHECK_SECONDS", "Held", "RulesKeeper"]
