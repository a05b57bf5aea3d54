"""Reading WAV files and changing their sample rate, with nothing but the standard library and numpy.

What this file teaches:
- A WAV file is a RIFF container: the 12 bytes "RIFF", a size, "WAVE", then chunks, each a 4-byte id, a
  little-endian 32-bit size and that many bytes of payload (plus one pad byte when the size is odd). Only
  two chunks matter here: "fmt " (how samples are stored) and "data" (the samples, channels interleaved).
  Every other chunk ("LIST", "fact", ...) is skipped by its size, which is why we parse the chunks ourselves
  instead of using the standard `wave` module: it refuses IEEE float and WAVE_FORMAT_EXTENSIBLE headers.
- Sample encodings: 8-bit PCM is unsigned with 128 as silence; 16, 24 and 32-bit PCM are signed two's
  complement (24-bit has no numpy dtype, so its three bytes are assembled into an int32 by hand); format 3
  is IEEE float. WAVE_FORMAT_EXTENSIBLE (0xFFFE) is a wrapper whose real format code is the first two bytes
  of its SubFormat GUID.
- Resampling as band-limited interpolation: each output sample is a windowed-sinc-weighted sum of the input
  samples around its position in time (Smith, "Digital Audio Resampling",
  https://ccrma.stanford.edu/~jos/resample/). The low-pass built into the sinc is what prevents aliasing.

Format reference: Microsoft "Multiple Channel Audio Data and WAVE Files" (WAVEFORMATEXTENSIBLE),
https://learn.microsoft.com/en-us/windows-hardware/drivers/audio/extensible-wave-format-descriptors
"""
from __future__ import annotations

import math
import os
import struct
from functools import lru_cache

import numpy as np

WAVE_FORMAT_PCM = 1
WAVE_FORMAT_IEEE_FLOAT = 3
WAVE_FORMAT_EXTENSIBLE = 0xFFFE
# The SubFormat GUID of WAVE_FORMAT_EXTENSIBLE is the format code followed by these 14 fixed bytes.
_GUID_TAIL = b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"
_PCM_BITS = (8, 16, 24, 32)


