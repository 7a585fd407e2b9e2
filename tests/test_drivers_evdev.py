"""The evdev keyboard-wedge driver end to end: kernel input_event records through a pipe, read by evdev's reader.

The pipe is the only fake (no /dev/uinput here): the records are the bytes a
64-bit kernel writes, and the driver reads them with evdev's own C reader
under the event loop, as it reads a real device.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from keyrecords import pack, records_for_text

from drivers.base import Backoff, CardRead, CouponScan, DeviceChanged, DriverEvent, MemberCode, Unreadable
from drivers.evdev_wedge import DeviceUnavailableError, EvdevWedgeConfig, EvdevWedgeDriver, Handle
from drivers.member_qr import sign_member_code
from drivers.registry import DRIVERS, build, parse_device

pytestmark = pytest.mark.timeout(30)

PAN = "6200123456780001"
SWIPE = f"%B{PAN}^MEMBER/TEST^2712101?;{PAN}=2712101?"
RFC8032_SECRET = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
RFC8032_PUBLIC = "hex:d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"


def now_us() -> int:
    return int(time.time() * 1_000_000)


class Pipes:
    """An opener handing the driver the read end of a fresh pipe per (re)connection."""

    def __init__(self, fail_first: int = 0) -> None:
        self.writers: asyncio.Queue[int] = asyncio.Queue()
        self.fail_first = fail_first
        self.opened = 0

    def __call__(self, config: EvdevWedgeConfig) -> Handle:
        if self.fail_first > 0:
            self.fail_first -= 1
            raise DeviceUnavailableError("no input device matches the configuration")
        read, write = os.pipe()
        os.set_blocking(read, False)
        self.opened += 1
        self.writers.put_nowait(write)
        return Handle(read, f"pipe {self.opened}", lambda: os.close(read))


def config(**changes: Any) -> EvdevWedgeConfig:
    doc: dict[str, Any] = {"name": "msr", "type": "evdev_wedge", "path": "/dev/input/by-id/test", "gap_ms": 30}
    doc.update(changes)
    return EvdevWedgeConfig.model_validate(doc)


async def collect(driver: EvdevWedgeDriver, until: Callable[[list[DriverEvent]], bool]) -> list[DriverEvent]:
    """The driver's events until ``until(seen)``; five seconds at most."""
    seen: list[DriverEvent] = []

    async def run() -> None:
        async for event in driver.events():
            seen.append(event)
            if until(seen):
                return

    await asyncio.wait_for(run(), 5.0)
    return seen


def reads(events: list[DriverEvent]) -> list[DriverEvent]:
    return [e for e in events if not isinstance(e, DeviceChanged)]


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def _typed(texts: list[str], cfg: EvdevWedgeConfig, *, want: int, keymap: str = "us") -> list[DriverEvent]:
    pipes = Pipes()
    async with EvdevWedgeDriver(cfg, opener=pipes) as driver:

        async def feed() -> None:
            write = await pipes.writers.get()
            for text in texts:
                os.write(write, pack(records_for_text(text, keymap, t0=now_us(), per_key_us=200)))
                await asyncio.sleep(0.01)

        feeder = asyncio.create_task(feed())
        events = await collect(driver, lambda seen: len(reads(seen)) >= want)
        await feeder
    return reads(events)


def test_a_swipe_typed_as_input_records_is_a_card_read() -> None:
    events = run(_typed([SWIPE], config(role="magstripe"), want=1))
    assert len(events) == 1
    read = events[0]
    assert isinstance(read, CardRead)
    assert (read.device, read.source, read.number, read.expiry) == ("msr", "magstripe", PAN, "2712")
    assert PAN not in repr(read)


def test_a_half_swipe_is_unreadable_and_never_a_member() -> None:
    events = run(_typed([SWIPE[:30]], config(role="magstripe"), want=1))
    assert len(events) == 1
    assert isinstance(events[0], Unreadable)
    assert events[0].source == "magstripe"


def test_a_scan_without_enter_ends_at_the_gap() -> None:
    async def body() -> list[DriverEvent]:
        pipes = Pipes()
        async with EvdevWedgeDriver(config(role="barcode"), opener=pipes) as driver:

            async def feed() -> None:
                write = await pipes.writers.get()
                os.write(write, pack(records_for_text("CPN20260042", t0=now_us(), per_key_us=200, enter=False)))

            feeder = asyncio.create_task(feed())
            events = await collect(driver, lambda seen: len(reads(seen)) >= 1)
            await feeder
        return reads(events)

    events = run(body())
    assert len(events) == 1
    assert isinstance(events[0], CouponScan)
    assert events[0].code.endswith("20260042")


