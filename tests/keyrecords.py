"""Kernel ``struct input_event`` records for text typed by a keyboard-wedge device.

``records_for_text`` types a text the way a scanner configured for a keyboard
layout does (per key: ``EV_MSC/MSC_SCAN``, key down, ``SYN_REPORT``, key up,
``SYN_REPORT``; Shift or AltGr pressed around the keys that need them; a dead
key followed by a space; Enter at the end), and ``pack`` turns records into
the bytes a 64-bit kernel writes, for tests that read them from a pipe.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

from drivers.keymap import KEY_ENTER, KEY_LEFTSHIFT, KEY_RIGHTALT, KEY_SPACE
from drivers.keymap import keymap as keymap_named
from drivers.keystrokes import EV_KEY, EV_MSC, EV_SYN, KEY_PRESSED, KEY_RELEASED, MSC_SCAN, SYN_REPORT

Record = tuple[int, int, int, int, int]  # tv_sec, tv_usec, type, code, value
INPUT_EVENT = struct.Struct("llHHi")  # struct input_event on 64-bit Linux: 24 bytes
T0_US = 1_765_350_000_000_000  # 2025-12-10 07:00 UTC, in microseconds


def _at(t_us: int, type_: int, code: int, value: int) -> Record:
    sec, usec = divmod(t_us, 1_000_000)
    return (sec, usec, type_, code, value)


def key_records(code: int, value: int, t_us: int) -> list[Record]:
    """One key going down (value 1) or up (0) at ``t_us``, as a wedge device reports it."""
    # The scan code is made up (HID keyboard page + key code): the assembler ignores it.
    return [
        _at(t_us, EV_MSC, MSC_SCAN, 0x70000 + code),
        _at(t_us, EV_KEY, code, value),
        _at(t_us, EV_SYN, SYN_REPORT, 0),
    ]


def tap(code: int, t_us: int, per_key_us: int, *, modifiers: tuple[int, ...] = ()) -> list[Record]:
    """One key pressed and released within ``per_key_us``, with ``modifiers`` held around it."""
    step = max(per_key_us // 4, 1)
    out: list[Record] = []
    for mod in modifiers:
        out += key_records(mod, KEY_PRESSED, t_us)
    out += key_records(code, KEY_PRESSED, t_us + step)
    out += key_records(code, KEY_RELEASED, t_us + 2 * step)
    for mod in modifiers:
        out += key_records(mod, KEY_RELEASED, t_us + 3 * step)
    return out


def records_for_text(
    text: str,
    keymap: str = "us",
    t0: int = T0_US,
    per_key_us: int = 2_000,
    *,
    enter: bool = True,
) -> list[Record]:
    """The records a wedge device configured for ``keymap`` sends to type ``text`` (then Enter).

    ``t0`` is the first key's time in microseconds since the epoch; each key
    takes ``per_key_us``.  ValueError for a character the layout cannot type.
    """
    layout = keymap_named(keymap)
    out: list[Record] = []
    t = t0
    for char in text:
        stroke = layout.keystroke(char)
        if stroke is None:
            raise ValueError(f"keymap {keymap!r} cannot type {char!r}")
        code, shift, altgr = stroke
        modifiers = (KEY_LEFTSHIFT,) if shift else (KEY_RIGHTALT,) if altgr else ()
        out += tap(code, t, per_key_us, modifiers=modifiers)
        t += per_key_us
        if char in layout.dead and not altgr:
            # A dead key types nothing until the next key: a space makes it the accent alone.
            out += tap(KEY_SPACE, t, per_key_us)
            t += per_key_us
    if enter:
        out += tap(KEY_ENTER, t, per_key_us)
    return out


def pack(records: Iterable[Record]) -> bytes:
    """Records as the bytes of ``struct input_event`` on 64-bit Linux."""
    return b"".join(INPUT_EVENT.pack(*record) for record in records)


def unpack(data: bytes) -> list[Record]:
    """The records in bytes that ``pack`` (or a 64-bit kernel) wrote."""
    if len(data) % INPUT_EVENT.size:
        raise ValueError(f"{len(data)} bytes is not a whole number of {INPUT_EVENT.size}-byte records")
    return [(sec, usec, type_, code, value) for sec, usec, type_, code, value in INPUT_EVENT.iter_unpack(data)]
