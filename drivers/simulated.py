"""A simulated device: replays a script of swipes, scans and card taps (``type = "simulated"``).

For demos and for trying a lane without hardware.  Swipes and scans are the
text a wedge device would type, and go through the same decoders as a real
read (``drivers.reads``): a garbled swipe in a script is refused just as a
garbled real one.  A tap is what an IC reader reads off a card's member
file.  ``unplug`` / ``plug`` steps exercise the POS's handling of
``device.changed``.

    [[devices]]
    name = "demo"
    type = "simulated"
    steps = [
      { after_s = 2.0, swipe = "%B6200888800000001^MEMBER/DEMO^2712101?;6200888800000001=2712101?" },
      { after_s = 3.0, tap = "6200888800000002" },
      { after_s = 1.0, scan = "CPN20260042" },
    ]
    repeat = false
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from drivers.base import CardRead, CardRemoved, DeviceChanged, DriverEvent, EventLoopDriver
from drivers.reads import ReadDecoder, ReadSettings


class Step(BaseModel):
    """One scripted action, after a pause."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    after_s: float = Field(default=1.0, ge=0.0, le=3600.0, description="pause before this step, in seconds")
    swipe: str | None = Field(default=None, max_length=512, description="what a magstripe reader types")
    scan: str | None = Field(default=None, max_length=512, description="what a barcode / QR scanner types")
    tap: str | None = Field(default=None, max_length=64, description="the card number an IC reader reads")
    remove: bool = Field(default=False, description="the IC card leaves the reader")
    unplug: bool = Field(default=False, description="the device goes away")
    plug: bool = Field(default=False, description="the device comes back")

    @model_validator(mode="after")
    def _one_action(self) -> Step:
        actions = [k for k in ("swipe", "scan", "tap") if getattr(self, k) is not None]
        actions += [k for k in ("remove", "unplug", "plug") if getattr(self, k)]
        if len(actions) != 1:
            raise ValueError("a step does exactly one of swipe, scan, tap, remove, unplug, plug")
        return self


class SimulatedConfig(ReadSettings):
    """A scripted device."""

    type: Literal["simulated"] = "simulated"
    # strict=False: TOML gives arrays as lists; the model keeps them as an immutable tuple.
    steps: tuple[Step, ...] = Field(min_length=1, max_length=10_000, strict=False, description="the script")
    repeat: bool = Field(default=False, description="start the script again at its end (for a demo that runs on)")


class SimulatedDriver(EventLoopDriver):
    """Plays its script, then ends (or repeats it)."""

    def __init__(self, config: SimulatedConfig) -> None:
        super().__init__()
        self.name = config.name
        self.config = config
        self._decoder = ReadDecoder(config)

    async def events(self) -> AsyncIterator[DriverEvent]:
        yield DeviceChanged(self.name, "connected", "simulated device")
        while not self._closed.is_set():
            for step in self.config.steps:
                if await self.closing_within(step.after_s):
                    return
                yield self._event(step)
            if not self.config.repeat:
                return

    def _event(self, step: Step) -> DriverEvent:
        if step.swipe is not None:
            return self._decoder.decode(step.swipe, time.time())
        if step.scan is not None:
            return self._decoder.decode(step.scan, time.time())
        if step.tap is not None:
            return CardRead(self.name, "ic", step.tap)
        if step.remove:
            return CardRemoved(self.name)
        return DeviceChanged(self.name, "disconnected" if step.unplug else "connected", "simulated")
