"""Task metrics for the final evaluation: what the model can do, not only how low its loss is.

What this file teaches:
- Loss is a proxy; each task also gets a behavioural metric computed from greedy answers (temperature 0)
  to held-out prompts that training never saw:
    code   ast_parse_rate: the share of answers that are valid Python (`ast.parse` succeeds).
    image, audio (questions about a picture or a clip): exact-match accuracy, per question kind when the
           data labels kinds (`"kind": "count"` -> count_accuracy), and over all of them (exact_match).
- Greedy answers are reproducible, so prompts of one length are answered together in a batch
  (minimm.chat.ask_many): the same answers as one by one, in a fraction of the time.
- The held-out prompts are the validation split's own examples, read back from the JSONL files that
  built it (meta.json lists them), so your own data gets the same metrics as the bundled default.
"""
from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Callable

import torch

from minimm.audio import load_audio_features
from minimm.chat import ask_many
from minimm.formats import Example, read_examples
from minimm.tokenizer import Tokenizer
from minimm.vit import load_image


def validation_examples(data_dir: Path, meta: dict, tasks: list[str],
                        media_dir: str | None) -> dict[tuple[str, bool], list[Example]]:
    """The validation examples that end with an assistant answer, read once and grouped by (task, has
    media): questions about images or audio are scored apart from text-only prompts of the same task."""
    groups: dict[tuple[str, bool], list[Example]] = {}
    for source in meta["sources"]["val"]:
        for ex in read_examples(data_dir / source, media_dir, tasks=tasks, log=lambda *_: None):
            if ex.turns[-1][0] == "assistant":
                groups.setdefault((ex.task, bool(ex.images or ex.audio)), []).append(ex)
    return groups


def code_metrics(model, tok: Tokenizer, examples: list[Example], max_new_tokens: int) -> dict:
    answers = ask_many(model, tok, examples[0].task, [ex.turns[:-1] for ex in examples], max_new_tokens)
    parsed = 0
    for answer in answers:
        try:
            ast.parse(answer)
            parsed += 1
        except SyntaxError:
            pass
    return {"ast_parse_rate": parsed / max(1, len(examples)), "n": len(examples)}


def exact_match_metrics(model, tok: Tokenizer, examples: list[Example], max_new_tokens: int,
                        image_size: int, resize: str) -> dict:
    """Exact match of greedy answers to questions about images or audio (all of one task), per kind and overall."""
    right: dict[str, list[int]] = {}
    answers = ask_many(model, tok, examples[0].task, [ex.turns[:-1] for ex in examples], max_new_tokens,
                       images=[[load_image(p, image_size, resize) for p in ex.images] for ex in examples],
                       audio=[[load_audio_features(p).T for p in ex.audio] for ex in examples])
    for ex, answer in zip(examples, answers):
        hit = int(answer.strip() == ex.turns[-1][1].strip())
        right.setdefault("exact_match", []).append(hit)
        if ex.kind:
            right.setdefault(f"{ex.kind}_accuracy", []).append(hit)
    return {name: round(sum(hits) / len(hits), 4) for name, hits in sorted(right.items())} | {"n": len(examples)}


METRICS: dict[str, Callable] = {"code": code_metrics}


@torch.no_grad()
def evaluate_tasks(model, tok: Tokenizer, data_dir: Path, val_losses: dict, cfg, log=print) -> dict:
    """{task: {"val_loss": ..., <metric>: ...}} for every task with validation data."""
    model.eval()
    results: dict = {}
    data_dir = Path(data_dir)
    meta = json.loads((data_dir / "meta.json").read_text())
    media_dir = str(data_dir / meta["media_dir"]) if meta.get("media_dir") else None  # relative: to data_dir
    held_out = validation_examples(data_dir, meta, tok.tasks, media_dir)
    for task in tok.tasks:
        if task in val_losses:
            results[task] = {"val_loss": round(val_losses[task], 4)}
        if task in METRICS:
            examples = held_out.get((task, False), [])[:cfg.eval_samples]
            if examples:
                log(f"evaluating {task} on {len(examples)} held-out prompts")
                # as many new tokens as the context holds (generation stops at block_size): an answer is
                # cut short only when it would not have fit in a training row either
                results.setdefault(task, {}).update(METRICS[task](model, tok, examples, cfg.block_size))
        examples = held_out.get((task, True), [])[:cfg.eval_media_samples]
        if examples and (hasattr(model, "vision") or hasattr(model, "audio")):
            log(f"evaluating {task} on {len(examples)} held-out questions about images or audio")
            results.setdefault(task, {}).update(exact_match_metrics(
                model, tok, examples, 32, meta.get("image_size", 0), meta.get("resize", "pad")))
    return results
