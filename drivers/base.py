"""The driver contract: what every card reader and scanner gives the agent.

A driver is an async context manager that, once entered, yields frozen typed
events from ``events()`` until it is closed.  It never decides who a member
is: it reports what it read (a card number, a member code, a coupon, or that
a read was unusable) and how the device is doing; the agent identifies.

Drivers report upward and never raise for a device problem: a reader that
is unplugged or a pcscd that went away is a ``DeviceChanged`` event, then the
driver retries on its own with capped, jittered backoff (``Backoff``) and
reports again when the device is back.  Only a programming error escapes
``events()``.

Card numbers in events are the raw text read (the agent hashes it at once);
``__repr__`` of every event masks them, so an event logged by mistake does
not leak one.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal, Protocol, Self

Source = Literal["magstripe", "ic", "barcode"]
DeviceState = Literal["connected", "disconnected", "error"]


def mask(number: str) -> str:
    """A card number for logs and reprs: only its last four characters."""
    return "*" * max(len(number) - 4, 0) + number[-4:]


@dataclass(frozen=True, slots=True)
class CardRead:
    """A card number read from a magnetic stripe, an IC card's member file or UID, or a printed barcode."""

    device: str
    source: Source
    number: str = field(repr=False)
    expiry: str | None = None  # YYMM from the stripe, when present

    def __repr__(self) -> str:
        return f"CardRead(device={self.device!r}, source={self.source!r}, number={mask(self.number)!r})"


@dataclass(frozen=True, slots=True)
class MemberCode:
    """A member id from a verified member QR code (the phone app's)."""

    device: str
    source: Source
    member_id: str
    dynamic: bool  # a signed, time-limited code (else a static one)


@dataclass(frozen=True, slots=True)
class CouponScan:
    """A coupon code scanned."""

    device: str
    code: str


@dataclass(frozen=True, slots=True)
class Unreadable:
    """A read that must not be matched to anyone: garbled, truncated, forged, replayed, unsupported."""

    device: str
    source: Source
    reason: str  # a short code: bad_lrc, no_end_sentinel, bad_check_digit, bad_signature, replayed, ...
    detail: str = ""


@dataclass(frozen=True, slots=True)
class CardRemoved:
    """An IC card left the reader."""

    device: str


@dataclass(frozen=True, slots=True)
class DeviceChanged:
    """A device appeared, went away, or failed; ``detail`` says what a technician needs to know."""

    device: str
    state: DeviceState
    detail: str = ""


DriverEvent = CardRead | MemberCode | CouponScan | Unreadable | CardRemoved | DeviceChanged


class Driver(Protocol):
    """What the agent needs of a driver (``drivers.registry`` builds them from lane.toml)."""

    name: str

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...

    def events(self) -> AsyncIterator[DriverEvent]:
        """Events until the driver is closed; device trouble is reported as DeviceChanged, never raised."""
        ...


class EventLoopDriver:
    """Base of drivers that run on the event loop itself (no thread): closing, and waiting that a close ends."""

    def __init__(self) -> None:
        self._closed = asyncio.Event()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._closed.set()

    async def closing_within(self, seconds: float) -> bool:
        """Wait ``seconds``, or less if the driver is closed meanwhile; True if it was."""
        try:
            async with asyncio.timeout(seconds):
                await self._closed.wait()
        except TimeoutError:
            return False
        return True


@dataclass
class Backoff:
    """Capped exponential backoff with full jitter, reset after a success."""

    initial: float = 0.5
    cap: float = 30.0
    rng: random.Random = field(default_factory=random.Random)
    _attempt: int = 0

    def next_delay(self) -> float:
        ceiling = min(self.cap, self.initial * (2**self._attempt))
        self._attempt += 1
        # Full jitter: lanes that lost the same pcscd or USB hub do not all retry in step.
        return self.rng.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self._attempt = 0
