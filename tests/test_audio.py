"""minimm/wav.py and minimm/audio.py: WAV reading, resampling, log-mel features and the audio encoder."""
import io
import math
import re
import struct
import wave

import numpy as np
import pytest
import torch

from minimm import ops
from minimm.audio import (HOP_LENGTH, N_MELS, SAMPLE_RATE, AudioEncoder, AudioEncoderConfig,
                          load_audio_features, load_wav, log_mel_spectrogram, mel_band_edges, mel_filterbank,
                          resample)

GUID_TAIL = b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"


# ---------------------------------------------------------------------------------------------------------
# Writing test files by hand: RIFF chunks with struct, or the standard wave module.

def chunk(chunk_id: bytes, payload: bytes) -> bytes:
    pad = b"\x00" if len(payload) % 2 else b""
    return chunk_id + struct.pack("<I", len(payload)) + payload + pad


def riff(*chunks: bytes) -> bytes:
    body = b"WAVE" + b"".join(chunks)
    return b"RIFF" + struct.pack("<I", len(body)) + body


def fmt_chunk(code: int, channels: int, sr: int, bits: int, extensible: bool = False) -> bytes:
    block_align = channels * bits // 8
    head = struct.pack("<HHIIHH", 0xFFFE if extensible else code, channels, sr, sr * block_align,
                       block_align, bits)
    if not extensible:
        return chunk(b"fmt ", head)
    ext = struct.pack("<HHI", 22, bits, 0) + struct.pack("<H", code) + GUID_TAIL
    return chunk(b"fmt ", head + ext)


def random_samples(rng: np.random.Generator, bits: int, n: int) -> np.ndarray:
    """Integers covering the whole range of a signed `bits`-bit sample, extremes included."""
    lo, hi = -2 ** (bits - 1), 2 ** (bits - 1) - 1
    values = rng.integers(lo, hi, size=n, endpoint=True, dtype=np.int64)
    values[:2] = lo, hi
    return values


def pcm_bytes(values: np.ndarray, bits: int) -> bytes:
    if bits == 8:
        return (values + 128).astype(np.uint8).tobytes()  # 8-bit WAV is unsigned
    if bits == 24:
        return values.astype("<i4").view(np.uint8).reshape(-1, 4)[:, :3].tobytes()  # low 3 bytes
    return values.astype("<i2" if bits == 16 else "<i4").tobytes()


