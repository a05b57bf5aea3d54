"""The pieces of training that train.py reads as one loop: optimizer, schedule, loss weighting, checkpoints.

What this file teaches:
- AdamW (Loshchilov & Hutter 2017, https://arxiv.org/abs/1711.05101) with weight decay on matrices only:
  biases and norm gains are not pulled towards zero. Only parameters that require grad are handed to the
  optimizer, so a frozen base (LoRA, freeze flags) holds no optimizer state at all. `optimizer="muon"`
  hands the nn.Linear weights to Muon instead (minimm/muon.py), with the same groups and schedule.
- The schedule: linear warmup, then a cosine from learning_rate down to min_lr at lr_decay_iters. A group
  of parameters may follow it at a multiple (lr_scales: the media encoders at media_lr_scale). Or, with
  warmdown_frac > 0, warmup-stable-decay: the full rate until the last warmdown_frac of the steps, then a straight
  line down to min_lr (Hu et al. 2024, MiniCPM, https://arxiv.org/abs/2404.06395; Hägele et al. 2024,
  https://arxiv.org/abs/2405.18392): more steps at the full rate. In the default run, one seed, it changed nothing
  beyond that seed's spread (EXPERIMENTS.md), so config/mixed.py keeps the cosine.
- Token-weighted gradient accumulation: the loss of a step is the sum of per-token losses over every
  micro-batch divided by the step's total count of supervised tokens. A mean of micro-batch means would
  weight a micro-batch with 3 answer tokens like one with 300; this way the step equals one big batch.
  Per-task loss weights (task_loss_weights) make it a weighted mean, sum(w * loss) / sum(w): a task whose
  answers are a few tokens long (an image question's "top left") then gets more of each step's gradient than
  its share of the supervised tokens, without more tokens or time.
- Checkpoints are written to a temporary file and renamed, so a crash mid-write never destroys the last
  good checkpoint; they load with weights_only=True (no arbitrary code runs on load).
"""
from __future__ import annotations

import inspect
import math
import os
import random
from pathlib import Path

import torch
import torch.nn as nn

from minimm.data import Batches
from minimm.muon import Muon
from minimm.unlikelihood import SEQ_BATCH, SEQ_NEW_TOKENS, SEQ_NGRAM, induction_negatives, sequence_unlikelihood


def configure_optimizer(model: nn.Module, weight_decay: float, learning_rate: float,
                        betas: tuple[float, float], device_type: str,
                        lr_scales: dict[str, float] | None = None,
                        optimizer: str = "adamw") -> torch.optim.Optimizer:
    """AdamW (optimizer="adamw") or Muon (minimm/muon.py: Muon for nn.Linear weights, AdamW for the rest)
    over the parameters that require grad. lr_scales: {name prefix: multiplier}; each group keeps its
    multiplier as "lr_scale", and the loop sets group["lr"] = lr * group["lr_scale"] every step."""
    if optimizer not in ("adamw", "muon"):
        raise ValueError(f"optimizer must be 'adamw' or 'muon', not {optimizer!r}")
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}  # wte is also lm_head
    linears = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)} - embeddings
    to_muon = linears if optimizer == "muon" else set()

    def scale_of(name: str) -> float:
        return next((s for prefix, s in (lr_scales or {}).items() if name.startswith(prefix)), 1.0)

    groups = []
    for scale in sorted({scale_of(n) for n, _ in params}):
        mine = [p for n, p in params if scale_of(n) == scale]
        muon = [p for p in mine if id(p) in to_muon]
        adam = [p for p in mine if id(p) not in to_muon]
        groups.append({"params": muon, "weight_decay": weight_decay, "lr_scale": scale, "muon": True})
        groups.append({"params": [p for p in adam if p.dim() >= 2], "weight_decay": weight_decay,
                       "lr_scale": scale})
        groups.append({"params": [p for p in adam if p.dim() < 2], "weight_decay": 0.0, "lr_scale": scale})
    groups = [g for g in groups if g["params"]]
    if optimizer == "muon":
        fast_bf16 = device_type == "cuda" or (device_type == "cpu" and cpu_has_fast_bf16())
        return Muon(groups, lr=learning_rate, betas=betas, ns_dtype=torch.bfloat16 if fast_bf16 else torch.float32)
    fused = device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **({"fused": True} if fused else {}))


