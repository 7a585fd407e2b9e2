"""Keyboard-wedge readers through evdev: magnetic-stripe readers and barcode / QR scanners.

These devices are USB keyboards that "type" what they read.  The driver
opens the one device the configuration names by a stable identity (a
``/dev/input/by-id`` path, the kernel's device name, vendor:product or the
physical path, never a bare ``eventN`` that changes at the next boot),
``grab()``s it so its keystrokes never reach the POS window, and turns the
kernel's ``input_event`` records into text (``drivers.keystrokes``) and the
text into events (``drivers.magstripe``, ``drivers.barcode``,
``drivers.member_qr``), all of which are pure and tested byte by byte.

The I/O shell is this module: ``events()`` opens the device, reads records
with evdev's own C reader under ``loop.add_reader`` (no thread), and when the
device goes away (unplugged: ENODEV, or end of file) reports it and retries
discovery with capped, jittered backoff.  The record source is injectable
(``opener``) so tests feed real ``struct input_event`` records through a
pipe: the transport boundary, the only fake.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import evdev
from evdev import _input  # type: ignore[attr-defined]  # the C reader ships no type information
from pydantic import Field, field_validator, model_validator

from drivers.base import Backoff, DeviceChanged, DriverEvent, EventLoopDriver, Unreadable
from drivers.keymap import KEYMAPS, keymap
from drivers.keystrokes import Keyed, KeystrokeAssembler
from drivers.reads import ReadDecoder, ReadSettings

log = logging.getLogger(__name__)


class EvdevWedgeConfig(ReadSettings):
    """A keyboard-wedge magstripe reader or barcode/QR scanner (``type = "evdev_wedge"``)."""

    type: Literal["evdev_wedge"] = "evdev_wedge"
    path: str | None = Field(
        default=None, description="device path, best a stable one: /dev/input/by-id/usb-…-event-kbd"
    )
    device_name: str | None = Field(default=None, description="the kernel's name of the device (lane-agent devices)")
    vendor_product: str | None = Field(
        default=None, pattern=r"^[0-9a-fA-F]{4}:[0-9a-fA-F]{4}$", description="USB vendor:product, e.g. 0c2e:0b61"
    )
    phys: str | None = Field(default=None, description="physical path, e.g. usb-0000:00:14.0-2/input0")
    keymap: str = Field(default="us", description=f"the layout the device types in: {', '.join(KEYMAPS)}")
    gap_ms: int = Field(default=80, ge=5, le=2000, description="a pause this long between keys ends a read")
    grab: bool = Field(default=True, description="take the device exclusively, so reads never reach the POS window")
    retry_max_s: float = Field(default=30.0, ge=1.0, le=600.0, description="longest wait between reconnect attempts")

    @field_validator("keymap")
    @classmethod
    def _known_keymap(cls, name: str) -> str:
        keymap(name)  # raises ValueError naming the known ones
        return name

    @model_validator(mode="after")
    def _one_selector(self) -> EvdevWedgeConfig:
        given = [k for k in ("path", "device_name", "vendor_product", "phys") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "name the device by exactly one of path, device_name, vendor_product or phys"
                + (f" (given: {', '.join(given)})" if given else "")
            )
        return self


_BATCH = 64  # records evdev's device_read_many returns at most


class DeviceUnavailableError(Exception):
    """The configured device is not there (yet), or cannot be opened or grabbed."""


@dataclass
class Handle:
    """An open record source: a file descriptor of ``struct input_event`` records."""

    fd: int
    description: str
    close: Callable[[], None]


Opener = Callable[[EvdevWedgeConfig], Handle]


def _matches(config: EvdevWedgeConfig, device: Any) -> bool:
    if config.path is not None:
        return bool(device.path == os.path.realpath(config.path))
    if config.device_name is not None:
        return bool(device.name == config.device_name)
    if config.phys is not None:
        return bool(device.phys == config.phys)
    vendor, product = (int(part, 16) for part in (config.vendor_product or "0:0").split(":"))
    return bool(device.info.vendor == vendor and device.info.product == product)


def open_fifo(path: str) -> Handle:
    """A named pipe of recorded ``struct input_event`` records (a replay; see docs/hardware.md).

    Opened read-write on purpose: the pipe then always has a writer (this
    process), so it never reads as end-of-file between two replays.
    """
    fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)
    return Handle(fd, f"{path} (recorded input, FIFO)", lambda: os.close(fd))


def open_evdev(config: EvdevWedgeConfig) -> Handle:
    """Find, open and grab the configured input device (the production opener).

    A ``path`` naming a FIFO instead of an input device reads recorded records
    from it (``open_fifo``): a technician's replay of a captured session, and
    how the end-to-end tests drive a real agent.
    """
    if config.path is not None and Path(config.path).is_fifo():
        return open_fifo(config.path)
    found = None
    unopened: list[str] = []
    for path in evdev.list_devices():
        try:
            device = evdev.InputDevice(path)
        except OSError as exc:
            # Not ours to open (permissions) or gone since the listing: said below if nothing matched.
            unopened.append(f"{path}: {exc.strerror or exc}")
            continue
        if found is None and _matches(config, device):
            found = device
        else:
            device.close()
    if found is None:
        detail = f"; could not open {len(unopened)}: {', '.join(unopened[:3])}" if unopened else ""
        raise DeviceUnavailableError(f"no input device matches the configuration (see lane-agent devices){detail}")
    if config.grab:
        try:
            found.grab()
        except OSError as exc:
            found.close()
            raise DeviceUnavailableError(
                f"cannot grab {os.fsdecode(found.path)}: {exc.strerror} (another program holds it?)"
            ) from exc
    os.set_blocking(found.fd, False)
    info = f"{os.fsdecode(found.path)} {found.name!r} {found.info.vendor:04x}:{found.info.product:04x}"
    return Handle(found.fd, info, found.close)


def _read_records(fd: int) -> tuple[tuple[int, int, int, int, int], ...]:
    # evdev's own C reader of struct input_event records (what InputDevice.read uses); it reads any
    # file descriptor, so a FIFO of recorded records is read exactly as a device is.
    return tuple(_input.device_read_many(fd))


class EvdevWedgeDriver(EventLoopDriver):
    """The driver of one keyboard-wedge device; see the module docstring."""

    def __init__(
        self,
        config: EvdevWedgeConfig,
        *,
        opener: Opener = open_evdev,
        clock: Callable[[], float] = time.time,
        backoff: Backoff | None = None,
    ) -> None:
        super().__init__()
        self.name = config.name
        self.config = config
        self._opener = opener
        self._clock = clock
        self._backoff = backoff or Backoff(initial=0.5, cap=config.retry_max_s)
        self._keymap = keymap(config.keymap)
        self._decoder = ReadDecoder(config)

    async def events(self) -> AsyncIterator[DriverEvent]:
        """Reads as events, for as long as the driver is open; device trouble becomes DeviceChanged."""
        reported: str | None = None
        while not self._closed.is_set():
            try:
                handle = self._opener(self.config)
            except (DeviceUnavailableError, OSError) as exc:
                detail = str(exc)
                if reported != detail:
                    reported = detail
                    yield DeviceChanged(self.name, "disconnected", detail)
                await self.closing_within(self._backoff.next_delay())
                continue
            reported = None
            self._backoff.reset()
            log.info("%s: reading %s", self.name, handle.description)
            yield DeviceChanged(self.name, "connected", handle.description)
            try:
                async for event in self._read(handle):
                    yield event
            finally:
                handle.close()
            if not self._closed.is_set():
                reported = "the device went away"
                yield DeviceChanged(self.name, "disconnected", reported)

    async def _read(self, handle: Handle) -> AsyncIterator[DriverEvent]:
        loop = asyncio.get_running_loop()
        readable = asyncio.Event()
        assembler = KeystrokeAssembler(self._keymap, gap_ms=self.config.gap_ms)
        loop.add_reader(handle.fd, readable.set)
        closing = asyncio.ensure_future(self._closed.wait())
        try:
            while not self._closed.is_set():
                waiter = asyncio.ensure_future(readable.wait())
                # A read ends at Enter, or after a pause: wake up for the pause too.
                timeout = self.config.gap_ms / 1000 * 1.5 if assembler.pending else None
                done, _ = await asyncio.wait({waiter, closing}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                if waiter not in done:
                    waiter.cancel()
                    for keyed in self._flush(assembler):
                        yield self._decode(keyed)
                    continue
                readable.clear()
                try:
                    records = self._drain(handle.fd)
                except OSError as exc:
                    if exc.errno not in (errno.ENODEV, errno.EIO, errno.EBADF):
                        log.warning("%s: read failed: %s", self.name, exc)
                    return
                if records is None:
                    return  # end of file: the device (or the test's pipe) is gone
                for record in records:
                    for keyed in assembler.feed(*record):
                        yield self._decode(keyed)
        finally:
            closing.cancel()
            loop.remove_reader(handle.fd)

    @staticmethod
    def _drain(fd: int) -> list[tuple[int, int, int, int, int]] | None:
        """Every record waiting now (None at end of file).

        evdev's reader returns at most 64 records a call; a swipe is some 500.
        Reading on until the descriptor is empty, rather than going back to
        the event loop after each batch, halved a swipe's p99 (docs/performance.md).
        """
        records: list[tuple[int, int, int, int, int]] = []
        while True:
            try:
                batch = _read_records(fd)
            except BlockingIOError:
                return records
            if not batch:
                return records or None
            records.extend(batch)
            if len(batch) < _BATCH:
                return records

    def _flush(self, assembler: KeystrokeAssembler) -> Iterator[Keyed]:
        now = self._clock()
        sec = int(now)
        yield from assembler.flush(sec, int((now - sec) * 1_000_000))

    def _decode(self, keyed: Keyed) -> DriverEvent:
        """One read as an event; anything doubtful is Unreadable, never a member."""
        source = self._decoder.source_of(keyed.text)
        if not keyed.decodable:
            if keyed.ended_by == "overflow":
                return Unreadable(self.name, source, "overflow", f"{len(keyed.text)} characters without an end")
            if keyed.ended_by == "dropped":
                return Unreadable(self.name, source, "events_lost", "the kernel dropped input events mid-read")
            detail = f"{keyed.unmapped} keys unknown to keymap {self.config.keymap!r}"
            return Unreadable(self.name, source, "wrong_keymap", detail)
        return self._decoder.decode(keyed.text, self._clock())