def write_with_wave(path, data: bytes, channels: int, bits: int, sr: int) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(bits // 8)
        w.setframerate(sr)
        w.writeframes(data)


# ---------------------------------------------------------------------------------------------------------
# load_wav

@pytest.mark.parametrize("writer", ["wave", "struct", "extensible"])
@pytest.mark.parametrize("bits", [8, 16, 24, 32])
@pytest.mark.parametrize("channels", [1, 2, 3])
def test_pcm_values_match_what_was_written(tmp_path, writer, bits, channels):
    rng = np.random.default_rng(bits * 10 + channels)
    n_frames, sr = 97, 11025
    values = random_samples(rng, bits, n_frames * channels)
    data = pcm_bytes(values, bits)
    path = tmp_path / f"{writer}.wav"
    if writer == "wave":
        write_with_wave(path, data, channels, bits, sr)
    else:
        path.write_bytes(riff(fmt_chunk(1, channels, sr, bits, extensible=writer == "extensible"),
                              chunk(b"LIST", b"odd"),  # an odd-sized chunk to skip, with its pad byte
                              chunk(b"data", data)))
    samples, got_sr = load_wav(path)
    expected = values.reshape(n_frames, channels).mean(axis=1) / 2.0 ** (bits - 1)
    assert got_sr == sr
    assert samples.dtype == np.float32 and samples.shape == (n_frames,)
    np.testing.assert_allclose(samples, expected, rtol=0, atol=1e-7)
    assert samples.min() >= -1.0 and samples.max() <= 1.0


@pytest.mark.parametrize("extensible", [False, True])
@pytest.mark.parametrize("channels", [1, 2, 3])
def test_float32_values_match_what_was_written(tmp_path, extensible, channels):
    rng = np.random.default_rng(channels)
    values = rng.uniform(-1, 1, size=(53, channels)).astype("<f4")
    values[0, 0] = 1.75  # beyond full scale: clipped
    path = tmp_path / "float.wav"
    path.write_bytes(riff(fmt_chunk(3, channels, 22050, 32, extensible), chunk(b"fact", struct.pack("<I", 53)),
                          chunk(b"data", values.tobytes())))
    samples, sr = load_wav(path)
    assert sr == 22050
    np.testing.assert_allclose(samples, np.clip(values.astype(np.float64), -1, 1).mean(axis=1), atol=1e-7)


def test_chunks_in_any_order(tmp_path):
    data = pcm_bytes(np.array([1000, -2000, 3000]), 16)
    path = tmp_path / "data_first.wav"
    path.write_bytes(riff(chunk(b"data", data), fmt_chunk(1, 1, 8000, 16)))
    samples, _ = load_wav(path)
    np.testing.assert_allclose(samples, np.array([1000, -2000, 3000]) / 32768, atol=1e-7)


def good_wav() -> bytes:
    return riff(fmt_chunk(1, 2, 16000, 16), chunk(b"data", pcm_bytes(np.arange(-50, 50), 16)))


BAD_FILES = {
    "truncated data": (good_wav()[:-7], "truncated"),
    "truncated header": (good_wav()[:20], "truncated"),
    "no chunks": (riff(), "no 'fmt '"),
    "no data": (riff(fmt_chunk(1, 1, 16000, 16)), "no 'data'"),
    "empty file": (b"", "not a RIFF/WAVE"),
    "ogg container": (b"OggS" + bytes(60), "not a RIFF/WAVE"),
    "riff but not wave": (b"RIFF" + struct.pack("<I", 4) + b"AVI ", "not a RIFF/WAVE"),
    "adpcm": (riff(fmt_chunk(2, 1, 16000, 16), chunk(b"data", bytes(8))), "format code 0x2"),
    "12-bit pcm": (riff(fmt_chunk(1, 1, 16000, 12), chunk(b"data", bytes(8))), "12 bits"),
    "64-bit float": (riff(fmt_chunk(3, 1, 16000, 64), chunk(b"data", bytes(16))), "64 bits"),
    "extensible alaw": (riff(fmt_chunk(6, 1, 16000, 8, extensible=True), chunk(b"data", bytes(8))), "0x6"),
    "zero channels": (riff(fmt_chunk(1, 0, 16000, 16), chunk(b"data", bytes(8))), "0 channels"),
    "zero rate": (riff(fmt_chunk(1, 1, 0, 16), chunk(b"data", bytes(8))), "0 Hz"),
    "partial frame": (riff(fmt_chunk(1, 2, 16000, 16), chunk(b"data", bytes(6))), "whole number"),
    "short fmt": (riff(chunk(b"fmt ", bytes(10)), chunk(b"data", bytes(8))), "at least 16"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_files_raise_value_error_naming_the_file(tmp_path, case):
    blob, reason = BAD_FILES[case]
    path = tmp_path / f"{case.replace(' ', '_')}.wav"
    path.write_bytes(blob)
    with pytest.raises(ValueError, match=re.escape(str(path))) as info:
        load_wav(path)
    assert reason in str(info.value)


def test_extensible_with_unknown_guid_raises(tmp_path):
    blob = bytearray(riff(fmt_chunk(1, 1, 16000, 16, extensible=True), chunk(b"data", bytes(8))))
    blob[blob.index(GUID_TAIL)] ^= 0xFF
    path = tmp_path / "guid.wav"
    path.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="GUID"):
        load_wav(path)


# ---------------------------------------------------------------------------------------------------------
# resample

def peak_hz(y: np.ndarray, sr: int) -> float:
    spectrum = np.abs(np.fft.rfft(y * np.hanning(len(y))))
    return spectrum.argmax() * sr / len(y)


@pytest.mark.parametrize("sr_in, freq", [(44100, 1234.5), (8000, 2900.0), (22050, 6100.0), (11025, 440.0)])
def test_resample_keeps_a_tones_frequency(sr_in, freq):
    n_in = int(0.73 * sr_in) + 3
    x = np.sin(2 * np.pi * freq * np.arange(n_in) / sr_in)
    y = resample(x, sr_in, SAMPLE_RATE)
    assert y.dtype == np.float32 and len(y) == math.ceil(n_in * SAMPLE_RATE / sr_in)
    bin_hz = SAMPLE_RATE / len(y)
    assert abs(peak_hz(y, SAMPLE_RATE) - freq) <= bin_hz
    middle = slice(len(y) // 4, 3 * len(y) // 4)  # away from the edges, where the signal starts from zeros
    expected = np.sin(2 * np.pi * freq * np.arange(len(y)) / SAMPLE_RATE)
    np.testing.assert_allclose(y[middle], expected[middle], atol=2e-3)


def test_resample_removes_what_the_new_rate_cannot_hold():
    x = np.sin(2 * np.pi * 10000.0 * np.arange(44100) / 44100)  # above 8 kHz: would alias to 6 kHz
    y = resample(x, 44100, SAMPLE_RATE)
    assert np.sqrt(np.mean(y[500:-500] ** 2)) < 1e-3 * np.sqrt(np.mean(x ** 2))


def test_resample_same_rate_and_errors():
    x = np.linspace(-1, 1, 17)
    np.testing.assert_array_equal(resample(x, 16000, 16000), x.astype(np.float32))
    np.testing.assert_allclose(resample(np.ones(3000), 48000, 16000)[100:-100], 1.0, atol=1e-3)  # DC gain 1
    with pytest.raises(ValueError, match="mono"):
        resample(np.zeros((2, 10)), 8000, 16000)
    with pytest.raises(ValueError, match="positive"):
        resample(x, 0, 16000)


# ---------------------------------------------------------------------------------------------------------
# log-mel features

@pytest.mark.parametrize("sr, n_fft, n_mels", [(16000, 400, 80), (22050, 510, 37), (8000, 256, 23)])
def test_filterbank_equals_librosa(sr, n_fft, n_mels):
    librosa = pytest.importorskip("librosa")
    ours = mel_filterbank(sr, n_fft, n_mels)
    assert ours.shape == (n_mels, n_fft // 2 + 1)
    np.testing.assert_allclose(ours, librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels), rtol=0, atol=1e-6)


def test_log_mel_equals_librosa_pipeline():
    librosa = pytest.importorskip("librosa")
    x = (0.1 * np.random.default_rng(0).standard_normal(12345)).astype(np.float32)
    power = librosa.feature.melspectrogram(y=x, sr=16000, n_fft=400, hop_length=160, n_mels=80,
                                           center=True, pad_mode="reflect")
    log_mel = np.log10(np.maximum(power, 1e-10))
    expected = (np.maximum(log_mel, log_mel.max() - 8.0) + 4.0) / 4.0
    np.testing.assert_allclose(log_mel_spectrogram(x), expected, atol=1e-5)


@pytest.mark.parametrize("band", [7, 23, 41, 66])
def test_pure_tone_peaks_in_its_mel_band(band):
    freq = mel_band_edges(SAMPLE_RATE, N_MELS)[band + 1]  # the apex of band `band`'s triangle
    x = 0.5 * np.sin(2 * np.pi * freq * np.arange(9000) / SAMPLE_RATE)
    mel = log_mel_spectrogram(x)
    assert mel[:, 5:-5].mean(axis=1).argmax() == band


def test_log_mel_shape_and_range():
    rng = np.random.default_rng(1)
    n = 16000 + 77
    t = np.arange(n) / SAMPLE_RATE
    x = 0.3 * np.sin(2 * np.pi * 700 * t) + 0.01 * rng.standard_normal(n)
    mel = log_mel_spectrogram(x)
    assert mel.dtype == np.float32 and mel.shape == (N_MELS, 1 + n // HOP_LENGTH)
    assert mel.max() - mel.min() <= 2.0 + 1e-6  # 8 decades / 4
    assert -1.5 < mel.min() and mel.max() < 1.5
    assert np.all(log_mel_spectrogram(np.zeros(1000)) == -1.5)  # silence: the floor, (-10 + 4) / 4
    assert log_mel_spectrogram(np.full(150, 0.1)).shape == (N_MELS, 1)  # shorter than one window
    with pytest.raises(ValueError):
        log_mel_spectrogram(np.zeros(0))


def test_load_audio_features_resamples(tmp_path):
    sr, n = 22050, 22050 // 2
    x = 0.4 * np.sin(2 * np.pi * 1000 * np.arange(n) / sr)
    path = tmp_path / "tone.wav"
    write_with_wave(path, pcm_bytes(np.round(x * 32767).astype(np.int64), 16), 1, 16, sr)
    mel = load_audio_features(path)
    assert mel.shape == (N_MELS, 1 + math.ceil(n * SAMPLE_RATE / sr) // HOP_LENGTH)
    np.testing.assert_allclose(mel, log_mel_spectrogram(resample(load_wav(path)[0], sr, SAMPLE_RATE)))


# ---------------------------------------------------------------------------------------------------------
# AudioEncoder

def small_encoder(seed: int = 0, **overrides) -> AudioEncoder:
    torch.manual_seed(seed)
    config = AudioEncoderConfig(**{"n_mels": 13, "n_embd": 48, "n_layer": 2, "n_head": 3, "max_frames": 61,
                                   **overrides})
    return AudioEncoder(config).eval()


@pytest.mark.parametrize("n_frames", [1, 2, 37, 50, 61])
def test_encoder_output_shape(n_frames):
    encoder = small_encoder()
    out = encoder(torch.randn(3, 13, n_frames))
    assert out.shape == (3, math.ceil(n_frames / 2), 48)
    assert torch.isfinite(out).all()


def test_output_lengths():
    lengths = torch.tensor([1, 2, 3, 37, 50])
    assert AudioEncoder.output_lengths(lengths).tolist() == [1, 1, 2, 19, 25]
    for n in range(1, 12):  # agrees with what the strided convolution actually produces
        assert small_encoder()(torch.randn(1, 13, n)).shape[1] == AudioEncoder.output_lengths(torch.tensor(n))


@pytest.mark.parametrize("backend", ["math", "torch"])
def test_padding_does_not_change_real_frames(backend):
    encoder = small_encoder(seed=3)
    lengths = torch.tensor([37, 23, 8, 1])  # odd and even: the stride-2 conv reads one frame past odd ends
    mels = torch.randn(4, 13, 37) * 3 + 5  # padded frames hold garbage, not zeros
    previous = ops.get_backend()
    ops.set_backend(backend)
    try:
        batched = encoder(mels, lengths)  # (B, T, C)
        for b, length in enumerate(lengths.tolist()):
            alone = encoder(mels[b:b + 1, :, :length])  # (1, T_b, C): the same clip, never padded
            t = alone.shape[1]
            torch.testing.assert_close(batched[b, :t], alone[0], atol=1e-5, rtol=1e-5)
            assert torch.all(batched[b, t:] == 0)
    finally:
        ops.set_backend(previous)


def test_padded_inputs_get_no_gradient():
    encoder = small_encoder(seed=4)
    mels = torch.randn(2, 13, 29, requires_grad=True)
    encoder(mels, torch.tensor([29, 12])).square().sum().backward()
    assert torch.isfinite(mels.grad).all()
    assert torch.all(mels.grad[1, :, 12:] == 0) and mels.grad[1, :, :12].abs().sum() > 0
    assert all(p.grad is not None for p in encoder.parameters())


def test_encoder_rejects_too_many_frames_and_round_trips_state():
    encoder = small_encoder()
    with pytest.raises(ValueError, match="max_frames"):
        encoder(torch.randn(1, 13, 62))
    assert not any("pos_emb" in key for key in encoder.state_dict())  # fixed positions are not saved
    buffer = io.BytesIO()
    torch.save(encoder.state_dict(), buffer)
    buffer.seek(0)
    other = small_encoder(seed=9)
    other.load_state_dict(torch.load(buffer, weights_only=True))
    x = torch.randn(2, 13, 20)
    torch.testing.assert_close(other(x), encoder(x))


def test_initial_convolutions_keep_the_clip_audible_beside_the_positions():
    """At initialisation the clip's content must reach the transformer at a scale comparable to the
    sinusoidal positions added to it. With PyTorch's default conv init it arrived ~10x weaker (ratio ~0.09 on
    these clips, ~0.04 on the bundled ones) and training settled on a clip-independent constant; He init
    gives ~0.7 here."""
    t = np.arange(SAMPLE_RATE) / SAMPLE_RATE
    clips = [0.3 * np.sin(2 * np.pi * f * t) * (t % 0.25 < 0.15) for f in (697.0, 1209.0, 523.25)]
    mels = torch.from_numpy(np.stack([log_mel_spectrogram(c) for c in clips]))  # (3, n_mels, F)
    for seed in range(3):
        torch.manual_seed(seed)
        encoder = AudioEncoder(AudioEncoderConfig(n_embd=128, n_layer=1, n_head=4))
        with torch.no_grad():
            content = torch.nn.functional.gelu(encoder.conv2(torch.nn.functional.gelu(encoder.conv1(mels))))
        assert content.std() / encoder.pos_emb.std() > 0.3
