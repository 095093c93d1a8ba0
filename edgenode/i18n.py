"""Translations for everything a person reads or hears, through gettext catalogs.

Messages are written in English in the code (the msgids) and translated in
``edgenode/locale/<language>/LC_MESSAGES/edgenode.po``. The catalogs are read with Babel at
run time, so there is no compiled .mo file to fall out of date. Simplified Chinese is the
default; English is the msgids themselves.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

from babel.messages.pofile import read_po

LOCALE_DIR = Path(__file__).parent / "locale"
DOMAIN = "edgenode"
DEFAULT_LANGUAGE = "zh_CN"
LANGUAGES = ("zh_CN", "en")


def N_(message: str) -> str:
    """Mark a string for extraction without translating it yet."""
    return message


class Translator:
    def __init__(self, language: str, messages: dict[str, str]) -> None:
        self.language = language
        self._messages = messages

    def gettext(self, message: str) -> str:
        return self._messages.get(message) or message


@lru_cache(maxsize=len(LANGUAGES))
def translator(language: str = DEFAULT_LANGUAGE) -> Translator:
    """Load the catalog for a language. Unknown languages fall back to the default."""
    if language not in LANGUAGES:
        language = DEFAULT_LANGUAGE
    if language == "en":
        return Translator("en", {})
    path = LOCALE_DIR / language / "LC_MESSAGES" / f"{DOMAIN}.po"
    with path.open("rb") as po_file:
        catalog = read_po(po_file, locale=language, domain=DOMAIN)
    messages = {
        str(message.id): str(message.string)
        for message in catalog
        if message.id and message.string and not message.fuzzy
    }
    return Translator(language, messages)


def language_from_env(default: str = DEFAULT_LANGUAGE) -> str:
    """Pick the language from EDGENODE_LANG, else the default. LANG is deliberately ignored:
    a gate device's shell locale is usually C or en_US, while its users read Chinese."""
    value = os.environ.get("EDGENODE_LANG", "")
    return value if value in LANGUAGES else default
