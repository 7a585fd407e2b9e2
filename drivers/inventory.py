"""What a technician needs to see of the lane PC's hardware: input devices and PC/SC readers.

Read-only and quick: used by ``lane-agent devices``.  Every failure (no
``/dev/input``, no permission, pcscd not running) is reported as a note to
act on, never as a traceback.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

BY_ID = Path("/dev/input/by-id")
BY_PATH = Path("/dev/input/by-path")
_LETTER_KEYS = range(16, 26)  # KEY_Q … KEY_P: a device that has them can type text


@dataclass(frozen=True, slots=True)
class InputInfo:
    """One evdev input device."""

    path: str
    name: str
    vendor_product: str
    phys: str
    stable_paths: tuple[str, ...]
    keyboard: bool


@dataclass(frozen=True, slots=True)
class ReaderInfo:
    """One PC/SC reader and whether a card is in it."""

    name: str
    card_present: bool
    atr: str = ""


@dataclass
class Inventory:
    """Everything found, with notes on what could not be looked at and why."""

    inputs: list[InputInfo] = field(default_factory=list)
    readers: list[ReaderInfo] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _stable_links() -> dict[str, list[str]]:
    links: dict[str, list[str]] = {}
    for folder in (BY_ID, BY_PATH):
        if not folder.is_dir():
            continue
        for link in sorted(folder.iterdir()):
            links.setdefault(os.path.realpath(link), []).append(str(link))
    return links


def input_devices(inventory: Inventory) -> None:
    """Add the evdev input devices this user can open."""
    if not Path("/dev/input").is_dir():
        inventory.notes.append("no /dev/input on this machine: no USB keyboard-wedge reader can be seen here")
        return
    try:
        import evdev  # noqa: PLC0415 - only this command needs the C extension
    except ImportError as exc:  # pragma: no cover - a dependency of the project
        inventory.notes.append(f"python-evdev is not installed: {exc}")
        return
    links = _stable_links()
    denied = 0
    for path in evdev.list_devices():
        try:
            device = evdev.InputDevice(path)
        except PermissionError:
            denied += 1
            continue
        except OSError as exc:  # unplugged between the listing and the open, or a driver error
            inventory.notes.append(f"{path}: cannot open: {exc.strerror or exc}")
            continue
        try:
            keys = device.capabilities().get(evdev.ecodes.EV_KEY, [])
            inventory.inputs.append(
                InputInfo(
                    path=os.fsdecode(device.path),
                    name=device.name,
                    vendor_product=f"{device.info.vendor:04x}:{device.info.product:04x}",
                    phys=device.phys or "",
                    stable_paths=tuple(links.get(os.fsdecode(device.path), ())),
                    keyboard=all(code in keys for code in _LETTER_KEYS),
                )
            )
        finally:
            device.close()
    if denied:
        inventory.notes.append(f"{denied} input device(s) not readable: run as root or add the user to group 'input'")


def pcsc_readers(inventory: Inventory) -> None:
    """Add the PC/SC readers and their cards (needs pcscd)."""
    try:
        from smartcard.scard import (  # type: ignore[import-untyped]  # noqa: PLC0415
            SCARD_S_SUCCESS,
            SCARD_SCOPE_USER,
            SCARD_STATE_PRESENT,
            SCARD_STATE_UNAWARE,
            SCardEstablishContext,
            SCardGetErrorMessage,
            SCardGetStatusChange,
            SCardListReaders,
            SCardReleaseContext,
        )
    except ImportError as exc:  # pragma: no cover - a dependency of the project
        inventory.notes.append(f"pyscard is not installed: {exc}")
        return
    code, context = SCardEstablishContext(SCARD_SCOPE_USER)
    if code != SCARD_S_SUCCESS:
        inventory.notes.append(f"PC/SC unavailable ({SCardGetErrorMessage(code).strip()}): is pcscd running?")
        return
    try:
        code, names = SCardListReaders(context, [])
        if code != SCARD_S_SUCCESS:
            inventory.notes.append(f"no PC/SC readers ({SCardGetErrorMessage(code).strip()})")
            return
        code, states = SCardGetStatusChange(context, 0, [(name, SCARD_STATE_UNAWARE) for name in names])
        if code != SCARD_S_SUCCESS:
            states = [(name, 0, []) for name in names]
        for name, state, atr in states:
            present = bool(state & SCARD_STATE_PRESENT)
            inventory.readers.append(ReaderInfo(name, present, bytes(atr).hex(" ").upper() if present else ""))
    finally:
        SCardReleaseContext(context)


def take_inventory() -> Inventory:
    """Input devices and PC/SC readers, with notes."""
    inventory = Inventory()
    input_devices(inventory)
    pcsc_readers(inventory)
    return inventory
