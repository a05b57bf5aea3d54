"""The projector: encoder states -> the GPT's embedding space, with fewer tokens and a set scale.

Follows LLaVA-1.5's two-layer MLP projector (Liu et al. 2023, "Improved Baselines with Visual Instruction
Tuning", https://arxiv.org/abs/2310.03744), with Idefics3's pixel shuffle (Laurençon et al. 2024, "Building
and better understanding vision-language models", https://arxiv.org/abs/2408.12637), as nanoVLM uses it.

What this file teaches:
- Pixel shuffle (space-to-depth) and its 1-D twin for audio, frame stacking: neighbouring encoder tokens
  are stacked into the channels of one, so the language model reads s^2 (or k) times fewer media tokens
  and loses nothing.
- Image tokens get a learned place of their own in the GPT's space, and audio tokens a learned place in
  time, because rotary positions say how far apart two tokens are but not where an attended token sits
  (Projector's docstring).
- A LayerNorm ends the projector and sets the scale at which media tokens enter the GPT: larger than the
  token embeddings, which a pre-norm GPT trained from scratch learned faster from here (Projector's docstring).

Shape letters: N images or clips, P patches per image, gh gw patch grid, s pixel-shuffle factor, Ce encoder
channels, Ta audio encoder frames, C the GPT's channels (n_embd), M media tokens.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from minimm.audio import sinusoids
from minimm.vit import interpolate_pos_emb, sincos_2d

IMAGE_POS_INIT_STD = 0.2  # the image tokens' own positions at init (Projector): ~3x the content's std
MEDIA_NORM_GAIN = 3.0  # std of each projected media token's channels at init (Projector's out_norm)


def pixel_shuffle(x: torch.Tensor, s: int, grid: tuple[int, int] | None = None) -> torch.Tensor:
    """Stack each s x s neighbourhood of patches into one token: (N, P, Ce) -> (N, P / s^2, s^2 * Ce).

    grid: (gh, gw) of the patches, row-major in P; None means a square grid. A merged token holds its
    patches in (row offset, column offset) order, channels last.
    """
    N, P, Ce = x.shape
    gh, gw = grid if grid is not None else (math.isqrt(P), math.isqrt(P))
    if gh * gw != P or gh % s or gw % s:
        raise ValueError(f"pixel shuffle {s}: a {gh}x{gw} grid of {P} patches does not split into "
                         f"{s}x{s} blocks")
    x = x.reshape(N, gh // s, s, gw // s, s, Ce)  # (N, gh/s, s, gw/s, s, Ce)
    x = x.permute(0, 1, 3, 2, 4, 5)  # (N, gh/s, gw/s, s, s, Ce)
    return x.reshape(N, (gh // s) * (gw // s), s * s * Ce)  # (N, P/s^2, s^2 Ce)


def stack_frames(x: torch.Tensor, k: int) -> torch.Tensor:
    """Merge each run of k consecutive frames into one token, the 1-D pixel shuffle that audio LLMs use
    (Ultravox, Qwen2-Audio pool time the same way): (N, Ta, Ce) -> (N, ceil(Ta / k), k * Ce), the tail
    zero-padded. A token then holds k * 20 ms of sound in its channels, and the language model reads k
    times fewer audio positions, so a clip costs it k times less and its attention has fewer places to
    search when it looks for the next key or note."""
    N, Ta, Ce = x.shape
    pad = (-Ta) % k
    if pad:
        x = torch.cat([x, x.new_zeros(N, pad, Ce)], dim=1)  # (N, Ta + pad, Ce)
    return x.reshape(N, (Ta + pad) // k, k * Ce)  # (N, ceil(Ta / k), k Ce)


class Projector(nn.Module):
    """Encoder states -> GPT embeddings: Linear, GELU, Linear, after an optional pixel shuffle.

    Pixel shuffle (space-to-depth): a 48x48 image in 8x8 patches gives a 6x6 grid, P = 36 tokens of Ce
    channels. With s = 2 each 2x2 block of neighbouring patches becomes one token of 4 Ce channels:
    (N, 36, Ce) -> (N, 6, 6, Ce) -> (N, 3, 3, 2*2*Ce) -> (N, 9, 4 Ce), and the MLP maps 4 Ce -> C.
    Nothing is thrown away (the channels hold all four patches), but the language model reads s^2 = 4
    times fewer image tokens, so its sequences are shorter and its attention cheaper. Neighbours are
    merged because they are the patches most likely to belong to one object.
    in_dim: the encoder's channels Ce (before the shuffle); out_dim: the GPT's n_embd C.
    frame_stack: for audio, the same idea along time (stack_frames): (N, Ta, Ce) -> (N, Ta / k, k Ce).
    token_grid: (rows, columns) of the image tokens after the shuffle; given, each token also gets a
    learned position of its own in the GPT's space (pos_emb, below).
    max_tokens: for audio, the most tokens a clip can give; given, token t of every clip gets row t of a
    learned (max_tokens, C) table, for the same reason as image tokens (below, after the image figures).

    Why image tokens need positions of their own in the GPT's space: the GPT's rotary positions make
    attention depend on how far apart two tokens are, but what an attended token passes on (its value)
    holds only what the token itself carries. The ViT adds its positions at its input; after its blocks,
    the shuffle and this MLP it is mixed into the content, and the GPT answered "Where is the red shape?"
    barely above chance: the red token has to say where it sits. A learned (rows, columns, C) table added
    to the projected tokens puts it back. It starts as 2-D sine-cosines (vit.sincos_2d) at
    IMAGE_POS_INIT_STD, above the projected content's std at init (~0.07), and is interpolated like the
    ViT's table for other image sizes.
    Measured (image-only, 300 steps; EXPERIMENTS.md): where 0.17 -> 0.49, count 0.87 -> 1.00, val loss 0.61 ->
    0.52; in the 720-step default run, with fewer pictures per step, image val loss 0.69 -> 0.67 only.
    Audio has the same gap: to write "4 1 7 #" the GPT must know which key it has reached, but a tone token
    it attends to says which key sounds, not when. Without a table the default run's DTMF mistakes were
    mostly a key too many (often the last key written twice) or too few. The table starts as 1-D
    sinusoids at IMAGE_POS_INIT_STD. Measured in the default run (config/mixed.py, all 300 held-out DTMF
    clips, EXPERIMENTS.md): DTMF 0.870 -> 0.907, and 0.900 with --seed=2; audio val loss 0.050 -> 0.042 / 0.036.
    out_norm: a LayerNorm ends the projector (after the position table), its gain starting at
    MEDIA_NORM_GAIN, so media tokens enter the GPT at a scale set here rather than wherever the MLP drifts.

    Why a set scale, and why large: the GPT is pre-norm, so a token's residual stream starts as its input
    vector and every block adds to it; an input much larger than the blocks' updates stays what later
    blocks read at that position. Li et al. 2025 ("The Unseen Bias: How Norm Discrepancy in Pre-Norm MLLMs
    Leads to Visual Information Loss", https://arxiv.org/abs/2512.08374) put a LayerNorm after a pretrained
    LLaVA's projector to pull its high-norm image tokens down to the text's scale. Training from scratch for
    minutes, we measured the other direction: media tokens ~50x larger than the token embeddings learn best.
    Audio only, 200 steps (EXPERIMENTS.md): audio val loss 0.93 without the norm; with it, at gain 0.02 (the text's
    scale) 1.18, 1.0: 0.79, 3.0: 0.65, 10: 0.62; after 600 steps dtmf / notes 0.78 / 0.92 without it, 0.91 /
    0.95 with it. In the 720-step mixed run (audio drawn 1.3x): image val loss 0.67 -> 0.56 (color 0.25 ->
    0.69), audio 1.18 -> 1.01, and a linear probe names the sounding key from 51% of the projected tone
    tokens instead of 10%. Image only, 300 steps: no change (val loss 0.52 -> 0.53). With audio drawn 4x
    (config/mixed.py) the gain is small: val loss image 0.72 -> 0.69, audio 0.085 -> 0.073.
    """

    def __init__(self, in_dim: int, out_dim: int, pixel_shuffle: int = 1, frame_stack: int = 1,
                 token_grid: tuple[int, int] | None = None, max_tokens: int | None = None,
                 out_norm: bool = False):
        super().__init__()
        if pixel_shuffle < 1 or frame_stack < 1:
            raise ValueError(f"pixel_shuffle={pixel_shuffle}, frame_stack={frame_stack}: must be at least 1")
        self.pixel_shuffle, self.frame_stack = pixel_shuffle, frame_stack
        merged = in_dim * pixel_shuffle ** 2 * frame_stack
        self.mlp = nn.Sequential(nn.Linear(merged, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))
        # the GPT's init, N(0, 0.02): projected media then start at the scale of the token embeddings
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        if token_grid is not None and max_tokens is not None:
            raise ValueError("token_grid (image tokens) and max_tokens (audio tokens) exclude each other")
        self.pos_emb = None  # (rows, columns, C) with token_grid, (max_tokens, C) with max_tokens
        if token_grid is not None:
            table = sincos_2d(*token_grid, out_dim)  # (rows, columns, C)
            self.pos_emb = nn.Parameter(table * (IMAGE_POS_INIT_STD / table.std()))
        elif max_tokens is not None:
            table = sinusoids(max_tokens, out_dim)  # (max_tokens, C)
            self.pos_emb = nn.Parameter(table * (IMAGE_POS_INIT_STD / table.std()))
        self.norm = None  # applied last, after the table
        if out_norm:
            self.norm = nn.LayerNorm(out_dim)
            nn.init.constant_(self.norm.weight, MEDIA_NORM_GAIN)

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """x: (N, P, Ce) -> (N, P / s^2, C), or (N, Ta, Ce) -> (N, Ta / k, C) with frame_stack k.
        grid: (gh, gw) when the patches are not a square grid."""
        if self.pixel_shuffle > 1:
            x = pixel_shuffle(x, self.pixel_shuffle, grid)  # (N, P/s^2, s^2 Ce)
        if self.frame_stack > 1:
            x = stack_frames(x, self.frame_stack)  # (N, Ta/k, k Ce)
        x = self.mlp(x)  # (N, M, C)
        if self.pos_emb is not None and self.pos_emb.dim() == 2:  # audio tokens: each one's place in time
            if x.shape[1] > self.pos_emb.shape[0]:
                raise ValueError(f"{x.shape[1]} audio tokens, but the position table holds {self.pos_emb.shape[0]}")
            x = x + self.pos_emb[: x.shape[1]]  # (N, M, C) + (M, C)
        elif self.pos_emb is not None:  # image tokens: add each one's place in the (rows, columns) grid
            s = self.pixel_shuffle
            rows, columns = (grid[0] // s, grid[1] // s) if grid is not None else (math.isqrt(x.shape[1]),) * 2
            x = x + interpolate_pos_emb(self.pos_emb, rows, columns)  # (N, M, C) + (M, C)
        if self.norm is not None:
            x = self.norm(x)  # (N, M, C)
        return x
