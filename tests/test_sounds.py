"""prepare/sounds.py: the synthetic DTMF and notes clips are deterministic, well-formed and hearable."""
import re

import numpy as np
import pytest

from minimm.audio import load_wav, log_mel_spectrogram
from prepare.sounds import (DTMF_COLUMNS_HZ, DTMF_KEYS, DTMF_QUESTION, DTMF_ROWS_HZ, KEYPAD, MAX_SECONDS,
                            NOTE_NAMES, NOTES_QUESTION, SAMPLE_RATE, dtmf_frequencies, make_audio_examples,
                            make_dtmf_clip, make_notes_clip, note_frequency, write_wav)

DTMF_ANSWER = re.compile(r"^[0-9*#]( [0-9*#]){2,6}$")
NOTES_ANSWER = re.compile(r"^(\S+)( \S+){1,4}$")


def file_bytes(out_dir, rows):
    return [(out_dir / row["audio"]).read_bytes() for row in rows]


def test_same_seed_same_bytes(tmp_path):
    rows_a = make_audio_examples(tmp_path / "a", 9, seed=5, split="train")
    rows_b = make_audio_examples(tmp_path / "b", 9, seed=5, split="train")
    assert rows_a == rows_b
    assert file_bytes(tmp_path / "a", rows_a) == file_bytes(tmp_path / "b", rows_b)
    fewer = make_audio_examples(tmp_path / "c", 4, seed=5, split="train")  # example i does not depend on n
    assert file_bytes(tmp_path / "c", fewer) == file_bytes(tmp_path / "a", rows_a)[:4]
    other_seed = make_audio_examples(tmp_path / "d", 9, seed=6, split="train")
    other_split = make_audio_examples(tmp_path / "e", 9, seed=5, split="val")
    for rows, out_dir in ((other_seed, tmp_path / "d"), (other_split, tmp_path / "e")):
        assert all(x != y for x, y in zip(file_bytes(out_dir, rows), file_bytes(tmp_path / "a", rows_a)))


def test_rows_follow_the_schema_and_answers_are_well_formed(tmp_path):
    rows = make_audio_examples(tmp_path, 30, seed=0, split="train")
    assert [row["kind"] for row in rows] == ["dtmf", "notes"] * 15
    for row in rows:
        assert row["task"] == "audio" and not row["audio"].startswith("/")
        user, assistant = row["conversations"]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        question = DTMF_QUESTION if row["kind"] == "dtmf" else NOTES_QUESTION
        assert user["content"] == f"<audio>\n{question}"
        answer = assistant["content"]
        if row["kind"] == "dtmf":
            assert DTMF_ANSWER.match(answer), answer
        else:
            assert NOTES_ANSWER.match(answer) and set(answer.split()) <= set(NOTE_NAMES), answer
        samples, sr = load_wav(tmp_path / row["audio"])
        assert sr == SAMPLE_RATE and 0 < len(samples) <= MAX_SECONDS * SAMPLE_RATE
        assert 0.01 < np.abs(samples).max() <= 1.0


def test_clip_lengths_and_coverage():
    keys, notes, dtmf_lengths, notes_lengths = set(), set(), set(), set()
    for seed in range(150):
        samples, answer = make_dtmf_clip(np.random.default_rng(seed))
        assert samples.dtype == np.float32 and len(samples) <= MAX_SECONDS * SAMPLE_RATE
        keys.update(answer.split())
        dtmf_lengths.add(len(answer.split()))
        samples, answer = make_notes_clip(np.random.default_rng(seed))
        assert samples.dtype == np.float32 and len(samples) <= MAX_SECONDS * SAMPLE_RATE
        notes.update(answer.split())
        notes_lengths.add(len(answer.split()))
    assert keys == set(DTMF_KEYS) and notes == set(NOTE_NAMES)
    assert dtmf_lengths == {3, 4, 5, 6, 7} and notes_lengths == {2, 3, 4, 5}


