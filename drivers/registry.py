"""The driver types lane.toml can name, and how a ``[[devices]]`` table becomes a driver.

An explicit table, not plugin discovery: a technician's ``type = "…"`` either
names one of these or is an error that lists them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from drivers.base import Driver
from drivers.config import DeviceConfig
from drivers.evdev_wedge import EvdevWedgeConfig, EvdevWedgeDriver
from drivers.ic import ICCardDriver, ICConfig
from drivers.simulated import SimulatedConfig, SimulatedDriver


@dataclass(frozen=True, slots=True)
class DriverType:
    """A driver: its configuration model and how to build one from it."""

    config: type[DeviceConfig]
    build: Callable[[Any], Driver]
    summary: str


DRIVERS: Mapping[str, DriverType] = {
    "evdev_wedge": DriverType(
        EvdevWedgeConfig, EvdevWedgeDriver, "keyboard-wedge magstripe reader or barcode/QR scanner (evdev)"
    ),
    "ic": DriverType(ICConfig, ICCardDriver, "IC member cards in a PC/SC reader, through pcscd (pyscard)"),
    "simulated": DriverType(SimulatedConfig, SimulatedDriver, "replays a script of swipes, scans and card taps"),
}


@dataclass(frozen=True, slots=True)
class DeviceProblem:
    """One problem in a ``[[devices]]`` table: the key (within the table), a code, and why."""

    key: str
    code: str
    message: str


def parse_device(table: Mapping[str, Any]) -> tuple[DeviceConfig | None, list[DeviceProblem]]:
    """Validate one ``[[devices]]`` table by its ``type``; every problem is reported."""
    kind = table.get("type")
    if not isinstance(kind, str) or kind not in DRIVERS:
        known = ", ".join(DRIVERS)
        return None, [DeviceProblem("type", "unknown_driver", f"{kind!r} is not a driver type; known: {known}")]
    try:
        return DRIVERS[kind].config.model_validate(dict(table)), []
    except ValidationError as exc:
        problems = []
        for error in exc.errors(include_url=False):
            key = ".".join(str(part) for part in error["loc"])
            problems.append(DeviceProblem(key, str(error["type"]), str(error["msg"]).removeprefix("Value error, ")))
        return None, problems


def build(config: DeviceConfig) -> Driver:
    """The driver for a validated device configuration."""
    return DRIVERS[config.type].build(config)
