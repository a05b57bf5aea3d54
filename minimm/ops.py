"""The two hot operations of every model in minimm, behind one call site each.

What this file teaches:
- `attention()` and `cross_entropy()` are the only places where a model touches a fast kernel. The GPT,
  the ViT and the audio encoder all call them, so a new backend is one branch here, not an edit everywhere.
- Every backend computes the same function as the written-out "math" reference below; that reference is
  what the tests compare the fast paths against (the tinygrad idea: one helper checks every op).
- The backend is chosen once (`set_backend`, from the config key `kernels`), with a fallback that always
  works: plain PyTorch.
- Mixed precision is a per-op choice: under CPU bf16 autocast the matmuls gain (Intel AMX, AVX-512 BF16) but
  PyTorch's CPU attention kernel loses, so attention() keeps its own arithmetic in fp32 there.

Backends:
  "math"   written-out softmax(q k^T / sqrt(hs)) v and log-softmax cross-entropy: slow, obviously right.
  "torch"  torch.nn.functional.scaled_dot_product_attention / F.cross_entropy (fused where PyTorch has it).
  "triton" minimm/kernels/ (FlashAttention-style attention, fused cross-entropy); CUDA, or the CPU
           interpreter when TRITON_INTERPRET=1 (that is how the tests run it).

Shape letters: B batch, nh heads, Tq query tokens, Tk key tokens, hs head size, N rows, V vocabulary.
Paper for the attention: Vaswani et al. 2017, https://arxiv.org/abs/1706.03762
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

BACKENDS = ("math", "torch", "triton")
_backend = "torch"


def set_backend(kernels: str, device: str | torch.device = "cpu") -> str:
    """Choose the backend for the whole process from the config key `kernels`.

    kernels: "auto" (Triton on CUDA when it imports, else PyTorch), "triton", "torch" or "math".
    Returns the backend chosen; train.py and sample.py print it in one log line.
    """
    global _backend
    if kernels == "auto":
        kernels = "triton" if torch.device(device).type == "cuda" and _triton_available() else "torch"
    if kernels not in BACKENDS:
        raise ValueError(f"kernels={kernels!r}: expected one of 'auto', {', '.join(map(repr, BACKENDS))}")
    if kernels == "triton" and not _triton_available():
        raise RuntimeError("kernels='triton' but triton does not import: pip install -e '.[triton]'")
    _backend = kernels
    return kernels


def get_backend() -> str:
    return _backend


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def attention_mask(Tq: int, Tk: int, causal: bool, key_lengths: torch.Tensor | None,
                   segment_ids: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """Boolean mask (B or 1, 1, Tq, Tk), True where a query may look at a key; None when all may.

    causal: query i (the i-th of the last Tq positions) sees keys 0 .. Tk - Tq + i, so that a KV cache
            (Tq < Tk) lines the queries up with the end of the keys.
    key_lengths: (B,) number of real keys per row; keys at or beyond it are padding.
    segment_ids: (B, T) id of the packed example each token belongs to; tokens attend within their own
            example only (needs Tq == Tk).
    """
    mask = None
    if causal:
        q_pos = torch.arange(Tk - Tq, Tk, device=device)[:, None]
        mask = (torch.arange(Tk, device=device)[None, :] <= q_pos)[None, None]  # (1, 1, Tq, Tk)
    if key_lengths is not None:
        keep = torch.arange(Tk, device=device)[None, :] < key_lengths.to(device)[:, None]  # (B, Tk)
        keep = keep[:, None, None, :]  # (B, 1, 1, Tk)
        mask = keep if mask is None else mask & keep
    if segment_ids is not None:
        same = segment_ids[:, :, None] == segment_ids[:, None, :]  # (B, T, T)
        same = same[:, None, -Tq:, :]  # (B, 1, Tq, Tk)
        mask = same if mask is None else mask & same
    return mask


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
              key_lengths: torch.Tensor | None = None, segment_ids: torch.Tensor | None = None,
              backend: str | None = None) -> torch.Tensor:
    """Scaled dot-product attention. q: (B, nh, Tq, hs), k and v: (B, nh, Tk, hs) -> (B, nh, Tq, hs).

    A query row whose keys are all masked (only possible with key_lengths == 0) returns zeros.
    """
    backend = backend or _backend
    if backend == "triton" and segment_ids is None and q.shape[2] == k.shape[2] and q.shape[-1] <= 128:
        from minimm.kernels.attention import triton_attention
        return triton_attention(q, k, v, causal=causal, key_lengths=key_lengths)
    mask = attention_mask(q.shape[2], k.shape[2], causal, key_lengths, segment_ids, q.device)
    if backend == "math":
        return math_attention(q, k, v, mask)
    half = q.dtype in (torch.bfloat16, torch.float16)
    if q.device.type == "cpu" and (half or torch.is_autocast_enabled("cpu")):
        # PyTorch's CPU attention kernel is slower in bfloat16 than in float32 (its backward ~3x, 16 x 4
        # heads x 256 x 48), while bf16 matmuls on CPUs with AMX are 5x faster than fp32 ones. So under CPU
        # autocast the linears run in bf16 and attention in fp32 (autocast would cast it back: off here).
        work = torch.float32 if half else q.dtype
        with torch.autocast("cpu", enabled=False):
            return _torch_attention(q.to(work), k.to(work), v.to(work), mask, causal, key_lengths,
                                    segment_ids).to(q.dtype)
    return _torch_attention(q, k, v, mask, causal, key_lengths, segment_ids)


def _torch_attention(q, k, v, mask, causal, key_lengths, segment_ids) -> torch.Tensor:
    """attention() through torch.nn.functional.scaled_dot_product_attention; arguments as there."""
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v)
    if causal and key_lengths is None and segment_ids is None and q.shape[2] == k.shape[2]:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if key_lengths is None:  # causal or same-example masks always leave a query its own key
        return out
    return out.masked_fill(~mask.any(-1, keepdim=True), 0.0)  # fully masked rows: zeros, not NaN


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   mask: torch.Tensor | None) -> torch.Tensor:
    """The reference: softmax(q k^T / sqrt(hs)) v, written out. Shapes as in attention()."""
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))  # (B, nh, Tq, Tk)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    if mask is not None:
        probs = probs.nan_to_num(0.0)  # a row with every key masked has no weights
    return probs @ v  # (B, nh, Tq, hs)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                  reduction: str = "mean", backend: str | None = None) -> torch.Tensor:
    """Softmax cross-entropy. logits: (..., V), targets: (...) of class ids or ignore_index.

    reduction: "mean" (over the targets that are not ignored; 0 when there are none, never NaN),
    "sum", or "none" (one loss per row, 0 where ignored).
    """
    backend = backend or _backend
    logits2d = logits.reshape(-1, logits.shape[-1])  # (N, V)
    targets1d = targets.reshape(-1)  # (N,)
    if backend == "triton":
        from minimm.kernels.cross_entropy import triton_cross_entropy
        loss = triton_cross_entropy(logits2d, targets1d, ignore_index=ignore_index, reduction=reduction)
    elif backend == "math":
        loss = math_cross_entropy(logits2d, targets1d, ignore_index, reduction)
    else:
        loss = F.cross_entropy(logits2d.float(), targets1d, ignore_index=ignore_index, reduction="none")
        loss = _reduce(loss, targets1d != ignore_index, reduction)
    return loss.reshape(targets.shape) if reduction == "none" else loss


def math_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                       reduction: str) -> torch.Tensor:
    """The reference: -log_softmax(logits)[target], written out. logits: (N, V), targets: (N,)."""
    valid = targets != ignore_index  # (N,)
    logprobs = logits.float() - torch.logsumexp(logits.float(), dim=-1, keepdim=True)  # (N, V)
    picked = logprobs.gather(1, targets.clamp(min=0)[:, None])[:, 0]  # (N,)
    return _reduce(-picked * valid, valid, reduction)


def _reduce(loss: torch.Tensor, valid: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.sum() / valid.sum().clamp(min=1)
    raise ValueError(f"reduction={reduction!r}: expected 'mean', 'sum' or 'none'")
