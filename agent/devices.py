"""The lane's devices at work: driver events become identifications and POS events.

One task per configured device (``device:<name>``) iterates its driver's
events.  A card read or member code is identified exactly as a code typed at
the POS (``LaneService.identify``), with the device's source; an unusable
read is a ``card.rejected`` with reason ``unreadable``; a coupon is a
``coupon.scanned``; a device coming and going is a ``device.changed`` and
shows in ``/v1/status``.  A driver that fails with a programming error is
logged and restarted after a pause: the lane keeps selling without it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from agent.pos_models import IdentifyIn
from agent.service import LaneService
from drivers.base import (
    CardRead,
    CardRemoved,
    CouponScan,
    DeviceChanged,
    Driver,
    DriverEvent,
    MemberCode,
    Unreadable,
    mask,
)
from drivers.config import DeviceConfig

log = logging.getLogger(__name__)

RESTART_AFTER_BUG_S = 5.0


@dataclass
class DeviceStatus:
    """What ``/v1/status`` shows of one device."""

    name: str
    type: str
    state: str = "starting"
    detail: str = ""
    since: str = ""
    reads: int = 0
    unreadable: int = 0

    def to_wire(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class DeviceHub:
    """Runs the lane's drivers and routes what they read."""

    def __init__(
        self, service: LaneService, devices: Sequence[DeviceConfig], build: Callable[[DeviceConfig], Driver]
    ) -> None:
        self.service = service
        self._devices = list(devices)
        self._build = build
        self.states = {device.name: DeviceStatus(device.name, device.type) for device in devices}

    def status(self) -> list[dict[str, Any]]:
        return [state.to_wire() for state in self.states.values()]

    def start(self, group: asyncio.TaskGroup) -> list[asyncio.Task[None]]:
        """One named task per device in the daemon's task group."""
        return [group.create_task(self._run(device), name=f"device:{device.name}") for device in self._devices]

    async def _run(self, device: DeviceConfig) -> None:
        name = device.name
        while True:
            try:
                async with self._build(device) as driver:
                    async for event in driver.events():
                        await self.handle(event)
            except asyncio.CancelledError:
                raise
            except Exception:
                # A bug in a driver must not stop the till: log it, say so, try again.
                log.exception("device %s failed; restarting it in %.0f s", name, RESTART_AFTER_BUG_S)
                await self.handle(DeviceChanged(name, "error", "the driver failed; see the agent's log"))
                await asyncio.sleep(RESTART_AFTER_BUG_S)
            else:
                return  # the driver ended on its own (a simulated script that ran out)

    async def handle(self, event: DriverEvent) -> None:  # noqa: C901 - one branch per event type
        """Route one driver event (public for the simulated till and tests)."""
        state = self.states.get(event.device)
        if isinstance(event, CardRead):
            if state:
                state.reads += 1
            log.debug("%s read card %s (%s)", event.device, mask(event.number), event.source)
            await self.service.identify(IdentifyIn(code=event.number, kind="card"), source=event.source)
        elif isinstance(event, MemberCode):
            if state:
                state.reads += 1
            await self.service.identify(IdentifyIn(code=event.member_id, kind="member_id"), source=event.source)
        elif isinstance(event, Unreadable):
            if state:
                state.unreadable += 1
            log.info("%s: unreadable %s read (%s) %s", event.device, event.source, event.reason, event.detail)
            self.service.reject_unreadable(event.source, event.reason)
        elif isinstance(event, CouponScan):
            self.service.events.publish("coupon.scanned", {"device": event.device, "code": event.code})
        elif isinstance(event, DeviceChanged):
            if state:
                state.state, state.detail = event.state, event.detail
                state.since = dt.datetime.now(dt.UTC).isoformat()
            log.info("device %s %s: %s", event.device, event.state, event.detail)
            self.service.events.publish(
                "device.changed", {"device": event.device, "state": event.state, "detail": event.detail}
            )
        elif isinstance(event, CardRemoved):
            log.debug("%s: card removed", event.device)
