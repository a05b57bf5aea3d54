"""Fused output layer + cross-entropy: the loss of `hidden @ weight.T` without the (N, V) logits.

What this file teaches:
- At the end of a language model the logits are the largest tensor in training by far: 32k tokens x a
  128k vocabulary in bf16 is 8 GiB, and eager autograd keeps the log-softmax and a gradient of the same
  size next to it. Yet nothing needs all of them at once: each row's loss and gradient depend on that
  row's logits only.
- So go through the rows chunk by chunk: project one chunk of hidden states to logits (one matmul),
  let the fused cross-entropy kernel (cross_entropy.py) compute the chunk's loss and overwrite its
  logits with d loss / d logits, and fold that straight into the two gradients the model needs:
      grad_hidden[chunk] = dlogits @ weight            (n, H)
      grad_weight       += dlogits^T @ hidden[chunk]   (V, H)
  then drop the chunk. Peak memory is one chunk of logits instead of three full copies; the matmul work
  is the same as the materialised version (forward, and both backward matmuls).
- Like the fused cross-entropy, the gradients are computed during the forward pass (the loss is a
  scalar, so its gradient is known up to the one number backward receives), and backward multiplies
  them by it. This follows the chunked "fused linear cross-entropy" of Liger-Kernel (Hsu et al. 2024,
  https://arxiv.org/abs/2410.10989).
- grad_weight is accumulated in the weight's dtype by in-place matmuls (each accumulates in fp32 inside,
  then rounds once per chunk). Larger chunks mean fewer roundings and fewer passes over grad_weight;
  smaller chunks mean less memory.

Shape letters: N rows (tokens), H hidden size, V vocabulary, n rows in one chunk.
"""
from __future__ import annotations

import torch

from minimm.kernels.cross_entropy import cross_entropy_fwd_grad, folds_mean


class LinearCrossEntropy(torch.autograd.Function):
    """Loss of (hidden @ weight.T, targets); gradients for hidden and weight computed in forward."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                reduction: str, z_loss: float, chunk_size: int, use_triton: bool | None) -> torch.Tensor:
        N = hidden.shape[0]
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n_valid = (targets != ignore_index).sum().clamp(min=1).to(torch.float32)
        fold = reduction == "mean" and folds_mean(hidden.dtype)
        grad_scale = 1.0 / n_valid if fold else None
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros_like(weight) if want_weight else None
        loss = torch.empty(N, device=hidden.device, dtype=torch.float32)
        for start in range(0, N, chunk_size):
            end = min(start + chunk_size, N)
            h = hidden[start:end]  # (n, H)
            logits = h @ weight.t()  # (n, V), private to this loop: safe to overwrite with its gradient
            dlogits = logits if (want_hidden or want_weight) else None
            loss[start:end] = cross_entropy_fwd_grad(logits, targets[start:end], ignore_index, z_loss,
                                                     grad_scale, dlogits, use_triton)
            if want_hidden:
                torch.mm(dlogits, weight, out=grad_hidden[start:end])  # (n, H)
            if want_weight:
                grad_weight.addmm_(dlogits.t(), h)  # (V, H)
        ctx.save_for_backward(grad_hidden, grad_weight, n_valid)
        ctx.unscaled_mean, ctx.used = reduction == "mean" and not fold, False
        return loss.sum() / n_valid if reduction == "mean" else loss.sum()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        if ctx.used:  # the stored gradients were scaled in place by the first backward
            raise RuntimeError("backward through linear_cross_entropy can run only once")
        ctx.used = True
        grad_hidden, grad_weight, n_valid = ctx.saved_tensors
        factor = grad_output / n_valid if ctx.unscaled_mean else grad_output
        for grad in (grad_hidden, grad_weight):
            if grad is not None:
                grad.mul_(factor.to(grad.dtype))
        return grad_hidden, grad_weight, None, None, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = -100, reduction: str = "mean", chunk_size: int = 4096,
                         z_loss: float = 0.0, use_triton: bool | None = None) -> torch.Tensor:
    """cross_entropy(hidden @ weight.T, targets) in chunks of rows. Returns an fp32 scalar.

    hidden: (N, H); weight: (V, H) (an nn.Linear's weight, no bias); targets: (N,) with ignore_index for
    rows that carry no loss. reduction: "mean" (over non-ignored rows; 0 when none) or "sum".
    chunk_size: rows per chunk; a chunk's logits take chunk_size * V elements of hidden's dtype.
    z_loss: as in triton_cross_entropy. use_triton: None uses the Triton kernel on CUDA or under
    TRITON_INTERPRET=1 and the torch reference otherwise; True or False forces one.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction={reduction!r}: linear_cross_entropy supports 'mean' and 'sum' (the "
                         "gradients are built in forward, which needs one scalar upstream gradient)")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"expected hidden (N, H) and weight (V, H); got {hidden.shape} and {weight.shape}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"expected targets (N,) = {hidden.shape[:1]}; got {targets.shape}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size}: must be at least 1")
    return LinearCrossEntropy.apply(hidden.contiguous(), weight, targets, ignore_index, reduction,
                                    float(z_loss), chunk_size, use_triton)
