"""Muon for the weight matrices, AdamW for the rest: one optimizer, so train.py's loop does not change.

What this file teaches:
- A gradient step on a weight matrix W (out, in) is dominated by its few largest singular directions; the
  rare directions, small in the gradient, barely move. Muon (Jordan et al. 2024,
  https://kellerjordan.github.io/posts/muon/) keeps a momentum matrix M = U S V^T and steps along U V^T
  instead: the same directions, each singular value set to 1, so every direction learns at one pace.
  On small GPTs trained for few steps this reaches a given loss in fewer steps than AdamW.
- U V^T without an SVD: Newton-Schulz iterations X <- a X + (b A + c A^2) X with A = X X^T, matmuls only.
  Starting from M scaled to spectral norm <= 1, each iteration applies the odd polynomial
  a s + b s^3 + c s^5 to every singular value s, pushing it towards 1, while U and V stay. After five, all
  but the tiniest lie in roughly [0.7, 1.2]: not exactly 1, which is what trading accuracy for speed buys.
  Five iterations of three matmuls per matrix, batched over the matrices of one shape (the four layers'
  c_attn weights in one stack; a tall matrix turned wide joins the wide ones of its size): on the default
  CPU model 0.08-0.10 s of a ~0.85 s step in bf16, where one matrix at a time took 0.14-0.17 s. Repaid by
  the fewer steps it needs (config/mixed.py).
- The size of the step: U V^T of an (out, in) matrix has entries of RMS about 1 / sqrt(max(out, in)).
  Scaled by 0.2 sqrt(max(out, in)) its RMS is ~0.2, about that of an AdamW update (Liu et al. 2025,
  "Muon is Scalable for LLM Training", https://arxiv.org/abs/2502.16982), so the same learning_rate,
  schedule and decoupled weight decay serve both kinds of parameter.
- What gets Muon: the weights of nn.Linear layers (attention, MLP, projectors, patch and frame linears).
  Embedding tables (tied to the output head), position tables, norm gains and biases are not maps
  between spaces with a meaningful spectrum; they keep AdamW.
"""
from __future__ import annotations

import math

import torch

# the quintic's coefficients from Jordan et al.: steep near 0 (a = 3.4445) so small singular values grow fast
NEWTON_SCHULZ = (3.4445, -4.7750, 2.0315)
RMS_MATCH = 0.2  # the target RMS of a Muon update, about an AdamW update's (Liu et al. 2025)


def orthogonalize(g: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """g: (out, in), or a stack of same-shaped matrices (N, out, in) -> about U V^T of each one's SVD, same
    shape, in dtype. Newton-Schulz on the wide orientation, so A = X X^T is the smaller square. The
    iteration corrects its own rounding, so bfloat16 is enough where the hardware multiplies it fast (a GPU,
    a CPU with AMX or AVX-512 BF16: training.cpu_has_fast_bf16)."""
    a, b, c = NEWTON_SCHULZ
    x = g.to(dtype)
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT  # (..., in, out): A below is (..., in, in), the smaller side
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # spectral norm <= Frobenius norm = 1
    for _ in range(steps):
        gram = x @ x.mT  # (..., r, r), r = min(out, in)
        x = a * x + (b * gram + c * gram @ gram) @ x  # (..., r, max(out, in))
    return x.mT if tall else x


class Muon(torch.optim.Optimizer):
    """Groups with "muon": True step along the orthogonalized Nesterov momentum; the others are AdamW.

    Every group has "lr" and "weight_decay" (decoupled: p <- p (1 - lr wd) before the step, as AdamW).
    momentum: Muon's momentum coefficient; betas, eps: AdamW's; ns_steps, ns_dtype: the Newton-Schulz
    iterations and the dtype they multiply in.
    """

    def __init__(self, groups: list[dict], lr: float, betas: tuple[float, float] = (0.9, 0.99),
                 eps: float = 1e-8, momentum: float = 0.95, ns_steps: int = 5,
                 ns_dtype: torch.dtype = torch.float32):
        defaults = dict(lr=lr, betas=betas, eps=eps, momentum=momentum, ns_steps=ns_steps, weight_decay=0.0,
                        muon=False)
        self.ns_dtype = ns_dtype
        super().__init__(groups, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        by_shape = {}  # Muon's matrices by shape, a tall one turned wide: one batched Newton-Schulz per shape
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                p.mul_(1.0 - group["lr"] * group["weight_decay"])
                if group["muon"]:
                    by_shape.setdefault((min(p.shape), max(p.shape)), []).append((p, group))
                else:
                    self._adamw(p, self.state[p], group)
        for (_, cols), params in by_shape.items():
            # orthogonalize(M^T) = orthogonalize(M)^T, so (768, 192) and (192, 768) share a stack
            tall = [p.size(0) > p.size(1) for p, _ in params]
            momenta = [self._momentum(p, group) for p, group in params]  # each (out, in)
            nesterov = torch.stack([m.T if t else m for m, t in zip(momenta, tall)])  # (N, rows, cols)
            directions = orthogonalize(nesterov, self.defaults["ns_steps"], self.ns_dtype)  # (N, rows, cols)
            scale = RMS_MATCH * math.sqrt(cols)
            for (p, group), direction, t in zip(params, directions, tall):
                p.add_((direction.T if t else direction).to(p.dtype), alpha=-group["lr"] * scale)  # (out, in)
        return loss

    def _momentum(self, p: torch.Tensor, group: dict) -> torch.Tensor:
        """Update p's momentum buffer with its gradient; return the Nesterov look-ahead (out, in)."""
        state = self.state[p]
        if not state:
            state["momentum_buffer"] = torch.zeros_like(p)
        momentum, buf = group["momentum"], state["momentum_buffer"]
        buf.lerp_(p.grad, 1.0 - momentum)  # buf = momentum * buf + (1 - momentum) * grad
        return p.grad.lerp(buf, momentum)  # look one momentum step ahead

    @staticmethod
    def _adamw(p: torch.Tensor, state: dict, group: dict) -> None:
        if not state:
            state["step"] = torch.zeros(())
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        beta1, beta2 = group["betas"]
        state["step"] += 1
        t = state["step"].item()
        state["exp_avg"].lerp_(p.grad, 1.0 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1.0 - beta2)
        denom = (state["exp_avg_sq"] / (1.0 - beta2 ** t)).sqrt_().add_(group["eps"])
        p.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / (1.0 - beta1 ** t))
