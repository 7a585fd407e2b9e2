"""IC card readers through PC/SC (pcscd), contact or contactless (``type = "ic"``).

    [[devices]]
    name = "ic"
    type = "ic"
    reader = "ACS ACR1252"       # a part of the reader's PC/SC name; empty: every reader
    uid_fallback = true          # cards without the member application: use their UID

Threads.  pyscard's calls block, so one owner thread per driver (named
``ic-<name>``, not a daemon, so the PC/SC context is always released) does
every PC/SC call: it establishes the context, lists the readers, waits in
``SCardGetStatusChange`` (the readers plus ``\\\\?PnP?\\Notification``, so a
reader plugged in or out wakes it; readers are re-listed at every wake-up
as well, because pcsc-lite only signals changes made *during* a wait), and
reads each card inserted.  Events cross to the event loop with
``call_soon_threadsafe`` into an ``asyncio.Queue`` that ``events()`` drains.
The one call made from another thread is ``SCardCancel``, which exists for
that: ``__aexit__`` sets the stop flag and cancels the wait, then joins the
thread.  pyscard's ``CardMonitor`` is not used (its thread is not a daemon
and hangs the process at exit if an observer is left).

Reading a card.  On insertion the ATR comes with the state change; the
driver connects (shared), and ``drivers.apdu.read_card`` does the rest:
SELECT the member application, READ BINARY its file, parse it; or, where
``uid_fallback`` is on and the card has no member application, GET DATA the
UID (the number is then ``"UID"`` + hex, see ``drivers.apdu``).  The result
is one ``CardRead`` or one ``Unreadable`` per insertion; ``CardRemoved``
when the card leaves (also for an unreadable one).

APDU timeout.  ``SCardTransmit`` has no timeout and cannot be interrupted:
``SCardCancel`` only wakes ``SCardGetStatusChange`` (measured: a transmit to
a card that answers after 3 s returns after 3 s, cancel or not), and vpcd
itself waits for ever.  So the timeout is a deadline per APDU kept by the
event loop: the owner thread arms it before each transmit; if the answer is
not back in ``apdu_timeout_s``, the loop reports ``Unreadable(reason=
"timeout")`` at once, and whatever the card answers later is thrown away
(the card is then reset on disconnect).  The cashier is told at the deadline
and the lane keeps selling; the owner thread is blocked only until the card
answers or leaves (a pulled card ends a pending transmit at once), so the
next card is read normally.  An answer that arrives after the deadline but
before the loop's timer fired is judged by the same clock: late is late.
The price of one thread: while a card hangs, this device reports nothing
else (its other readers included), and closing the driver waits for the
command up to ``apdu_timeout_s`` + 1 s, then logs a warning and leaves the
thread, which (not being a daemon) holds the process until the card answers
or leaves.  A card being read when the driver closes is not reported.

Faults.  pcscd not running (``SCARD_E_NO_SERVICE``) or gone mid-run
(``SCARD_F_COMM_ERROR``, ``SCARD_E_SERVICE_STOPPED``, a stale context) is
``DeviceChanged(state="disconnected")``; an unexpected PC/SC error is
``DeviceChanged(state="error")``; either way the context is dropped and
re-established with capped, jittered backoff (``drivers.base.Backoff``),
then ``DeviceChanged(state="connected")``.  A card present when pcscd went
away is reported removed: the driver can no longer vouch for it.  No reader
matching ``reader`` is ``disconnected`` too, until one appears.  pyscard's
errors never leave this module: they become events, or ``PcscError``
(a ``drivers.errors.DriverError``) inside it.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import logging
import re
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, Self

from pydantic import Field, field_validator, model_validator
from smartcard import scard  # type: ignore[import-untyped]  # pyscard ships no type information

from drivers.apdu import DEFAULT_AID, CardOutcome, MemberFile, ReadPlan, UidRead, command_name, read_card
from drivers.base import Backoff, CardRead, CardRemoved, DeviceChanged, DeviceState, DriverEvent, Unreadable
from drivers.config import DeviceConfig
from drivers.errors import DriverError

log = logging.getLogger(__name__)

PNP_NOTIFICATION = "\\\\?PnP?\\Notification"


# --- configuration ------------------------------------------------------------


def _parse_aid(text: str) -> bytes:
    cleaned = re.sub(r"[\s:]", "", text)
    if not re.fullmatch(r"(?:[0-9A-Fa-f]{2})+", cleaned):
        raise ValueError("an AID is hex bytes, e.g. 'F0 4C 41 4E 45 4D 42'")
    aid = bytes.fromhex(cleaned)
    if not 5 <= len(aid) <= 16:
        raise ValueError(f"an AID is 5-16 bytes, this one is {len(aid)}")
    return aid


class ICConfig(DeviceConfig):
    """An IC card reader through pcscd (``type = "ic"``)."""

    type: Literal["ic"] = "ic"
    reader: str = Field(
        default="", max_length=200, description="which PC/SC readers: a part of their name (empty: every reader)"
    )
    reader_regex: bool = Field(default=False, description="treat `reader` as a regular expression (searched)")
    aid: str = Field(
        default=DEFAULT_AID.hex(" ").upper(),
        description="the member application's AID, 5-16 hex bytes (the default is proprietary: F0 + 'LANEMB')",
    )
    read_offset: int = Field(default=0, ge=0, le=0x7FFF, description="where the member data starts in its file")
    read_length: int | None = Field(
        default=None,
        ge=1,
        le=0x8000,
        description="bytes to read; unset: as many as the member template says, up to max_file_bytes",
    )
    max_file_bytes: int = Field(default=1024, ge=2, le=0x8000, description="never read more of the file than this")
    read_chunk: int = Field(default=128, ge=1, le=256, description="bytes asked for by each READ BINARY (its Le)")
    uid_fallback: bool = Field(
        default=False, description="a card without the member application is read by its contactless UID"
    )
    apdu_timeout_s: float = Field(
        default=2.0, gt=0.0, le=60.0, description="a card that takes longer to answer one command is unreadable"
    )
    poll_s: float = Field(
        default=1.0, ge=0.05, le=60.0, description="longest wait for a reader event before re-listing the readers"
    )
    retry_initial_s: float = Field(default=0.5, ge=0.01, le=60.0, description="first wait before reconnecting")
    retry_max_s: float = Field(default=30.0, ge=0.05, le=600.0, description="longest wait between reconnect attempts")

    @field_validator("aid")
    @classmethod
    def _valid_aid(cls, text: str) -> str:
        return _parse_aid(text).hex(" ").upper()

    @model_validator(mode="after")
    def _consistent(self) -> ICConfig:
        if self.reader_regex:
            try:
                re.compile(self.reader)
            except re.error as exc:
                raise ValueError(f"reader is not a regular expression: {exc}") from exc
        extent = self.read_length if self.read_length is not None else self.max_file_bytes
        if self.read_offset + extent > 0x8000:
            raise ValueError("read_offset + read_length (or max_file_bytes) must stay within 32768")
        if self.retry_initial_s > self.retry_max_s:
            raise ValueError("retry_initial_s must not exceed retry_max_s")
        return self

    def read_plan(self) -> ReadPlan:
        """What ``drivers.apdu.read_card`` reads off each card."""
        return ReadPlan(
            aid=_parse_aid(self.aid),
            offset=self.read_offset,
            length=self.read_length,
            max_length=self.max_file_bytes,
            chunk=self.read_chunk,
            uid_fallback=self.uid_fallback,
        )

    def matches(self, reader: str) -> bool:
        """Whether this device watches the PC/SC reader so named."""
        if self.reader_regex:
            return re.search(self.reader, reader) is not None
        return self.reader in reader


# --- PC/SC, typed -------------------------------------------------------------

_OK = int(scard.SCARD_S_SUCCESS)
_E_TIMEOUT = int(scard.SCARD_E_TIMEOUT)
_E_CANCELLED = int(scard.SCARD_E_CANCELLED)
_E_NO_READERS = int(scard.SCARD_E_NO_READERS_AVAILABLE)
_E_UNKNOWN_READER = int(scard.SCARD_E_UNKNOWN_READER)
_STATE_CHANGED = int(scard.SCARD_STATE_CHANGED)
_STATE_PRESENT = int(scard.SCARD_STATE_PRESENT)
_STATE_MUTE = int(scard.SCARD_STATE_MUTE)
_STATE_GONE = int(scard.SCARD_STATE_UNKNOWN | scard.SCARD_STATE_IGNORE | scard.SCARD_STATE_UNAVAILABLE)
_LEAVE_CARD = int(scard.SCARD_LEAVE_CARD)
_RESET_CARD = int(scard.SCARD_RESET_CARD)


def _result_names() -> dict[int, str]:
    names: dict[int, str] = {}
    for name, value in sorted(vars(scard).items()):
        if name.startswith(("SCARD_S_", "SCARD_E_", "SCARD_F_", "SCARD_W_")) and isinstance(value, int):
            names.setdefault(value & 0xFFFFFFFF, name)
    return names


_CODE_NAMES = _result_names()

# pcscd is not there, or this context outlived the pcscd it was made with.  A pcscd that is
# shutting down answers a context it is dropping with SCARD_W_SECURITY_VIOLATION (seen here).
_SERVICE_GONE = frozenset(
    int(getattr(scard, name))
    for name in (
        "SCARD_E_NO_SERVICE",
        "SCARD_E_SERVICE_STOPPED",
        "SCARD_F_COMM_ERROR",
        "SCARD_E_INVALID_HANDLE",
        "SCARD_W_SECURITY_VIOLATION",
    )
)
# What a failed connect or transmit says about the card, as Unreadable reasons.
_CARD_REASONS = {
    "SCARD_W_REMOVED_CARD": "removed",
    "SCARD_E_NO_SMARTCARD": "removed",
    "SCARD_W_RESET_CARD": "card_reset",
    "SCARD_W_UNRESPONSIVE_CARD": "unresponsive",
    "SCARD_W_UNPOWERED_CARD": "unresponsive",
    "SCARD_E_SHARING_VIOLATION": "reader_busy",
    "SCARD_E_PROTO_MISMATCH": "unsupported_card",
    "SCARD_W_UNSUPPORTED_CARD": "unsupported_card",
    "SCARD_E_READER_UNAVAILABLE": "reader_gone",
    "SCARD_E_UNKNOWN_READER": "reader_gone",
}


def code_name(hresult: int) -> str:
    """The SCARD_* name of a PC/SC result code."""
    return _CODE_NAMES.get(hresult & 0xFFFFFFFF, f"0x{hresult & 0xFFFFFFFF:08X}")


class PcscError(DriverError):
    """A PC/SC call failed; ``code`` is the SCARD_* name, ``hresult`` the number."""

    def __init__(self, device: str, call: str, hresult: int, message: str = "") -> None:
        text = message or _error_message(hresult)
        super().__init__(device, code_name(hresult), f"{call}: {text} ({code_name(hresult)})")
        self.call = call
        self.hresult = hresult

    @property
    def service_gone(self) -> bool:
        """pcscd is unreachable (not running, stopped, or restarted under this context)."""
        return self.hresult in _SERVICE_GONE


def _error_message(hresult: int) -> str:
    try:
        return str(scard.SCardGetErrorMessage(hresult)).strip()
    except (scard.error, SystemError):
        return "unknown error"


@dataclass(frozen=True, slots=True)
class _ReaderState:
    name: str
    event_state: int
    atr: bytes


class _Pcsc:
    """pyscard's low-level calls with types, and with every failure as ``PcscError``."""

    def __init__(self, device: str) -> None:
        self._device = device
        self._lock = threading.Lock()  # guards _context between the owner and SCardCancel
        self._context: int | None = None

    def _call(self, call: str, fn: Callable[..., Any], *args: object) -> Any:
        try:
            return fn(*args)
        except (scard.error, SystemError) as exc:  # pyscard's own failures (SystemError on a bad handle)
            raise PcscError(self._device, call, int(scard.SCARD_F_UNKNOWN_ERROR), f"pyscard: {exc}") from exc

    def _check(self, call: str, hresult: int) -> None:
        if hresult != _OK:
            raise PcscError(self._device, call, hresult)

    def establish(self) -> None:
        hresult, context = self._call("SCardEstablishContext", scard.SCardEstablishContext, scard.SCARD_SCOPE_USER)
        self._check("SCardEstablishContext", int(hresult))
        with self._lock:
            self._context = int(context)

    def release(self) -> None:
        with self._lock:
            context, self._context = self._context, None
        if context is not None:
            try:
                self._call("SCardReleaseContext", scard.SCardReleaseContext, context)
            except PcscError as exc:  # pcscd is gone already: nothing left to release
                log.debug("%s: releasing the PC/SC context: %s", self._device, exc)

    def cancel(self) -> None:
        """Wake a blocked ``get_status_change`` (the one call made from another thread)."""
        with self._lock:  # held across the call: the owner must not release the context under it
            context = self._context
            if context is not None:
                try:
                    self._call("SCardCancel", scard.SCardCancel, context)
                except PcscError as exc:
                    log.debug("%s: %s", self._device, exc)

    @property
    def context(self) -> int:
        if self._context is None:
            raise RuntimeError("no PC/SC context")
        return self._context

    def list_readers(self) -> list[str]:
        hresult, readers = self._call("SCardListReaders", scard.SCardListReaders, self.context, [])
        if int(hresult) == _E_NO_READERS:
            return []
        self._check("SCardListReaders", int(hresult))
        return [str(reader) for reader in readers]

    def get_status_change(self, timeout_ms: int, states: list[tuple[str, int]]) -> tuple[int, list[_ReaderState]]:
        """(result code, new states); TIMEOUT, CANCELLED and UNKNOWN_READER are returned, not raised."""
        hresult, new = self._call("SCardGetStatusChange", scard.SCardGetStatusChange, self.context, timeout_ms, states)
        hresult = int(hresult)
        if hresult not in {_OK, _E_TIMEOUT, _E_CANCELLED, _E_UNKNOWN_READER}:
            raise PcscError(self._device, "SCardGetStatusChange", hresult)
        return hresult, [_ReaderState(str(name), int(state), bytes(atr)) for name, state, atr in new or []]

    def connect(self, reader: str) -> tuple[int, int]:
        hresult, handle, protocol = self._call(
            "SCardConnect",
            scard.SCardConnect,
            self.context,
            reader,
            scard.SCARD_SHARE_SHARED,
            scard.SCARD_PROTOCOL_T0 | scard.SCARD_PROTOCOL_T1,
        )
        self._check("SCardConnect", int(hresult))
        return int(handle), int(protocol)

    def transmit(self, handle: int, protocol: int, command: bytes) -> bytes:
        hresult, response = self._call("SCardTransmit", scard.SCardTransmit, handle, protocol, list(command))
        self._check("SCardTransmit", int(hresult))
        return bytes(response)

    def disconnect(self, handle: int, disposition: int) -> None:
        try:
            self._check(
                "SCardDisconnect", int(self._call("SCardDisconnect", scard.SCardDisconnect, handle, disposition))
            )
        except PcscError as exc:  # the card or pcscd left first: the handle is dead either way
            log.debug("%s: %s", self._device, exc)


