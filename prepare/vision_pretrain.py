"""Pretraining the image encoder on the bundled pictures' own labels, before the GPT reads its tokens.

What this file teaches:
- Vision-language models start from a vision encoder that has already learned to see: LLaVA and nanoVLM
  take CLIP's or SigLIP's, trained on hundreds of millions of captioned pictures, and the first ViT was
  pretrained on labelled ImageNet (Dosovitskiy et al. 2020, "An Image is Worth 16x16 Words",
  https://arxiv.org/abs/2010.11929). The language model then learns to read features that are there.
- Why a from-scratch model needs it even for flat shapes (measured, EXPERIMENTS.md): trained only through
  the GPT's answers, the default ViT learns colour and place in a few hundred steps but hardly shape (a
  linear probe on its tokens names a cell's shape 0.40 of the time; chance is 0.20). Until the GPT can
  read a shape its answers say little about which pixels make one, and until the tokens carry shapes the
  GPT cannot learn to read them. Trained straight on per-cell labels, the same ViT and projector tell the
  shapes apart (0.86-0.88 after 600 steps of 32 pictures), and handed to the GPT, frozen (config/mixed.py's
  freeze_vision), "Describe the image." is answered exactly 0.72-0.84 of the time instead of 0.09. Trained on
  through the GPT's answers instead, the encoder loses much of it (a probe: shape 0.86 -> 0.66; describe 0.27).
- Supervised pretraining with the labels the generator knows (prepare/shapes.py): for each cell of the 3x3
  grid on which the shapes are placed, the colour and the shape whose centre lies in it, or "none". Linear
  heads read each image token on its own, so every token must carry its own cell: the form in which the
  GPT will read them. Grids of other sizes are average-pooled to 3x3 first.
- The heads are thrown away afterwards; the projector goes on learning in the main run, and the ViT too
  unless freeze_vision keeps it as pretrained.
- Letters, not words (vision_pretrain_letters; 0.3 in config/mixed.py): on WORD_SHARE more text pictures, a
  linear head on each token says which letters have their centre in its cell, a yes / no per letter. Like the
  shapes, that is a label per cell, the same for a letter wherever it stands, and 26 letters make all the words;
  the GPT's attention then gathers a word's letters from the tokens that hold them. With it the frozen encoder's
  tokens tell the word apart far better (a fresh head on them, 600 steps: 0.56 -> 0.87), the shapes nearly as
  before (0.99 -> 0.97 per cell), and with more text pictures in the GPT's rows (prepare/shapes.py's n_read) the
  default reads words (EXPERIMENTS.md).
- Words (vision_pretrain_words > 0, off by default): a head over all 9 tokens names the word of a text
  picture. The probe then read the word 0.69 of the time after 1800 steps, but the GPT reading those tokens
  answered "What does the text say?" only 0.14, and the shapes suffered (EXPERIMENTS.md): one class per word at
  every place it can stand is much to learn, from few pictures.

bench/vision_probe.py trains the same heads to compare encoders, or to probe a trained run's frozen one.
"""
from __future__ import annotations

import math
import time
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from minimm.training import configure_optimizer
from minimm.vit import to_tensor
from prepare.shapes import COLORS, SHAPES, WORDS, examples_with_words, split_seed

LETTERS = "abcdefghijklmnopqrstuvwxyz"  # prepare/shapes.py's words are lowercase
GRID = 3  # prepare/shapes.py puts each shape's centre well inside a cell of a 3x3 grid
# at most this many training pictures are drawn (~8 s); 1200 steps of 32 (config/mixed.py) see each twice. With 8,000
# the 1200 steps learned them by heart (training loss 0.000) and named a held-out cell's shape 0.97 of the time; with
# 19,200, 0.99 (600 steps of 8,000: 0.96; bench/vision_probe.py --n_train, EXPERIMENTS.md)
N_PICTURES = 19200
N_VAL = 500  # held-out pictures, from the validation seed, for the accuracy it reports
# with the word head on (vision_pretrain_words > 0), text pictures are added: half as many again as the scenes,
# since a scene set holds only a fifth of them and the ViT then barely learned a word (0.14 after 600 steps)
WORD_SHARE = 0.5
N_VAL_WORDS = 200
BATCH_SIZE = 32
# the rate schedule of the pretraining: warm up over the first WARMUP steps (at most a tenth of them), then fall
# linearly to near zero at the last. At a constant rate the encoder ends where the noise of its last steps leaves
# it; decayed, at 3x the peak (config/mixed.py's vision_pretrain_lr), the shape per cell after 600 steps is 0.95
# instead of 0.88 (EXPERIMENTS.md)
WARMUP = 30


