"""Tables from evdev key codes to the characters a keyboard-wedge scanner types.

A keyboard-wedge scanner types each character with the key that its configured keyboard
layout uses for that character, and the kernel reports the key's position as an evdev key
code. edgenode expects scanners set to the US layout and reads key codes with the ``US`` table.
``GERMAN`` (QWERTZ) and ``FRENCH`` (AZERTY) are the US table with the keys that differ
replaced. They exist to recognise a scanner set to one of those layouts, and are not complete
keyboard maps: AltGr characters and dead-key compositions are missing.

Caps Lock, Num Lock, Ctrl, Alt and Meta are in ``IGNORED_KEYS``: scanners do not use them to
type the payloads edgenode reads, so they neither type nor change the Shift state.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from evdev import ecodes as e

SHIFT_KEYS = frozenset({e.KEY_LEFTSHIFT, e.KEY_RIGHTSHIFT})

# Keys that end a code: scanners send Enter by default and Tab when set up for form fields.
SUFFIX_KEYS = frozenset({e.KEY_ENTER, e.KEY_KPENTER, e.KEY_TAB})

IGNORED_KEYS = frozenset(
    {
        e.KEY_CAPSLOCK,
        e.KEY_NUMLOCK,
        e.KEY_LEFTCTRL,
        e.KEY_RIGHTCTRL,
        e.KEY_LEFTALT,
        e.KEY_RIGHTALT,
        e.KEY_LEFTMETA,
        e.KEY_RIGHTMETA,
    }
)

_LETTER_KEYS = {
    e.KEY_A: "a",
    e.KEY_B: "b",
    e.KEY_C: "c",
    e.KEY_D: "d",
    e.KEY_E: "e",
    e.KEY_F: "f",
    e.KEY_G: "g",
    e.KEY_H: "h",
    e.KEY_I: "i",
    e.KEY_J: "j",
    e.KEY_K: "k",
    e.KEY_L: "l",
    e.KEY_M: "m",
    e.KEY_N: "n",
    e.KEY_O: "o",
    e.KEY_P: "p",
    e.KEY_Q: "q",
    e.KEY_R: "r",
    e.KEY_S: "s",
    e.KEY_T: "t",
    e.KEY_U: "u",
    e.KEY_V: "v",
    e.KEY_W: "w",
    e.KEY_X: "x",
    e.KEY_Y: "y",
    e.KEY_Z: "z",
}

# Numpad keys type the same character with or without Shift, as with Num Lock on. Num Lock
# state is not tracked, because scanners that use the numpad send digits with Num Lock on.
_NUMPAD_KEYS = {
    e.KEY_KP0: "0",
    e.KEY_KP1: "1",
    e.KEY_KP2: "2",
    e.KEY_KP3: "3",
    e.KEY_KP4: "4",
    e.KEY_KP5: "5",
    e.KEY_KP6: "6",
    e.KEY_KP7: "7",
    e.KEY_KP8: "8",
    e.KEY_KP9: "9",
    e.KEY_KPDOT: ".",
    e.KEY_KPSLASH: "/",
    e.KEY_KPASTERISK: "*",
    e.KEY_KPMINUS: "-",
    e.KEY_KPPLUS: "+",
}

_US_UNSHIFTED = {
    **_LETTER_KEYS,
    e.KEY_1: "1",
    e.KEY_2: "2",
    e.KEY_3: "3",
    e.KEY_4: "4",
    e.KEY_5: "5",
    e.KEY_6: "6",
    e.KEY_7: "7",
    e.KEY_8: "8",
    e.KEY_9: "9",
    e.KEY_0: "0",
    e.KEY_MINUS: "-",
    e.KEY_EQUAL: "=",
    e.KEY_LEFTBRACE: "[",
    e.KEY_RIGHTBRACE: "]",
    e.KEY_BACKSLASH: "\\",
    e.KEY_SEMICOLON: ";",
    e.KEY_APOSTROPHE: "'",
    e.KEY_GRAVE: "`",
    e.KEY_COMMA: ",",
    e.KEY_DOT: ".",
    e.KEY_SLASH: "/",
    e.KEY_SPACE: " ",
    **_NUMPAD_KEYS,
}

_US_SHIFTED = {
    **{code: char.upper() for code, char in _LETTER_KEYS.items()},
    e.KEY_1: "!",
    e.KEY_2: "@",
    e.KEY_3: "#",
    e.KEY_4: "$",
    e.KEY_5: "%",
    e.KEY_6: "^",
    e.KEY_7: "&",
    e.KEY_8: "*",
    e.KEY_9: "(",
    e.KEY_0: ")",
    e.KEY_MINUS: "_",
    e.KEY_EQUAL: "+",
    e.KEY_LEFTBRACE: "{",
    e.KEY_RIGHTBRACE: "}",
    e.KEY_BACKSLASH: "|",
    e.KEY_SEMICOLON: ":",
    e.KEY_APOSTROPHE: '"',
    e.KEY_GRAVE: "~",
    e.KEY_COMMA: "<",
    e.KEY_DOT: ">",
    e.KEY_SLASH: "?",
    e.KEY_SPACE: " ",
    **_NUMPAD_KEYS,
}

# German QWERTZ keys that differ from US. Dead keys (^, ´, `) are listed with the character
# they type when followed by a space. KEY_102ND is the extra key left of Y on ISO keyboards.
_GERMAN_UNSHIFTED = {
    e.KEY_Y: "z",
    e.KEY_Z: "y",
    e.KEY_MINUS: "ß",
    e.KEY_EQUAL: "´",
    e.KEY_LEFTBRACE: "ü",
    e.KEY_RIGHTBRACE: "+",
    e.KEY_SEMICOLON: "ö",
    e.KEY_APOSTROPHE: "ä",
    e.KEY_GRAVE: "^",
    e.KEY_BACKSLASH: "#",
    e.KEY_SLASH: "-",
    e.KEY_102ND: "<",
    e.KEY_KPDOT: ",",
}

_GERMAN_SHIFTED = {
    e.KEY_Y: "Z",
    e.KEY_Z: "Y",
    e.KEY_2: '"',
    e.KEY_3: "§",
    e.KEY_6: "&",
    e.KEY_7: "/",
    e.KEY_8: "(",
    e.KEY_9: ")",
    e.KEY_0: "=",
    e.KEY_MINUS: "?",
    e.KEY_EQUAL: "`",
    e.KEY_LEFTBRACE: "Ü",
    e.KEY_RIGHTBRACE: "*",
    e.KEY_SEMICOLON: "Ö",
    e.KEY_APOSTROPHE: "Ä",
    e.KEY_GRAVE: "°",
    e.KEY_BACKSLASH: "'",
    e.KEY_COMMA: ";",
    e.KEY_DOT: ":",
    e.KEY_SLASH: "_",
    e.KEY_102ND: ">",
    e.KEY_KPDOT: ",",
}

# French AZERTY keys that differ from US. The digit row types symbols and needs Shift for
# digits. A, Q, Z, W and M sit on other keys.
_FRENCH_UNSHIFTED = {
    e.KEY_GRAVE: "²",
    e.KEY_1: "&",
    e.KEY_2: "é",
    e.KEY_3: '"',
    e.KEY_4: "'",
    e.KEY_5: "(",
    e.KEY_6: "-",
    e.KEY_7: "è",
    e.KEY_8: "_",
    e.KEY_9: "ç",
    e.KEY_0: "à",
    e.KEY_MINUS: ")",
    e.KEY_EQUAL: "=",
    e.KEY_Q: "a",
    e.KEY_W: "z",
    e.KEY_LEFTBRACE: "^",
    e.KEY_RIGHTBRACE: "$",
    e.KEY_A: "q",
    e.KEY_SEMICOLON: "m",
    e.KEY_APOSTROPHE: "ù",
    e.KEY_BACKSLASH: "*",
    e.KEY_102ND: "<",
    e.KEY_Z: "w",
    e.KEY_M: ",",
    e.KEY_COMMA: ";",
    e.KEY_DOT: ":",
    e.KEY_SLASH: "!",
}

_FRENCH_SHIFTED = {
    e.KEY_1: "1",
    e.KEY_2: "2",
    e.KEY_3: "3",
    e.KEY_4: "4",
    e.KEY_5: "5",
    e.KEY_6: "6",
    e.KEY_7: "7",
    e.KEY_8: "8",
    e.KEY_9: "9",
    e.KEY_0: "0",
    e.KEY_MINUS: "°",
    e.KEY_EQUAL: "+",
    e.KEY_Q: "A",
    e.KEY_W: "Z",
    e.KEY_LEFTBRACE: "¨",
    e.KEY_RIGHTBRACE: "£",
    e.KEY_A: "Q",
    e.KEY_SEMICOLON: "M",
    e.KEY_APOSTROPHE: "%",
    e.KEY_BACKSLASH: "µ",
    e.KEY_102ND: ">",
    e.KEY_Z: "W",
    e.KEY_M: "?",
    e.KEY_COMMA: ".",
    e.KEY_DOT: "/",
    e.KEY_SLASH: "§",
}


@dataclass(frozen=True, slots=True)
class Layout:
    """A keyboard layout: the character each key code types, without and with Shift."""

    name: str
    unshifted: Mapping[int, str]
    shifted: Mapping[int, str]

    def character(self, code: int, *, shift: bool) -> str | None:
        """Return the character that ``code`` types, or None for a key this table lacks."""
        table = self.shifted if shift else self.unshifted
        return table.get(code)


def _derive(name: str, unshifted: dict[int, str], shifted: dict[int, str]) -> Layout:
    """Build a layout from the US tables with the keys that differ replaced."""
    return Layout(
        name,
        MappingProxyType({**_US_UNSHIFTED, **unshifted}),
        MappingProxyType({**_US_SHIFTED, **shifted}),
    )


US = Layout("US", MappingProxyType(_US_UNSHIFTED), MappingProxyType(_US_SHIFTED))
GERMAN = _derive("German", _GERMAN_UNSHIFTED, _GERMAN_SHIFTED)
FRENCH = _derive("French", _FRENCH_UNSHIFTED, _FRENCH_SHIFTED)

# Non-US layouts that scanners are commonly set to, in the order they are tried when a US
# reading is not a recognised payload.
OTHER_LAYOUTS = (GERMAN, FRENCH)
