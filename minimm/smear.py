"""Smear: each position's input also carries a learned map of the inputs just before it (GPTConfig.smear).

What this file teaches:
- Copying from the prompt ("def parse(self, line):" in the question, the same line to start the answer) is
  what induction heads do (Olsson et al. 2022, https://arxiv.org/abs/2209.11895): a head in one layer finds
  the earlier position whose *previous* token equals the current token, and copies what sits there. Plain
  attention needs a first layer just to fetch "my previous token"; x_t + W1 x_(t-1) gives it to every
  position at the input, so a single layer can do the match. modded-nanogpt calls a gated variant "smear".
- With smear=2 a position also carries the token before that (+ W2 x_(t-2)), so the match can be on two
  tokens: after "test, " in "def addSkip(self, test, reason):" one earlier position follows ", " preceded by
  "test", while two follow ", " alone (the next word is "test" or "reason").
- Each W starts at zero (minimm/gpt.py: the model starts as the plain GPT); an input from before the
  example's first position (t = 0, or the start of a packed example) adds nothing, and in generation the
  KV cache keeps the last inputs so that one new position at a time gets the same sum.
"""
from __future__ import annotations

import torch
import torch.nn as nn


def smear_previous(x: torch.Tensor, maps: list[nn.Linear], segment_ids: torch.Tensor | None,
                   kv_cache=None) -> torch.Tensor:
    """x_t + maps[0](x_(t-1)) (+ maps[1](x_(t-2))). x: (B, T, C) -> (B, T, C).

    segment_ids: (B, T) packed-example ids, or None. kv_cache: a gpt.KVCache whose last_inputs (newest
    first, each (B, C)) continue the sequence from an earlier call; updated here for the next one."""
    B, T, C = x.shape
    cached = kv_cache.last_inputs if kv_cache is not None and kv_cache.pos > 0 else []
    starts = None
    if segment_ids is not None:  # packed rows: no input crosses into the next example
        starts = torch.ones_like(segment_ids, dtype=torch.bool)
        starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]  # (B, T)
    out, shifted = x, x
    for back, weight_map in enumerate(maps, start=1):
        # shifted[:, t] = the input `back` positions before t; before this call's first, from the cache
        first = cached[back - 1] if back <= len(cached) else x.new_zeros(B, C)  # (B, C)
        shifted = torch.cat([first[:, None], shifted[:, :-1]], dim=1)  # (B, T, C)
        if starts is not None:  # shifting twice masks both x_(t-1) and x_(t-2) at a start
            shifted = shifted.masked_fill(starts[..., None], 0.0)
        out = out + weight_map(shifted)
    if kv_cache is not None:  # the newest inputs, newest first, for the next call
        kv_cache.last_inputs = ([x[:, T - 1 - j] for j in range(min(T, len(maps)))] + cached)[:len(maps)]
    return out  # (B, T, C)
