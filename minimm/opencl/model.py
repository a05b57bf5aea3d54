"""The GPT of minimm/gpt.py on an OpenCL device: same weights, same function, same generate().

What is notable here:
- No weights are converted: the model reads the very state_dict GPT writes (checkpoints from train.py,
  "_orig_mod." prefixes of torch.compile stripped) and gives one back in the same format, so a model
  trained here loads in PyTorch and the other way round.
- forward() reads like GPT.forward: one line per op, each a kernel (or two) from minimm.opencl.
- Generation keeps a KV cache on the device: each new token costs one position per layer; keys and
  values are written straight into the cache by the kernel that splits the heads, and attention over
  the cache is one fused kernel (launches, not arithmetic, are what a generation step spends).
- Sampling (temperature, top-k, top-p) happens on the host with minimm.sampling.decode_loop, on the (B, V)
  logits of the last position, so both backends sample the same way.
- Dropout is not implemented: forward() is the eval-mode function (the trainer refuses dropout > 0).

Shape letters: B batch, T tokens, C channels (n_embd), nh heads, hs head size (C // nh), V vocabulary.
"""
from __future__ import annotations

from dataclasses import asdict
from typing import Callable, Mapping

import numpy as np
import torch

from minimm.gpt import QK_NORM_EPS, GPTConfig
from minimm.rope import rope_tables
from minimm.sampling import decode_loop
from minimm.opencl import attention as A
from minimm.opencl import functional as F
from minimm.opencl.runtime import Device, get_device
from minimm.opencl.tensor import Tensor, no_grad


class KVCache:
    """Keys and values of every layer on the device: each (B, nh, block_size, hs); pos positions filled."""

    def __init__(self, config: GPTConfig, batch_size: int, device: Device):
        hs = config.n_embd // config.n_head
        shape = (batch_size, config.n_head, config.block_size, hs)
        self.k = [Tensor(device, shape) for _ in range(config.n_layer)]
        self.v = [Tensor(device, shape) for _ in range(config.n_layer)]
        self.pos = 0
        self.last_inputs = []  # the last positions' inputs, newest first, each (B, 1, C): GPTConfig.smear


