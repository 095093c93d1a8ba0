"""Spoken prompts for the guard and the resident: one short recorded phrase per kind of verdict.

The prompts are WAV files made at build time by scripts/make-prompts and shipped in
drivers/prompts/<language>/. At start ``VoicePrompter`` scales them to the configured volume
into a private temporary folder. Each verdict then only records which prompt is wanted and
wakes a worker thread, so the pipeline thread never waits for audio. The worker plays the
prompt with ``aplay`` (alsa-utils) in a subprocess. When a newer prompt arrives while one is
still playing, the older one is stopped: the newest verdict is the one the person in front of
the gate needs to hear. A missing player or audio device is logged once and counted. The
daemon keeps deciding either way.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
import threading
import wave
from collections.abc import Sequence
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import structlog

from edgenode.config import VoiceConfig
from edgenode.i18n import N_
from edgenode.policy import Outcome, Verdict
from edgenode.reasons import Reason

if TYPE_CHECKING:
    from edgenode.guard_desk import OverrideEvent
    from edgenode.pipeline import VerdictEvent

log = structlog.get_logger("drivers.voice")

PROMPTS_DIR = Path(__file__).parent / "prompts"
SAMPLE_RATE_HZ = 16_000
APLAY = ("aplay", "-q")
# How often the worker checks whether the playing prompt has ended, in seconds.
POLL_INTERVAL_S = 0.05
# Upper bound on waiting for a stopped player process to exit before it is killed.
PLAYER_STOP_TIMEOUT_S = 2.0


class Prompt(StrEnum):
    ADMIT = "admit"
    REVIEW = "review"
    DENY = "deny"
    UNRECOGNISED = "unrecognised"
    INCOMPLETE = "incomplete"
    # The local data is too old to admit anyone: a guard has to check by hand.
    STALE = "stale"


# The spoken sentence of each prompt, as a gettext msgid. scripts/make-prompts speaks the
# translation for each language; tests/test_voice.py checks that the shipped files match.
PROMPT_TEXTS: dict[Prompt, str] = {
    Prompt.ADMIT: N_("Please go ahead."),
    Prompt.REVIEW: N_("Please wait for a manual check."),
    Prompt.DENY: N_("Do not enter."),
    Prompt.UNRECOGNISED: N_("Code not recognised. Please try again."),
    Prompt.INCOMPLETE: N_("Please show both codes."),
    Prompt.STALE: N_("Local data is out of date. Please wait for a manual check."),
}

# Languages with a full set of prompt files.
PROMPT_LANGUAGES = ("zh_CN", "en")

_STALE_DATA = frozenset({Reason.CACHE_STALE, Reason.CACHE_EMPTY})
_HAN = re.compile(r"[\u4e00-\u9fff]")


class VoiceError(Exception):
    """A prompt file that is missing or not 16 kHz mono 16-bit PCM: the install is broken."""


def prompt_for(verdict: Verdict) -> Prompt:
    """Pick the prompt for a verdict. Stale data changes a review prompt, never a deny."""
    if verdict.outcome == Outcome.ADMIT:
        return Prompt.ADMIT
    if verdict.outcome == Outcome.DENY:
        return Prompt.DENY
    if verdict.outcome == Outcome.REVIEW:
        stale = any(reason in _STALE_DATA for reason in verdict.reasons)
        return Prompt.STALE if stale else Prompt.REVIEW
    if verdict.outcome == Outcome.INCOMPLETE:
        return Prompt.INCOMPLETE
    return Prompt.UNRECOGNISED


def count_syllables(language: str, text: str) -> int:
    """Count the syllables of a prompt sentence, to check its recording's length.

    Mandarin has one syllable per character. For English this is an estimate: the vowel
    groups of each word, less a final silent "e", at least one per word.
    """
    if language == "zh_CN":
        return len(_HAN.findall(text))
    count = 0
    for word in re.findall(r"[a-z']+", text.lower()):
        groups = len(re.findall(r"[aeiouy]+", word))
        if word.endswith("e") and not word.endswith(("le", "ee")) and groups > 1:
            groups -= 1
        count += max(groups, 1)
    return count


def prompt_path(language: str, prompt: Prompt, prompts_dir: Path = PROMPTS_DIR) -> Path:
    return prompts_dir / language / f"{prompt.value}.wav"


def read_prompt(path: Path) -> np.ndarray:
    """Read a shipped prompt as int16 samples. Raises VoiceError for any other format."""
    try:
        with wave.open(str(path), "rb") as wav:
            shape = (wav.getnchannels(), wav.getsampwidth(), wav.getframerate())
            frames = wav.readframes(wav.getnframes())
    except (OSError, EOFError, wave.Error) as exc:
        raise VoiceError(f"cannot read prompt {path}: {exc}") from exc
    if shape != (1, 2, SAMPLE_RATE_HZ):
        channels, width, rate = shape
        raise VoiceError(
            f"prompt {path} is {channels} channel(s), {8 * width}-bit, {rate} Hz; "
            f"expected mono 16-bit {SAMPLE_RATE_HZ} Hz: run scripts/make-prompts"
        )
    return np.frombuffer(frames, dtype="<i2")


def write_prompt(path: Path, samples: np.ndarray) -> None:
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(SAMPLE_RATE_HZ)
        wav.writeframes(samples.astype("<i2").tobytes())


class VoicePrompter:
    """Plays the prompt for each verdict and override, off the pipeline thread.

    Call ``start()`` before the daemon runs and ``close()`` after it stops. ``player`` is the
    aplay command line; ``-D`` with the configured device and then the WAV file are appended.
    Tests replace it with a script that takes the same arguments.
    """

    def __init__(
        self,
        config: VoiceConfig,
        language: str,
        *,
        prompts_dir: Path = PROMPTS_DIR,
        player: Sequence[str] = APLAY,
    ) -> None:
        self.config = config
        self.language = language if language in PROMPT_LANGUAGES else PROMPT_LANGUAGES[0]
        self.prompts_dir = prompts_dir
        self.player = list(player)
        if config.device:
            self.player += ["-D", config.device]
        self.played = 0
        self.replaced = 0
        self.failures = 0
        self._failure_logged = False
        self._files: dict[Prompt, Path] = {}
        self._folder: Path | None = None
        self._lock = threading.Lock()
        self._wakeup = threading.Event()
        self._pending: Prompt | None = None
        self._stopping = False
        self._thread: threading.Thread | None = None

    # --- life cycle ---

    def start(self) -> None:
        """Scale every prompt to the configured volume and start the player thread."""
        folder = Path(tempfile.mkdtemp(prefix="edgenode-voice-"))
        try:
            gain = self.config.volume_percent / 100
            for prompt in Prompt:
                samples = read_prompt(prompt_path(self.language, prompt, self.prompts_dir))
                scaled = np.round(samples.astype(np.float64) * gain)
                path = folder / f"{prompt.value}.wav"
                write_prompt(path, scaled.astype(np.int16))
                self._files[prompt] = path
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        self._folder = folder
        self._thread = threading.Thread(target=self._run, name="voice", daemon=True)
        self._thread.start()
        log.info(
            "voice_started",
            language=self.language,
            volume_percent=self.config.volume_percent,
            device=self.config.device or "default",
        )

    def close(self) -> None:
        """Stop the prompt that is playing, end the thread and remove the scaled files."""
        with self._lock:
            self._stopping = True
            self._wakeup.set()
        if self._thread is not None:
            self._thread.join(timeout=PLAYER_STOP_TIMEOUT_S + 1)
            self._thread = None
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None
        log.info("voice_stopped", played=self.played, failures=self.failures)

    # --- listeners (called on the pipeline thread; they only hand over the prompt) ---

    def on_verdict(self, event: VerdictEvent) -> None:
        self.say(prompt_for(event.verdict))

    def on_override(self, event: OverrideEvent) -> None:
        self.say(Prompt.ADMIT if event.decision == "admit" else Prompt.DENY)

    def say(self, prompt: Prompt) -> None:
        """Queue a prompt, replacing any queued one, and return at once."""
        with self._lock:
            self._pending = prompt
            self._wakeup.set()

    # --- the player thread ---

    def _run(self) -> None:
        process: subprocess.Popen[bytes] | None = None
        playing = Prompt.ADMIT
        while True:
            self._wakeup.wait(timeout=POLL_INTERVAL_S if process is not None else None)
            with self._lock:
                prompt, self._pending = self._pending, None
                stopping = self._stopping
                self._wakeup.clear()
            if process is not None and process.poll() is not None:
                self._check_result(process, playing)
                process = None
            if process is not None and (prompt is not None or stopping):
                self._stop_player(process)
                self.replaced += prompt is not None
                process = None
            if stopping:
                return
            if prompt is not None:
                process = self._spawn(prompt)
                playing = prompt

    def _spawn(self, prompt: Prompt) -> subprocess.Popen[bytes] | None:
        command = [*self.player, str(self._files[prompt])]
        try:
            return subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
            )
        except OSError as exc:
            hint = "install alsa-utils" if isinstance(exc, FileNotFoundError) else ""
            self._failed(prompt.value, f"{command[0]}: {exc.strerror}", hint)
            return None

    def _check_result(self, process: subprocess.Popen[bytes], prompt: Prompt) -> None:
        stderr = process.stderr.read() if process.stderr is not None else b""
        if process.stderr is not None:
            process.stderr.close()
        if process.returncode == 0:
            self.played += 1
            if self._failure_logged:
                log.info("voice_playback_recovered", prompt=prompt.value, failures=self.failures)
                self._failure_logged = False
            return
        error = stderr.decode("utf-8", "replace").strip()[-500:]
        self._failed(prompt.value, error or f"exit code {process.returncode}", "check voice.device")

    def _failed(self, prompt: str, error: str, hint: str) -> None:
        """Count a failed prompt and log it once until playback works again."""
        self.failures += 1
        if self._failure_logged:
            return
        self._failure_logged = True
        log.error(
            "voice_playback_failed",
            prompt=prompt,
            device=self.config.device or "default",
            error=error,
            hint=hint,
            failures=self.failures,
        )

    @staticmethod
    def _stop_player(process: subprocess.Popen[bytes]) -> None:
        process.terminate()
        try:
            process.wait(timeout=PLAYER_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            try:
                process.wait(timeout=PLAYER_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                # A process stuck in the kernel (a hung USB sound card) ignores SIGKILL until
                # the driver returns. It is left behind so that the next prompt can play.
                log.error("voice_player_stuck", pid=process.pid)
        if process.stderr is not None:
            process.stderr.close()
