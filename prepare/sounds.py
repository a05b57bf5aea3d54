"""The bundled audio tasks: DTMF key sequences and short melodies, synthesised from a seed.

What this file teaches:
- A dataset that needs no download: every clip is built from sines and noise by a numpy Generator, so the
  same seed gives the same bytes on every machine, and the answer is known exactly because we chose it.
- DTMF (the tones of a telephone keypad): each key sounds one "row" and one "column" frequency at once.
  The eight frequencies were picked so that no one is a harmonic or a sum/difference of two others, which is
  what makes them easy to tell apart (ITU-T Recommendation Q.23).
- Notes must be resolvable by what the encoder sees: 40 Hz FFT bins (16 kHz / 400) pooled into 80 mel
  bands. Below 1 kHz the mel bands' apexes are ~37 Hz apart, about one bin; above it they widen ~4% per band.
  A semitone is only 6% (31 Hz at C5, less than one bin), so a chromatic scale would put neighbours in the
  same bin. The major pentatonic scale has no semitone steps: its closest neighbours, a whole tone apart
  (12%, 64 Hz at C5..D5), land at least two mel bands apart over the two octaves C5..A6 (523-1760 Hz);
  tests/test_sounds.py checks this numerically. Harmonics, when present, are weaker than the fundamental.

Clip length: at most MAX_SECONDS = 2 s, i.e. 32000 samples -> 1 + 32000 // 160 = 201 mel frames -> 101
encoder frames after the stride-2 convolution; config/mixed.py's audio_stack = 4 merges those into 26
tokens, so an audio example costs the language model at most ~26 positions.

Rows follow minimm/formats.py's "conversations" schema; "audio" is relative to out_dir, where the caller
writes the JSONL file (formats.py resolves media paths against the JSONL file's folder).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import wave
import zlib

import numpy as np

SAMPLE_RATE = 16000
MAX_SECONDS = 2.0  # see the module docstring for the frame count this gives

KEYPAD = ("123", "456", "789", "*0#")  # rows of a telephone keypad
DTMF_ROWS_HZ = (697.0, 770.0, 852.0, 941.0)
DTMF_COLUMNS_HZ = (1209.0, 1336.0, 1477.0)
DTMF_KEYS = "0123456789*#"
DTMF_QUESTION = "Which keys were pressed?"

NOTE_NAMES = ("C5", "D5", "E5", "G5", "A5", "C6", "D6", "E6", "G6", "A6")  # major pentatonic, 2 octaves
_SEMITONES_FROM_A = {"C": -9, "D": -7, "E": -5, "F": -4, "G": -2, "A": 0, "B": 2}
NOTES_QUESTION = "Name the notes."


def dtmf_frequencies(key: str) -> tuple[float, float]:
    """The (row, column) frequencies in Hz of one keypad key."""
    for row, keys in enumerate(KEYPAD):
        if key in keys:
            return DTMF_ROWS_HZ[row], DTMF_COLUMNS_HZ[keys.index(key)]
    raise ValueError(f"{key!r} is not a DTMF key; expected one of {DTMF_KEYS!r}")


def note_frequency(name: str) -> float:
    """Equal temperament with A4 = 440 Hz: "C5" -> 523.25 Hz."""
    semitones = _SEMITONES_FROM_A[name[0]] + 12 * (int(name[1:]) - 4)
    return 440.0 * 2.0 ** (semitones / 12)


def _samples(rng: np.random.Generator, low_ms: float, high_ms: float) -> int:
    """A random duration between low_ms and high_ms, in samples."""
    return int(rng.integers(round(low_ms * SAMPLE_RATE / 1000), round(high_ms * SAMPLE_RATE / 1000),
                            endpoint=True))


def _ramps(n: int, ramp: int) -> np.ndarray:
    """(n,) envelope with raised-cosine fade-in and fade-out of `ramp` samples: no clicks at the edges,
    which would spread energy over every frequency."""
    envelope = np.ones(n)
    fade = 0.5 - 0.5 * np.cos(np.pi * np.arange(ramp) / ramp)  # (ramp,) from 0 towards 1
    envelope[:ramp] = fade
    envelope[n - ramp:] = np.minimum(envelope[n - ramp:], fade[::-1])
    return envelope


def _sine(rng: np.random.Generator, freq: float, n: int) -> np.ndarray:
    return np.sin(2 * np.pi * freq * np.arange(n) / SAMPLE_RATE + rng.uniform(0, 2 * np.pi))


def _assemble(rng: np.random.Generator, events: list[np.ndarray], gap_ms: tuple[float, float],
              level: float) -> np.ndarray:
    """Place sounds one after another with random silences, add white noise, -> float32 at 16 kHz."""
    parts = [np.zeros(_samples(rng, 20, 100))]
    for i, sound in enumerate(events):
        if i:
            parts.append(np.zeros(_samples(rng, *gap_ms)))
        parts.append(sound)
    parts.append(np.zeros(_samples(rng, 20, 100)))
    clip = np.concatenate(parts)
    snr_db = rng.uniform(15, 35)  # noise level relative to the sounds' amplitude
    clip += rng.standard_normal(len(clip)) * level * 10 ** (-snr_db / 20)
    assert len(clip) <= MAX_SECONDS * SAMPLE_RATE, "clip longer than MAX_SECONDS: check the durations"
    return np.clip(clip, -1.0, 1.0).astype(np.float32)


def make_dtmf_clip(rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """3 to 7 random keys, each 60-120 ms of its two tones, 40-100 ms apart -> (samples, "4 1 7 #").

    Longest: 100 + 7 * 120 + 6 * 100 + 100 ms = 1.64 s.
    """
    keys = [DTMF_KEYS[i] for i in rng.integers(0, len(DTMF_KEYS), size=rng.integers(3, 7, endpoint=True))]
    level = rng.uniform(0.05, 0.45)
    tones = []
    for key in keys:
        row_hz, column_hz = dtmf_frequencies(key)
        n = _samples(rng, 60, 120)
        twist = 10 ** (rng.uniform(0, 3) / 20)  # telephone lines pass the higher column tone a bit louder
        pair = _sine(rng, row_hz, n) + twist * _sine(rng, column_hz, n)
        tones.append(level / (1 + twist) * 10 ** (rng.uniform(-2, 2) / 20) * pair * _ramps(n, 80))
    return _assemble(rng, tones, (40, 100), level), " ".join(keys)


def make_notes_clip(rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """2 to 5 notes from NOTE_NAMES, each 150-280 ms, 30-80 ms apart -> (samples, "C5 E5 G5").

    Half the clips are pure sines, half carry up to 3 overtones with geometrically falling amplitude
    (ratio 0.2-0.5, so the fundamental stays the loudest). Notes decay like a plucked string.
    Longest: 100 + 5 * 280 + 4 * 80 + 100 ms = 1.92 s.
    """
    names = [NOTE_NAMES[i] for i in rng.integers(0, len(NOTE_NAMES), size=rng.integers(2, 5, endpoint=True))]
    level = rng.uniform(0.05, 0.45)
    n_overtones = int(rng.integers(1, 3, endpoint=True)) if rng.random() < 0.5 else 0
    ratio = rng.uniform(0.2, 0.5)
    notes = []
    for name in names:
        n = _samples(rng, 150, 280)
        f0 = note_frequency(name)
        harmonics = [ratio ** h * _sine(rng, f0 * (h + 1), n) for h in range(n_overtones + 1)
                     if f0 * (h + 1) < SAMPLE_RATE / 2]
        decay = np.exp(-np.arange(n) / (SAMPLE_RATE * rng.uniform(0.15, 0.6)))
        tone = np.sum(harmonics, axis=0) / sum(ratio ** h for h in range(len(harmonics)))
        notes.append(level * 10 ** (rng.uniform(-2, 2) / 20) * tone * decay * _ramps(n, 160))
    return _assemble(rng, notes, (30, 80), level), " ".join(names)


def write_wav(path: str | os.PathLike, samples: np.ndarray, sr: int = SAMPLE_RATE) -> None:
    """Write mono samples in [-1, 1] as 16-bit PCM, atomically: a temporary file renamed into place, so a
    crash never leaves a half-written clip under the final name."""
    pcm = np.round(np.clip(np.asarray(samples, dtype=np.float64), -1.0, 1.0) * 32767).astype("<i2")
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".wav.tmp")
    try:
        with os.fdopen(fd, "wb") as f, wave.open(f, "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(sr)
            w.writeframes(pcm.tobytes())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def make_audio_examples(out_dir: str | os.PathLike, n: int, seed: int, split: str) -> list[dict]:
    """Write n clips under out_dir/audio/<split>/ (DTMF and notes alternating) -> their JSONL rows.

    Example i draws from its own Generator seeded by (seed, split, i): the same arguments give identical
    files, the first k clips do not depend on n, and splits never share a random stream.
    """
    folder = os.path.join(out_dir, "audio", split)
    os.makedirs(folder, exist_ok=True)
    split_id = zlib.crc32(split.encode("utf-8"))
    rows = []
    for i in range(n):
        rng = np.random.default_rng([seed, split_id, i])
        kind, make, question = ("dtmf", make_dtmf_clip, DTMF_QUESTION) if i % 2 == 0 else \
            ("notes", make_notes_clip, NOTES_QUESTION)
        samples, answer = make(rng)
        relative = f"audio/{split}/{kind}_{i:06d}.wav"
        write_wav(os.path.join(out_dir, relative), samples)
        rows.append({"task": "audio",
                     "conversations": [{"role": "user", "content": f"<audio>\n{question}"},
                                       {"role": "assistant", "content": answer}],
                     "audio": relative, "kind": kind})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description="Write the synthetic audio tasks as WAV + JSONL.")
    parser.add_argument("out_dir")
    parser.add_argument("--n_train", type=int, default=2000)
    parser.add_argument("--n_val", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1337)
    args = parser.parse_args()
    for split, n in (("train", args.n_train), ("val", args.n_val)):
        start = time.perf_counter()
        rows = make_audio_examples(args.out_dir, n, args.seed, split)
        path = os.path.join(args.out_dir, f"{split}.jsonl")
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        os.replace(path + ".tmp", path)
        print(f"{split}: {n} clips in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