class OpenCLGPT:
    def __init__(self, config: GPTConfig, params: dict[str, Tensor], device: Device):
        self.config = config
        self.device = device
        self.params = params  # GPT's parameter names; lm_head.weight is transformer.wte.weight (tied)
        self.rope = None
        if config.pos_emb == "rope":  # cos/sin of every position, uploaded once: rows are positions
            cos, sin = rope_tables(config.block_size, config.n_embd // config.n_head, config.rope_base)
            self.rope = (Tensor.from_numpy(device, cos.numpy()), Tensor.from_numpy(device, sin.numpy()))

    def forward_tensors(self, idx: np.ndarray | None, targets: np.ndarray | None = None,
                        segment_ids: np.ndarray | None = None, reduction: str = "mean",
                        kv_cache: KVCache | None = None,
                        inputs_embeds: np.ndarray | None = None) -> tuple[Tensor, Tensor | None]:
        """GPT.forward on the device, recording the tape when parameters require grad.

        idx, targets, segment_ids: host int arrays (B, T); or inputs_embeds: host floats (B, T, C)
        instead of idx (images and audio spliced in; inference only). Returns device tensors
        (logits, loss); without targets only the last position's logits: (B, 1, V).
        """
        cfg, p = self.config, self.params.get
        B, T = idx.shape if inputs_embeds is None else inputs_embeds.shape[:2]
        offset = kv_cache.pos if kv_cache is not None else 0
        if offset + T > cfg.block_size:
            raise ValueError(f"sequence of {offset + T} tokens exceeds block_size {cfg.block_size}")
        if kv_cache is not None and segment_ids is not None:
            raise ValueError("segment_ids are for training on packed examples, not for a KV cache")
        if inputs_embeds is None:
            x = F.embedding(idx, p("transformer.wte.weight"), p("transformer.wpe.weight"), offset)  # (B, T, C)
        else:
            x = Tensor.from_numpy(self.device, inputs_embeds)  # (B, T, C)
            if cfg.pos_emb == "learned":
                positions = np.broadcast_to(np.arange(offset, offset + T), (B, T))
                x = F.add(x, F.embedding(positions, p("transformer.wpe.weight")))  # (B, T, C)
        if cfg.smear:  # GPT.smear_previous: x + W1 x_(t-1) (+ W2 x_(t-2)), kept inside each packed example
            cached = kv_cache.last_inputs if kv_cache is not None and offset > 0 else []  # each (B, 1, C)
            keep = None if segment_ids is None else np.concatenate(
                [np.zeros((B, 1), np.int32), segment_ids[:, 1:] == segment_ids[:, :-1]], axis=1)  # (B, T)
            out, shifted = x, x
            for back in range(1, int(cfg.smear) + 1):  # shifting twice: the input two positions back
                first = cached[back - 1] if back <= len(cached) else None  # (B, 1, C)
                shifted = F.shift_time(shifted, first, keep)  # (B, T, C)
                weight = "transformer.smear.weight" if back == 1 else "transformer.smear2.weight"
                out = F.linear(shifted, p(weight), residual=out)  # (B, T, C)
            if kv_cache is not None:  # the newest inputs, newest first, for the next call
                kv_cache.last_inputs = ([F.select_time(x, -1 - j) for j in range(min(T, int(cfg.smear)))]
                                        + cached)[:int(cfg.smear)]
            x = out
        activation = F.relu_squared if cfg.activation == "relu2" else F.gelu  # the MLP's (GPTConfig.activation)
        for layer in range(cfg.n_layer):
            h = f"transformer.h.{layer}."
            a = F.layer_norm(x, p(h + "ln_1.weight"), p(h + "ln_1.bias"))  # (B, T, C)
            qkv = F.linear(a, p(h + "attn.c_attn.weight"), p(h + "attn.c_attn.bias"))  # (B, T, 3C)
            if cfg.qk_norm:  # GPTConfig.qk_norm: split, RMS-normalise q and k per head, then rotate
                q, k, v = A.split_heads(qkv, cfg.n_head)  # each (B, nh, T, hs)
                q = F.rms_norm(q, p(h + "attn.q_norm.weight"), QK_NORM_EPS)  # (B, nh, T, hs)
                k = F.rms_norm(k, p(h + "attn.k_norm.weight"), QK_NORM_EPS)  # (B, nh, T, hs)
                if self.rope is not None:
                    q, k = A.rope(q, self.rope, offset), A.rope(k, self.rope, offset)
                if kv_cache is None:
                    y = A.merge_heads(A.attention(q, k, v, causal=True, segment_ids=segment_ids))  # (B, T, C)
                else:
                    A.write_into_cache(k, kv_cache.k[layer], offset)
                    A.write_into_cache(v, kv_cache.v[layer], offset)
                    y = A.cached_attention(q, kv_cache.k[layer], kv_cache.v[layer], key_count=offset + T)
            elif kv_cache is None:
                q, k, v = A.split_heads(qkv, cfg.n_head, self.rope)  # each (B, nh, T, hs)
                y = A.attention(q, k, v, causal=True, segment_ids=segment_ids)  # (B, nh, T, hs)
                y = A.merge_heads(y)  # (B, T, C)
            else:
                k, v = kv_cache.k[layer], kv_cache.v[layer]  # (B, nh, block_size, hs)
                q = A.split_heads_into_cache(qkv, cfg.n_head, k, v, offset, self.rope)  # (B, nh, T, hs)
                y = A.cached_attention(q, k, v, key_count=offset + T)  # (B, T, C)
            x = F.linear(y, p(h + "attn.c_proj.weight"), p(h + "attn.c_proj.bias"), residual=x)  # (B, T, C)
            a = F.layer_norm(x, p(h + "ln_2.weight"), p(h + "ln_2.bias"))  # (B, T, C)
            a = activation(F.linear(a, p(h + "mlp.c_fc.weight")), p(h + "mlp.c_fc.bias"))  # (B, T, 4C)
            x = F.linear(a, p(h + "mlp.c_proj.weight"), p(h + "mlp.c_proj.bias"), residual=x)  # (B, T, C)
        if kv_cache is not None:
            kv_cache.pos += T
        x = F.layer_norm(x, p("transformer.ln_f.weight"), p("transformer.ln_f.bias"))  # (B, T, C)
        if targets is None:
            return F.linear(F.select_time(x, -1), p("transformer.wte.weight")), None  # (B, 1, V)
        logits = F.linear(x, p("transformer.wte.weight"))  # (B, T, V), the tied output head
        return logits, F.cross_entropy(logits, targets, reduction=reduction)

    def forward(self, idx=None, targets=None, segment_ids=None, reduction: str = "mean",
                kv_cache: KVCache | None = None, inputs_embeds=None,
                return_logits: bool = True) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """GPT.forward's contract with host tensors in and out (evaluation: no gradients).

        idx, targets, segment_ids: (B, T) torch tensors or numpy arrays; inputs_embeds: (B, T, C) floats.
        Returns (logits, loss) as CPU torch tensors: logits (B, T, V) with targets, else (B, 1, V), or
        None with return_logits=False (the head still runs at every position here); loss as GPT's.
        """
        if inputs_embeds is not None:
            inputs_embeds = torch.as_tensor(inputs_embeds).detach().float().cpu().numpy()
        with no_grad():
            logits, loss = self.forward_tensors(host_ints(idx), host_ints(targets), host_ints(segment_ids),
                                                reduction, kv_cache, inputs_embeds)
            return (torch.from_numpy(logits.numpy()) if return_logits else None,
                    None if loss is None else torch.from_numpy(loss.numpy()))

    __call__ = forward

    def eval(self) -> OpenCLGPT:
        """For code written for nn.Module (minimm.training.evaluate_loss): there is no dropout to turn off."""
        return self

    train = eval

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, stop_tokens: tuple[int, ...] = (),
                 callback: Callable[[torch.Tensor], None] | None = None, inputs_embeds=None,
                 use_cache: bool = True) -> torch.Tensor:
        """GPT.generate with the KV cache on the device: continue idx (B, T) by up to max_new_tokens
        tokens and return (B, T + new) as a CPU LongTensor. Arguments as GPT.generate; inputs_embeds
        (B, T, C), the prompt with images or audio spliced in, needs the cache (use_cache=True)."""
        if inputs_embeds is not None and not use_cache:
            raise ValueError("inputs_embeds needs use_cache=True on the OpenCL backend")
        idx = torch.as_tensor(idx, dtype=torch.long).cpu()
        cache = KVCache(self.config, idx.shape[0], self.device) if use_cache else None

        def step_logits(idx: torch.Tensor, step: int) -> torch.Tensor:
            if cache is not None and step > 0:
                return self.forward(idx[:, -1:], kv_cache=cache)[0]  # (B, 1, V)
            return self.forward(idx, kv_cache=cache, inputs_embeds=inputs_embeds)[0]  # (B, 1, V)

        return decode_loop(step_logits, idx, max_new_tokens, self.config.block_size, temperature, top_k, top_p,
                           stop_tokens, callback)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The weights as CPU tensors under GPT's names (lm_head.weight included, tied to wte)."""
        out = {name: torch.from_numpy(t.numpy()) for name, t in self.params.items()}
        out["lm_head.weight"] = out["transformer.wte.weight"]
        return out

    def model_args(self) -> dict:
        return asdict(self.config)

    @classmethod
    def from_torch(cls, model: torch.nn.Module, device: str = "opencl") -> OpenCLGPT:
        """A copy of a minimm.gpt.GPT on the OpenCL device. LoRA layers (minimm.lora) must be merged
        first (merge_lora): their effective weight is what gets copied."""
        weights = dict(model.state_dict())
        for name, module in model.named_modules():
            if hasattr(module, "lora_A"):  # a LoRALinear: copy the weight it computes with
                if not module.merged:
                    raise ValueError(f"{name} has an unmerged LoRA adapter: call minimm.lora.merge_lora(model)")
                weight = module.merged_weight if module.merged_weight is not None else module.base.weight
                weights = {k: v for k, v in weights.items() if not k.startswith(name + ".")}
                weights[name + ".weight"] = weight
                if module.base.bias is not None:
                    weights[name + ".bias"] = module.base.bias
        return load_gpt(weights, asdict(model.config), device)