def test_scans_member_cards_coupons_and_signed_qr_codes() -> None:
    qr = sign_member_code(RFC8032_SECRET, "hq1", "M000123", int(time.time()), b"\x01" * 9)
    cfg = config(role="barcode", qr_keys={"hq1": RFC8032_PUBLIC})
    events = run(_typed(["M6200123456780001", "CPN20260042", qr, qr, "6901234567892"], cfg, want=5))
    kinds = [type(e).__name__ for e in events]
    assert kinds == ["CardRead", "CouponScan", "MemberCode", "Unreadable", "Unreadable"]
    card, _, member, replay, product = events
    assert isinstance(card, CardRead)
    assert card.source == "barcode"
    assert isinstance(member, MemberCode)
    assert (member.member_id, member.dynamic) == ("M000123", True)
    assert isinstance(replay, Unreadable)
    assert replay.reason == "replayed"
    assert isinstance(product, Unreadable)
    assert product.reason == "product_code"


def test_a_reader_typing_another_layout_is_refused_not_guessed() -> None:
    # A reader set to AZERTY: its digit row needs shift; read as US it must never become another number.
    events = run(_typed([SWIPE], config(role="magstripe"), want=1, keymap="fr"))
    assert len(events) == 1
    assert not isinstance(events[0], CardRead) or events[0].number == PAN


def test_unplugged_devices_are_reported_and_picked_up_again() -> None:
    async def body() -> list[DriverEvent]:
        pipes = Pipes(fail_first=2)
        backoff = Backoff(initial=0.01, cap=0.05)
        async with EvdevWedgeDriver(config(role="magstripe"), opener=pipes, backoff=backoff) as driver:

            async def feed() -> None:
                first = await pipes.writers.get()
                os.close(first)  # unplugged: the driver reads end-of-file
                second = await pipes.writers.get()
                os.write(second, pack(records_for_text(SWIPE, t0=now_us(), per_key_us=200)))

            feeder = asyncio.create_task(feed())
            events = await collect(driver, lambda seen: any(isinstance(e, CardRead) for e in seen))
            await feeder
        return events

    events = run(body())
    states = [(e.state, e.detail) for e in events if isinstance(e, DeviceChanged)]
    assert states[0] == ("disconnected", "no input device matches the configuration")
    assert [s for s, _ in states] == ["disconnected", "connected", "disconnected", "connected"]
    assert states[2][1] == "the device went away"
    assert isinstance(events[-1], CardRead)


def test_closing_the_driver_ends_its_events() -> None:
    async def body() -> None:
        pipes = Pipes()
        driver = EvdevWedgeDriver(config(), opener=pipes)
        async with driver:
            stream: AsyncIterator[DriverEvent] = driver.events()
            first = await anext(stream)
            assert isinstance(first, DeviceChanged)
        # Closed: the stream ends promptly instead of waiting for keys.
        rest = await asyncio.wait_for(_drain(stream), 2)
        assert rest == []

    run(body())


async def _drain(stream: AsyncIterator[DriverEvent]) -> list[DriverEvent]:
    return [event async for event in stream]


def test_the_registry_validates_device_tables() -> None:
    device, problems = parse_device({"name": "msr", "type": "evdev_wedge", "path": "/dev/x", "keymap": "klingon"})
    assert device is None
    assert [p.key for p in problems] == ["keymap"]
    assert "us" in problems[0].message
    device, problems = parse_device({"name": "msr", "type": "evdev_wedge", "path": "/dev/x", "phys": "usb-1"})
    assert device is None
    assert "exactly one of path" in problems[0].message
    device, problems = parse_device({"name": "x", "type": "teleporter"})
    assert device is None
    assert problems[0].code == "unknown_driver"
    assert "evdev_wedge" in problems[0].message
    device, problems = parse_device({"name": "scan", "type": "evdev_wedge", "vendor_product": "05e0:1200"})
    assert problems == []
    assert device is not None
    assert isinstance(build(device), EvdevWedgeDriver)
    assert {"evdev_wedge", "ic", "simulated"} <= set(DRIVERS)
