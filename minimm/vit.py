"""The image encoder: a Vision Transformer, and the one way pixels get into it.

Paper: Dosovitskiy et al. 2020, "An Image is Worth 16x16 Words", https://arxiv.org/abs/2010.11929

What this file teaches:
- An image becomes a sequence by cutting it into patch_size x patch_size squares (`patchify`) and mapping
  each flattened square to n_embd numbers with one Linear. That Linear is exactly a Conv2d whose kernel
  and stride are both patch_size: each output position of such a convolution sees one patch, no overlap,
  with the same weights everywhere. We flatten patches in (channel, row, column) order, the layout of a
  Conv2d weight, so `conv.weight.reshape(n_embd, -1)` is our Linear weight (the tests check it).
- Position is learned per grid cell as a (gh, gw, C) grid. Kept as a grid, it can be resized bilinearly
  for an image of another size, so a model trained at 48x48 still runs on 64x64 (the paper, section 3.2).
  It starts as 2-D sine-cosines (`sincos_2d`) at the scale of the patch content, not as noise: trained
  from scratch on a few thousand pictures, the encoder can tell where a patch is from the first step.
- The blocks are the GPT's pre-norm blocks with one difference: attention is not causal, every patch sees
  every other patch, because an image has no reading order.
- No CLS token. A classifier needs one vector per image, so the paper pools into an extra token; here the
  language model reads every patch embedding (after a projector, minimm/projector.py) and attends to the
  patches it needs, so pooling would only throw information away.
- Preprocessing, in one place for both paths: `load_image` decodes, converts to RGB and resizes once at
  prepare time into uint8; `to_tensor` normalises at train time; `preprocess` (used by sample.py on a
  user's image) is the two together, so a picture is normalised the same way however it arrives.

Normalisation: pixel / 127.5 - 1, i.e. mean 0.5 and std 0.5 per channel, giving [-1, 1]. Not the ImageNet
statistics: the encoder is trained from scratch, and all it needs is inputs centred near zero at unit scale.

Defaults: 48x48 images in 8x8 patches, a 6x6 grid of P = 36 patches, sized for the bundled shapes and
words (prepare/shapes.py) on a 2-core CPU.

Shape letters: B batch, H W image height and width, ps patch size, gh gw patch grid (H // ps, W // ps),
P patches (gh * gw), D flattened patch (3 * ps * ps), C channels (n_embd), nh heads, hs head size.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageOps

from minimm.ops import attention

RESIZE_POLICIES = ("pad", "crop")
PAD_FILL = (128, 128, 128)  # normalises to ~0: padding adds no signal the model could mistake for content
WHITE = (255, 255, 255)  # what transparent pixels become: documents and icons are drawn on white paper
PIXEL_MEAN = 127.5  # mean 0.5 and std 0.5 of a pixel in [0, 1], in 8-bit units
PIXEL_STD = 127.5
POS_INIT_STD = 0.2  # the initial positions' std: about that of the patches' content under LeCun's init


@dataclass
class ViTConfig:
    image_size: int = 48  # the bundled tasks stay decidable at 48x48 (see prepare/shapes.py)
    patch_size: int = 8  # 6x6 grid: 36 image tokens for the language model to read
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size={self.image_size} is not a multiple of "
                             f"patch_size={self.patch_size}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not a multiple of n_head={self.n_head}")

    @property
    def n_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """images: (B, 3, H, W) -> (B, P, D), patches in row-major grid order, each flattened as (3, ps, ps)."""
    B, ch, H, W = images.shape
    if H % patch_size or W % patch_size:
        raise ValueError(f"image {H}x{W} is not a multiple of patch_size={patch_size}")
    gh, gw = H // patch_size, W // patch_size
    x = images.reshape(B, ch, gh, patch_size, gw, patch_size)  # (B, 3, gh, ps, gw, ps)
    x = x.permute(0, 2, 4, 1, 3, 5)  # (B, gh, gw, 3, ps, ps)
    return x.reshape(B, gh * gw, ch * patch_size * patch_size)  # (B, P, D)


def unpatchify(patches: torch.Tensor, patch_size: int, height: int, width: int) -> torch.Tensor:
    """The inverse of patchify. patches: (B, P, D) -> (B, 3, height, width)."""
    B, P, D = patches.shape
    gh, gw, ch = height // patch_size, width // patch_size, D // (patch_size * patch_size)
    x = patches.reshape(B, gh, gw, ch, patch_size, patch_size)  # (B, gh, gw, 3, ps, ps)
    x = x.permute(0, 3, 1, 4, 2, 5)  # (B, 3, gh, ps, gw, ps)
    return x.reshape(B, ch, height, width)  # (B, 3, H, W)


def interpolate_pos_emb(grid: torch.Tensor, gh: int, gw: int) -> torch.Tensor:
    """grid: (gh0, gw0, C) learned position embeddings -> (gh * gw, C), resized bilinearly if need be."""
    if grid.shape[:2] != (gh, gw):
        x = grid.permute(2, 0, 1)[None]  # (1, C, gh0, gw0): F.interpolate wants channels first
        x = F.interpolate(x, size=(gh, gw), mode="bilinear", align_corners=False)  # (1, C, gh, gw)
        grid = x[0].permute(1, 2, 0)  # (gh, gw, C)
    return grid.reshape(gh * gw, grid.shape[-1])  # (P, C)


def _sincos_1d(n: int, dim: int) -> torch.Tensor:
    """(n, dim): sin and cos of the index 0..n-1 at ceil(dim / 2) frequencies from 1 down to 1/100."""
    k = (dim + 1) // 2
    angles = torch.arange(n, dtype=torch.float32)[:, None] * 100.0 ** (-torch.arange(k) / max(1, k - 1))  # (n, k)
    return torch.cat([angles.sin(), angles.cos()], dim=1)[:, :dim]  # (n, dim)


def sincos_2d(gh: int, gw: int, C: int) -> torch.Tensor:
    """(gh, gw, C) 2-D sine-cosine positions: the first C // 2 channels encode the row, the rest the column.
    Neighbouring cells get similar vectors and far ones different ones, so position is legible from the
    first step; here the table is only the *initial* value of the learned embedding (MAE, He et al. 2021,
    https://arxiv.org/abs/2111.06377, keeps it fixed)."""
    rows = _sincos_1d(gh, C // 2)[:, None, :].expand(gh, gw, C // 2)  # (gh, gw, C/2)
    cols = _sincos_1d(gw, C - C // 2)[None, :, :].expand(gh, gw, C - C // 2)  # (gh, gw, C - C/2)
    return torch.cat([rows, cols], dim=-1)  # (gh, gw, C)


class SelfAttention(nn.Module):
    """Multi-head attention where every patch attends to every patch (causal=False)."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.proj = nn.Linear(config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, P, C) -> (B, P, C)."""
        B, P, C = x.shape
        qkv = self.qkv(x).reshape(B, P, 3, self.n_head, C // self.n_head)  # (B, P, 3, nh, hs)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, nh, P, hs)
        y = attention(q, k, v, causal=False)  # (B, nh, P, hs)
        y = y.transpose(1, 2).reshape(B, P, C)  # (B, P, C)
        return self.dropout(self.proj(y))


class MLP(nn.Module):
    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, P, C) -> (B, P, C), through a 4C-wide hidden layer."""
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-norm: normalise the input of each sublayer and add its output to the untouched residual stream."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = SelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class ViT(nn.Module):
    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.config = config
        grid = config.image_size // config.patch_size
        self.patch_embed = nn.Linear(3 * config.patch_size ** 2, config.n_embd)
        self.pos_emb = nn.Parameter(torch.zeros(grid, grid, config.n_embd))
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.apply(self._init_weights)
        # Trained from scratch on a few thousand pictures (the paper pre-trains on ImageNet-21k or JFT), a ViT
        # whose positions start as N(0, 0.02) noise beside larger patch content learns where things are only
        # slowly. So both terms of the sum start at one readable scale: the patch Linear gets LeCun's init
        # (its output std is about the pixels' std, ~0.2 on the bundled scenes), and the positions start as
        # 2-D sine-cosines scaled to POS_INIT_STD. Both are learned from there.
        nn.init.normal_(self.patch_embed.weight, std=1 / math.sqrt(self.patch_embed.in_features))
        with torch.no_grad():
            table = sincos_2d(grid, grid, config.n_embd)  # (gh, gw, C)
            self.pos_emb.copy_(table * (POS_INIT_STD / table.std()))
        # GPT-2's init: the writes into the residual stream shrink with depth, so the sum keeps its scale
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: (B, 3, H, W), normalised as by to_tensor -> (B, P, C), P = (H // ps) * (W // ps)."""
        ps = self.config.patch_size
        x = self.patch_embed(patchify(images, ps))  # (B, P, C)
        x = x + interpolate_pos_emb(self.pos_emb, images.shape[2] // ps, images.shape[3] // ps)  # (B, P, C)
        x = self.dropout(x)
        for block in self.blocks:
            x = block(x)  # (B, P, C)
        return self.ln_f(x)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> "RGB": transparency composited on white, 16-bit scaled to 8-bit."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # Pillow's own convert() clips these to 0..255, turning most of a 16-bit picture white; instead
        # map the 16-bit range onto 8 bits (65535 / 255 = 257). Mode "I" holds 16-bit PNGs in older Pillow.
        pixels = np.clip(np.asarray(image, dtype=np.float64), 0, 65535) / 257.0
        image = Image.fromarray(np.rint(pixels).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, WHITE + (255,)), rgba).convert("RGB")
    return image.convert("RGB")  # L, P, CMYK, 1, YCbCr, ...: Pillow's conversions are right for these


def resize_square(image: Image.Image, image_size: int, resize: str = "pad") -> Image.Image:
    """An RGB image -> image_size x image_size. "pad": keep all of it, filling the short side with grey;
    "crop": keep the centre square, losing the ends of the long side."""
    if resize not in RESIZE_POLICIES:
        raise ValueError(f"resize={resize!r}: expected one of {', '.join(map(repr, RESIZE_POLICIES))}")
    w, h = image.size
    side = max(w, h) if resize == "pad" else min(w, h)
    if resize == "pad":
        square = Image.new("RGB", (side, side), PAD_FILL)
        square.paste(image, ((side - w) // 2, (side - h) // 2))
    else:
        left, top = (w - side) // 2, (h - side) // 2
        square = image.crop((left, top, left + side, top + side))
    # Pillow widens the bicubic kernel by the shrink factor, so this also low-passes before subsampling.
    return square.resize((image_size, image_size), Image.Resampling.BICUBIC)


def image_to_uint8(image: Image.Image, image_size: int, resize: str = "pad") -> np.ndarray:
    """A decoded image -> uint8 (image_size, image_size, 3): upright (EXIF), RGB, resized."""
    return np.asarray(resize_square(to_rgb(ImageOps.exif_transpose(image)), image_size, resize))


def load_image(path: str | Path, image_size: int, resize: str = "pad") -> np.ndarray:
    """Decode the file at path -> uint8 (image_size, image_size, 3). Raises ValueError naming the file
    when it is missing, truncated, or not an image."""
    try:
        with Image.open(path) as image:
            image.load()  # open() reads only the header: a truncated file fails here, not later
            return image_to_uint8(image, image_size, resize)
    # OSError covers a missing file, UnidentifiedImageError and truncation; some broken PNG chunks raise
    # SyntaxError, a short GIF EOFError, and an absurd header DecompressionBombError.
    except (OSError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from e


def to_tensor(pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) array or tensor -> float32 (B, 3, H, W) in [-1, 1]: the one normalisation."""
    # np.array copies: a memmap batch is read-only, and torch will not wrap a read-only array silently
    x = pixels if isinstance(pixels, torch.Tensor) else torch.from_numpy(np.array(pixels))
    if x.dtype != torch.uint8:
        raise TypeError(f"to_tensor expects uint8 pixels, got {x.dtype}: were they normalised already?")
    x = x.permute(0, 3, 1, 2)  # (B, 3, H, W)
    return (x.float() - PIXEL_MEAN) / PIXEL_STD


def preprocess(image: Image.Image, image_size: int, resize: str = "pad") -> torch.Tensor:
    """A Pillow image in any mode -> float32 (3, image_size, image_size), normalised as in training."""
    return to_tensor(image_to_uint8(image, image_size, resize)[None])[0]