def use_opencl_decoder(model: torch.nn.Module, device: str = "opencl") -> OpenCLGPT:
    """Route a PyTorch model's generation through an OpenCL copy of its decoder; returns the copy.

    model: a minimm GPT, or a MultimodalGPT (its ViT, audio encoder and projectors keep running in
    PyTorch on the CPU and hand their embeddings to the OpenCL decoder through inputs_embeds). After
    this, model.generate(...) works as before, on the OpenCL device; later changes to the PyTorch
    weights are not seen.
    """
    gpt = getattr(model, "gpt", model)
    opencl = OpenCLGPT.from_torch(gpt, device)
    gpt.generate = opencl.generate  # the instance attribute shadows GPT.generate
    return opencl


def load_gpt(state_dict: Mapping[str, torch.Tensor], model_args: Mapping, device: str = "opencl") -> OpenCLGPT:
    """An OpenCLGPT from GPT's state_dict and model_args (a checkpoint's "model" and "model_args").

    A MultimodalGPT checkpoint (model_args with a "gpt" entry) gives its decoder; its encoders are not
    ported to OpenCL. device: "opencl" or "opencl:P:D" (see minimm.opencl.runtime.get_device).
    """
    weights = {name.removeprefix("_orig_mod."): t for name, t in state_dict.items()}
    if "gpt" in model_args:  # a MultimodalGPT checkpoint: its decoder is the GPT under "gpt."
        model_args = model_args["gpt"]
        weights = {name.removeprefix("gpt."): t for name, t in weights.items() if name.startswith("gpt.")}
    config = GPTConfig(**model_args)
    dev = get_device(device)
    weights.pop("lm_head.weight", None)  # tied: the same matrix as transformer.wte.weight
    expected = expected_parameter_names(config)
    missing, unexpected = expected - weights.keys(), weights.keys() - expected
    if missing or unexpected:
        raise KeyError(f"state_dict does not match the config: missing {sorted(missing)}, "
                       f"unexpected {sorted(unexpected)}")
    params = {name: Tensor.from_numpy(dev, weights[name].detach().float().cpu().numpy())
              for name in sorted(expected)}
    return OpenCLGPT(config, params, dev)


def expected_parameter_names(config: GPTConfig) -> set[str]:
    """GPT's parameter names for this config, without the tied lm_head.weight."""
    names = {"transformer.wte.weight", "transformer.ln_f.weight"}
    if config.pos_emb == "learned":
        names.add("transformer.wpe.weight")
    if config.smear:
        names.add("transformer.smear.weight")
    if config.smear >= 2:
        names.add("transformer.smear2.weight")
    for layer in range(config.n_layer):
        h = f"transformer.h.{layer}."
        names |= {h + "ln_1.weight", h + "ln_2.weight", h + "attn.c_attn.weight", h + "attn.c_proj.weight",
                  h + "mlp.c_fc.weight", h + "mlp.c_proj.weight"}
    if config.bias:
        names |= {n.replace(".weight", ".bias") for n in names if ".ln_" in n or ".c_" in n}
    if config.qk_norm:  # RMSNorm gains, no bias
        names |= {f"transformer.h.{layer}.attn.{n}_norm.weight" for layer in range(config.n_layer) for n in "qk"}
    return names


def host_ints(x) -> np.ndarray | None:
    """A torch tensor or array-like of token ids as a numpy array (None stays None)."""
    if x is None:
        return None
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x)
