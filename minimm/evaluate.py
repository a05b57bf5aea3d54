"""Task metrics for the final evaluation: what the model can do, not only how low its loss is.

What this file teaches:
- Loss is a proxy; each task also gets a behavioural metric computed from greedy answers (temperature 0)
  to held-out prompts that training never saw:
    code   ast_parse_rate: the share of answers that are valid Python (`ast.parse` succeeds).
- The held-out prompts are the validation split's own examples, read back from the JSONL files that
  built it (meta.json lists them), so your own data gets the same metrics as the bundled default.
"""
from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Callable

import torch

from minimm.chat import ask
from minimm.formats import Example, read_examples
from minimm.tokenizer import Tokenizer


def validation_examples(data_dir: Path, tasks: list[str], task: str, limit: int) -> list[Example]:
    """Up to `limit` validation examples of one task that end with an assistant answer."""
    meta = json.loads((data_dir / "meta.json").read_text())
    found: list[Example] = []
    for source in meta["sources"]["val"]:
        for ex in read_examples(data_dir / source, tasks=tasks, log=lambda *_: None):
            if ex.task == task and ex.turns[-1][0] == "assistant":
                found.append(ex)
                if len(found) == limit:
                    return found
    return found


def code_metrics(model, tok: Tokenizer, examples: list[Example], max_new_tokens: int) -> dict:
    parsed = 0
    for ex in examples:
        answer = ask(model, tok, ex.task, ex.turns[:-1], max_new_tokens=max_new_tokens, temperature=0.0)
        try:
            ast.parse(answer)
            parsed += 1
        except SyntaxError:
            pass
    return {"ast_parse_rate": parsed / max(1, len(examples)), "n": len(examples)}


METRICS: dict[str, Callable] = {"code": code_metrics}


@torch.no_grad()
def evaluate_tasks(model, tok: Tokenizer, data_dir: Path, val_losses: dict, cfg, log=print) -> dict:
    """{task: {"val_loss": ..., <metric>: ...}} for every task with validation data."""
    model.eval()
    results: dict = {}
    for task in tok.tasks:
        if task in val_losses:
            results[task] = {"val_loss": round(val_losses[task], 4)}
        if task in METRICS:
            examples = validation_examples(Path(data_dir), tok.tasks, task, cfg.eval_samples)
            if examples:
                log(f"evaluating {task} on {len(examples)} held-out prompts")
                results.setdefault(task, {}).update(METRICS[task](model, tok, examples, cfg.block_size // 2))
    return results
