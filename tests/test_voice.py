"""Voice prompts: the shipped files, the choice of prompt, and playback off the pipeline thread.

Playback runs the real aplay against ALSA's null device, and a missing card for the failure
case. Tests about which prompt plays when use a stand-in player script that logs what it was
asked to play, because the tests cannot listen to the audio.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import structlog

from drivers.voice import (
    PROMPT_LANGUAGES,
    PROMPT_TEXTS,
    PROMPTS_DIR,
    SAMPLE_RATE_HZ,
    Prompt,
    VoiceError,
    VoicePrompter,
    count_syllables,
    prompt_for,
    prompt_path,
    read_prompt,
)
from edgenode.config import ConfigError, VoiceConfig, parse_config
from edgenode.i18n import translator
from edgenode.journal import Journal
from edgenode.policy import Outcome, Verdict
from edgenode.reasons import Reason
from tests.test_gpio import verdict_event

TIMEOUT_S = 10
HAN = re.compile(r"[\u4e00-\u9fff]")
PROMPT_FILES = [(language, prompt) for language in PROMPT_LANGUAGES for prompt in Prompt]
FILE_IDS = [f"{language}-{prompt.value}" for language, prompt in PROMPT_FILES]

# A stand-in for aplay: logs "start NAME", sleeps, logs "end NAME". NAME is the WAV's stem.
PLAYER_SCRIPT = """
import pathlib, shutil, sys, time
log, seconds, copy_dir, wav = sys.argv[1], float(sys.argv[2]), sys.argv[3], sys.argv[-1]
name = pathlib.Path(wav).stem
if copy_dir:
    shutil.copy(wav, copy_dir)
with open(log, "a") as f:
    f.write(f"start {name}\\n")
time.sleep(seconds)
with open(log, "a") as f:
    f.write(f"end {name}\\n")
