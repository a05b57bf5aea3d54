"""Audio for minimm: the log-mel spectrogram and the transformer encoder that reads it.

What this file teaches:
- A spectrogram is a sequence of short, overlapping, windowed FFTs. Whisper's front end, rebuilt from its
  definition: 25 ms Hann windows every 10 ms, power spectrum, 80 mel bands, log10, a floor 8 decades
  below the loudest value, then a fixed affine map that lands roughly in [-1, 1].
- The mel scale (Slaney's: linear below 1 kHz, logarithmic above) spaces bands the way pitch is heard;
  each band is a triangle over FFT bins, scaled to unit area so wide high bands do not dominate.
- The encoder is Whisper's, small: two 1-D convolutions (the second halves the frame rate), fixed
  sinusoidal positions, pre-norm transformer blocks with bidirectional attention, a final LayerNorm.
- Padding is handled exactly: padded mel frames are zeroed before each convolution (so the convolution
  sees what it would see at the true end of the clip) and masked as attention keys, so the outputs of real
  frames do not depend on how much padding shares their batch.
- Initialisation matters more than it looks: with PyTorch's default convolution init the clip's content
  reaches the transformer ~25 times weaker than the positions added to it, and the model never learns to
  listen (its audio loss stays at chance). He init keeps the content at unit scale (see AudioEncoder).

Paper: Radford et al. 2022, "Robust Speech Recognition via Large-Scale Weak Supervision" (Whisper),
https://arxiv.org/abs/2212.04356. Mel filters: Slaney, "Auditory Toolbox" (1998).

Shape letters: B batch, F mel frames, T encoder frames (F / 2 rounded up), C channels (n_embd),
nh heads, hs head size (C / nh), n_mels mel bands, n_freq FFT bins (n_fft / 2 + 1).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from minimm.ops import attention
from minimm.wav import load_wav, resample

__all__ = ["SAMPLE_RATE", "N_FFT", "HOP_LENGTH", "N_MELS", "load_wav", "resample", "mel_filterbank",
           "log_mel_spectrogram", "load_audio_features", "AudioEncoderConfig", "AudioEncoder"]

SAMPLE_RATE = 16000  # Hz: speech and our synthetic tones live below its 8 kHz Nyquist frequency
N_FFT = 400  # 25 ms window at 16 kHz: FFT bins 16000 / 400 = 40 Hz apart
HOP_LENGTH = 160  # 10 ms at 16 kHz: 100 mel frames per second
N_MELS = 80  # mel bands between 0 Hz and 8 kHz
LOG_FLOOR = 1e-10  # power below this is silence: keeps log10 finite
DYNAMIC_RANGE = 8.0  # decades kept below the loudest value (80 dB)

# Slaney's mel scale: 3 mels per 200 Hz up to 1 kHz, then logarithmic, 27 mels per factor 6.4 in Hz.
_MEL_LINEAR_HZ = 200.0 / 3.0
_MEL_BREAK_HZ = 1000.0
_MEL_BREAK = _MEL_BREAK_HZ / _MEL_LINEAR_HZ  # 15 mels at 1 kHz
_MEL_LOG_STEP = math.log(6.4) / 27.0


def hz_to_mel(f: np.ndarray) -> np.ndarray:
    """Slaney mel scale: linear below 1 kHz, logarithmic above, continuous at the break."""
    f = np.asarray(f, dtype=np.float64)
    log_part = _MEL_BREAK + np.log(np.maximum(f, _MEL_BREAK_HZ) / _MEL_BREAK_HZ) / _MEL_LOG_STEP
    return np.where(f < _MEL_BREAK_HZ, f / _MEL_LINEAR_HZ, log_part)


def mel_to_hz(m: np.ndarray) -> np.ndarray:
    """Inverse of hz_to_mel."""
    m = np.asarray(m, dtype=np.float64)
    log_part = _MEL_BREAK_HZ * np.exp(_MEL_LOG_STEP * (np.maximum(m, _MEL_BREAK) - _MEL_BREAK))
    return np.where(m < _MEL_BREAK, m * _MEL_LINEAR_HZ, log_part)


def mel_band_edges(sr: int, n_mels: int) -> np.ndarray:
    """(n_mels + 2,) Hz: band i rises from edge i, peaks at edge i + 1 and falls to zero at edge i + 2."""
    return mel_to_hz(np.linspace(0.0, hz_to_mel(sr / 2), n_mels + 2))


def mel_filterbank(sr: int, n_fft: int, n_mels: int) -> np.ndarray:
    """Triangular mel filters with Slaney area normalisation -> (n_mels, n_fft // 2 + 1) float32.

    Band edges are evenly spaced in mel from 0 Hz to sr / 2. Each triangle is divided by its width in Hz
    (times 2), so every band has roughly the same area: a white spectrum gives equal energy per band.
    """
    fft_hz = np.linspace(0.0, sr / 2, n_fft // 2 + 1)  # (n_freq,) centre of each rfft bin
    edges = mel_band_edges(sr, n_mels)  # (n_mels + 2,)
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]  # (n_mels, 1) each
    rising = (fft_hz[None, :] - lower) / (centre - lower)  # (n_mels, n_freq)
    falling = (upper - fft_hz[None, :]) / (upper - centre)  # (n_mels, n_freq)
    triangles = np.maximum(0.0, np.minimum(rising, falling))
    return (triangles * (2.0 / (upper - lower))).astype(np.float32)


@lru_cache(maxsize=None)
def _filters_and_window() -> tuple[np.ndarray, np.ndarray]:
    filters = mel_filterbank(SAMPLE_RATE, N_FFT, N_MELS).astype(np.float64)  # (n_mels, n_freq)
    # Periodic Hann (the denominator is N, not N - 1): overlapping copies at hop N / 4 sum to a constant.
    window = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(N_FFT) / N_FFT)  # (N_FFT,)
    return filters, window


def log_mel_spectrogram(samples_16k: np.ndarray) -> np.ndarray:
    """Mono 16 kHz samples (N,) -> log-mel spectrogram, a numpy float32 array (N_MELS, F).

    F = 1 + N // HOP_LENGTH: frames are centred on samples 0, 160, 320, ..., with the signal reflected
    at both ends (as in Whisper and torch.stft(center=True)). numpy rather than torch because features
    are computed once at prepare time and stored; torch.from_numpy() turns them into a tensor for free.
    Clips shorter than N_FFT // 2 + 1 samples are zero-padded to that length so reflection is defined.
    """
    x = np.asarray(samples_16k, dtype=np.float64)
    if x.ndim != 1 or len(x) == 0:
        raise ValueError(f"log_mel_spectrogram expects non-empty mono samples (N,), got shape {x.shape}")
    filters, window = _filters_and_window()
    n_frames = 1 + len(x) // HOP_LENGTH
    x = np.pad(x, (0, max(0, N_FFT // 2 + 1 - len(x))))
    padded = np.pad(x, N_FFT // 2, mode="reflect")  # (N + N_FFT,)
    frames = np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[::HOP_LENGTH][:n_frames]  # (F, N_FFT)
    power = np.abs(np.fft.rfft(frames * window, axis=-1)) ** 2  # (F, n_freq)
    # (n_mels, n_freq) x (F, n_freq) -> (n_mels, F). einsum rather than @: too small to gain from BLAS
    # threads, which in a loop over many clips cost more in waking up than the product itself.
    mel = np.einsum("mk,fk->mf", filters, power)
    log_mel = np.log10(np.maximum(mel, LOG_FLOOR))
    log_mel = np.maximum(log_mel, log_mel.max() - DYNAMIC_RANGE)
    # Whisper's fixed scaling: the 8 decades below a peak of 0 (log10 power) map exactly onto [-1, 1];
    # louder or quieter clips shift by a quarter per decade, so real clips land roughly in [-1, 1].
    return np.ascontiguousarray((log_mel + 4.0) / 4.0, dtype=np.float32)


def load_audio_features(path: str | os.PathLike) -> np.ndarray:
    """WAV file -> (N_MELS, F) float32 log-mel features: read, mix to mono, resample to 16 kHz, mel."""
    samples, sample_rate = load_wav(path)
    return log_mel_spectrogram(resample(samples, sample_rate, SAMPLE_RATE))


@dataclass
class AudioEncoderConfig:
    n_mels: int = N_MELS
    n_embd: int = 192
    n_layer: int = 4
    n_head: int = 4
    max_frames: int = 1001  # longest input in mel frames: 10 s at 100 frames per second, plus one
    dropout: float = 0.0


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> torch.Tensor:
    """Fixed positional code (length, channels): sines then cosines at geometrically spaced frequencies."""
    half = channels // 2
    inv_timescales = torch.exp(-math.log(max_timescale) * torch.arange(half) / max(half - 1, 1))  # (half,)
    angles = torch.arange(length)[:, None] * inv_timescales[None, :]  # (length, half)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)  # (length, channels)


class SelfAttention(nn.Module):
    """Bidirectional multi-head self-attention; keys at or beyond each row's length are ignored."""

    def __init__(self, config: AudioEncoderConfig):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be a multiple of n_head"
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        y = attention(q, k, v, causal=False, key_lengths=lengths)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: AudioEncoderConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))  # (B, T, 4C) inside, (B, T, C) out


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: AudioEncoderConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = SelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), lengths)
        return x + self.mlp(self.ln_2(x))


