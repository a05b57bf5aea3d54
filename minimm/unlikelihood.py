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
- The sequence-level half (Welleck et al.'s other one; sequence_unlikelihood, the `seq_unlikelihood` key).
  Teacher forcing only ever shows the model the training text, where a wrong copy is one token; a loop is a
  state of its own answers, "'fork', 'fork', 'fork'", where each repeat makes the next likelier. So late in
  training the model also answers a few training prompts greedily, as the evaluation asks it, and every token
  of a 4-gram that repeats an earlier one of the same answer gets -log(1 - p) at the position that wrote it.
  Nothing is learned from the answer's other tokens: no target is the model's own output.

Shapes: B batch, T positions, V vocabulary, N rows.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from minimm import ops
from minimm.formats import read_examples
from minimm.render import render_prompt


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


# ---- the sequence-level half: loops in the model's own answers ---------------------------------------------
# The term above sees only the training text, where a wrong copy is one token. A loop, though, is a state of
# the model's own output: once it has written "'fork', 'fork'," the copy is the likeliest token, and teacher
# forcing never shows it that state. Welleck et al.'s sequence-level half lets the model answer (greedily, as
# the evaluation asks it) and pushes down every token of an n-gram that repeats one earlier in its own answer.
SEQ_BATCH = 8  # prompts answered per step (train.py), all of one length
SEQ_NEW_TOKENS = 96  # answer tokens each: the default's code loops start within the first few dozen
SEQ_NGRAM = 4  # Welleck et al.'s n


@torch.no_grad()
def repeated_ngrams(tokens: torch.Tensor, start: int, n: int, stops: tuple[int, ...] = ()) -> torch.Tensor:
    """Where an answer repeats itself. tokens: (B, L), the prompt in [:start] and the answer after it.

    Returns (B, L) bool: True at every position of an n-gram of the answer that already occurred earlier in the
    same answer (overlaps count: with n = 4, "a b a b a b" marks its last four tokens). Nothing after a row's
    first stop token is marked: the answer ended there."""
    marks = torch.zeros(tokens.shape, dtype=torch.bool)
    for b, row in enumerate(tokens.tolist()):
        end = next((t for t in range(start, len(row)) if row[t] in stops), len(row))
        seen = set()
        for t in range(start + n, end + 1):  # the n-gram row[t - n:t]
            gram = tuple(row[t - n:t])
            if gram in seen:
                marks[b, t - n:t] = True
            seen.add(gram)
    return marks.to(tokens.device)


def sequence_unlikelihood(model, prompts: torch.Tensor, max_new_tokens: int, n: int,
                          stops: tuple[int, ...]) -> tuple[torch.Tensor, int]:
    """The sequence-level unlikelihood of greedy answers to prompts: (B, T0) ids of one length, text only.

    The model (a GPT or MultimodalGPT, unwrapped) answers each prompt greedily without gradients; then one
    forward pass with gradients scores the answers, and every token of a repeated n-gram (repeated_ngrams)
    costs -log(1 - p(token)) at the position that wrote it. Returns (the sum of those costs, the number of
    answer tokens, stop token included), so a caller can average over the answers' length. When no answer repeats
    itself the cost is a constant 0 (no gradient, and no scoring pass)."""
    was_training = model.training
    model.eval()
    out = model.generate(prompts, max_new_tokens, temperature=0.0, stop_tokens=stops)  # (B, T0 + new)
    model.train(was_training)
    T0 = prompts.shape[1]
    marks = repeated_ngrams(out, T0, n, stops)  # (B, L)
    is_stop = torch.isin(out[:, T0:], torch.tensor(stops, device=out.device))  # (B, new)
    answered = (is_stop.long().cumsum(1) - is_stop.long()) == 0  # (B, new): up to and with the first stop
    negatives = torch.where(marks[:, 1:], out[:, 1:], torch.full_like(out[:, 1:], -100))  # (B, L - 1)
    if not bool((negatives != -100).any()):
        return torch.zeros((), device=out.device), int(answered.sum())
    logits, _ = model(out[:, :-1], torch.full_like(out[:, :-1], -100), reduction="none")  # (B, L - 1, V)
    return unlikelihood_loss(logits, negatives).sum(), int(answered.sum())


def answer_prompts(data_dir, tok, max_length: int, split: str = "train") -> dict[int, list[list[int]]]:
    """The prompts (task token, user turn, assistant start) of the split's text-only examples that end with
    an answer, as the model is asked them, grouped by length: greedy decoding without padding answers a
    batch of one length (minimm.chat.ask_many does the same). Only prompts shorter than max_length (the
    model's block_size), so there is room to answer. data_dir holds meta.json, as train.py's does."""
    data_dir = Path(data_dir)
    meta = json.loads((data_dir / "meta.json").read_text())
    media_dir = str(data_dir / meta["media_dir"]) if meta.get("media_dir") else None
    prompts: dict[int, list[list[int]]] = {}
    for source in meta["sources"][split]:
        for ex in read_examples(data_dir / source, media_dir, tasks=tok.tasks, log=lambda *_: None):
            if ex.turns[-1][0] == "assistant" and not ex.images and not ex.audio:
                prompt = render_prompt(tok, ex.task, ex.turns[:-1])
                if len(prompt) < max_length:
                    prompts.setdefault(len(prompt), []).append(prompt)
    return prompts
