"""Keyboard layouts for keyboard-wedge scanners and magstripe readers: Linux key codes to characters.

A wedge device does not send characters, it sends key presses as a keyboard
with some layout would: the reader is configured (by scanning a setup barcode)
for the host's keyboard layout, and the host must decode the key codes with
the same layout.  A mismatch is the classic wedge failure: a French-configured
scanner presses Shift+``KEY_1`` for a ``1``, which a US decoding reads as
``!``.  The layouts here are what the reader emulates, not what an X11 or
console keymap does: there is no compose processing beyond dead keys (see
below), and the numeric keypad always gives digits, because scanners in
keypad mode assume Num Lock is on.

Key codes are the values of ``linux/input-event-codes.h``; they are written
out here rather than taken from ``evdev.ecodes`` so that the pure decoders do
not need python-evdev (a C extension) installed.

Dead keys: on the German and French layouts some accents (``^`` among them,
which track 1 uses as its field separator) are dead keys.  A reader
configured for such a layout sends the dead key followed by a space to type
the accent alone.  ``Keymap.dead`` names those characters; the assembler in
``drivers.keystrokes`` then takes "dead key + space" as the accent and
"dead key + anything else" as the accent followed by that character, so a
reader that does not send the space decodes the same.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

KEY_ESC = 1
KEY_1 = 2
KEY_2 = 3
KEY_3 = 4
KEY_4 = 5
KEY_5 = 6
KEY_6 = 7
KEY_7 = 8
KEY_8 = 9
KEY_9 = 10
KEY_0 = 11
KEY_MINUS = 12
KEY_EQUAL = 13
KEY_BACKSPACE = 14
KEY_TAB = 15
KEY_Q = 16
KEY_W = 17
KEY_E = 18
KEY_R = 19
KEY_T = 20
KEY_Y = 21
KEY_U = 22
KEY_I = 23
KEY_O = 24
KEY_P = 25
KEY_LEFTBRACE = 26
KEY_RIGHTBRACE = 27
KEY_ENTER = 28
KEY_LEFTCTRL = 29
KEY_A = 30
KEY_S = 31
KEY_D = 32
KEY_F = 33
KEY_G = 34
KEY_H = 35
KEY_J = 36
KEY_K = 37
KEY_L = 38
KEY_SEMICOLON = 39
KEY_APOSTROPHE = 40
KEY_GRAVE = 41
KEY_LEFTSHIFT = 42
KEY_BACKSLASH = 43
KEY_Z = 44
KEY_X = 45
KEY_C = 46
KEY_V = 47
KEY_B = 48
KEY_N = 49
KEY_M = 50
KEY_COMMA = 51
KEY_DOT = 52
KEY_SLASH = 53
KEY_RIGHTSHIFT = 54
KEY_KPASTERISK = 55
KEY_LEFTALT = 56
KEY_SPACE = 57
KEY_CAPSLOCK = 58
KEY_NUMLOCK = 69
KEY_KP7 = 71
KEY_KP8 = 72
KEY_KP9 = 73
KEY_KPMINUS = 74
KEY_KP4 = 75
KEY_KP5 = 76
KEY_KP6 = 77
KEY_KPPLUS = 78
KEY_KP1 = 79
KEY_KP2 = 80
KEY_KP3 = 81
KEY_KP0 = 82
KEY_102ND = 86  # the extra key left of Z on ISO (European) keyboards
KEY_KPENTER = 96
KEY_RIGHTCTRL = 97
KEY_KPSLASH = 98
KEY_RIGHTALT = 100  # AltGr on European layouts
KEY_LEFTMETA = 125
KEY_RIGHTMETA = 126

DIGIT_ROW = (KEY_1, KEY_2, KEY_3, KEY_4, KEY_5, KEY_6, KEY_7, KEY_8, KEY_9, KEY_0)
# The letter keys by their US legend: KEY_Q is the key the US layout prints Q on.
LETTER_KEYS: Mapping[str, int] = MappingProxyType(
    {
        "a": KEY_A, "b": KEY_B, "c": KEY_C, "d": KEY_D, "e": KEY_E, "f": KEY_F, "g": KEY_G,
        "h": KEY_H, "i": KEY_I, "j": KEY_J, "k": KEY_K, "l": KEY_L, "m": KEY_M, "n": KEY_N,
        "o": KEY_O, "p": KEY_P, "q": KEY_Q, "r": KEY_R, "s": KEY_S, "t": KEY_T, "u": KEY_U,
        "v": KEY_V, "w": KEY_W, "x": KEY_X, "y": KEY_Y, "z": KEY_Z,
    }
)  # fmt: skip
# The numeric keypad is the same on every layout (and scanners assume Num Lock on).
KEYPAD: Mapping[int, str] = MappingProxyType(
    {
        KEY_KP0: "0", KEY_KP1: "1", KEY_KP2: "2", KEY_KP3: "3", KEY_KP4: "4",
        KEY_KP5: "5", KEY_KP6: "6", KEY_KP7: "7", KEY_KP8: "8", KEY_KP9: "9",
        KEY_KPASTERISK: "*", KEY_KPMINUS: "-", KEY_KPPLUS: "+", KEY_KPSLASH: "/",
    }
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Keymap:
    """One keyboard layout: which character each key gives, plain, with Shift, and with AltGr.

    Compared and hashed by ``name`` only.  Build custom layouts with
    ``Keymap.build`` (it copies the tables, so the keymap cannot change
    after construction).
    """

    name: str
    plain: Mapping[int, str] = field(compare=False, repr=False)
    shifted: Mapping[int, str] = field(compare=False, repr=False)
    altgr: Mapping[int, str] = field(compare=False, repr=False)
    # Keys whose Shift level Caps Lock inverts: the letters, on these layouts.
    caps_keys: frozenset[int] = field(compare=False, repr=False)
    # Characters that dead keys type at the plain and Shift levels (AltGr has none here).
    dead: frozenset[str] = field(compare=False, repr=False)
    _reverse: Mapping[str, tuple[int, bool, bool]] = field(compare=False, repr=False)

    @classmethod
    def build(
        cls,
        name: str,
        plain: Mapping[int, str],
        shifted: Mapping[int, str],
        *,
        altgr: Mapping[int, str] | None = None,
        caps_keys: frozenset[int] | None = None,
        dead: frozenset[str] = frozenset(),
    ) -> Keymap:
        """A keymap from its tables; ``caps_keys`` defaults to the keys whose plain character is a letter."""
        plain_t = dict(plain)
        shifted_t = dict(shifted)
        altgr_t = dict(altgr or {})
        for table in (plain_t, shifted_t, altgr_t):
            for code, char in table.items():
                if not isinstance(code, int) or not 0 <= code < 0x300 or len(char) != 1:
                    raise ValueError(f"keymap {name!r}: key {code!r} must map to exactly one character")
        if caps_keys is None:
            caps_keys = frozenset(code for code, char in plain_t.items() if char.isalpha())
        reverse: dict[str, tuple[int, bool, bool]] = {}
        # Main keys before the keypad, then plain before Shift before AltGr: a character
        # reachable several ways is typed the way a reader configured for this layout types it.
        levels = ((plain_t, False, False), (shifted_t, True, False), (altgr_t, False, True))
        for keypad in (False, True):
            for table, shift, alt in levels:
                for code, char in sorted(table.items()):
                    if (code in KEYPAD) == keypad:
                        reverse.setdefault(char, (code, shift, alt))
        return cls(
            name=name,
            plain=MappingProxyType(plain_t),
            shifted=MappingProxyType(shifted_t),
            altgr=MappingProxyType(altgr_t),
            caps_keys=frozenset(caps_keys),
            dead=frozenset(dead),
            _reverse=MappingProxyType(reverse),
        )

    def char(self, code: int, shifted: bool, *, caps_lock: bool = False, altgr: bool = False) -> str | None:
        """The character key ``code`` types, or None if it types none on this layout."""
        if altgr:
            return self.altgr.get(code)
        if caps_lock and code in self.caps_keys:
            shifted = not shifted
        return (self.shifted if shifted else self.plain).get(code)

    def keystroke(self, char: str) -> tuple[int, bool, bool] | None:
        """How to type ``char`` on this layout: (key code, with Shift, with AltGr), or None if it can't be typed."""
        return self._reverse.get(char)


