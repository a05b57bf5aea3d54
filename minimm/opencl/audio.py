"""The audio encoder of minimm/audio.py on an OpenCL device: two convolutions, then transformer blocks.

Paper: Radford et al. 2022, Whisper, https://arxiv.org/abs/2212.04356 (the encoder's layout).

What is notable here: the convolutions are im2col + SGEMM (minimm/opencl/kernels/conv1d.py) and come
out in the token layout (B, T, C) the blocks read, so no transpose is ever made. Padded frames are
zeroed with masks computed on the host from the lengths, exactly where AudioEncoder zeroes them, and
attention ignores keys past each clip's length (key_lengths). Every op records its backward.

Shape letters: B batch, n_mels mel bands, F mel frames, T encoder frames (ceil(F / 2)), C channels.
"""
from __future__ import annotations

from dataclasses import asdict

import numpy as np
import torch

from minimm.audio import AudioEncoder, AudioEncoderConfig, sinusoids
from minimm.opencl import attention as A
from minimm.opencl import functional as F
from minimm.opencl.runtime import Device, get_device
from minimm.opencl.tensor import Tensor, no_grad


class OpenCLAudioEncoder:
    def __init__(self, config: AudioEncoderConfig, params: dict[str, Tensor], device: Device):
        self.config = config
        self.device = device
        self.params = params  # AudioEncoder's parameter names

    @classmethod
    def from_torch(cls, model: AudioEncoder, device: str = "opencl") -> OpenCLAudioEncoder:
        dev = get_device(device)
        params = {name: Tensor.from_numpy(dev, p.detach().float().cpu().numpy())
                  for name, p in model.state_dict().items()}
        return cls(model.config, params, dev)

    def _mask(self, lengths: np.ndarray | None, B: int, frames: int) -> Tensor | None:
        """(B, frames, C) of ones at real frames and zeros at padded ones; None when nothing is padded."""
        if lengths is None:
            return None
        keep = (np.arange(frames)[None, :] < lengths[:, None]).astype(np.float32)  # (B, frames)
        return Tensor.from_numpy(self.device, np.repeat(keep[:, :, None], self.config.n_embd, axis=2))

    def forward_tensors(self, mels: torch.Tensor, lengths: torch.Tensor | None = None) -> Tensor:
        """mels: (B, n_mels, F) log-mel; lengths: (B,) real frames -> (B, T, C) on the device."""
        cfg, p = self.config, self.params.get
        B, _, n_frames = mels.shape
        if n_frames > cfg.max_frames:
            raise ValueError(f"{n_frames} mel frames is more than max_frames={cfg.max_frames}")
        mels = mels.detach().float().cpu().numpy()
        in_lengths = None if lengths is None else lengths.cpu().numpy()
        out_lengths = None if lengths is None else AudioEncoder.output_lengths(lengths.cpu()).numpy()
        if in_lengths is not None:  # padded frames read as zeros, as the convolution's own padding would
            mels = mels * (np.arange(n_frames)[None, None, :] < in_lengths[:, None, None])
        x = F.conv1d(Tensor.from_numpy(self.device, mels), p("conv1.weight"), p("conv1.bias"), 1, 1)  # (B, F, C)
        x = F.gelu(x, approximate="none")  # (B, F, C)
        keep_in = self._mask(in_lengths, B, n_frames)
        if keep_in is not None:
            x = F.mul(x, keep_in)  # (B, F, C)
        x = F.conv1d(x, p("conv2.weight"), p("conv2.bias"), 2, 1, channels_last=True)  # (B, T, C)
        x = F.gelu(x, approximate="none")  # (B, T, C)
        T = x.shape[1]
        positions = sinusoids(T, cfg.n_embd).numpy()  # (T, C): the encoder's fixed buffer
        x = F.add(x, Tensor.from_numpy(self.device, np.broadcast_to(positions, (B, T, cfg.n_embd))))  # (B, T, C)
        for layer in range(cfg.n_layer):
            h = f"blocks.{layer}."
            a = F.layer_norm(x, p(h + "ln_1.weight"), p(h + "ln_1.bias"))  # (B, T, C)
            qkv = F.linear(a, p(h + "attn.c_attn.weight"), p(h + "attn.c_attn.bias"))  # (B, T, 3C)
            q, k, v = A.split_heads(qkv, cfg.n_head)  # each (B, nh, T, hs)
            y = A.merge_heads(A.attention(q, k, v, causal=False, key_lengths=out_lengths))  # (B, T, C)
            x = F.linear(y, p(h + "attn.c_proj.weight"), p(h + "attn.c_proj.bias"), residual=x)  # (B, T, C)
            a = F.layer_norm(x, p(h + "ln_2.weight"), p(h + "ln_2.bias"))  # (B, T, C)
            a = F.gelu(F.linear(a, p(h + "mlp.c_fc.weight")), p(h + "mlp.c_fc.bias"), approximate="none")
            x = F.linear(a, p(h + "mlp.c_proj.weight"), p(h + "mlp.c_proj.bias"), residual=x)  # (B, T, C)
        x = F.layer_norm(x, p("ln_post.weight"), p("ln_post.bias"))  # (B, T, C)
        keep_out = self._mask(out_lengths, B, T)
        return x if keep_out is None else F.mul(x, keep_out)  # (B, T, C)

    def forward(self, mels: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """AudioEncoder.forward: (B, n_mels, F) -> (B, T, C) as a CPU tensor (no gradients)."""
        with no_grad():
            return torch.from_numpy(self.forward_tensors(mels, lengths).numpy())

    __call__ = forward

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: torch.from_numpy(t.numpy()) for name, t in self.params.items()}

    def model_args(self) -> dict:
        return asdict(self.config)
