"""The decoder: a GPT written out in one file, small enough to read in one sitting.

What is notable here:
- Pre-norm transformer blocks (Radford et al. 2019, GPT-2: https://cdn.openai.com/better-language-models/
  language_models_are_unsupervised_multitask_learners.pdf) with GPT-2's init: weights N(0, 0.02) and the
  residual projections scaled by 1/sqrt(2 * n_layer), so the residual stream does not grow with depth.
- Rotary position embeddings by default (Su et al. 2021, RoFormer: https://arxiv.org/abs/2104.09864):
  q and k are rotated by an angle proportional to their position, so q.k depends only on the distance
  between tokens (minimm/rope.py). Learned absolute positions (GPT-2's) are an option: `pos_emb="learned"`.
- Attention and the loss go through minimm.ops, the one place where fast kernels are chosen.
- `forward(inputs_embeds=...)` lets the multimodal model splice image and audio embeddings into the
  sequence; `generate()` uses a KV cache so each new token costs one position, not the whole prefix
  (picking each token: minimm/sampling.py, shared with the OpenCL backend).
- Input and output embeddings are tied (Press & Wolf 2016, https://arxiv.org/abs/1608.05859).
- `smear` (an option, on in train.py's configs): each position's input also carries a learned map of the
  previous position's input (smear=2: of the previous two), so a single attention layer can copy from the
  prompt (minimm/smear.py).
- `qk_norm` (an option, on in config/mixed.py): each head's queries and keys are scaled to RMS 1 (times a
  learned gain) before the dot product (Henry et al. 2020, https://arxiv.org/abs/2010.04245; Dehghani et al.
  2023, https://arxiv.org/abs/2302.05442). How sharply a head attends is then set by the gains alone, not by how
  large the q and k projections happen to grow, and the attention logits cannot run away.
- `activation="relu2"` (an option): the MLP computes max(0, h)^2 instead of GELU (So et al. 2021, Primer:
  https://arxiv.org/abs/2109.08668), a sparser, cheaper nonlinearity (the modded-nanogpt speedrun uses it too).

Shape letters: B batch, T tokens, C channels (n_embd), nh heads, hs head size (C // nh), V vocabulary.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from minimm import ops
from minimm.rope import apply_rope, rope_tables
from minimm.sampling import decode_loop
from minimm.smear import smear_previous
from minimm.unlikelihood import cross_entropy_with_unlikelihood


QK_NORM_EPS = 1e-6  # GPTConfig.qk_norm's RMSNorm epsilon (the OpenCL decoder uses the same)


@dataclass
class GPTConfig:
    vocab_size: int = 4096
    block_size: int = 256
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True
    pos_emb: str = "rope"  # "rope" or "learned"
    rope_base: float = 10000.0
    smear: int = 0  # add learned maps of the previous 1 or 2 positions' inputs to each input (GPT.smear_previous)
    qk_norm: bool = False  # RMS-normalise each head's queries and keys before the dot product
    activation: str = "gelu"  # the MLP's: "gelu" (GPT-2's tanh form) or "relu2" (ReLU squared)

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be a multiple of n_head={self.n_head}")
        if self.activation not in ("gelu", "relu2"):
            raise ValueError(f"activation={self.activation!r}: expected 'gelu' or 'relu2'")
        if int(self.smear) not in (0, 1, 2):
            raise ValueError(f"smear={self.smear}: expected 0 (off), 1 (the previous input) "
                             "or 2 (the previous two)")
        if self.pos_emb == "rope" and (self.n_embd // self.n_head) % 2:
            raise ValueError(f"rotary positions turn channel pairs: the head size n_embd / n_head = "
                             f"{self.n_embd // self.n_head} must be even")


class KVCache:
    """Keys and values of every layer for the positions generated so far: each (B, nh, block_size, hs)."""

    def __init__(self, config: GPTConfig, batch_size: int, device: torch.device, dtype: torch.dtype):
        hs = config.n_embd // config.n_head
        shape = (batch_size, config.n_head, config.block_size, hs)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.pos = 0  # how many positions are filled
        self.last_inputs = []  # the last positions' input embeddings, newest first, each (B, C): GPTConfig.smear

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v: (B, nh, T, hs) at the next positions; return all keys and values so far."""
        T = k.shape[2]
        self.k[layer][:, :, self.pos:self.pos + T] = k
        self.v[layer][:, :, self.pos:self.pos + T] = v
        end = self.pos + T
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]  # (B, nh, pos + T, hs)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be a multiple of n_head"
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v in that order
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        if config.qk_norm:
            hs = config.n_embd // config.n_head
            self.q_norm = nn.RMSNorm(hs, eps=QK_NORM_EPS)
            self.k_norm = nn.RMSNorm(hs, eps=QK_NORM_EPS)
        self.qk_norm = config.qk_norm

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                kv_cache: KVCache | None, layer: int, segment_ids: torch.Tensor | None) -> torch.Tensor:
        B, T, C = x.shape
        hs = C // self.n_head
        q, k, v = self.c_attn(x).split(C, dim=2)  # each (B, T, C)
        q, k = q.view(B, T, self.n_head, hs), k.view(B, T, self.n_head, hs)  # each (B, T, nh, hs)
        if self.qk_norm:  # in float32 (under bf16 autocast too), while each head's vector is contiguous
            q, k = self.q_norm(q.float()).to(v.dtype), self.k_norm(k.float()).to(v.dtype)  # (B, T, nh, hs)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # each (B, nh, T, hs)
        v = v.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v)  # (B, nh, pos + T, hs)
        y = ops.attention(q, k, v, causal=True, segment_ids=segment_ids)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)
        self.activation = config.activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)  # (B, T, 4C)
        if self.activation == "relu2":  # max(0, h)^2, Primer's
            h = F.relu(h).square()
        else:  # GPT-2's tanh form of GELU
            h = F.gelu(h, approximate="tanh")
        return self.dropout(self.c_proj(h))  # (B, T, C)


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, rope, kv_cache: KVCache | None, layer: int,
                segment_ids: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), rope, kv_cache, layer, segment_ids)  # (B, T, C)
        return x + self.mlp(self.ln_2(x))  # (B, T, C)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        if config.pos_emb not in ("rope", "learned"):
            raise ValueError(f"pos_emb={config.pos_emb!r}: expected 'rope' or 'learned'")
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        if config.pos_emb == "learned":
            self.transformer.wpe = nn.Embedding(config.block_size, config.n_embd)
        if config.smear:  # smear: the map of x_(t-1); smear2: of x_(t-2)
            self.transformer.smear = nn.Linear(config.n_embd, config.n_embd, bias=False)
        if config.smear >= 2:
            self.transformer.smear2 = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied: one matrix reads and writes tokens
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # residual projections: keep the stream's variance flat
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        for back in range(1, int(config.smear) + 1):  # starts as the plain GPT
            nn.init.zeros_(self.smear_map(back).weight)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor | None = None, targets: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None, segment_ids: torch.Tensor | None = None,
                kv_cache: KVCache | None = None, reduction: str = "mean", return_logits: bool = True,
                negatives: torch.Tensor | None = None, unlikelihood: float = 0.0):
        """Next-token logits and, with targets, the loss.

        idx: (B, T) token ids, or inputs_embeds: (B, T, C) already embedded (the multimodal splice).
        targets: (B, T) next-token ids, -100 where a position is not in the loss.
        segment_ids: (B, T) packed-example ids; attention stays inside each example.
        kv_cache: continue from the cached positions (generation).
        Returns (logits (B, T, V), loss or None). Without targets only the last position's logits are
        computed: (B, 1, V), the nanoGPT trick that makes generation cheap.
        return_logits=False (training and validation losses): returns (None, loss), and the head runs only
        at the positions that have a target. In a multimodal batch about two in three positions have none
        (prompts, image and audio tokens), and the head with its softmax is the widest matmul in a small model.
        negatives: (B, T) token ids not to predict (-100: none); each adds unlikelihood * -log(1 - p) to its
        position's loss (minimm/unlikelihood.py).
        """
        x = self.transformer.wte(idx) if inputs_embeds is None else inputs_embeds  # (B, T, C)
        B, T, C = x.shape
        offset = kv_cache.pos if kv_cache is not None else 0
        if offset + T > self.config.block_size:
            raise ValueError(f"sequence of {offset + T} tokens exceeds block_size {self.config.block_size}")
        rope = None
        if self.config.pos_emb == "learned":
            pos = torch.arange(offset, offset + T, device=x.device)
            x = x + self.transformer.wpe(pos)  # (B, T, C)
        else:
            rope = rope_tables(T, C // self.config.n_head, self.config.rope_base, offset, x.device)
        if self.config.smear:
            x = self.smear_previous(x, segment_ids, kv_cache)  # (B, T, C)
        x = self.transformer.drop(x)
        for layer, block in enumerate(self.transformer.h):
            x = block(x, rope, kv_cache, layer, segment_ids)  # (B, T, C)
        if kv_cache is not None:
            kv_cache.pos += T
        x = self.transformer.ln_f(x)  # (B, T, C)
        if targets is None:
            return self.lm_head(x[:, [-1], :]), None  # (B, 1, V)
        if not return_logits and not torch.compiler.is_compiling():  # compiled graphs keep static shapes
            keep = targets != -100  # (B, T)
            kept_negatives = negatives[keep] if negatives is not None else None  # (N,)
            kept_loss = self._head_loss(self.lm_head(x[keep]), targets[keep], kept_negatives, unlikelihood,
                                        reduction)  # (N,) or ()
            if reduction != "none":
                return None, kept_loss
            loss = torch.zeros(B, T, dtype=kept_loss.dtype, device=x.device)
            return None, loss.masked_scatter(keep, kept_loss)  # (B, T), 0 where ignored
        logits = self.lm_head(x)  # (B, T, V)
        loss = self._head_loss(logits, targets, negatives, unlikelihood, reduction)
        return (logits if return_logits else None), loss

    @staticmethod
    def _head_loss(logits: torch.Tensor, targets: torch.Tensor, negatives: torch.Tensor | None,
                   unlikelihood: float, reduction: str) -> torch.Tensor:
        """The loss of the head's logits (..., V) against targets (...): cross-entropy, plus the unlikelihood
        term where negatives are given and its weight is not 0."""
        if negatives is None or not unlikelihood:
            return ops.cross_entropy(logits, targets, ignore_index=-100, reduction=reduction)
        return cross_entropy_with_unlikelihood(logits, targets, negatives, unlikelihood, reduction)

    def smear_map(self, back: int) -> nn.Linear:
        """The learned map of the input `back` positions earlier (1 or 2)."""
        return self.transformer.smear if back == 1 else self.transformer.smear2

    def smear_previous(self, x: torch.Tensor, segment_ids: torch.Tensor | None,
                       kv_cache: KVCache | None) -> torch.Tensor:
        """x_t + W1 x_(t-1) (+ W2 x_(t-2) with smear=2), kept inside each packed example: why, and how,
        in minimm/smear.py. x: (B, T, C) -> (B, T, C)."""
        maps = [self.smear_map(back) for back in range(1, int(self.config.smear) + 1)]
        return smear_previous(x, maps, segment_ids, kv_cache)  # (B, T, C)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; the tied embedding is counted once, and left out with non_embedding."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wte.weight.numel()
            if self.config.pos_emb == "learned":
                n -= self.transformer.wpe.weight.numel()
        return n

    def flops_per_token(self, T: int | None = None) -> float:
        """Training FLOPs per token (forward + backward): 6 per weight plus attention's 12 * L * C * T
        (the PaLM paper's estimate, appendix B: https://arxiv.org/abs/2204.02311)."""
        T = T or self.config.block_size
        cfg = self.config
        return 6 * self.num_params() + 6 * cfg.vocab_size * cfg.n_embd + 12 * cfg.n_layer * cfg.n_embd * T

    def model_args(self) -> dict:
        return asdict(self.config)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, stop_tokens: tuple[int, ...] = (),
                 callback: Callable[[torch.Tensor], None] | None = None,
                 inputs_embeds: torch.Tensor | None = None, use_cache: bool = True) -> torch.Tensor:
        """Continue idx: (B, T) by up to max_new_tokens tokens; returns (B, T + new).

        temperature=0 is greedy. top_k keeps the k likeliest tokens, top_p the smallest set whose
        probability reaches p. A row stops after emitting one of stop_tokens (later positions repeat it);
        generation ends when every row has stopped. callback(tokens (B,)) sees each step as it comes.
        inputs_embeds: (B, T, C) replaces the prompt's embeddings (images and audio spliced in).
        When the context is full, generation stops.
        """
        cache = KVCache(self.config, idx.shape[0], idx.device, self.transformer.wte.weight.dtype) if use_cache else None

        def step_logits(idx: torch.Tensor, step: int) -> torch.Tensor:
            if cache is not None and step > 0:
                return self(idx[:, -1:], kv_cache=cache)[0]  # (B, 1, V): one new position
            if inputs_embeds is not None:
                embeds = inputs_embeds if step == 0 else torch.cat(
                    [inputs_embeds, self.transformer.wte(idx[:, inputs_embeds.shape[1]:])], dim=1)
                return self(inputs_embeds=embeds, kv_cache=cache)[0]
            return self(idx, kv_cache=cache)[0]

        return decode_loop(step_logits, idx, max_new_tokens, self.config.block_size, temperature, top_k, top_p,
                           stop_tokens, callback)
