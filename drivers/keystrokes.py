"""Kernel key events from a keyboard-wedge device, assembled into reads: a pure state machine.

``KeystrokeAssembler`` consumes ``struct input_event`` records one at a time
(as ``(sec, usec, type, code, value)``) and returns the reads they complete.
It does no I/O and keeps no clock of its own: the I/O shell feeds it what the
device sent and calls ``flush`` on a timer, with a time from the same clock
as the events' timestamps.

A read ends

* when Enter (or keypad Enter) goes down: ``ended_by="enter"``, the normal
  end for a scanner or reader configured with an Enter suffix;
* when the next key goes down more than ``gap_ms`` after the previous one, or
  ``flush`` finds the last key older than that: ``ended_by="gap"``, for
  devices without a suffix.  A gap-ended read may be a read cut short by a
  stall, so a device that is configured to send Enter should treat one as
  unreadable rather than decode it;
* when it grows past ``max_chars`` keys: ``ended_by="overflow"`` with what
  came so far, and the rest of the read (up to the next Enter or gap) is
  dropped, so a stuck device cannot grow memory without bound;
* when the kernel reports lost events (``SYN_DROPPED``): ``ended_by="dropped"``
  with an empty text, and the rest of the read is dropped as well, because a
  read with keys missing could spell somebody else's number.

Only ``Keyed.decodable`` reads (ended by Enter or a gap, ``unmapped == 0``)
are fit to decode.  ``unmapped`` counts keys that typed nothing on the keymap (or were
pressed with Ctrl, Alt or a Windows key held): the usual sign that the device
is configured for another keyboard layout than the lane's.

Autorepeat events (value 2) are ignored: scanners do not autorepeat, and a
stuck key must not flood a read.  Timestamps that go backwards (the realtime
clock stepped back) end the read in progress as a gap: a read cut in two
only ever makes two unreadable reads, while gluing two reads together across
a clock step could not be undone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from drivers.base import mask
from drivers.keymap import (
    KEY_CAPSLOCK,
    KEY_ENTER,
    KEY_KPENTER,
    KEY_LEFTALT,
    KEY_LEFTCTRL,
    KEY_LEFTMETA,
    KEY_LEFTSHIFT,
    KEY_NUMLOCK,
    KEY_RIGHTALT,
    KEY_RIGHTCTRL,
    KEY_RIGHTMETA,
    KEY_RIGHTSHIFT,
    Keymap,
)

EV_SYN = 0
EV_KEY = 1
EV_MSC = 4
SYN_REPORT = 0
SYN_DROPPED = 3
MSC_SCAN = 4
KEY_RELEASED = 0
KEY_PRESSED = 1
KEY_REPEATED = 2

EndedBy = Literal["enter", "gap", "overflow", "dropped"]

# Held, these make the next keys mean something other than their character
# (Ctrl+J, Alt+keypad codes), so those keys count as unmapped.
_CHORD_MODIFIERS = frozenset({KEY_LEFTCTRL, KEY_RIGHTCTRL, KEY_LEFTALT, KEY_LEFTMETA, KEY_RIGHTMETA})
_ENTER_KEYS = frozenset({KEY_ENTER, KEY_KPENTER})


@dataclass(frozen=True, slots=True)
class Keyed:
    """One completed read: the text typed, why it ended, and how many keys typed nothing."""

    text: str = field(repr=False)
    ended_by: EndedBy
    unmapped: int
    started_us: int  # the first key's timestamp, in microseconds since the epoch of the events' clock
    ended_us: int  # the Enter, the last key before a gap, or the key that overflowed or was cut off

    @property
    def decodable(self) -> bool:
        """Whether the read is whole: ended by Enter or a gap, and every key typed a character."""
        return self.ended_by in ("enter", "gap") and self.unmapped == 0

    def __repr__(self) -> str:
        return (
            f"Keyed(text={mask(self.text)!r}, ended_by={self.ended_by!r}, unmapped={self.unmapped}, "
            f"started_us={self.started_us}, ended_us={self.ended_us})"
        )


class KeystrokeAssembler:
    """Kernel input events in, completed reads out (see the module docstring)."""

    def __init__(self, keymap: Keymap, *, gap_ms: int = 50, max_chars: int = 512) -> None:
        if gap_ms < 1:
            raise ValueError(f"gap_ms must be at least 1, not {gap_ms}")
        if max_chars < 1:
            raise ValueError(f"max_chars must be at least 1, not {max_chars}")
        self.keymap = keymap
        self._gap_us = gap_ms * 1000
        self._max_keys = max_chars
        self.reset()

    def reset(self) -> None:
        """Forget everything, as on a freshly opened device (after a reconnect, say)."""
        self._left_shift = False
        self._right_shift = False
        self._caps_lock = False
        self._altgr = False
        self._chords: set[int] = set()
        self._last_down: int | None = None
        self._ignore_until_report = False
        self._start_read()

    def _start_read(self) -> None:
        self._chars: list[str] = []
        self._unmapped = 0
        self._keys = 0
        self._started = 0
        self._dead: str | None = None
        # Set after an overflow or lost events: the rest of this read is dropped.
        self._discarding = False

    @property
    def pending(self) -> bool:
        """Whether a read (or the dropped rest of one) is in progress, which ``flush`` may end."""
        return self._last_down is not None and (self._keys > 0 or self._discarding)

    def feed(self, sec: int, usec: int, type_: int, code: int, value: int) -> list[Keyed]:
        """Consume one input_event record; the reads it completed, usually none."""
        if self._ignore_until_report:
            # After SYN_DROPPED the kernel's contract: ignore everything up to the next SYN_REPORT.
            self._ignore_until_report = not (type_ == EV_SYN and code == SYN_REPORT)
            return []
        now = sec * 1_000_000 + usec
        if type_ == EV_SYN and code == SYN_DROPPED:
            return self._lost_events(now)
        if type_ != EV_KEY:
            return []
        if value == KEY_RELEASED:
            self._release(code)
        elif value == KEY_PRESSED:
            return self._press(now, code)
        # Anything else is autorepeat, or a value no kernel sends.
        return []

    def _press(self, now: int, code: int) -> list[Keyed]:
        out: list[Keyed] = []
        last, self._last_down = self._last_down, now
        if last is not None and (now - last > self._gap_us or now < last):
            out += self._end("gap", last)
        if self._press_modifier(code) or (self._discarding and code not in _ENTER_KEYS):
            return out
        if code in _ENTER_KEYS:
            out += self._end("enter", now)
        elif self._keys >= self._max_keys:
            out += self._end("overflow", now)
            self._discarding = True
        else:
            if self._keys == 0:
                self._started = now
            self._keys += 1
            self._type(code)
        return out

    def flush(self, now_sec: int, now_usec: int) -> list[Keyed]:
        """The pending read, if its last key is more than ``gap_ms`` old at this time.

        ``now`` must come from the events' clock.  A ``now`` before the last key
        ends nothing: if the shell's clock is not the events' clock, waiting for
        the next key is safe, while ending reads on every tick would cut them.
        """
        now = now_sec * 1_000_000 + now_usec
        if self._last_down is None or now - self._last_down <= self._gap_us:
            return []
        return self._end("gap", self._last_down)

    def _release(self, code: int) -> None:
        if code == KEY_LEFTSHIFT:
            self._left_shift = False
        elif code == KEY_RIGHTSHIFT:
            self._right_shift = False
        elif code == KEY_RIGHTALT:
            self._altgr = False
        else:
            self._chords.discard(code)

    def _press_modifier(self, code: int) -> bool:
        if code == KEY_LEFTSHIFT:
            self._left_shift = True
        elif code == KEY_RIGHTSHIFT:
            self._right_shift = True
        elif code == KEY_CAPSLOCK:
            self._caps_lock = not self._caps_lock
        elif code == KEY_RIGHTALT:
            self._altgr = True
        elif code in _CHORD_MODIFIERS:
            self._chords.add(code)
        elif code != KEY_NUMLOCK:
            return False
        return True

    def _type(self, code: int) -> None:
        char: str | None = None
        if not self._chords:
            shifted = self._left_shift or self._right_shift
            char = self.keymap.char(code, shifted, caps_lock=self._caps_lock, altgr=self._altgr)
        if self._dead is not None:
            dead, self._dead = self._dead, None
            self._chars.append(dead)
            if char == " ":
                return  # dead key + space: the accent alone
        if char is None:
            self._unmapped += 1
        elif char in self.keymap.dead and not self._altgr:
            self._dead = char
        else:
            self._chars.append(char)

    def _lost_events(self, now: int) -> list[Keyed]:
        self._ignore_until_report = True
        # The key-ups we lost may have been the modifiers': start from none held.
        self._left_shift = self._right_shift = self._altgr = False
        self._chords.clear()
        # The text is left out: a read with keys missing is no use to anyone, and a
        # consumer that forgot to check ended_by must not decode a shortened number.
        cut = Keyed(
            text="",
            ended_by="dropped",
            unmapped=self._unmapped,
            started_us=self._started if self._keys else now,
            ended_us=now,
        )
        self._start_read()
        # Whatever comes before the next Enter or gap is the tail of a read we lost the start of.
        self._discarding = True
        self._last_down = now
        return [cut]

    def _end(self, ended_by: EndedBy, at: int) -> list[Keyed]:
        if self._discarding or self._keys == 0:
            self._start_read()
            return []
        if self._dead is not None:
            self._chars.append(self._dead)
        read = Keyed(
            text="".join(self._chars),
            ended_by=ended_by,
            unmapped=self._unmapped,
            started_us=self._started,
            ended_us=at,
        )
        self._start_read()
        return [read]