def _rows(keys: tuple[int, ...], chars: str) -> dict[int, str]:
    if len(keys) != len(chars):
        raise ValueError("a keymap row needs one character per key")
    return dict(zip(keys, chars, strict=True))


def _letters(layout: str) -> dict[int, str]:
    """Letter keys from a 26-character string giving, for each US letter a..z in turn, this layout's letter."""
    return {LETTER_KEYS[us]: local for us, local in zip("abcdefghijklmnopqrstuvwxyz", layout, strict=True)}


_US_PUNCT = (
    KEY_GRAVE,
    KEY_MINUS,
    KEY_EQUAL,
    KEY_LEFTBRACE,
    KEY_RIGHTBRACE,
    KEY_SEMICOLON,
    KEY_APOSTROPHE,
    KEY_BACKSLASH,
    KEY_COMMA,
    KEY_DOT,
    KEY_SLASH,
)
_COMMON = {**KEYPAD, KEY_SPACE: " ", KEY_TAB: "\t"}

US = Keymap.build(
    "us",
    plain={
        **_COMMON,
        **_rows(DIGIT_ROW, "1234567890"),
        **_letters("abcdefghijklmnopqrstuvwxyz"),
        **_rows(_US_PUNCT, "`-=[];'\\,./"),
    },
    shifted={
        **_COMMON,
        **_rows(DIGIT_ROW, "!@#$%^&*()"),
        **_letters("ABCDEFGHIJKLMNOPQRSTUVWXYZ"),
        **_rows(_US_PUNCT, '~_+{}:"|<>?'),
    },
)