class AudioEncoder(nn.Module):
    """Log-mel frames (B, n_mels, F) -> encoder states (B, T, C) with T = ceil(F / 2)."""

    def __init__(self, config: AudioEncoderConfig):
        super().__init__()
        self.config = config
        self.conv1 = nn.Conv1d(config.n_mels, config.n_embd, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(config.n_embd, config.n_embd, kernel_size=3, stride=2, padding=1)
        max_out = self.output_lengths(torch.tensor(config.max_frames)).item()
        # Fixed, derived from the config: not saved in checkpoints (persistent=False).
        self.register_buffer("pos_emb", sinusoids(max_out, config.n_embd), persistent=False)  # (T_max, C)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_post = nn.LayerNorm(config.n_embd)
        # Initialisation decides whether the clip is heard at all. PyTorch's default for a convolution
        # (std 1 / sqrt(3 fan_in)) shrinks the features about threefold per layer, so after two layers the
        # content is ~25 times weaker than the unit-amplitude sinusoids added to it, and training settles on
        # a clip-independent constant. He init (std sqrt(2 / fan_in), for the GELU that follows) keeps the
        # features at unit scale; the transformer's Linears get the GPT's N(0, 0.02).
        for conv in (self.conv1, self.conv2):
            nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
            nn.init.zeros_(conv.bias)
        for block in self.blocks:
            for m in block.modules():
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=0.02)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)

    @staticmethod
    def output_lengths(lengths: torch.Tensor) -> torch.Tensor:
        """Mel frames -> encoder frames: the stride-2 convolution (kernel 3, padding 1) keeps ceil(F / 2)."""
        return (lengths + 1) // 2

    def forward(self, mels: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """mels: (B, n_mels, F); lengths: (B,) real mel frames per row, None when no row is padded.

        Returns (B, T, C). Rows shorter than F get zeros at their padded output frames.
        """
        n_frames = mels.shape[2]
        if n_frames > self.config.max_frames:
            raise ValueError(f"{n_frames} mel frames is more than max_frames={self.config.max_frames}")
        out_lengths = None if lengths is None else self.output_lengths(lengths.to(mels.device))
        keep_in = self._keep(lengths, n_frames, mels)  # (B, 1, F): 1 for real frames, 0 for padding
        x = mels * keep_in  # (B, n_mels, F)
        x = F.gelu(self.conv1(x)) * keep_in  # (B, C, F)
        x = F.gelu(self.conv2(x))  # (B, C, T)
        x = x.transpose(1, 2)  # (B, T, C)
        x = self.drop(x + self.pos_emb[:x.shape[1]])  # (B, T, C)
        for block in self.blocks:
            x = block(x, out_lengths)
        x = self.ln_post(x)  # (B, T, C)
        return x * self._keep(out_lengths, x.shape[1], x).transpose(1, 2)  # (B, T, C)

    @staticmethod
    def _keep(lengths: torch.Tensor | None, n_frames: int, like: torch.Tensor) -> torch.Tensor:
        """(B, 1, n_frames) of ones at real frames and zeros at padded ones; all ones when lengths is None.

        Zeroing padded frames before a convolution makes it see what its own zero padding would show at
        the true end of the clip."""
        if lengths is None:
            return torch.ones(1, 1, n_frames, dtype=like.dtype, device=like.device)
        frames = torch.arange(n_frames, device=like.device)[None, :]  # (1, n_frames)
        return (frames < lengths.to(like.device)[:, None]).to(like.dtype)[:, None, :]  # (B, 1, n_frames)
