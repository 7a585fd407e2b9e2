"""The configuration every driver section shares, and what each driver's own model builds on.

A lane's devices are an array of tables in lane.toml, one per device:

    [[devices]]
    name = "swipe"            # how events, logs and /v1/status name it
    type = "evdev_wedge"      # the driver (drivers.registry.DRIVERS)
    ...                       # that driver's own keys

Each driver owns a pydantic model (a subclass of ``DeviceConfig``) whose field
descriptions are its documentation; ``drivers.registry.parse_device`` picks
the model by ``type``.  Frozen, strict and closed like the rest of the lane's
configuration: a misspelt key is an error, never a silent default.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

DeviceName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,32}$", description="the device's name on this lane")]


class DeviceConfig(BaseModel):
    """Keys every device has."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, hide_input_in_errors=True)

    name: DeviceName
    type: str = Field(description="the driver: evdev_wedge, ic or simulated")