def load_wav(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """Read a WAV file -> (samples: (N,) float32 mono in [-1, 1], sample_rate in Hz).

    Supports 8/16/24/32-bit PCM and 32-bit IEEE float, plain or inside WAVE_FORMAT_EXTENSIBLE, with any
    number of channels; channels are mixed down by their mean. Integer PCM is divided by 2**(bits - 1):
    the most negative code becomes -1 and the most positive 1 - 2**(1 - bits). Float samples beyond full
    scale are clipped to [-1, 1].
    Raises ValueError naming the file and the problem for anything else (another container, a truncated
    file, an unsupported encoding, zero channels).
    """
    with open(path, "rb") as f:
        blob = f.read()
    name = os.fspath(path)
    if len(blob) < 12 or blob[:4] != b"RIFF" or blob[8:12] != b"WAVE":
        raise ValueError(f"{name}: not a RIFF/WAVE file (first bytes {blob[:12]!r})")
    chunks = _read_chunks(blob, name)
    if "fmt " not in chunks:
        raise ValueError(f"{name}: no 'fmt ' chunk (truncated file?)")
    if "data" not in chunks:
        raise ValueError(f"{name}: no 'data' chunk (truncated file?)")
    fmt_code, channels, sample_rate, bits = _parse_fmt(chunks["fmt "], name)
    frame_bytes = channels * bits // 8
    data = chunks["data"]
    if len(data) % frame_bytes:
        raise ValueError(f"{name}: the data chunk holds {len(data)} bytes, not a whole number of "
                         f"{frame_bytes}-byte frames")
    samples = _decode(data, fmt_code, bits)  # (N * channels,) float64
    mono = samples.reshape(-1, channels).mean(axis=1)  # (N,)
    return mono.astype(np.float32), sample_rate


def _read_chunks(blob: bytes, name: str) -> dict[str, bytes]:
    """Walk the chunks after the 12-byte RIFF header -> {chunk id: payload}; the first of each id wins."""
    chunks: dict[str, bytes] = {}
    pos = 12
    while pos + 8 <= len(blob):
        chunk_id, size = struct.unpack_from("<4sI", blob, pos)
        key = chunk_id.decode("latin-1")
        payload = blob[pos + 8:pos + 8 + size]
        if len(payload) < size:
            raise ValueError(f"{name}: chunk {key!r} declares {size} bytes but only {len(payload)} remain "
                             f"(truncated file)")
        chunks.setdefault(key, payload)
        pos += 8 + size + (size & 1)  # chunks start on even offsets: odd payloads carry a pad byte
    return chunks


def _parse_fmt(fmt: bytes, name: str) -> tuple[int, int, int, int]:
    """The 'fmt ' chunk -> (format code with EXTENSIBLE unwrapped, channels, sample rate, bits per sample)."""
    if len(fmt) < 16:
        raise ValueError(f"{name}: 'fmt ' chunk is {len(fmt)} bytes, expected at least 16")
    fmt_code, channels, sample_rate, _byte_rate, _block_align, bits = struct.unpack_from("<HHIIHH", fmt)
    if fmt_code == WAVE_FORMAT_EXTENSIBLE:
        if len(fmt) < 40:
            raise ValueError(f"{name}: WAVE_FORMAT_EXTENSIBLE 'fmt ' chunk is {len(fmt)} bytes, expected 40")
        fmt_code, guid_tail = struct.unpack_from("<H14s", fmt, 24)
        if guid_tail != _GUID_TAIL:
            raise ValueError(f"{name}: WAVE_FORMAT_EXTENSIBLE with an unknown SubFormat GUID")
    if channels == 0:
        raise ValueError(f"{name}: the header says 0 channels")
    if sample_rate == 0:
        raise ValueError(f"{name}: the header says a sample rate of 0 Hz")
    supported = ((fmt_code == WAVE_FORMAT_PCM and bits in _PCM_BITS)
                 or (fmt_code == WAVE_FORMAT_IEEE_FLOAT and bits == 32))
    if not supported:
        raise ValueError(f"{name}: unsupported encoding (format code {fmt_code:#x}, {bits} bits); "
                         f"supported: PCM with 8/16/24/32 bits and 32-bit IEEE float")
    return fmt_code, channels, sample_rate, bits


def _decode(data: bytes, fmt_code: int, bits: int) -> np.ndarray:
    """Raw little-endian samples -> (n,) float64 with full scale at +-1."""
    if fmt_code == WAVE_FORMAT_IEEE_FLOAT:
        return np.clip(np.frombuffer(data, dtype="<f4").astype(np.float64), -1.0, 1.0)
    if bits == 8:
        return (np.frombuffer(data, dtype=np.uint8).astype(np.float64) - 128.0) / 128.0
    if bits == 24:
        b = np.frombuffer(data, dtype=np.uint8).reshape(-1, 3).astype(np.int32)  # (n, 3) low byte first
        # Put the three bytes in the top of an int32, then an arithmetic shift right sign-extends them.
        ints = ((b[:, 0] << 8) | (b[:, 1] << 16) | (b[:, 2] << 24)) >> 8
        return ints.astype(np.float64) / 2.0 ** 23
    ints = np.frombuffer(data, dtype="<i2" if bits == 16 else "<i4")
    return ints.astype(np.float64) / 2.0 ** (bits - 1)


# Resampling parameters. ZERO_CROSSINGS sinc lobes on each side of the centre, tapered by a Kaiser window
# with KAISER_BETA = 8 (about 80 dB side-lobe rejection); ROLLOFF puts the cutoff a little below the
# target Nyquist frequency so that the window's transition band (which widens as the kernel shortens)
# falls mostly below it, instead of letting the top of the band fold back.
ZERO_CROSSINGS = 16
KAISER_BETA = 8.0
ROLLOFF = 0.94
_OUTPUT_BLOCK = 8192  # output samples computed per step: bounds memory for long files


def resample(x: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    """Change the sample rate of a mono signal x: (N,) -> (ceil(N * sr_out / sr_in),) float32.

    Output sample n sits at time t = n * sr_in / sr_out, measured in input samples, and is
        y[n] = sum_k x[k] * h(t - k),   h(d) = c * sinc(c * d) * kaiser(d),
        c = ROLLOFF * min(1, sr_out / sr_in),
    where sinc(u) = sin(pi u) / (pi u). h is a low-pass filter whose cutoff is c times the input Nyquist
    frequency (sr_in / 2). Anti-aliasing: a signal sampled at sr_out can only represent frequencies below
    sr_out / 2; anything above would fold back ("alias") onto a false lower frequency. So when
    downsampling (sr_out < sr_in) the cutoff must be the output Nyquist frequency, c = sr_out / sr_in;
    when upsampling the input already holds nothing above sr_in / 2, and c = 1 only interpolates. ROLLOFF
    moves the cutoff a little lower so the filter's finite transition band stays on the safe side.
    The sinc is truncated to ZERO_CROSSINGS of its lobes per side and tapered by a Kaiser window; the
    gain at 0 Hz is 1. Samples outside the signal count as zeros.

    Because sr_out / sr_in = L / M in lowest terms, the fractional position of output n repeats every L
    outputs: the filter is tabulated once per phase (polyphase) and applied with one gather and one sum.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"resample expects a mono signal of shape (N,), got {x.shape}")
    if int(sr_in) != sr_in or int(sr_out) != sr_out or sr_in <= 0 or sr_out <= 0:
        raise ValueError(f"sample rates must be positive integers, got {sr_in} -> {sr_out}")
    sr_in, sr_out = int(sr_in), int(sr_out)
    if sr_in == sr_out:
        return x.astype(np.float32)
    g = math.gcd(sr_in, sr_out)
    up, down = sr_out // g, sr_in // g  # output n is at input time n * down / up
    table = _polyphase_table(up, down)  # (up, 2W)
    W = table.shape[1] // 2
    n_out = (len(x) * up + down - 1) // down
    padded = np.concatenate([np.zeros(W), x, np.zeros(W + 1)])  # input k lives at padded[k + W]
    y = np.empty(n_out, dtype=np.float64)
    for start in range(0, n_out, _OUTPUT_BLOCK):
        n = np.arange(start, min(start + _OUTPUT_BLOCK, n_out))
        base, phase = np.divmod(n * down, up)  # (n,), (n,)
        taps = base[:, None] + 1 + np.arange(2 * W)[None, :]  # (n, 2W) indices into padded
        y[n] = np.einsum("nw,nw->n", padded[taps], table[phase])  # (n,)
    return y.astype(np.float32)


@lru_cache(maxsize=8)
def _polyphase_table(up: int, down: int) -> np.ndarray:
    """Filter taps for every phase -> (up, 2W); cached because a dataset tends to share one sample rate.

    Phase p (output n with (n * down) % up == p) sits p / up of an input sample past input base =
    (n * down) // up, and reads inputs base - W + 1 ... base + W, at distances t - k from the kernel centre.
    """
    cutoff = ROLLOFF * min(1.0, up / down)
    half_width = ZERO_CROSSINGS / cutoff  # kernel half length in input samples
    W = math.ceil(half_width)
    offsets = np.arange(up)[:, None] / up + (W - 1) - np.arange(2 * W)[None, :]  # (up, 2W): t - k
    taper = np.sqrt(np.clip(1.0 - (offsets / half_width) ** 2, 0.0, None))
    window = np.where(np.abs(offsets) < half_width, np.i0(KAISER_BETA * taper) / np.i0(KAISER_BETA), 0.0)
    return cutoff * np.sinc(cutoff * offsets) * window  # (up, 2W)