def scenes(seed: int, n: int, image_size: int, n_words: int = 0) -> tuple[torch.Tensor, ...]:
    """n pictures of prepare/shapes.py (any kind), then n_words text pictures -> pixels (N, H, W, 3) uint8,
    colour and shape per cell (N, 9) (0 = no shape there), word index (N,) (-100 for a scene of shapes), and the
    letters whose centre lies in each cell (N, 9, 26) (0 / 1; none for a scene), N = n + n_words."""
    pixels, colors, shapes, words, letters = [], [], [], [], []
    cell = image_size / GRID
    for _, example in examples_with_words(seed, n, image_size, n_words):
        color, shape = np.zeros(GRID * GRID, np.int64), np.zeros(GRID * GRID, np.int64)
        for s in example.shapes:
            k = int(s.y // cell) * GRID + int(s.x // cell)  # row-major, as the tokens are
            color[k], shape[k] = 1 + list(COLORS).index(s.color), 1 + SHAPES.index(s.name)
        in_cell = np.zeros((GRID * GRID, len(LETTERS)), np.float32)
        for char, (x, y) in zip(example.word, example.letters):
            in_cell[min(int(y // cell), GRID - 1) * GRID + min(int(x // cell), GRID - 1), LETTERS.index(char)] = 1
        pixels.append(np.asarray(example.image))
        colors.append(color)
        shapes.append(shape)
        words.append(WORDS.index(example.word) if example.word else -100)
        letters.append(in_cell)
    return (torch.from_numpy(np.stack(pixels)), torch.from_numpy(np.stack(colors)),
            torch.from_numpy(np.stack(shapes)), torch.tensor(words), torch.from_numpy(np.stack(letters)))


class Probe(nn.Module):
    """An encoder and four linear heads: colour, shape and the letters in it per cell, the word from all cells.

    encoder: pixels (B, 3, H, W) -> tokens (B, M, C) on a square grid of M tokens; a grid other than 3x3 is
    average-pooled to 3x3 so each head's input is one cell's tokens."""

    def __init__(self, encoder: nn.Module, dim: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.color = nn.Linear(dim, 1 + len(COLORS))
        self.shape = nn.Linear(dim, 1 + len(SHAPES))
        self.word = nn.Linear(GRID * GRID * dim, len(WORDS))
        self.letters = nn.Linear(dim, len(LETTERS))

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h = self.encoder(to_tensor(pixels))  # (B, M, C)
        side = math.isqrt(h.shape[1])
        if side != GRID:
            grid = h.transpose(1, 2).reshape(h.shape[0], h.shape[2], side, side)  # (B, C, side, side)
            h = F.adaptive_avg_pool2d(grid, GRID).flatten(2).transpose(1, 2)  # (B, 9, C)
        # (B, 9, 8), (B, 9, 6), (B, n_words), (B, 9, 26)
        return self.color(h), self.shape(h), self.word(h.flatten(1)), self.letters(h)


def losses(probe: Probe, batch: tuple[torch.Tensor, ...], word_weight: float,
           letter_weight: float = 0.0) -> torch.Tensor:
    pixels, colors, shapes, words, letters = batch
    color_logits, shape_logits, word_logits, letter_logits = probe(pixels)
    loss = F.cross_entropy(color_logits.flatten(0, 1), colors.flatten())
    loss = loss + F.cross_entropy(shape_logits.flatten(0, 1), shapes.flatten())
    texts = words >= 0  # a batch without a text picture has no word or letter loss
    if word_weight and texts.any():
        loss = loss + word_weight * F.cross_entropy(word_logits, words, ignore_index=-100)
    if letter_weight and texts.any():  # per cell, one yes / no per letter, summed over the 26 (a cell holds 0-3)
        per_letter = F.binary_cross_entropy_with_logits(letter_logits[texts], letters[texts], reduction="none")
        loss = loss + letter_weight * per_letter.sum(-1).mean()
    return loss


@torch.no_grad()
def accuracy(probe: Probe, val: tuple[torch.Tensor, ...]) -> dict:
    """Held-out accuracy: colour and shape over the cells that hold a shape, word over the text pictures; for the
    letters, F1 of the (cell, letter) pairs named over the text pictures' true ones."""
    pixels, colors, shapes, words, letters = val
    color_logits, shape_logits, word_logits, letter_logits = probe(pixels)
    occupied, texts = colors > 0, words >= 0
    named, true = (letter_logits[texts] > 0).float(), letters[texts]
    return {"color": (color_logits.argmax(-1) == colors)[occupied].float().mean().item(),
            "shape": (shape_logits.argmax(-1) == shapes)[occupied].float().mean().item(),
            "word": (word_logits.argmax(-1) == words)[texts].float().mean().item(),
            "letters": (2 * (named * true).sum() / (named.sum() + true.sum()).clamp(min=1)).item()}


def lr_factor(step: int, steps: int, warmup: int) -> float:
    """The rate at step (1..steps) as a share of the peak: warmup / linear decay (WARMUP's comment)."""
    if step <= warmup:
        return step / warmup
    return (steps - step + 1) / (steps - warmup)


def fit(probe: Probe, train_set, val_set, steps: int, batch_size: int, lr: float, optimizer: str = "muon",
        word_weight: float = 0.0, seed: int = 1337, eval_every: int = 0, decay: bool = False,
        log: Callable[[str], None] = print, letter_weight: float = 0.0) -> tuple[dict, float]:
    """steps steps of the optimizer (minimm.training: "adamw" or "muon") on batches drawn with a fixed seed, at
    the rate lr, or with decay warmed up to lr and decayed (lr_factor), the word and letter losses weighted by
    word_weight and letter_weight; -> held-out accuracy after the last step, pictures per second."""
    opt = configure_optimizer(probe, 0.0, lr, (0.9, 0.999), "cpu", optimizer=optimizer)
    batch_rng = torch.Generator().manual_seed(seed)
    device = next(probe.parameters()).device
    warmup = min(WARMUP, steps // 10)
    seconds = 0.0
    for step in range(1, steps + 1):
        start = time.perf_counter()
        if decay:
            for group in opt.param_groups:
                group["lr"] = lr * lr_factor(step, steps, warmup) * group.get("lr_scale", 1.0)
        idx = torch.randint(0, len(train_set[0]), (batch_size,), generator=batch_rng)
        loss = losses(probe, [t[idx].to(device) for t in train_set], word_weight, letter_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        seconds += time.perf_counter() - start
        if eval_every and (step % eval_every == 0 or step == steps):
            acc = accuracy(probe, [t.to(device) for t in val_set])
            log(f"step {step:5d}  loss {loss.item():.3f}  held-out colour {acc['color']:.2f}  "
                f"shape {acc['shape']:.2f}  word {acc['word']:.2f}  letters {acc['letters']:.2f}  ({seconds:.0f} s)")
    return accuracy(probe, [t.to(device) for t in val_set]), steps * batch_size / max(seconds, 1e-9)


class ImagePath(nn.Module):
    """A MultimodalGPT's image path: its ViT, then its projector: pixels (B, 3, H, W) -> tokens (B, M, C)."""

    def __init__(self, vision: nn.Module, projector: nn.Module) -> None:
        super().__init__()
        self.vit, self.projector = vision, projector

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.projector(self.vit(images))  # (B, 3, H, W) -> (B, M, C)


def pretrain_vision(model: nn.Module, cfg, log: Callable[[str], None] = print) -> dict:
    """Train model.vision and model.image_projector for cfg.vision_pretrain_iters steps on per-cell labels of
    prepare/shapes.py pictures drawn from cfg.data_seed at cfg.image_size with cfg.optimizer, at the encoders'
    rate (learning_rate x media_lr_scale), or warmed up to cfg.vision_pretrain_lr and decayed when it is set
    (lr_factor); with cfg.vision_pretrain_words > 0 also on which word the text pictures show, with
    cfg.vision_pretrain_letters > 0 on which letters lie in each cell of them, each loss weighted by its key,
    over WORD_SHARE more text pictures. The global RNG is left as it was, so the main run's draws do not depend
    on it. -> held-out accuracy {"color", "shape", "word", "letters"} of the discarded heads."""
    path = ImagePath(model.vision, model.image_projector)
    device = next(path.parameters()).device
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        n_pictures = min(N_PICTURES, cfg.vision_pretrain_iters * BATCH_SIZE)  # never more than it will see
        with_text = cfg.vision_pretrain_words > 0 or cfg.vision_pretrain_letters > 0
        n_words = round(WORD_SHARE * n_pictures) if with_text else 0
        train_set = scenes(split_seed(cfg.data_seed, "train"), n_pictures, cfg.image_size, n_words)
        val_set = scenes(split_seed(cfg.data_seed, "val"), N_VAL, cfg.image_size, N_VAL_WORDS if with_text else 0)
        probe = Probe(path, model.image_projector.mlp[-1].out_features).to(device)
        decay = cfg.vision_pretrain_lr > 0
        lr = cfg.vision_pretrain_lr if decay else cfg.learning_rate * cfg.media_lr_scale
        acc, speed = fit(probe, train_set, val_set, cfg.vision_pretrain_iters, BATCH_SIZE, lr, cfg.optimizer,
                         cfg.vision_pretrain_words, seed=cfg.seed, decay=decay,
                         letter_weight=cfg.vision_pretrain_letters)
    log(f"vision pretraining: {cfg.vision_pretrain_iters} steps of {BATCH_SIZE} pictures "
        f"({n_pictures + n_words} drawn) in {time.perf_counter() - start:.0f} s ({speed:.0f} pictures/s); "
        f"held-out colour {acc['color']:.2f}, shape {acc['shape']:.2f} per cell"
        + (f", word {acc['word']:.2f}" if cfg.vision_pretrain_words > 0 else "")
        + (f", letters {acc['letters']:.2f} (F1)" if cfg.vision_pretrain_letters > 0 else ""))
    return acc
