"""LoRA: fine-tune a frozen model by learning a low-rank update next to some of its Linear layers.

Follows Hu et al. 2021, LoRA: https://arxiv.org/abs/2106.09685 (and, with `quantize=`, Dettmers et al.
2023, QLoRA: https://arxiv.org/abs/2305.14314, whose quantized frozen base lives in minimm/quant.py).

What this file teaches:
- The update a fine-tune makes to a weight W: (out, in) tends to have low rank, so learn it as B @ A with
  A: (r, in), B: (out, r), r small. The layer computes W x + (B A x) * alpha / r. B starts at zero, so at
  step 0 the model is exactly the pretrained one; A starts random (Kaiming-uniform, as nn.Linear) so that
  the first gradients of B are not zero. alpha / r keeps the update's size steady when r changes.
- Only A and B train: the optimizer state is 2 * r * (in + out) numbers per layer instead of 2 * in * out,
  and the saved fine-tune is a few hundred kilobytes (`save_lora`), loaded onto the same base model.
- After training, B A * alpha / r can be folded into W (`merge_lora`): inference then costs exactly what
  the base model costs. `unmerge_lora` undoes it, bit for bit.
- Which layers: `apply_lora` wraps every nn.Linear whose qualified name matches a regular expression
  (re.search, so a pattern matches anywhere in the name). The defaults adapt attention and MLP of every
  block: the GPT's `transformer.h.N`, the audio encoder's and the ViT's `blocks.N` (the ViT names its
  Linears qkv / proj / fc, the others c_attn / c_proj / c_fc: DEFAULT_TARGETS lists both). The tied
  output head (lm_head shares its weight with the token embedding) is never adapted, and modules named
  `*projector*` are left out by default: a multimodal fine-tune trains them fully, by name, with
  `mark_trainable(model, "projector")`.

Shape letters: in / out a Linear's features, r the LoRA rank; x: (..., in) for any leading dimensions.
"""
from __future__ import annotations

import math
import os
import re
import tempfile

import torch
import torch.nn as nn
import torch.nn.functional as F

from minimm.quant import KINDS, QuantLinear

DEFAULT_TARGETS = [
    r"attn\.c_attn$", r"attn\.c_proj$", r"mlp\.c_fc$", r"mlp\.c_proj$",  # GPT and audio encoder blocks
    r"attn\.qkv$", r"attn\.proj$", r"mlp\.fc$", r"mlp\.proj$",  # ViT blocks (minimm/vit.py's names)
]
DEFAULT_EXCLUDE = ["projector"]


class LoRALinear(nn.Module):
    """base(x) + dropout(x) @ A^T @ B^T * alpha / r, with the base (nn.Linear or QuantLinear) frozen."""

    def __init__(self, base: nn.Linear | QuantLinear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if r <= 0:
            raise ValueError(f"LoRA rank r={r}: must be positive")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha, self.scale = r, alpha, alpha / r
        # a quantized base has no float weight to copy the dtype from: its adapters are fp32
        like = base.absmax if isinstance(base, QuantLinear) else base.weight
        factory = dict(device=like.device, dtype=like.dtype)
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **factory))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, **factory))  # (out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's own init
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        # Set only while merged: the weight before merging (plain base) or the merged fp weight
        # (quantized base). Not persistent: a state_dict never holds them.
        self.register_buffer("original_weight", None, persistent=False)
        self.register_buffer("merged_weight", None, persistent=False)

    def delta_weight(self) -> torch.Tensor:
        """The learned update B @ A * scale: (out, in)."""
        return (self.lora_B @ self.lora_A) * self.scale  # (out, r) @ (r, in) -> (out, in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.merged:
            h = self.dropout(x) @ self.lora_A.transpose(0, 1)  # (..., in) @ (in, r) -> (..., r)
            update = (h @ self.lora_B.transpose(0, 1)) * self.scale  # (..., r) @ (r, out) -> (..., out)
            return self.base(x) + update  # (..., out)
        if self.merged_weight is None:
            return self.base(x)  # plain base: the update is already inside base.weight
        bias = self.base.bias.to(x.dtype) if self.base.bias is not None else None
        return F.linear(x, self.merged_weight.to(x.dtype), bias)  # (..., out)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the weight so forward is one matmul.

        Plain base: base.weight becomes W + B A * scale in place, and W is kept aside so that unmerge
        restores it exactly (subtracting the update back would be off by fp32 rounding).
        Quantized base: the codes cannot hold W + B A, so the merged weight is built in floating point
        next to them (dequantize, add the update); the codes stay untouched and unmerge just drops it.
        Either way, merging costs one fp copy of the weight until unmerge.
        """
        if self.merged:
            return
        if isinstance(self.base, QuantLinear):
            self.merged_weight = self.base.dequantized_weight() + self.delta_weight()  # (out, in)
        else:
            self.original_weight = self.base.weight.detach().clone()
            self.base.weight.add_(self.delta_weight().to(self.base.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo merge(): the base is exactly what it was, and the adapter is applied on the fly again."""
        if not self.merged:
            return
        if self.original_weight is not None:
            self.base.weight.copy_(self.original_weight)
        self.original_weight = None
        self.merged_weight = None
        self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}"


