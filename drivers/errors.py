"""The drivers' own exception: what a device library's error becomes at the drivers' boundary.

Drivers report device trouble upward as events (``DeviceChanged``,
``Unreadable``); an exception is for the few places where a caller must act
on one (opening a device by hand, a tool such as ``lane-agent devices``).
Each library's errors are translated here with ``raise ... from``, so no
pyscard or evdev exception escapes ``drivers``.
"""

from __future__ import annotations


class DriverError(Exception):
    """A device operation failed: which device, a machine-readable ``code``, and the message."""

    def __init__(self, device: str, code: str, message: str) -> None:
        super().__init__(f"{device}: {message} [{code}]")
        self.device = device
        self.code = code
        self.message = message
