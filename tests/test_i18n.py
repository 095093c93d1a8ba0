"""Every message a person reads has a Simplified Chinese translation; English is available."""

from __future__ import annotations

from pathlib import Path

import pytest
from babel.messages.extract import extract_from_dir

from edgenode.i18n import translator
from edgenode.messages import OUTCOME_WORDS, REASON_TEXTS, describe
from edgenode.policy import Outcome, Verdict
from edgenode.reasons import Reason

ROOT = Path(__file__).resolve().parent.parent
# Every package whose text a person may read: the CLI, the district tools, the drivers.
PACKAGES = [ROOT / "edgenode", ROOT / "sync", ROOT / "drivers"]


def extracted_messages() -> list[str]:
    keywords = {"gettext": None, "N_": None, "_": None}
    return sorted(
        {
            message
            for package in PACKAGES
            for _, _, message, _, _ in extract_from_dir(str(package), keywords=keywords)
            if isinstance(message, str)
        }
    )


def test_messages_are_found_in_the_code() -> None:
    assert len(extracted_messages()) > 50


@pytest.mark.parametrize("message", extracted_messages())
def test_message_has_chinese_translation(message: str) -> None:
    translated = translator("zh_CN").gettext(message)
    assert translated != message


def test_every_reason_has_a_message() -> None:
    assert set(REASON_TEXTS) == set(Reason)


def test_every_outcome_has_a_word() -> None:
    assert set(OUTCOME_WORDS) == set(Outcome)


def test_chinese_is_the_default() -> None:
    verdict = Verdict(outcome=Outcome.DENY, reasons=(Reason.HEALTH_RED,))
    assert describe(verdict, translator()) == "禁止通行: 健康码红码"


def test_english_is_available() -> None:
    verdict = Verdict(outcome=Outcome.DENY, reasons=(Reason.HEALTH_RED,))
    assert describe(verdict, translator("en")) == "Do not admit: Health status red"


def test_unknown_language_falls_back_to_chinese() -> None:
    assert translator("fr").language == "zh_CN"


def test_translations_keep_placeholders() -> None:
    import re

    chinese = translator("zh_CN")
    for message in extracted_messages():
        expected = sorted(re.findall(r"\{[^}]*\}", message))
        assert sorted(re.findall(r"\{[^}]*\}", chinese.gettext(message))) == expected, message