def _tied_parameter_ids(model: nn.Module) -> set[int]:
    """ids of parameters that appear under more than one name (lm_head.weight is wte.weight)."""
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    return {pid for pid, count in seen.items() if count > 1}


def _as_list(patterns: list[str] | str | None) -> list[str]:
    if patterns is None:
        return []
    return [patterns] if isinstance(patterns, str) else list(patterns)


def _matches(name: str, patterns: list[str]) -> bool:
    return any(re.search(p, name) for p in patterns)


def apply_lora(model: nn.Module, targets: list[str] | str, r: int, alpha: float, dropout: float = 0.0,
               quantize: str | None = None, exclude: list[str] | str | None = None) -> list[str]:
    """Wrap every nn.Linear whose qualified name matches a target in a LoRALinear; freeze all the rest.

    targets: regular expressions, matched with re.search against names like "transformer.h.0.attn.c_attn"
             (so "attn.c_attn" matches in every block; anchor with ^ or $ to be stricter).
    exclude: names matching these are skipped even when a target matches; default DEFAULT_EXCLUDE
             (projectors, which a multimodal fine-tune trains fully instead).
    quantize: None, "nf4" or "int8": the frozen base of each wrapped layer is replaced by a QuantLinear
              (QLoRA). Linears that are not wrapped stay in floating point, frozen.
    Linears whose weight is tied to another module (lm_head) are never wrapped.
    Returns the qualified names of the wrapped Linears, in model order. Raises ValueError if none matched.
    Call it before building the optimizer; the settings are kept on the model as `model.lora_config`.
    """
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise RuntimeError("LoRA is already applied to this model")
    if quantize is not None and quantize not in KINDS:
        raise ValueError(f"quantize={quantize!r}: expected None or one of {', '.join(map(repr, KINDS))}")
    targets = _as_list(targets)
    exclude = DEFAULT_EXCLUDE if exclude is None else _as_list(exclude)
    tied = _tied_parameter_ids(model)
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    chosen = [n for n, m in linears
              if _matches(n, targets) and not _matches(n, exclude) and id(m.weight) not in tied]
    if not chosen:
        names = ", ".join(n for n, _ in linears[:12]) + (", ..." if len(linears) > 12 else "")
        raise ValueError(f"no nn.Linear matches targets {targets} (exclude {exclude}, tied weights are "
                         f"never adapted); the model's Linears are: {names}")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        base = getattr(parent, child)
        if quantize is not None:
            base = QuantLinear.from_linear(base, quantize)
        setattr(parent, child, LoRALinear(base, r, alpha, dropout))
    model.lora_config = {"r": r, "alpha": alpha, "dropout": dropout, "targets": targets,
                         "exclude": exclude, "quantize": quantize, "trainable": []}
    return chosen


