"""Unlikelihood training against copy loops: push down the token that a wrong copy would write.

What this file teaches:
- Why small models loop. A decoder copies from its context with induction heads (Olsson et al. 2022,
  https://arxiv.org/abs/2209.11895): at token x_t, find the last earlier x_j equal to it and predict what
  followed it, x_(j+1). Inside "def wait(self, handle, timeout=None):" the token "," was last followed by
  " handle", so after "handle," the copy says " handle" again; greedy decoding takes it, the context now
  holds one more "handle,", and the copy only grows surer: "handle, handle, handle, ..." to the end of the
  context. Half of the default run's code answers that failed to parse did that (EXPERIMENTS.md).
- Unlikelihood training (Welleck et al. 2019, https://arxiv.org/abs/1908.04319) adds to the usual
  -log p(target) a term -log(1 - p(negative)) for tokens the model should not predict. Welleck et al. take
  every earlier context token as a negative; in code that punishes the names a function must repeat. Here a
  position gets one negative: the induction copy x_(j+1), and only where it is wrong (it differs from the
  target). Where copying is right the term is absent, so the model learns when to copy, not to stop copying.
- Cost: one (B, T, T) comparison of token ids per batch and a logsumexp over the rows that have a negative;
  3% of a step of the default run (EXPERIMENTS.md).
- Measured (EXPERIMENTS.md): with it, fewer answers copy a signature wrong; over 250 held-out instructions the
  parse rate rose by 0.03 in each of three paired runs, so config/mixed.py turns it on (TrainConfig keeps it off).

Shapes: B batch, T positions, V vocabulary, N rows.
"""
from __future__ import annotations

import torch

from minimm import ops


@torch.no_grad()
def induction_negatives(idx: torch.Tensor, targets: torch.Tensor,
                        segment_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The token an induction copy would predict at each position, where that copy is wrong.

    idx: (B, T) input ids; targets: (B, T) next-token ids, -100 where not in the loss; segment_ids: (B, T)
    packed-example ids (a copy never reaches into another example). Returns (B, T): idx[j + 1] for the last
    j < t with idx[j] == idx[t], or -100 where there is no such j, no target, or the copy equals the target.
    """
    B, T = idx.shape
    pos = torch.arange(T, device=idx.device)
    same = idx[:, :, None] == idx[:, None, :]  # (B, T, T): [b, t, j] = idx[b, t] == idx[b, j]
    same &= pos[None, None, :] < pos[None, :, None]  # j < t
    if segment_ids is not None:
        same &= segment_ids[:, :, None] == segment_ids[:, None, :]
    # (B, T): the last such j, plus 1; 0 where there is none. torch.where on int32 rather than bool * int64:
    # 1 ms instead of 6 for the default's 16 x 256 x 256 comparisons
    last = torch.where(same, (pos + 1).to(torch.int32), torch.zeros((), dtype=torch.int32)).amax(dim=-1).long()
    copy = idx.gather(1, last.clamp(max=T - 1))  # (B, T): idx[j + 1] (j + 1 <= t, so always in range)
    keep = (last > 0) & (targets != -100) & (copy != targets)
    return torch.where(keep, copy, torch.full_like(copy, -100))


def unlikelihood_loss(logits: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
    """-log(1 - p(negative)) per row, 0 where negatives == -100. logits: (..., V), negatives: (...).

    Only the rows that have a negative (about one in five supervised positions of the default's batches) are
    normalised, p = exp(logit - logsumexp(logits)): a softmax over every row cost the default run ~1% of a step
    more."""
    valid = negatives != -100  # (...)
    rows = logits[valid].float()  # (N, V), N rows with a negative
    logit = rows.gather(-1, negatives[valid][:, None])[:, 0]  # (N,)
    p = (logit - torch.logsumexp(rows, dim=-1)).exp()  # (N,)
    # clamped: a certain wrong copy (p -> 1) costs a large but finite loss instead of inf
    loss = -torch.log1p(-p.clamp(max=1 - 1e-4))  # (N,)
    return torch.zeros(negatives.shape, dtype=loss.dtype, device=loss.device).masked_scatter(valid, loss)  # (...)


def cross_entropy_with_unlikelihood(logits: torch.Tensor, targets: torch.Tensor, negatives: torch.Tensor,
                                    weight: float, reduction: str) -> torch.Tensor:
    """ops.cross_entropy plus weight * unlikelihood_loss per row, reduced the same way ("mean" over the rows
    that have a target). logits: (..., V); targets, negatives: (...), -100 where none."""
    negatives = negatives.masked_fill(targets == -100, -100)  # no target, no negative
    loss = ops.cross_entropy(logits, targets, reduction="none") + weight * unlikelihood_loss(logits, negatives)
    if reduction == "none":
        return loss  # (...)
    return loss.sum() if reduction == "sum" else loss.sum() / (targets != -100).sum().clamp(min=1)
