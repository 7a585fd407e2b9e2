"""Lane events for the POS: who was identified, which card was refused, what a device did.

The agent publishes each event once; every ``GET /v1/events`` stream is a
subscriber with its own bounded queue.  A POS that stops reading must not
hold memory or slow a sale down, so a full queue drops its *oldest* event and
counts the loss; the stream then tells the POS with a ``stream.lost`` event
how many it missed (it can call ``/v1/status`` or identify again).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

log = logging.getLogger(__name__)

EventKind = Literal["member.identified", "card.rejected", "coupon.scanned", "device.changed", "stream.lost"]
Source = Literal["magstripe", "ic", "barcode", "manual"]

DEFAULT_QUEUE = 256


@dataclass(frozen=True, slots=True)
class LaneEvent:
    """One event as the POS receives it: ``id`` grows by one per event on this lane since start."""

    id: int
    kind: EventKind
    at: dt.datetime
    data: Mapping[str, Any] = field(default_factory=dict)

    def to_wire(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "at": self.at.isoformat(), **self.data}


class _Subscriber:
    __slots__ = ("dropped", "queue")

    def __init__(self, size: int) -> None:
        self.queue: asyncio.Queue[LaneEvent | None] = asyncio.Queue(size)
        self.dropped = 0


class EventBus:
    """Fan-out of lane events to the open event streams; all on the event loop's thread."""

    def __init__(self, queue_size: int = DEFAULT_QUEUE) -> None:
        if queue_size < 1:
            raise ValueError("queue_size must be at least 1")
        self._queue_size = queue_size
        self._subscribers: set[_Subscriber] = set()
        self._ids = itertools.count(1)
        self._closed = False
        self.published = 0
        self.dropped = 0

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    def publish(self, kind: EventKind, data: Mapping[str, Any], *, at: dt.datetime | None = None) -> LaneEvent:
        """Send an event to every open stream; never blocks, never raises for a slow reader."""
        event = LaneEvent(next(self._ids), kind, at or dt.datetime.now(dt.UTC), dict(data))
        self.published += 1
        for subscriber in self._subscribers:
            if subscriber.queue.full():
                # The oldest event is the least useful one to a cashier; keep the newest.
                subscriber.queue.get_nowait()
                subscriber.dropped += 1
                self.dropped += 1
            subscriber.queue.put_nowait(event)
        log.debug("event %d %s", event.id, kind)
        return event

    async def stream(self) -> AsyncIterator[LaneEvent]:
        """Events published from now on, until the bus closes (shutdown) or the caller stops."""
        if self._closed:
            return
        subscriber = _Subscriber(self._queue_size)
        self._subscribers.add(subscriber)
        try:
            while True:
                event = await subscriber.queue.get()
                if event is None:
                    return
                if subscriber.dropped:
                    lost, subscriber.dropped = subscriber.dropped, 0
                    yield LaneEvent(0, "stream.lost", dt.datetime.now(dt.UTC), {"missed": lost})
                yield event
        finally:
            self._subscribers.discard(subscriber)

    def close(self) -> None:
        """End every stream (at shutdown), after the events already queued for it."""
        self._closed = True
        for subscriber in self._subscribers:
            if subscriber.queue.full():
                subscriber.queue.get_nowait()
                subscriber.dropped += 1
            subscriber.queue.put_nowait(None)