"""


def wait_for(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def spoken_text(language: str, prompt: Prompt) -> str:
    return translator(language).gettext(PROMPT_TEXTS[prompt])


class FakePlayer:
    def __init__(self, folder: Path, seconds: float = 30.0) -> None:
        self.script = folder / "player.py"
        self.script.write_text(PLAYER_SCRIPT)
        self.log = folder / "player.log"
        self.copies = folder / "copies"
        self.copies.mkdir()
        self.command = (sys.executable, str(self.script), str(self.log), str(seconds))
        self.command += (str(self.copies),)

    def lines(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []


@pytest.fixture
def fake_player(tmp_path: Path) -> FakePlayer:
    return FakePlayer(tmp_path)


@pytest.fixture
def make_prompter() -> Iterator[Callable[..., VoicePrompter]]:
    started: list[VoicePrompter] = []

    def make(
        player: tuple[str, ...] = ("aplay", "-q"), language: str = "zh_CN", **config: object
    ) -> VoicePrompter:
        prompter = VoicePrompter(VoiceConfig(**config), language, player=player)  # type: ignore[arg-type]
        prompter.start()
        started.append(prompter)
        return prompter

    yield make
    for prompter in started:
        prompter.close()


# --- the shipped prompt files ---


@pytest.mark.parametrize(("language", "prompt"), PROMPT_FILES, ids=FILE_IDS)
def test_prompt_file_is_16khz_mono_pcm(language: str, prompt: Prompt) -> None:
    samples = read_prompt(prompt_path(language, prompt))
    assert samples.dtype == np.dtype("<i2")


@pytest.mark.parametrize(("language", "prompt"), PROMPT_FILES, ids=FILE_IDS)
def test_prompt_duration_fits_its_syllables(language: str, prompt: Prompt) -> None:
    duration = len(read_prompt(prompt_path(language, prompt))) / SAMPLE_RATE_HZ
    units = count_syllables(language, spoken_text(language, prompt))
    assert units > 0
    assert duration >= 0.12 * units
    assert duration <= 0.6 * units


@pytest.mark.parametrize(("language", "prompt"), PROMPT_FILES, ids=FILE_IDS)
def test_prompt_is_not_silent(language: str, prompt: Prompt) -> None:
    samples = read_prompt(prompt_path(language, prompt)).astype(np.float64)
    assert np.abs(samples).max() >= 1000
    assert np.sqrt(np.mean(samples**2)) >= 300


@pytest.mark.parametrize("language", PROMPT_LANGUAGES)
def test_prompts_of_a_language_are_distinct(language: str) -> None:
    digests = {
        hashlib.sha256(prompt_path(language, prompt).read_bytes()).hexdigest() for prompt in Prompt
    }
    assert len(digests) == len(Prompt)


@pytest.mark.parametrize(("language", "prompt"), PROMPT_FILES, ids=FILE_IDS)
def test_prompt_file_speaks_the_catalog_text(language: str, prompt: Prompt) -> None:
    manifest = json.loads((PROMPTS_DIR / "manifest.json").read_text(encoding="utf-8"))
    recorded = manifest[language][prompt.value]["text"]
    assert recorded == spoken_text(language, prompt), "text changed: run scripts/make-prompts"


@pytest.mark.parametrize(("language", "prompt"), PROMPT_FILES, ids=FILE_IDS)
def test_prompt_was_transcribed_back_at_build(language: str, prompt: Prompt) -> None:
    manifest = json.loads((PROMPTS_DIR / "manifest.json").read_text(encoding="utf-8"))
    asr = manifest[language][prompt.value].get("asr")
    assert asr is not None, "run scripts/make-prompts --check"
    assert asr["match"] >= 0.7


def test_every_chinese_character_has_a_reading() -> None:
    manifest = json.loads((PROMPTS_DIR / "manifest.json").read_text(encoding="utf-8"))
    for prompt in Prompt:
        entry = manifest["zh_CN"][prompt.value]
        phones = entry["phones"].split()
        toned = [phone for phone in phones if phone[-1].isdigit() and not phone.startswith("#")]
        assert len(toned) == len(HAN.findall(entry["text"])), prompt


# --- which prompt a verdict gets ---


@pytest.mark.parametrize(
    ("outcome", "reasons", "expected"),
    [
        (Outcome.ADMIT, (Reason.HEALTH_GREEN,), Prompt.ADMIT),
        (Outcome.REVIEW, (Reason.HEALTH_YELLOW,), Prompt.REVIEW),
        (Outcome.REVIEW, (Reason.CACHE_STALE, Reason.HEALTH_GREEN), Prompt.STALE),
        (Outcome.REVIEW, (Reason.CACHE_EMPTY,), Prompt.STALE),
        (Outcome.DENY, (Reason.HEALTH_RED, Reason.CACHE_STALE), Prompt.DENY),
        (Outcome.INCOMPLETE, (Reason.MISSING_COMMUNITY_CODE,), Prompt.INCOMPLETE),
        (Outcome.UNRECOGNISED, (Reason.BAD_BASE45,), Prompt.UNRECOGNISED),
    ],
    ids=["admit", "review", "stale", "empty-cache", "deny-beats-stale", "incomplete", "unread"],
)
def test_prompt_for_verdict(
    outcome: Outcome, reasons: tuple[Reason, ...], expected: Prompt
) -> None:
    assert prompt_for(Verdict(outcome=outcome, reasons=reasons)) == expected


# --- playback ---


def test_aplay_plays_to_null_device(make_prompter: Callable[..., VoicePrompter]) -> None:
    prompter = make_prompter(device="null")
    prompter.say(Prompt.ADMIT)
    wait_for(lambda: prompter.played + prompter.failures >= 1)
    assert prompter.played == 1
    assert prompter.failures == 0


def test_missing_sound_card_is_logged_once_and_counted(
    make_prompter: Callable[..., VoicePrompter],
) -> None:
    prompter = make_prompter(device="hw:99")
    with structlog.testing.capture_logs() as logs:
        for count, prompt in enumerate((Prompt.DENY, Prompt.REVIEW, Prompt.ADMIT), start=1):
            prompter.say(prompt)
            wait_for(lambda count=count: prompter.failures == count)
    failures = [entry for entry in logs if entry["event"] == "voice_playback_failed"]
    assert prompter.failures == 3
    assert len(failures) == 1
    assert "hw:99" in failures[0]["device"]


def test_missing_player_is_logged_and_counted(
    tmp_path: Path, make_prompter: Callable[..., VoicePrompter]
) -> None:
    prompter = make_prompter(player=(str(tmp_path / "no-such-aplay"),))
    with structlog.testing.capture_logs() as logs:
        prompter.say(Prompt.ADMIT)
        wait_for(lambda: prompter.failures == 1)
    assert [entry["event"] for entry in logs] == ["voice_playback_failed"]
    assert logs[0]["hint"] == "install alsa-utils"


def test_newest_prompt_stops_the_playing_one(
    fake_player: FakePlayer, make_prompter: Callable[..., VoicePrompter]
) -> None:
    prompter = make_prompter(player=fake_player.command)
    prompter.say(Prompt.ADMIT)
    wait_for(lambda: "start admit" in fake_player.lines())
    prompter.say(Prompt.DENY)
    wait_for(lambda: "start deny" in fake_player.lines())
    assert "end admit" not in fake_player.lines()
    assert prompter.replaced == 1


def test_burst_of_prompts_ends_with_the_newest(
    fake_player: FakePlayer, make_prompter: Callable[..., VoicePrompter]
) -> None:
    prompter = make_prompter(player=fake_player.command)
    for prompt in (Prompt.ADMIT, Prompt.REVIEW, Prompt.UNRECOGNISED, Prompt.DENY):
        prompter.say(prompt)
    wait_for(lambda: "start deny" in fake_player.lines())
    assert fake_player.lines()[-1] == "start deny"
    assert len(fake_player.lines()) <= 4


def test_listener_returns_while_prompt_plays(
    tmp_path: Path, fake_player: FakePlayer, make_prompter: Callable[..., VoicePrompter]
) -> None:
    prompter = make_prompter(player=fake_player.command)
    with Journal(tmp_path / "journal.db", "gate-test") as journal:
        prompter.on_verdict(verdict_event(journal, Outcome.REVIEW))
    wait_for(lambda: "start review" in fake_player.lines())
    assert "end review" not in fake_player.lines()


def test_close_stops_the_playing_prompt(
    fake_player: FakePlayer, make_prompter: Callable[..., VoicePrompter]
) -> None:
    prompter = make_prompter(player=fake_player.command)
    prompter.say(Prompt.STALE)
    wait_for(lambda: "start stale" in fake_player.lines())
    prompter.close()
    assert prompter._thread is None
    assert "end stale" not in fake_player.lines()


def test_volume_scales_the_played_file(
    fake_player: FakePlayer, make_prompter: Callable[..., VoicePrompter]
) -> None:
    prompter = make_prompter(player=fake_player.command, volume_percent=50)
    prompter.say(Prompt.ADMIT)
    wait_for(lambda: "start admit" in fake_player.lines())
    played = read_prompt(fake_player.copies / "admit.wav").astype(np.int32)
    shipped = read_prompt(prompt_path("zh_CN", Prompt.ADMIT)).astype(np.int32)
    assert np.abs(played).max() == pytest.approx(np.abs(shipped).max() / 2, abs=1)


def test_english_display_plays_english_prompts(
    fake_player: FakePlayer, make_prompter: Callable[..., VoicePrompter]
) -> None:
    prompter = make_prompter(player=fake_player.command, language="en", volume_percent=100)
    prompter.say(Prompt.DENY)
    wait_for(lambda: "start deny" in fake_player.lines())
    played = read_prompt(fake_player.copies / "deny.wav")
    assert np.array_equal(played, read_prompt(prompt_path("en", Prompt.DENY)))


def test_unknown_language_falls_back_to_chinese() -> None:
    assert VoicePrompter(VoiceConfig(), "fr").language == "zh_CN"


def test_missing_prompt_file_fails_at_start(tmp_path: Path) -> None:
    prompter = VoicePrompter(VoiceConfig(), "zh_CN", prompts_dir=tmp_path)
    with pytest.raises(VoiceError, match="cannot read prompt"):
        prompter.start()


# --- config ---


@pytest.mark.parametrize("volume", [-1, 101])
def test_volume_out_of_range_is_rejected(volume: int) -> None:
    data = {"device": {"id": "gate-01", "site": "XH-0012"}, "voice": {"volume_percent": volume}}
    with pytest.raises(ConfigError, match=r"voice\.volume_percent"):
        parse_config(data)