# --- the APDU deadline --------------------------------------------------------


class _Verdict(enum.Enum):
    IN_TIME = "in_time"
    LATE = "late"  # over the deadline, not yet reported: the owner thread reports it
    REPORTED = "reported"  # the loop's timer already reported the timeout


class _ApduDeadline:
    """The deadline of the one APDU in flight, kept by the event loop's timer.

    The owner thread ``start``s it before a transmit and ``stop``s it after;
    if the loop's timer fires first it calls ``on_timeout`` (on the loop) at
    once.  The lock makes "timer fired" and "answer back" exclusive, so a
    timeout is reported exactly once and a late answer never also counts.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float, on_timeout: Callable[[str], None]) -> None:
        self._loop = loop
        self._timeout = timeout
        self._on_timeout = on_timeout
        self._lock = threading.Lock()
        self._serial = 0
        self._armed: int | None = None
        self._deadline = 0.0
        self._what = ""
        self._fired = False

    def start(self, what: str) -> int:
        with self._lock:
            self._serial += 1
            self._armed, self._fired, self._what = self._serial, False, what
            self._deadline = time.monotonic() + self._timeout
            serial, deadline = self._serial, self._deadline
        with contextlib.suppress(RuntimeError):  # the loop is closed: ``stop`` still judges by the clock
            self._loop.call_soon_threadsafe(self._arm, serial, deadline)
        return serial

    def _arm(self, serial: int, deadline: float) -> None:
        # A timer that outlives its APDU finds another serial armed and does nothing.
        self._loop.call_later(max(deadline - time.monotonic(), 0.0), self._fire, serial)

    def _fire(self, serial: int) -> None:
        with self._lock:
            if self._armed != serial:
                return
            self._fired = True
            what = self._what
        self._on_timeout(what)

    def stop(self, serial: int) -> _Verdict:
        with self._lock:
            if self._armed != serial:
                raise RuntimeError("stopping an APDU deadline that is not armed")
            self._armed = None
            if self._fired:
                return _Verdict.REPORTED
            return _Verdict.LATE if time.monotonic() > self._deadline else _Verdict.IN_TIME


class _TimedOutError(Exception):
    """The APDU in flight overran its deadline; ``event`` is the report still to send, if any."""

    def __init__(self, event: Unreadable | None) -> None:
        super().__init__("APDU timeout")
        self.event = event


class _StoppingError(Exception):
    """The driver is closing: abandon the card being read."""


class _NoAnswerError(Exception):
    """The card sent nothing back (seen when it is pulled while answering)."""


@dataclass(frozen=True, slots=True)
class _Crash:
    error: BaseException


@dataclass(frozen=True, slots=True)
class _End:
    pass


_END = _End()
_QueueItem = DriverEvent | _Crash | _End


@dataclass
class _Slot:
    """What the owner thread knows about one reader."""

    state: int = int(scard.SCARD_STATE_UNAWARE)
    present: bool = False
    counter: int | None = None  # pcsc-lite's card event count (the high word of the state)


# --- the driver ---------------------------------------------------------------


class ICCardDriver:
    """The driver of the IC card readers one ``[[devices]]`` table names; see the module docstring."""

    def __init__(self, config: ICConfig, *, backoff: Backoff | None = None) -> None:
        self.name = config.name
        self.config = config
        self._plan = config.read_plan()
        self._backoff = backoff or Backoff(initial=config.retry_initial_s, cap=config.retry_max_s)
        self._pcsc = _Pcsc(config.name)
        self._stop = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[_QueueItem] | None = None
        self._thread: threading.Thread | None = None
        self._deadline: _ApduDeadline | None = None
        self._closed = False
        # Owner-thread state.
        self._slots: dict[str, _Slot] = {}
        self._reported: tuple[DeviceState, str] | None = None
        self._use_pnp = True
        self._pnp_state = 0  # handed back as pcsc-lite returned it, so it reports only changes
        self._service_lost = False

    # -- the contract --

    async def __aenter__(self) -> Self:
        if self._thread is not None:
            raise RuntimeError(f"IC driver {self.name!r} was already started")
        self._loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue()
        self._deadline = _ApduDeadline(self._loop, self.config.apdu_timeout_s, self._report_timeout)
        self._thread = threading.Thread(target=self._run, name=f"ic-{self.name}", daemon=False)
        self._thread.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        thread, queue = self._thread, self._queue
        if thread is None or queue is None or self._closed:
            return
        self._stop.set()
        # A card still answering gets its APDU deadline; anything longer is a card that hangs the reader.
        give_up = time.monotonic() + self.config.apdu_timeout_s + 1.0
        while thread.is_alive():
            self._pcsc.cancel()  # repeated: a cancel that lands just before the wait starts is lost
            if time.monotonic() >= give_up:
                log.warning(
                    "%s: the PC/SC thread is still blocked in a card command; it ends when the card answers or leaves",
                    self.name,
                )
                break
            await asyncio.sleep(0.02)
        else:
            thread.join()
        self._closed = True
        queue.put_nowait(_END)

    async def events(self) -> AsyncIterator[DriverEvent]:
        """Card reads, removals and reader changes until the driver is closed."""
        queue = self._queue
        if queue is None:
            raise RuntimeError("enter the driver (`async with driver:`) before reading its events")
        while True:
            item = await queue.get()
            if isinstance(item, _End):
                queue.put_nowait(item)  # every reader of events() ends, not only the first
                return
            if isinstance(item, _Crash):
                raise item.error
            yield item

    # -- crossing to the loop --

    def _deliver(self, item: _QueueItem) -> None:
        if not self._closed and self._queue is not None:
            self._queue.put_nowait(item)

    def _post(self, item: _QueueItem) -> None:
        if isinstance(item, CardRead | Unreadable | CardRemoved):
            log.debug("%s: %r", self.name, item)
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening any more
            loop.call_soon_threadsafe(self._deliver, item)

    def _report_timeout(self, what: str) -> None:
        event = self._timeout_event(what)
        log.debug("%s: %r", self.name, event)
        self._deliver(event)

    def _timeout_event(self, what: str) -> Unreadable:
        return Unreadable(self.name, "ic", "timeout", f"no answer to {what} within {self.config.apdu_timeout_s:g} s")

    def _report(self, state: DeviceState, detail: str) -> None:
        if self._reported == (state, detail):
            return
        self._reported = (state, detail)
        log.info("%s: %s: %s", self.name, state, detail)
        self._post(DeviceChanged(self.name, state, detail))

    # -- the owner thread --

    def _run(self) -> None:
        try:
            self._supervise()
        except BaseException as exc:  # a programming error: events() raises it in the agent's task
            log.exception("%s: the PC/SC thread failed", self.name)
            self._post(_Crash(exc))
        finally:
            self._pcsc.release()

    def _supervise(self) -> None:
        while not self._stop.is_set():
            try:
                self._pcsc.establish()
                self._watch()
            except PcscError as exc:
                self._lost(exc)
                delay = self._backoff.next_delay()
                log.debug("%s: reconnecting to pcscd in %.2f s", self.name, delay)
                self._stop.wait(delay)
            finally:
                self._pcsc.release()

    def _lost(self, exc: PcscError) -> None:
        for slot in self._slots.values():
            if slot.present:
                self._post(CardRemoved(self.name))
        self._slots.clear()
        self._use_pnp = True  # a restarted or different pcscd may well support it
        self._pnp_state = 0
        if exc.service_gone:
            if not self._service_lost:  # once per outage, not once per reconnect attempt
                self._report("disconnected", f"pcscd not reachable: {exc.message}")
            self._service_lost = True
        else:
            self._report("error", exc.message)

    def _watch(self) -> None:
        reset = False
        timeout_ms = round(self.config.poll_s * 1000)
        while not self._stop.is_set():
            self._sync_readers(self._pcsc.list_readers())
            if not reset:
                self._backoff.reset()  # pcscd answered: the next loss starts from a short wait again
                reset = True
            states = [(name, slot.state) for name, slot in self._slots.items()]
            if self._use_pnp:
                states.insert(0, (PNP_NOTIFICATION, self._pnp_state))
            elif not states:
                self._stop.wait(self.config.poll_s)
                continue
            hresult, new_states = self._pcsc.get_status_change(timeout_ms, states)
            if hresult == _E_UNKNOWN_READER:
                self._unknown_reader()
                continue
            if hresult != _OK:
                continue  # timed out (re-list the readers) or cancelled (stopping)
            for state in new_states:
                if state.name == PNP_NOTIFICATION:
                    self._pnp_state = state.event_state & ~_STATE_CHANGED
                elif state.name in self._slots:
                    self._reader_changed(state)

    def _unknown_reader(self) -> None:
        # Either a watched reader left between listing and waiting (the next listing drops it),
        # or this PC/SC has no PnP pseudo-reader: then poll the reader list instead.
        if set(self._slots) <= set(self._pcsc.list_readers()) and self._use_pnp:
            log.info("%s: no PnP notification from PC/SC; re-listing readers every %g s", self.name, self.config.poll_s)
            self._use_pnp = False

    def _sync_readers(self, readers: list[str]) -> None:
        self._service_lost = False
        wanted = [reader for reader in readers if self.config.matches(reader)]
        for gone in [name for name in self._slots if name not in wanted]:
            if self._slots.pop(gone).present:
                self._post(CardRemoved(self.name))
        for name in wanted:
            self._slots.setdefault(name, _Slot())
        if wanted:
            self._report("connected", ("reader " if len(wanted) == 1 else "readers ") + ", ".join(wanted))
        else:
            listed = ", ".join(readers) if readers else "none"
            self._report("disconnected", f"no PC/SC reader matching {self.config.reader!r} (pcscd lists: {listed})")

    def _reader_changed(self, new: _ReaderState) -> None:
        slot = self._slots[new.name]
        slot.state = new.event_state & ~_STATE_CHANGED
        flags, counter = new.event_state & 0xFFFF, new.event_state >> 16
        present = bool(flags & _STATE_PRESENT) and not flags & _STATE_GONE
        was_present = slot.present
        # Present before and now, but another card event count: a card was swapped between two waits.
        swapped = present and was_present and slot.counter is not None and counter != slot.counter
        slot.present, slot.counter = present, counter
        if was_present and (not present or swapped):
            self._post(CardRemoved(self.name))
        if present and (not was_present or swapped):
            self._inserted(new.name, flags, new.atr)

    def _inserted(self, reader: str, flags: int, atr: bytes) -> None:
        if flags & _STATE_MUTE:
            self._post(Unreadable(self.name, "ic", "unresponsive", f"the card in {reader} gives no ATR (mute)"))
            return
        started = time.monotonic()
        event = self._read(reader, atr)
        log.debug("%s: card in %s read in %.1f ms", self.name, reader, (time.monotonic() - started) * 1000)
        if event is not None and not self._stop.is_set():  # a lane that is closing sells nothing more
            self._post(event)

    def _read(self, reader: str, atr: bytes) -> DriverEvent | None:
        """One card's one event: CardRead or Unreadable (None: already reported, or stopping)."""
        try:
            handle, protocol = self._pcsc.connect(reader)
        except PcscError as exc:
            if exc.service_gone:
                raise
            return self._card_failed(exc)
        disposition = _LEAVE_CARD
        try:
            outcome = read_card(functools.partial(self._transmit, handle, protocol), self._plan)
        except _TimedOutError as exc:
            disposition = _RESET_CARD  # the card may still be busy with a command nobody waits for
            return exc.event
        except _NoAnswerError:
            return Unreadable(self.name, "ic", "removed", "the card stopped answering mid-read (pulled too soon?)")
        except _StoppingError:
            return None
        except PcscError as exc:
            disposition = _RESET_CARD
            if exc.service_gone:
                raise
            return self._card_failed(exc)
        finally:
            self._pcsc.disconnect(handle, disposition)
        return self._event_for(outcome, atr)

    def _transmit(self, handle: int, protocol: int, command: bytes) -> bytes:
        if self._stop.is_set():
            raise _StoppingError
        deadline = self._deadline
        if deadline is None:
            raise RuntimeError("the driver was not entered")
        what = command_name(command)
        serial = deadline.start(what)
        try:
            response = self._pcsc.transmit(handle, protocol, command)
        except PcscError:
            self._judge(deadline.stop(serial), what)  # a pulled card after the deadline is still a timeout
            raise
        self._judge(deadline.stop(serial), what)
        if not response:
            raise _NoAnswerError
        return response

    def _judge(self, verdict: _Verdict, what: str) -> None:
        if verdict is _Verdict.REPORTED:
            raise _TimedOutError(None)
        if verdict is _Verdict.LATE:
            raise _TimedOutError(self._timeout_event(what))

    def _card_failed(self, exc: PcscError) -> Unreadable:
        return Unreadable(self.name, "ic", _CARD_REASONS.get(exc.code, "io_error"), exc.message)

    def _event_for(self, outcome: CardOutcome, atr: bytes) -> DriverEvent:
        if isinstance(outcome, MemberFile):
            return CardRead(self.name, "ic", outcome.number, expiry=outcome.expiry_yymm)
        if isinstance(outcome, UidRead):
            return CardRead(self.name, "ic", outcome.number)
        detail = outcome.detail
        if outcome.reason == "unknown_card":
            detail += f"; ATR {atr.hex(' ').upper()}"  # tells a technician which kind of card it was
        return Unreadable(self.name, "ic", outcome.reason, detail)