def test_dtmf_table():
    assert dtmf_frequencies("1") == (697.0, 1209.0) and dtmf_frequencies("#") == (941.0, 1477.0)
    assert dtmf_frequencies("0") == (941.0, 1336.0) and "".join(KEYPAD) == "123456789*0#"
    with pytest.raises(ValueError):
        dtmf_frequencies("A")


def magnitudes(segment: np.ndarray, freqs) -> np.ndarray:
    """|DFT| of a Hann-windowed segment at arbitrary frequencies (Hz) -> (len(freqs),)."""
    t = np.arange(len(segment)) / SAMPLE_RATE
    windowed = segment * np.hanning(len(segment))
    return np.abs(np.exp(-2j * np.pi * np.asarray(freqs)[:, None] * t[None, :]) @ windowed)


def tone_segments(samples: np.ndarray, freqs) -> list[tuple[int, int]]:
    """(start, end) sample ranges where energy at the given frequencies is on: 25 ms frames every 10 ms,
    narrow-band so the background noise stays far below the threshold."""
    starts = range(0, len(samples) - 400, 160)
    level = np.array([magnitudes(samples[s:s + 400], freqs).max() for s in starts])
    on = level > 0.2 * level.max()
    segments, begin = [], None
    for i, flag in enumerate(np.append(on, False)):
        if flag and begin is None:
            begin = i
        elif not flag and begin is not None:
            segments.append((starts[begin], starts[i - 1] + 400))
            begin = None
    return segments


@pytest.mark.parametrize("seed", range(12))
def test_dtmf_clip_has_each_keys_two_frequencies(seed):
    samples, answer = make_dtmf_clip(np.random.default_rng(seed))
    keys = answer.split()
    segments = tone_segments(samples, DTMF_ROWS_HZ + DTMF_COLUMNS_HZ)
    assert len(segments) == len(keys)
    for (start, end), key in zip(segments, keys):
        row_hz, column_hz = dtmf_frequencies(key)
        rows = magnitudes(samples[start:end], DTMF_ROWS_HZ)
        columns = magnitudes(samples[start:end], DTMF_COLUMNS_HZ)
        row, column = DTMF_ROWS_HZ.index(row_hz), DTMF_COLUMNS_HZ.index(column_hz)
        assert rows[row] > 4 * np.delete(rows, row).max()
        assert columns[column] > 4 * np.delete(columns, column).max()


def note_band(freq: float) -> int:
    x = 0.3 * np.sin(2 * np.pi * freq * np.arange(SAMPLE_RATE // 4) / SAMPLE_RATE)
    return int(log_mel_spectrogram(x)[:, 3:-3].mean(axis=1).argmax())


def test_notes_are_resolvable_by_the_mel_bands():
    bands = [note_band(note_frequency(name)) for name in NOTE_NAMES]
    assert note_frequency("A4") == 440.0 and abs(note_frequency("C5") - 523.251) < 1e-3
    assert all(later - earlier >= 2 for earlier, later in zip(bands, bands[1:])), bands


@pytest.mark.parametrize("seed", range(12))
def test_notes_clip_sounds_its_notes_and_no_others(seed):
    samples, answer = make_notes_clip(np.random.default_rng(seed))
    mel = log_mel_spectrogram(samples)  # (n_mels, F)
    loud = mel.max(axis=0) > mel.max() - 0.25  # frames within 10 dB of the loudest
    heard = set(mel[:, loud].argmax(axis=0).tolist())
    assert heard == {note_band(note_frequency(name)) for name in answer.split()}


def test_write_wav_round_trips_and_leaves_no_temporary_file(tmp_path):
    x = np.linspace(-1.2, 1.2, 1001).astype(np.float32)
    write_wav(tmp_path / "ramp.wav", x)
    samples, sr = load_wav(tmp_path / "ramp.wav")
    assert sr == SAMPLE_RATE
    np.testing.assert_allclose(samples, np.clip(x, -1, 1) * 32767 / 32768, atol=1 / 32768)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ramp.wav"]
