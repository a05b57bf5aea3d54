"""Quantized frozen weights: the "Q" of QLoRA, 4-bit NormalFloat (NF4) and int8 block-wise absmax.

Follows Dettmers et al. 2023, QLoRA: https://arxiv.org/abs/2305.14314 (section 3, "4-bit NormalFloat").

What this file teaches:
- A frozen base weight does not need 32 bits per number. Cut it into blocks of BLOCK_SIZE = 64 weights,
  divide each block by its largest magnitude (its absmax) so it lies in [-1, 1], and store for each weight
  only the index of the nearest of a few fixed levels. The absmax of each block is kept in fp32.
- Which levels? Trained weights are close to normally distributed, so NF4 places its 16 levels at quantiles
  of the normal distribution: each level then stands for about the same number of weights, and no code is
  wasted on values that hardly occur (the derivation is in `nf4_levels`). int8 uses 255 evenly spaced levels.
- Memory: NF4 stores two codes per byte (0.5 byte per weight) plus one fp32 scale per 64 weights
  (4 / 64 = 0.0625 byte), 0.5625 bytes per weight against fp32's 4: about 0.14x. int8: 1.0625 bytes, ~0.27x.
- `QuantLinear` keeps the codes and scales as buffers (so they travel with `state_dict()` and `.to()`) and
  dequantizes the weight in every forward: memory is saved at rest, the matmul itself runs in floating point.
  It never trains; LoRA adapters (minimm/lora.py) learn the update next to it.

Error bounds (proved by the rounding rule: each normalized weight goes to its nearest level, and every
normalized weight lies between the smallest and the largest level, -1 and 1):
  NF4:  |w - dequantize(quantize(w))| <= absmax_block * NF4_MAX_HALF_GAP  (NF4_MAX_HALF_GAP ~ 0.1519, half
        the widest gap between neighbouring levels, the one from -1 to -0.6962)
  int8: |w - dequantize(quantize(w))| <= absmax_block / 254                (half of one step of 1/127)
each up to fp32 rounding of the division and the product (a few ulps of absmax_block).

Shape letters: N number of weights, nb blocks (ceil(N / BLOCK_SIZE)), out / in the Linear's features.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

BLOCK_SIZE = 64  # weights sharing one absmax scale: QLoRA's choice, small enough that one outlier costs little
INT8_MAX = 127  # symmetric int8 codes in [-127, 127], so that 0 is exact and -128 is never used
KINDS = ("nf4", "int8")


def nf4_levels() -> torch.Tensor:
    """The 16 NF4 levels, ascending, in [-1, 1]: (16,) float32.

    Derivation. Let ppf be the inverse of the standard normal CDF (torch.special.ndtri). With 4 bits we
    want an exact zero (padding and zero-centred weights must stay exact) and both ends -1 and 1. A
    symmetric set of quantiles cannot have an exact zero with an even count of levels, so NF4 is
    asymmetric: 8 positive levels, 7 negative ones, and 0.
      - positive: ppf(p_j) for 8 probabilities p_j spaced evenly from 1/2 (excluded) up to p_max,
        p_j = 1/2 + (p_max - 1/2) * j / 8, j = 1..8;
      - negative: -ppf(q_j) for 7 probabilities spaced likewise, q_j = 1/2 + (p_max - 1/2) * j / 7, j = 1..7;
      - zero.
    ppf(1) is infinite, so the top probability p_max stops short of 1 by delta = (1/32 + 1/30) / 2: half of
    a probability step on a 16-level grid and on a 15-level grid, averaged (the QLoRA paper's offset,
    p_max = 0.9677083). Dividing everything by ppf(p_max) puts the largest level of each side at exactly
    1 and -1. The result matches the table in the paper's appendix E to ~1e-7.
    """
    p_max = 1.0 - (1.0 / 32 + 1.0 / 30) / 2
    step = torch.arange(1, 9, dtype=torch.float64)
    positive = torch.special.ndtri(0.5 + (p_max - 0.5) * step / 8)  # (8,)
    negative = -torch.special.ndtri(0.5 + (p_max - 0.5) * step[:7] / 7)  # (7,)
    levels = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive])
    levels = levels / torch.special.ndtri(torch.tensor(p_max, dtype=torch.float64))
    return levels.sort().values.float()


NF4_LEVELS = nf4_levels()
NF4_MAX_HALF_GAP = float((NF4_LEVELS[1:] - NF4_LEVELS[:-1]).max() / 2)


class QuantizedTensor(NamedTuple):
    """A quantized tensor: codes (packed NF4 nibbles as uint8, or int8), absmax: (nb,) fp32, and the shape."""
    codes: torch.Tensor
    absmax: torch.Tensor
    shape: torch.Size


def _blocks(w: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flatten w, pad with zeros to whole blocks, and normalize each block by its absmax.

    Returns (normalized (nb, block_size) in [-1, 1], absmax (nb,) fp32). An all-zero block keeps absmax 0
    and is divided by 1 instead, so it stays zero.
    """
    flat = w.detach().float().reshape(-1)  # (N,)
    padded = F.pad(flat, (0, -flat.numel() % block_size))  # (nb * block_size,)
    blocks = padded.view(-1, block_size)  # (nb, block_size)
    absmax = blocks.abs().amax(dim=1)  # (nb,)
    divisor = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    return blocks / divisor[:, None], absmax


