"""Data: batches drawn from the packed memmaps that minimm/pack.py writes.

What this file teaches:
- The nanoGPT layout: one flat array of token ids per split, read through np.memmap, so a dataset larger
  than RAM costs nothing. Beside it: a uint8 loss mask, a uint8 task id per token, an index of where each
  example starts, and the media (uint8 images, float16 log-mel features) decoded once at prepare time.
- Two kinds of rows. Plain text is one long stream cut into random windows, as nanoGPT does. Instruction
  and chat examples are packed whole, several to a row, each row starting at an example boundary;
  segment ids keep every token's attention inside its own example (see ops.attention_mask).
- Targets carry -100 wherever the mask is 0, so only supervised tokens reach the loss; every token also
  carries its task id, so validation loss can be reported per task.
- Batches are a pure function of (seed, step, row): resuming at step N, or splitting the rows of a
  global batch across DDP ranks, draws exactly the batches an uninterrupted single process would.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from minimm.audio import N_MELS, AudioEncoder
from minimm.vit import to_tensor

TEXT_STREAM, PACKED = 0, 1  # the two kinds of example in the index
# a drawn example too long for the rest of a row goes back and another is drawn, up to this many times in a row.
# Stopping at the first one, 13.0% of the default's row positions held padding or an example's end-of-text token,
# compute spent on nothing to learn; with 8 tries, 5.6% (a step then holds 2% more code answer tokens, 12% more
# image and audio ones: the short examples fill the ends of rows)
PACK_TRIES = 8


@dataclass
class MediaSpec:
    """How media become tensors and placeholders; part of the dataset's settings."""
    image_size: int = 0  # 0: no image encoder, examples with images are skipped
    resize: str = "pad"
    image_tokens: int = 0  # placeholders per image (the projector's output length)
    strict: bool = False  # stop at the first unreadable media file instead of skipping the example
    audio_stack: int = 1  # audio encoder frames merged into one placeholder by the audio projector

    @classmethod
    def from_config(cls, cfg) -> "MediaSpec":
        """From a TrainConfig: one placeholder per token the image and audio projectors produce."""
        tokens = (cfg.image_size // cfg.patch_size) ** 2 // cfg.pixel_shuffle ** 2
        return cls(cfg.image_size, cfg.resize, tokens, cfg.strict, cfg.audio_stack)


def audio_tokens(frames, stack: int = 1):
    """Placeholders for a clip of `frames` mel frames (an int, or a tensor of them): the audio encoder
    halves time (a stride-2 conv), then the projector merges `stack` neighbouring encoder frames into one
    token (the last one padded). The one definition that packing, prompts and the splice all use."""
    return (AudioEncoder.output_lengths(frames) + stack - 1) // stack


@dataclass
class Batch:
    x: torch.Tensor  # (B, T) input ids
    y: torch.Tensor  # (B, T) target ids, -100 where not supervised
    task_ids: torch.Tensor  # (B, T) task of each target token
    segment_ids: torch.Tensor | None  # (B, T) packed example of each token; None when all rows are windows
    images: torch.Tensor | None = None  # (N_img, H, W, 3) uint8, in the order of their placeholders
    audio: torch.Tensor | None = None  # (N_clip, n_mels, F) float, zero-padded to the longest clip
    audio_lengths: torch.Tensor | None = None  # (N_clip,) real frames of each clip

    def to(self, device: str | torch.device) -> "Batch":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(*(move(t) for t in (self.x, self.y, self.task_ids, self.segment_ids, self.images,
                                         self.audio, self.audio_lengths)))

    def media(self) -> dict:
        """The model's media keyword arguments (none for a text-only batch): images normalised to float."""
        media = {}
        if self.images is not None:
            media["images"] = to_tensor(self.images)
        if self.audio is not None:
            media["audio"], media["audio_lengths"] = self.audio, self.audio_lengths
        return media


class Split:
    """One split of a packed dataset on disk, and the rows drawn from it."""

    def __init__(self, data_dir: str | Path, split: str, block_size: int, task_weights: dict | None = None):
        """task_weights: {task: weight} scales how often each task's packed examples are drawn (default
        1: in proportion to their count), and the text stream's share of the rows by the weight of text."""
        data_dir = Path(data_dir)
        meta = json.loads((data_dir / "meta.json").read_text())
        self.ids = np.memmap(data_dir / f"{split}.bin", dtype=np.dtype(meta["dtype"]), mode="r")
        self.mask = np.memmap(data_dir / f"{split}_mask.bin", dtype=np.uint8, mode="r")
        self.task = np.memmap(data_dir / f"{split}_task.bin", dtype=np.uint8, mode="r")
        self.index = np.load(data_dir / f"{split}_index.npy")
        stats = meta["splits"][split]
        size = meta.get("image_size", 0)
        self.images = self.image_ids = None  # each picture once; an example's image slots name its rows
        if stats.get("images"):
            self.images = np.memmap(data_dir / f"{split}_images.bin", dtype=np.uint8, mode="r",
                                    shape=(stats["images"], size, size, 3))
            self.image_ids = np.load(data_dir / f"{split}_image_ids.npy")
        self.audio = self.audio_index = None
        if stats.get("audio_clips"):
            self.audio = np.memmap(data_dir / f"{split}_audio.bin", dtype=np.float16, mode="r").reshape(-1, N_MELS)
            self.audio_index = np.load(data_dir / f"{split}_audio_index.npy")
        self.block_size = block_size
        self.eot = meta["eot"]
        self.stream_end = int(meta["splits"][split]["text_stream_tokens"])
        packed = self.index[self.index[:, 3] == PACKED]
        too_long = packed[:, 1] > block_size + 1
        has_media = (packed[:, 5] > 0) | (packed[:, 7] > 0)
        # truncation keeps the start of a long conversation; one with media would lose placeholders, so
        # those are left out instead. Both are counted for the log.
        self.n_truncated = int((too_long & ~has_media).sum())
        self.n_dropped = int((too_long & has_media).sum())
        self.packed = packed[~(too_long & has_media)]
        weights = np.array([(task_weights or {}).get(t, 1.0) for t in meta["tasks"]])[self.packed[:, 2]]
        self.cumulative = np.cumsum(weights) / weights.sum() if len(weights) else weights  # (N,)
        packed_tokens = int(self.packed[:, 1].sum())
        total = self.stream_end + packed_tokens
        # a row is a text window with probability equal to the text stream's (weighted) share of the tokens
        w_stream = (task_weights or {}).get("text", 1.0) * self.stream_end
        w_packed = float((weights * self.packed[:, 1]).sum()) if len(weights) else 0.0
        self.p_window = w_stream / (w_stream + w_packed) if self.stream_end > block_size and w_stream else 0.0
        if total == 0:
            raise ValueError(f"{data_dir}/{split}.bin holds no tokens")

    def row(self, rng: np.random.Generator):
        """One row: input ids, targets, task ids, segment ids (each (T,)), then the ids of the images
        and audio clips it holds, in order."""
        T = self.block_size
        images: list[int] = []
        clips: list[int] = []
        if rng.random() < self.p_window:
            start = int(rng.integers(0, self.stream_end - T))
            chunk = slice(start, start + T + 1)
            seq, mask, task = self.ids[chunk], self.mask[chunk], self.task[chunk]
            segments = np.zeros(T + 1, dtype=np.int64)
        else:
            seq, mask, task, segments = self._pack(rng, images, clips)
        seq = seq.astype(np.int64)
        targets = np.where(mask[1:] == 1, seq[1:], -100)
        return seq[:-1], targets, task[1:].astype(np.int64), segments[:-1], images, clips

    def _pack(self, rng: np.random.Generator, images: list[int], clips: list[int]):
        """Whole examples, drawn at random, laid end to end; a drawn example that does not fit in what is
        left of the row is put back and another drawn, until PACK_TRIES in a row have not fit."""
        T = self.block_size
        seq = np.zeros(T + 1, dtype=np.int64)
        mask = np.zeros(T + 1, dtype=np.uint8)
        task = np.zeros(T + 1, dtype=np.uint8)
        segments = np.zeros(T + 1, dtype=np.int64)
        pos, segment, misses = 0, 0, 0
        while pos < T + 1 and misses < PACK_TRIES:
            start, length, _, _, first_image, n_images, first_clip, n_clips = \
                self.packed[min(int(np.searchsorted(self.cumulative, rng.random())), len(self.packed) - 1)]
            if length > T + 1 - pos:
                if pos > 0:
                    misses += 1
                    continue
                length = T + 1  # one example longer than a row: keep its start (truncation)
            misses = 0
            sl = slice(start, start + length)
            seq[pos:pos + length], mask[pos:pos + length] = self.ids[sl], self.mask[sl]
            task[pos:pos + length], segments[pos:pos + length] = self.task[sl], segment
            images += range(first_image, first_image + n_images)
            clips += range(first_clip, first_clip + n_clips)
            pos, segment = pos + length, segment + 1
        # padding: its own segment so every position attends to at least itself; never in the loss
        seq[pos:], segments[pos:] = self.eot, segment
        return seq, mask, task, segments

    def media(self, images: list[int], clips: list[int]):
        """Tensors for the given image slots and clip ids: (N, H, W, 3) uint8; (N, n_mels, F) and (N,)."""
        pixels = torch.from_numpy(np.stack([self.images[self.image_ids[i]] for i in images])) if images else None
        if not clips:
            return pixels, None, None
        spans = [self.audio_index[c] for c in clips]
        lengths = torch.tensor([int(n) for _, n in spans])
        audio = torch.zeros(len(clips), N_MELS, int(lengths.max()))
        for j, (offset, n) in enumerate(spans):
            audio[j, :, :n] = torch.from_numpy(self.audio[offset:offset + n].astype(np.float32).T)
        return pixels, audio, lengths


class Batches:
    """Batches of `batch_size` rows for one rank; row r of step s of the global batch is drawn with
    the generator seeded by (seed, s, r), so any split of the global batch across ranks is exact."""

    def __init__(self, split: Split, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.split, self.batch_size, self.seed = split, batch_size, seed
        self.rank, self.world_size = rank, world_size

    def get(self, step: int) -> Batch:
        first = self.rank * self.batch_size
        rows = [self.split.row(np.random.default_rng([self.seed, step, first + r]))
                for r in range(self.batch_size)]
        x, y, task, seg = (torch.from_numpy(np.stack(col)) for col in list(zip(*rows))[:4])
        single_segment = bool((seg == seg[:, :1]).all())
        images = [i for row in rows for i in row[4]]
        clips = [c for row in rows for c in row[5]]
        return Batch(x, y, task, None if single_segment else seg, *self.split.media(images, clips))