# German QWERTZ (DIN 2137 T1): Y and Z swapped, umlauts where US has punctuation.
_DE_PUNCT = (*_US_PUNCT, KEY_102ND)
DE = Keymap.build(
    "de",
    plain={
        **_COMMON,
        **_rows(DIGIT_ROW, "1234567890"),
        **_letters("abcdefghijklmnopqrstuvwxzy"),
        **_rows(_DE_PUNCT, "^ß´ü+öä#,.-<"),
    },
    shifted={
        **_COMMON,
        **_rows(DIGIT_ROW, '!"§$%&/()='),
        **_letters("ABCDEFGHIJKLMNOPQRSTUVWXZY"),
        **_rows(_DE_PUNCT, "°?`Ü*ÖÄ';:_>"),
    },
    altgr={
        KEY_Q: "@",
        KEY_E: "€",
        KEY_M: "µ",
        KEY_2: "²",
        KEY_3: "³",
        KEY_7: "{",
        KEY_8: "[",
        KEY_9: "]",
        KEY_0: "}",
        KEY_MINUS: "\\",
        KEY_RIGHTBRACE: "~",
        KEY_102ND: "|",
    },
    # Caps Lock shifts the letters and umlauts, not ß (whose Shift level is '?').
    caps_keys=frozenset({*LETTER_KEYS.values(), KEY_LEFTBRACE, KEY_SEMICOLON, KEY_APOSTROPHE}),
    dead=frozenset("^´`"),
)

# French AZERTY: A/Q and Z/W swapped, M where US has ';', and the digits need Shift.
_FR_PUNCT = (
    KEY_GRAVE,
    KEY_MINUS,
    KEY_EQUAL,
    KEY_LEFTBRACE,
    KEY_RIGHTBRACE,
    KEY_SEMICOLON,
    KEY_APOSTROPHE,
    KEY_BACKSLASH,
    KEY_M,
    KEY_COMMA,
    KEY_DOT,
    KEY_SLASH,
    KEY_102ND,
)
_FR_LETTERS = {k: v for k, v in _letters("qbcdefghijkl,noparstuvzxyw").items() if k != KEY_M}
FR = Keymap.build(
    "fr",
    plain={
        **_COMMON,
        **_rows(DIGIT_ROW, "&é\"'(-è_çà"),
        **_FR_LETTERS,
        **_rows(_FR_PUNCT, "²)=^$mù*,;:!<"),
    },
    shifted={
        **_COMMON,
        **_rows(DIGIT_ROW, "1234567890"),
        **{k: v.upper() for k, v in _FR_LETTERS.items()},
        # KEY_GRAVE (²) has no shifted character on the French layout.
        **_rows(_FR_PUNCT[1:], "°+¨£M%µ?./§>"),
    },
    altgr={
        KEY_2: "~",
        KEY_3: "#",
        KEY_4: "{",
        KEY_5: "[",
        KEY_6: "|",
        KEY_7: "`",
        KEY_8: "\\",
        KEY_9: "^",
        KEY_0: "@",
        KEY_MINUS: "]",
        KEY_EQUAL: "}",
        KEY_E: "€",
    },
    # Caps Lock on AZERTY shifts the letters, m included, but not the digit row.
    caps_keys=frozenset({*_FR_LETTERS, KEY_SEMICOLON}),
    dead=frozenset("^¨"),
)

KEYMAPS: Mapping[str, Keymap] = MappingProxyType({km.name: km for km in (US, DE, FR)})


def keymap(name: str) -> Keymap:
    """The keymap called ``name`` ("us", "de", "fr"); ValueError naming the known ones otherwise."""
    try:
        return KEYMAPS[name]
    except KeyError:
        known = ", ".join(sorted(KEYMAPS))
        raise ValueError(f"unknown keymap {name!r}: known keymaps are {known}") from None
