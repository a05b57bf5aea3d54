"""Rotary position embeddings (Su et al. 2021, RoFormer: https://arxiv.org/abs/2104.09864).

What this file teaches: instead of adding a position vector to each token, rotate each query and key by an
angle proportional to its position. Channel pair (i, i + hs/2) of a head is a point in a plane, turned by
position * base^(-2i/hs); the dot product of a rotated query and key then depends only on the distance
between their positions, not on where they sit. minimm.gpt applies it to q and k in every attention layer
(the default `pos_emb="rope"`); the OpenCL backend uploads the same tables once (minimm/opencl/attention.py).
"""
from __future__ import annotations

import torch


def rope_tables(T: int, hs: int, base: float, offset: int = 0,
                device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotation angles for positions offset .. offset+T-1: each (T, hs).

    Channel pair (i, i + hs/2) turns at frequency base^(-2i/hs): fast for the first pairs (local order),
    slow for the last (long range).
    """
    inv_freq = base ** (-torch.arange(0, hs, 2, device=device, dtype=torch.float32) / hs)  # (hs/2,)
    pos = torch.arange(offset, offset + T, device=device, dtype=torch.float32)
    angles = pos[:, None] * inv_freq[None, :]  # (T, hs/2)
    angles = torch.cat([angles, angles], dim=-1)  # (T, hs)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each channel pair (i, i + hs/2) of x: (B, nh, T, hs) by the angles in cos/sin: (T, hs)."""
    x1, x2 = x.chunk(2, dim=-1)  # each (B, nh, T, hs/2)
    rotated = torch.cat([-x2, x1], dim=-1)  # (B, nh, T, hs)
    return (x * cos + rotated * sin).to(x.dtype)