def quantize_nf4(w: torch.Tensor, block_size: int = BLOCK_SIZE) -> QuantizedTensor:
    """w: any shape -> NF4 codes, two per byte: (ceil(N / block_size) * block_size / 2,) uint8."""
    if block_size % 2:
        raise ValueError(f"block_size={block_size}: NF4 packs two codes per byte, so it must be even")
    normalized, absmax = _blocks(w, block_size)
    levels = NF4_LEVELS.to(w.device)
    midpoints = (levels[1:] + levels[:-1]) / 2  # (15,) the decision boundaries between neighbours
    codes = torch.bucketize(normalized.reshape(-1), midpoints).to(torch.uint8)  # (nb * block_size,) in 0..15
    packed = (codes[0::2] << 4) | codes[1::2]  # high nibble: even positions, low nibble: odd ones
    return QuantizedTensor(packed, absmax, w.shape)


def dequantize_nf4(q: QuantizedTensor) -> torch.Tensor:
    """The inverse of quantize_nf4 up to the rounding error: float32 of shape q.shape."""
    codes = torch.stack([q.codes >> 4, q.codes & 0x0F], dim=-1).reshape(-1)  # (nb * block_size,)
    values = NF4_LEVELS.to(q.codes.device)[codes.long()].view(q.absmax.numel(), -1)  # (nb, block_size)
    values = values * q.absmax.float()[:, None]  # (nb, block_size)
    return values.reshape(-1)[:q.shape.numel()].view(q.shape)


def quantize_int8(w: torch.Tensor, block_size: int = BLOCK_SIZE) -> QuantizedTensor:
    """w: any shape -> int8 codes in [-127, 127]: (ceil(N / block_size) * block_size,) int8."""
    normalized, absmax = _blocks(w, block_size)
    codes = torch.round(normalized * INT8_MAX).to(torch.int8).reshape(-1)  # (nb * block_size,)
    return QuantizedTensor(codes, absmax, w.shape)


def dequantize_int8(q: QuantizedTensor) -> torch.Tensor:
    """The inverse of quantize_int8 up to the rounding error: float32 of shape q.shape."""
    values = q.codes.float().view(q.absmax.numel(), -1)  # (nb, block_size)
    values = values * (q.absmax.float() / INT8_MAX)[:, None]  # (nb, block_size)
    return values.reshape(-1)[:q.shape.numel()].view(q.shape)


QUANTIZE = {"nf4": quantize_nf4, "int8": quantize_int8}
DEQUANTIZE = {"nf4": dequantize_nf4, "int8": dequantize_int8}


class QuantLinear(nn.Module):
    """A frozen Linear whose weight is stored quantized and dequantized in each forward.

    Buffers: `codes` and `absmax` (see QuantizedTensor); the bias, if any, stays in floating point as a
    parameter that does not train. forward(x: (..., in)) -> (..., out), the same function as F.linear with
    the dequantized weight. Keep the buffers in fp32 (train with autocast, not `model.to(bfloat16)`),
    since a bf16 absmax would add its own rounding to every weight of the block.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, kind: str = "nf4",
                 block_size: int = BLOCK_SIZE, device: torch.device | None = None):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind={kind!r}: expected one of {', '.join(map(repr, KINDS))}")
        self.in_features, self.out_features = in_features, out_features
        self.kind, self.block_size = kind, block_size
        n_blocks = -(-in_features * out_features // block_size)  # ceil
        n_codes = n_blocks * block_size // 2 if kind == "nf4" else n_blocks * block_size
        code_dtype = torch.uint8 if kind == "nf4" else torch.int8
        self.register_buffer("codes", torch.zeros(n_codes, dtype=code_dtype, device=device))
        self.register_buffer("absmax", torch.zeros(n_blocks, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, kind: str = "nf4", block_size: int = BLOCK_SIZE) -> QuantLinear:
        """Quantize a Linear's weight: (out, in); the bias is copied as it is."""
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, kind, block_size,
                linear.weight.device)
        quantized = QUANTIZE[kind](linear.weight, block_size)
        q.codes.copy_(quantized.codes)
        q.absmax.copy_(quantized.absmax)
        if linear.bias is not None:
            q.bias.data.copy_(linear.bias.detach())
        return q

    def dequantized_weight(self) -> torch.Tensor:
        """The weight in fp32: (out, in)."""
        shape = torch.Size((self.out_features, self.in_features))
        return DEQUANTIZE[self.kind](QuantizedTensor(self.codes, self.absmax, shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.dequantized_weight().to(x.dtype)  # (out, in), rebuilt each call, never stored
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, weight, bias)  # (..., out)

    def memory_bytes(self) -> int:
        """Bytes this layer holds at rest: codes, scales and bias."""
        tensors = [self.codes, self.absmax] + ([self.bias] if self.bias is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    def fp32_bytes(self) -> int:
        """Bytes the same layer would hold as an fp32 nn.Linear."""
        return 4 * (self.in_features * self.out_features + (self.out_features if self.bias is not None else 0))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, kind={self.kind}, block_size={self.block_size}")


def memory_report(model: nn.Module) -> dict[str, float]:
    """Memory of every QuantLinear in model at rest vs the same layers in fp32.

    Returns {"quantized_bytes", "fp32_bytes", "ratio", "layers"}; ratio is quantized / fp32 (about 0.14
    for NF4, 0.27 for int8, a little more where fp32 biases weigh in). Raises ValueError if none is found.
    """
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    if not layers:
        raise ValueError("no QuantLinear in the model: apply_lora(..., quantize='nf4') makes them")
    quantized = sum(m.memory_bytes() for m in layers)
    fp32 = sum(m.fp32_bytes() for m in layers)
    return {"quantized_bytes": quantized, "fp32_bytes": fp32, "ratio": quantized / fp32, "layers": len(layers)}