def cpu_has_fast_bf16() -> bool:
    """True when this CPU multiplies bfloat16 in hardware: Intel AMX (Xeon 4th generation and later) or the
    AVX-512 BF16 dot-product instructions (AMD Zen 4 and later, Intel Cooper Lake).

    There `dtype="bfloat16"` (autocast) makes a training step cheaper on the CPU: the linears run in bf16,
    attention stays in fp32 (ops.attention). A (4096, 192) x (192, 768) Linear, forward and backward, took
    12 ms instead of 23 ms on an AMD EPYC with AVX-512 BF16; with AMX the product alone took 1.25 ms instead
    of 9.3 ms (EXPERIMENTS.md). Elsewhere bf16 matmuls are emulated and slower than fp32.
    """
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")  # PyTorch's own CPU feature probes
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def learning_rate_at(step: int, learning_rate: float, min_lr: float, warmup_iters: int,
                     lr_decay_iters: int, warmdown_frac: float = 0.0) -> float:
    """The rate at step (0-based): linear warmup, then a cosine to min_lr at lr_decay_iters, or with
    warmdown_frac > 0 the full rate until the last warmdown_frac x lr_decay_iters steps, then linear to min_lr."""
    if step < warmup_iters:
        return learning_rate * (step + 1) / warmup_iters
    if step >= lr_decay_iters:
        return min_lr
    if warmdown_frac > 0:
        decay_start = max(warmup_iters, lr_decay_iters - round(warmdown_frac * lr_decay_iters))
        if step < decay_start:
            return learning_rate
        return min_lr + (lr_decay_iters - step) / max(1, lr_decay_iters - decay_start) * (learning_rate - min_lr)
    progress = (step - warmup_iters) / max(1, lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (learning_rate - min_lr)


def count_supervised(batches: list, world_size: int = 1, loss_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Supervised target tokens across the micro-batches of one step (and every rank under DDP); with
    loss_weights, (n_tasks,), each token counts its task's weight."""
    count = sum(_token_weights(b, loss_weights).sum() for b in batches).float()
    if world_size > 1:
        torch.distributed.all_reduce(count)
    return count


def task_loss_weight_vector(weights: dict, tasks: list[str]) -> torch.Tensor | None:
    """{task: weight} (config's task_loss_weights) as a (n_tasks,) tensor in the tokenizer's task order, 1 for
    a task not named; None when none is given. A task the data does not have, or a negative weight, is an error."""
    if not weights:
        return None
    unknown = sorted(set(weights) - set(tasks))
    if unknown:
        raise ValueError(f"task_loss_weights names {unknown}, not a task of this data; its tasks: {tasks}")
    negative = {t: w for t, w in weights.items() if not float(w) >= 0}
    if negative:
        raise ValueError(f"task_loss_weights must be >= 0, got {negative}")
    return torch.tensor([float(weights.get(t, 1.0)) for t in tasks])


def _token_weights(b, loss_weights: torch.Tensor | None) -> torch.Tensor:
    """(B, T): each target token's weight in the loss, 0 where it is not supervised."""
    valid = (b.y != -100).float()
    return valid if loss_weights is None else valid * loss_weights[b.task_ids]


def _add_task_losses(task_loss: torch.Tensor, task_count: torch.Tensor, token_loss: torch.Tensor, b) -> None:
    """Accumulate per-task sums of supervised token losses, token_loss: (B, T), for the log."""
    valid = (b.y != -100).float()
    task_loss.scatter_add_(0, b.task_ids.flatten(), (token_loss.float().detach() * valid).flatten())
    task_count.scatter_add_(0, b.task_ids.flatten(), valid.flatten())


def backward_token_weighted(model: nn.Module, micro_batches: list, n_tasks: int, autocast, scaler,
                            world_size: int = 1, ddp: bool = False,
                            unlikelihood: float = 0.0,
                            loss_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward every micro-batch of one step, each loss = its sum of per-token losses over
    the step's count of supervised tokens; returns per-task (loss sums, token counts) for the log, unweighted.
    loss_weights, (n_tasks,): each token's loss times its task's weight, over the sum of the weights.

    A micro-batch with no supervised token adds zero to the gradient, never NaN. unlikelihood > 0 adds
    that weight times the unlikelihood of each position's wrong induction copy (minimm/unlikelihood.py)
    to its loss, and so to the logged train loss.
    """
    device = micro_batches[0].y.device
    if loss_weights is not None:
        loss_weights = loss_weights.to(device)
    n_supervised = count_supervised(micro_batches, world_size, loss_weights).clamp(min=1e-6)  # 0 only if no loss
    task_loss = torch.zeros(n_tasks, device=device)
    task_count = torch.zeros(n_tasks, device=device)
    for m, b in enumerate(micro_batches):
        if ddp:  # only the last micro-batch all-reduces the gradients
            model.require_backward_grad_sync = m == len(micro_batches) - 1
        negatives = induction_negatives(b.x, b.y, b.segment_ids) if unlikelihood else None  # (B, T)
        with autocast:
            _, token_loss = model(b.x, b.y, segment_ids=b.segment_ids, reduction="none", return_logits=False,
                                  negatives=negatives, unlikelihood=unlikelihood, **b.media())  # (B, T)
        # DDP averages gradients over ranks, so scale by world_size to keep sum / (global count)
        weighted = token_loss.float() if loss_weights is None else token_loss.float() * loss_weights[b.task_ids]
        loss = weighted.sum() * world_size / n_supervised
        scaler.scale(loss).backward()
        _add_task_losses(task_loss, task_count, token_loss, b)
    if world_size > 1:  # the logged loss is the global batch's, as in a single process
        torch.distributed.all_reduce(task_loss)
        torch.distributed.all_reduce(task_count)
    return task_loss, task_count


def backward_sequence_unlikelihood(model: nn.Module, prompts: dict[int, list[list[int]]], weight: float,
                                   rng: random.Random, stops: tuple[int, ...], autocast, scaler,
                                   ddp: bool = False) -> float:
    """One batch of the sequence-level unlikelihood (minimm/unlikelihood.py) into the step's gradients:
    SEQ_BATCH prompts of one length (a length drawn in proportion to its prompts: answer_prompts), answered
    greedily; backward of weight x its cost per answer token. Returns that cost, for the log.

    Call it before the step's micro-batches: under DDP its gradients then stay local (no all-reduce) and join
    the all-reduce of the step's last micro-batch, as another micro-batch would; each rank draws its own prompts."""
    lengths = list(prompts)
    length = rng.choices(lengths, weights=[len(prompts[n]) for n in lengths])[0]
    rows = rng.sample(prompts[length], min(SEQ_BATCH, len(prompts[length])))
    device = next(model.parameters()).device
    if ddp:
        model.require_backward_grad_sync = False
    with autocast:
        cost, n_tokens = sequence_unlikelihood(unwrap(model), torch.tensor(rows, device=device), SEQ_NEW_TOKENS,
                                               SEQ_NGRAM, stops)
    per_token = cost / max(n_tokens, 1)
    if per_token.requires_grad:
        scaler.scale(weight * per_token).backward()
    return float(per_token.detach())


def backward_token_weighted_opencl(trainer, micro_batches: list, n_tasks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same step on an OpenCL device (minimm.opencl.OpenCLTrainer): the same weighting, its own tape."""
    n_supervised = float(count_supervised(micro_batches).clamp(min=1))
    task_loss, task_count = torch.zeros(n_tasks), torch.zeros(n_tasks)
    for b in micro_batches:
        token_loss = trainer.backward(b.x, b.y, b.segment_ids, loss_scale=1.0 / n_supervised)  # (B, T)
        _add_task_losses(task_loss, task_count, token_loss, b)
    return task_loss, task_count


@torch.no_grad()
def evaluate_loss(model: nn.Module, batches: Batches, eval_iters: int, tasks: list[str],
                  device: str, autocast) -> dict[str, float]:
    """Validation loss overall and per task, from the per-token losses of eval_iters fixed batches."""
    model.eval()
    loss_sum = torch.zeros(len(tasks) + 1)
    count = torch.zeros(len(tasks) + 1)
    for i in range(eval_iters):
        b = batches.get(i).to(device)
        with autocast:
            _, loss = model(b.x, b.y, segment_ids=b.segment_ids, reduction="none", return_logits=False,
                            **b.media())  # (B, T)
        loss = loss.float().cpu()
        valid = b.y.cpu() != -100
        task = b.task_ids.cpu()
        for t in range(len(tasks)):
            sel = valid & (task == t)
            loss_sum[t] += loss[sel].sum()
            count[t] += sel.sum()
        loss_sum[-1] += loss[valid].sum()
        count[-1] += valid.sum()
    model.train()
    out = {"all": (loss_sum[-1] / count[-1].clamp(min=1)).item()}
    out.update({t: (loss_sum[i] / count[i]).item() for i, t in enumerate(tasks) if count[i] > 0})
    return out


def save_checkpoint(state: dict, path: str | Path) -> None:
    """torch.save to path.tmp, then an atomic rename over path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path, device: str = "cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}: train one first, e.g. python train.py config/mixed.py")
    return torch.load(path, map_location=device, weights_only=True)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside DistributedDataParallel and torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)
