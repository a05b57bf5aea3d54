"""Picking the next token, and the generation loop that every backend shares.

What this file teaches:
- Greedy decoding is temperature 0 (argmax); otherwise the logits are divided by the temperature and
  filtered before sampling: top-k keeps the k likeliest tokens, top-p (nucleus sampling, Holtzman et al.
  2019, https://arxiv.org/abs/1904.09751) the smallest set whose probability reaches p.
- The loop knows nothing about the model: it asks step_logits(idx, step) for the next position's logits,
  so the PyTorch GPT (with or without its KV cache) and the OpenCL decoder use the same code.

Shape letters: B batch, T tokens so far, V vocabulary.
"""
from __future__ import annotations

from typing import Callable

import torch


def decode_loop(step_logits: Callable[[torch.Tensor, int], torch.Tensor], idx: torch.Tensor, max_new_tokens: int,
                block_size: int, temperature: float, top_k: int | None, top_p: float | None,
                stop_tokens: tuple[int, ...], callback: Callable[[torch.Tensor], None] | None) -> torch.Tensor:
    """The sampling loop every backend shares: step_logits(idx (B, T), step) -> logits (B, 1, V) of the
    next position; pick, append, stream, stop. Returns (B, T + new)."""
    done = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
    stop = torch.tensor(stop_tokens, dtype=torch.long, device=idx.device)
    for step in range(max_new_tokens):
        if idx.shape[1] >= block_size:
            break
        next_token = sample_next(step_logits(idx, step)[:, -1, :], temperature, top_k, top_p)  # (B,)
        next_token = torch.where(done, idx[:, -1], next_token)
        idx = torch.cat([idx, next_token[:, None]], dim=1)  # (B, T + 1)
        if callback is not None:
            callback(next_token)
        done |= torch.isin(next_token, stop)
        if bool(done.all()):
            break
    return idx


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None,
                top_p: float | None) -> torch.Tensor:
    """Pick one token per row from logits: (B, V) -> (B,)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, [-1]]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative - sorted_logits.softmax(dim=-1) >= top_p  # the mass before it is enough
        logits = logits.masked_fill(drop_sorted.scatter(1, order, drop_sorted), float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), num_samples=1)[:, 0]