def mark_trainable(model: nn.Module, patterns: list[str] | str) -> list[str]:
    """Unfreeze every parameter whose qualified name matches one of the patterns (re.search).

    For modules a config trains fully next to the adapters (the multimodal projectors). Call it after
    apply_lora, which freezes everything else; the patterns are recorded in model.lora_config so that
    lora_state_dict saves those parameters too. Returns the names unfrozen; ValueError if none matched.
    """
    patterns = _as_list(patterns)
    names = [n for n, p in model.named_parameters() if _matches(n, patterns)]
    if not names:
        raise ValueError(f"no parameter matches {patterns}")
    for name in names:
        model.get_parameter(name).requires_grad_(True)
    config = getattr(model, "lora_config", None)
    if config is not None:
        config["trainable"] = config["trainable"] + [p for p in patterns if p not in config["trainable"]]
    return names


def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its layer (see LoRALinear.merge)."""
    for m in model.modules():
        if isinstance(m, LoRALinear):
            m.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Undo merge_lora exactly."""
    for m in model.modules():
        if isinstance(m, LoRALinear):
            m.unmerge()


def lora_state_dict(model: nn.Module) -> dict:
    """What a LoRA fine-tune changed: {"config": model.lora_config, "tensors": {name: tensor}}.

    tensors: every adapter's lora_A and lora_B, plus the parameters of modules marked trainable
    (mark_trainable), detached. The frozen base is not in it: load the base checkpoint, then load_lora.
    Plain dicts, strings, numbers and tensors only, so torch.load(weights_only=True) reads it.
    """
    config = getattr(model, "lora_config", None)
    if config is None:
        raise ValueError("the model has no LoRA: call apply_lora first")
    tensors = {n: p.detach() for n, p in model.named_parameters()
               if n.endswith((".lora_A", ".lora_B")) or _matches(n, config["trainable"])}
    return {"config": dict(config), "tensors": tensors}


def save_lora(path: str, model: nn.Module) -> None:
    """Write lora_state_dict(model) to path atomically: a temporary file in the same folder, then rename,
    so a crash mid-write never leaves a truncated file where a good one was."""
    state = lora_state_dict(model)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".lora-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def load_lora(model: nn.Module, path_or_state: str | dict) -> list[str]:
    """Load adapters (and fully trained modules) saved by save_lora / lora_state_dict into model.

    If the model has no LoRA yet, it is applied first with the saved settings (targets, r, alpha,
    dropout, quantize, exclude, then mark_trainable); the base weights must already be loaded. Strict:
    the saved names must be exactly the ones the model expects, else ValueError lists the missing and
    unexpected ones. Returns the names loaded.
    """
    state = path_or_state
    if isinstance(path_or_state, (str, os.PathLike)):
        state = torch.load(path_or_state, map_location="cpu", weights_only=True)
    config, tensors = state["config"], state["tensors"]
    if getattr(model, "lora_config", None) is None:
        apply_lora(model, config["targets"], config["r"], config["alpha"], config["dropout"],
                   config["quantize"], config["exclude"])
        if config["trainable"]:
            mark_trainable(model, config["trainable"])
    if any(isinstance(m, LoRALinear) and m.merged for m in model.modules()):
        raise RuntimeError("unmerge_lora(model) before loading adapters into it")
    expected = lora_state_dict(model)["tensors"]
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"LoRA state does not fit the model: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        for name, target in expected.items():
            if target.shape != tensors[name].shape:
                raise ValueError(f"{name}: saved shape {tuple(tensors[name].shape)}, "
                                 f"model has {tuple(target.shape)}")
            target.copy_(tensors[name])
    return sorted(expected)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a tied weight counts once, and a quantized frozen weight
    counts as its in * out weights even though it is stored as codes."""
    params = list(model.parameters())
    trainable = sum(p.numel() for p in params if p.requires_grad)
    quantized = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, QuantLinear))
    return trainable, sum(p.numel() for p in params) + quantized
