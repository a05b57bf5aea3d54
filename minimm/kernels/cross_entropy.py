"""Fused softmax cross-entropy in Triton: the loss and its gradient from one program per row.

What this file teaches:
- Cross-entropy over a large vocabulary is memory-bound: the arithmetic per logit is tiny, the logits
  are huge (16k rows x 128k vocabulary in bf16 is 4 GiB). The eager PyTorch path writes log-softmax out,
  reads it back for the loss, then writes a zero gradient, scatters into it and runs the log-softmax
  backward: about seven passes over N x V. Here one program per row does two sweeps over its row:
    sweep 1, online logsumexp: a running max m and a running sum s of exp(x - m), rescaled whenever a
             block raises the max (the same trick as FlashAttention's softmax), then
             loss = logsumexp(x) - x[target];
    sweep 2, the gradient, already known in closed form: d loss / d x_j = softmax(x)_j - [j == target],
             written straight out. Backward then only multiplies by the incoming gradient, and skips
             even that when it is 1 (the usual loss.backward()).
  Two reads and one write of the logits in total (the second read often hits L2). This is the approach
  of Liger-Kernel's cross-entropy (Hsu et al. 2024, https://arxiv.org/abs/2410.10989).
- Where the gradient goes: by default into a preallocated buffer of the logits' shape and dtype. With
  `inplace=True` it overwrites the logits themselves, which saves N x V of memory but is only safe when
  nothing reads the logits afterwards (no logging of argmax, no other op that saved them for its own
  backward). linear_cross_entropy.py uses that on logits it owns.
- z-loss (PaLM, https://arxiv.org/abs/2204.02311, section 5): `z_loss * logsumexp(x)^2` is added to each
  non-ignored row's loss, pulling the softmax normaliser towards 1 for numerical stability; its gradient
  2 * z_loss * logsumexp(x) * softmax(x) joins sweep 2 for free.
- The mean's 1 / (number of non-ignored rows) is folded into the stored gradient for bf16 and fp32. fp16
  would flush many of the small values p / N to zero, so there the gradient is stored unscaled and the
  backward pass applies 1 / N together with the incoming gradient.

Shape letters: N rows (tokens), V vocabulary. Rows whose target is ignore_index get loss 0, gradient 0.
Every other target must lie in [0, V): checking that would cost a host sync, so it is not checked.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
MAX_BLOCK_V = 4096  # logits per block of a sweep: 16 fp32 per thread at 8 warps


@triton.jit
def _ce_fwd_grad(LOGITS, TARGETS, LOSS, GRAD, GRAD_SCALE, stride_logits, stride_grad, V, ignore_index,
                 z_loss, COMPUTE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
    """One program: one row. Writes LOSS[row] and, if COMPUTE_GRAD, GRAD[row, :] (V,)."""
    row = tl.program_id(0).to(tl.int64)
    x_row = LOGITS + row * stride_logits
    g_row = GRAD + row * stride_grad
    target = tl.load(TARGETS + row)
    if target == ignore_index:
        tl.store(LOSS + row, 0.0)
        if COMPUTE_GRAD:
            for start in range(0, V, BLOCK_V):
                offs = start + tl.arange(0, BLOCK_V)
                tl.store(g_row + offs, tl.zeros([BLOCK_V], tl.float32), mask=offs < V)
    else:
        m = float("-inf")
        s = 0.0
        for start in range(0, V, BLOCK_V):  # sweep 1: online logsumexp
            offs = start + tl.arange(0, BLOCK_V)
            x = tl.load(x_row + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, 0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
            m = m_new
        lse = m + tl.log(s)
        x_target = tl.load(x_row + target).to(tl.float32)
        tl.store(LOSS + row, lse - x_target + z_loss * lse * lse)
        if COMPUTE_GRAD:  # sweep 2: (softmax * (1 + 2 z lse) - onehot) * scale
            scale = tl.load(GRAD_SCALE)
            p_scale = 1.0 + 2.0 * z_loss * lse
            for start in range(0, V, BLOCK_V):
                offs = start + tl.arange(0, BLOCK_V)
                x = tl.load(x_row + offs, mask=offs < V, other=0.0).to(tl.float32)
                grad = tl.exp(x - lse) * p_scale - tl.where(offs == target, 1.0, 0.0)
                tl.store(g_row + offs, grad * scale, mask=offs < V)


@triton.jit
def _scale_rows(GRAD, SCALE, stride_grad, stride_scale, V, BLOCK_V: tl.constexpr):
    """GRAD[row, :] *= SCALE[row * stride_scale]; a row whose factor is 1 is not touched."""
    row = tl.program_id(0).to(tl.int64)
    factor = tl.load(SCALE + row * stride_scale).to(tl.float32)
    if factor != 1.0:
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            g = tl.load(GRAD + row * stride_grad + offs, mask=offs < V, other=0.0)
            tl.store(GRAD + row * stride_grad + offs, g.to(tl.float32) * factor, mask=offs < V)


def _block_v(V: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps) for a row of V logits."""
    block = min(triton.next_power_of_2(V), MAX_BLOCK_V)
    return block, max(1, min(8, block // 512))


def folds_mean(dtype: torch.dtype) -> bool:
    """Whether the mean's 1/N goes into the stored gradient (not for fp16: p/N would underflow)."""
    return dtype != torch.float16


def cross_entropy_fwd_grad(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                           z_loss: float = 0.0, grad_scale: torch.Tensor | None = None,
                           grad: torch.Tensor | None = None, use_triton: bool | None = None) -> torch.Tensor:
    """Per-row loss (N,) fp32, and the gradient of sum(loss) * grad_scale written into `grad` if given.

    logits: (N, V); targets: (N,); grad: (N, V) with unit stride along V, may be `logits` itself.
    grad_scale: 0-dim fp32 tensor (a tensor so that 1/count needs no host sync), default 1.
    use_triton: None picks the Triton kernel on CUDA or under TRITON_INTERPRET=1, else the torch
    reference below.
    """
    N, V = logits.shape
    if grad_scale is None:
        grad_scale = torch.ones((), device=logits.device, dtype=torch.float32)
    if use_triton is None:
        use_triton = logits.is_cuda or INTERPRET
    if not use_triton:
        return torch_cross_entropy_fwd_grad(logits, targets, ignore_index, z_loss, grad_scale, grad)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    loss = torch.empty(N, device=logits.device, dtype=torch.float32)
    block, warps = _block_v(V)
    _ce_fwd_grad[(N,)](logits, targets.contiguous(), loss, logits if grad is None else grad,
                       grad_scale.to(torch.float32), logits.stride(0),
                       0 if grad is None else grad.stride(0), V, ignore_index, float(z_loss),
                       COMPUTE_GRAD=grad is not None, BLOCK_V=block, num_warps=warps)
    return loss


def torch_cross_entropy_fwd_grad(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                                 z_loss: float, grad_scale: torch.Tensor,
                                 grad: torch.Tensor | None) -> torch.Tensor:
    """The same function as the kernel, in plain PyTorch (fp32 copies of the logits)."""
    x = logits.float()  # (N, V)
    valid = targets != ignore_index  # (N,)
    safe_targets = torch.where(valid, targets, 0)
    lse = torch.logsumexp(x, dim=-1)  # (N,)
    picked = x.gather(1, safe_targets[:, None])[:, 0]  # (N,)
    loss = torch.where(valid, lse - picked + z_loss * lse * lse, 0.0)
    if grad is not None:
        g = torch.softmax(x, dim=-1) * (1.0 + 2.0 * z_loss * lse)[:, None]  # (N, V)
        g[torch.arange(len(g), device=g.device), safe_targets] -= 1.0
        grad.copy_(g * (valid[:, None] * grad_scale))
    return loss


class FusedCrossEntropy(torch.autograd.Function):
    """Forward computes the loss and the gradient together; backward scales the gradient in place."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, reduction: str,
                z_loss: float, inplace: bool) -> torch.Tensor:
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction={reduction!r}: expected 'mean', 'sum' or 'none'")
        logits = logits if logits.stride(-1) == 1 else logits.contiguous()
        n_valid = (targets != ignore_index).sum().clamp(min=1).to(torch.float32)
        fold = reduction == "mean" and folds_mean(logits.dtype)
        grad = None
        if ctx.needs_input_grad[0]:
            grad = logits if inplace else torch.empty_like(logits)
        loss = cross_entropy_fwd_grad(logits, targets, ignore_index, z_loss,
                                      1.0 / n_valid if fold else None, grad)
        ctx.save_for_backward(grad, n_valid)
        ctx.reduction, ctx.unscaled_mean, ctx.used = reduction, reduction == "mean" and not fold, False
        if reduction == "none":
            return loss
        return loss.sum() / n_valid if reduction == "mean" else loss.sum()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        if ctx.used:  # the stored gradient was scaled in place by the first backward
            raise RuntimeError("backward through triton_cross_entropy can run only once")
        ctx.used = True
        grad, n_valid = ctx.saved_tensors
        factor = grad_output.float() / n_valid if ctx.unscaled_mean else grad_output.float()
        factor = factor.contiguous()
        block, warps = _block_v(grad.shape[1])
        _scale_rows[(grad.shape[0],)](grad, factor, grad.stride(0), 1 if ctx.reduction == "none" else 0,
                                      grad.shape[1], BLOCK_V=block, num_warps=warps)
        return grad, None, None, None, None, None


def triton_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                         reduction: str = "mean", z_loss: float = 0.0, inplace: bool = False) -> torch.Tensor:
    """Softmax cross-entropy. logits: (N, V), targets: (N,) -> fp32 scalar, or (N,) for reduction="none".

    reduction: "mean" over the non-ignored rows (0 when there are none), "sum", or "none" (0 where
    ignored). z_loss: weight of logsumexp^2 added per non-ignored row. inplace: write the gradient
    over the logits (see the module docstring for when that is safe). Backward can run once.
    """
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"expected logits (N, V) and targets (N,); got {logits.shape} and {targets.shape}")
    return FusedCrossEntropy.apply(logits, targets, ignore_index, reduction, z_loss, inplace)
