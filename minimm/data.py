"""Data: rendered examples packed into flat memmaps on disk, and batches drawn from them.

What this file teaches:
- The nanoGPT layout: one flat array of token ids per split (`train.bin`, `val.bin`, uint16 when the
  vocabulary fits, else uint32), read through np.memmap so a dataset larger than RAM costs nothing.
  Beside it: a uint8 loss mask, a uint8 task id per token, and an index of where each example starts.
- Two kinds of rows. Plain text is one long stream cut into random windows, as nanoGPT does. Instruction
  and chat examples are packed whole, several to a row, each row starting at an example boundary;
  segment ids keep every token's attention inside its own example (see ops.attention_mask).
- Targets carry -100 wherever the mask is 0, so only supervised tokens reach the loss; every token also
  carries its task id, so validation loss can be reported per task.
- Batches are a pure function of (seed, step, row): resuming at step N, or splitting the rows of a
  global batch across DDP ranks, draws exactly the batches an uninterrupted single process would.
- `meta.json` records what built the data and a hash of those settings; when the settings change the
  data is stale and gets rebuilt instead of silently training on the old one.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from minimm.formats import Example
from minimm.render import render
from minimm.tokenizer import Tokenizer

TEXT_STREAM, PACKED = 0, 1  # the two kinds of example in the index


def settings_hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def dataset_status(data_dir: str | Path, settings: dict) -> str:
    """'ok', 'missing' or 'stale' (built from other settings, or by an older layout)."""
    meta_path = Path(data_dir) / "meta.json"
    if not meta_path.is_file():
        return "missing"
    meta = json.loads(meta_path.read_text())
    return "ok" if meta.get("settings_hash") == settings_hash(settings) else "stale"


def _atomic_save(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object, so np.save does not append ".npy" to the temp name
        np.save(f, array)


def pack_split(examples: Iterable[Example], tok: Tokenizer, out_dir: Path, split: str) -> dict:
    """Render and write one split; returns its statistics (examples and tokens per task)."""
    stream_ids, stream_mask, stream_task, packed = [], [], [], []
    for ex in examples:
        r = render(ex, tok)
        task_id = tok.tasks.index(ex.task)
        is_text = len(ex.turns) == 1 and ex.turns[0][0] == "text"
        (stream_ids if is_text else packed).append((r, task_id))
    rows = stream_ids + packed  # the text stream first, so it is one contiguous range
    dtype = np.uint16 if tok.vocab_size <= 2 ** 16 else np.uint32
    n_tokens = sum(len(r.ids) for r, _ in rows)
    ids = np.empty(n_tokens, dtype=dtype)
    mask = np.empty(n_tokens, dtype=np.uint8)
    task = np.empty(n_tokens, dtype=np.uint8)
    index = np.empty((len(rows), 4), dtype=np.int64)  # start, length, task id, kind
    examples_per_task, tokens_per_task = Counter(), Counter()
    pos = 0
    for i, (r, task_id) in enumerate(rows):
        n = len(r.ids)
        ids[pos:pos + n], mask[pos:pos + n], task[pos:pos + n] = r.ids, r.mask, task_id
        index[i] = (pos, n, task_id, TEXT_STREAM if i < len(stream_ids) else PACKED)
        examples_per_task[tok.tasks[task_id]] += 1
        tokens_per_task[tok.tasks[task_id]] += n
        pos += n
    _atomic_save(out_dir / f"{split}.bin", lambda p: ids.tofile(p))
    _atomic_save(out_dir / f"{split}_mask.bin", lambda p: mask.tofile(p))
    _atomic_save(out_dir / f"{split}_task.bin", lambda p: task.tofile(p))
    _atomic_save(out_dir / f"{split}_index.npy", lambda p: _save_npy(p, index))
    return {"examples": dict(examples_per_task), "tokens": dict(tokens_per_task),
            "text_stream_tokens": int(sum(len(r.ids) for r, _ in stream_ids))}


def build_dataset(splits: dict[str, Iterable[Example]], tok: Tokenizer, out_dir: str | Path,
                  settings: dict, sources: dict[str, list[str]]) -> dict:
    """Pack every split, save the tokenizer beside the data, and write meta.json last (so a crash
    half-way leaves a dataset that reads as missing, never as valid). sources: split -> the files read,
    relative to out_dir or absolute; the final evaluation reads its held-out prompts from sources["val"]."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "meta.json").unlink(missing_ok=True)
    tok.save(out_dir / "tokenizer")
    meta = {
        "tokenizer": "tokenizer", "vocab_size": tok.vocab_size, "eot": tok.eot, "tasks": list(tok.tasks),
        "dtype": "uint16" if tok.vocab_size <= 2 ** 16 else "uint32",
        "splits": {split: pack_split(examples, tok, out_dir, split) for split, examples in splits.items()},
        "sources": sources, "settings": settings, "settings_hash": settings_hash(settings),
    }
    _atomic_save(out_dir / "meta.json", lambda p: Path(p).write_text(json.dumps(meta, indent=2) + "\n"))
    return meta


def describe_meta(meta: dict) -> str:
    """A table of examples and tokens per task and split."""
    lines = [f"{'split':<6} {'task':<10} {'examples':>9} {'tokens':>10}"]
    for split, stats in meta["splits"].items():
        for task in sorted(stats["examples"]):
            lines.append(f"{split:<6} {task:<10} {stats['examples'][task]:>9} {stats['tokens'][task]:>10}")
    return "\n".join(lines)


@dataclass
class Batch:
    x: torch.Tensor  # (B, T) input ids
    y: torch.Tensor  # (B, T) target ids, -100 where not supervised
    task_ids: torch.Tensor  # (B, T) task of each target token
    segment_ids: torch.Tensor | None  # (B, T) packed example of each token; None when all rows are windows

    def to(self, device: str | torch.device) -> "Batch":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(move(self.x), move(self.y), move(self.task_ids), move(self.segment_ids))


class Split:
    """One split of a packed dataset on disk, and the rows drawn from it."""

    def __init__(self, data_dir: str | Path, split: str, block_size: int):
        data_dir = Path(data_dir)
        meta = json.loads((data_dir / "meta.json").read_text())
        self.ids = np.memmap(data_dir / f"{split}.bin", dtype=np.dtype(meta["dtype"]), mode="r")
        self.mask = np.memmap(data_dir / f"{split}_mask.bin", dtype=np.uint8, mode="r")
        self.task = np.memmap(data_dir / f"{split}_task.bin", dtype=np.uint8, mode="r")
        self.index = np.load(data_dir / f"{split}_index.npy")
        self.block_size = block_size
        self.eot = meta["eot"]
        self.stream_end = int(meta["splits"][split]["text_stream_tokens"])
        self.packed = self.index[self.index[:, 3] == PACKED]
        packed_tokens = int(self.packed[:, 1].sum())
        total = self.stream_end + packed_tokens
        # a row is a text window with probability equal to the text stream's share of the tokens
        self.p_window = self.stream_end / total if self.stream_end > block_size else 0.0
        if total == 0:
            raise ValueError(f"{data_dir}/{split}.bin holds no tokens")

    def row(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """One row: input ids, targets, task ids, segment ids, each (T,)."""
        T = self.block_size
        if rng.random() < self.p_window:
            start = int(rng.integers(0, self.stream_end - T))
            chunk = slice(start, start + T + 1)
            seq, mask, task = self.ids[chunk], self.mask[chunk], self.task[chunk]
            segments = np.zeros(T + 1, dtype=np.int64)
        else:
            seq, mask, task, segments = self._pack(rng)
        seq = seq.astype(np.int64)
        targets = np.where(mask[1:] == 1, seq[1:], -100)
        return seq[:-1], targets, task[1:].astype(np.int64), segments[:-1]

    def _pack(self, rng: np.random.Generator):
        """Whole examples, drawn at random, laid end to end until the next one does not fit."""
        T = self.block_size
        seq = np.zeros(T + 1, dtype=np.int64)
        mask = np.zeros(T + 1, dtype=np.uint8)
        task = np.zeros(T + 1, dtype=np.uint8)
        segments = np.zeros(T + 1, dtype=np.int64)
        pos, segment = 0, 0
        while pos < T + 1:
            start, length, _, _ = self.packed[int(rng.integers(0, len(self.packed)))]
            if length > T + 1 - pos:
                if pos > 0:
                    break
                length = T + 1  # one example longer than a row: keep its start (truncation)
            sl = slice(start, start + length)
            seq[pos:pos + length], mask[pos:pos + length] = self.ids[sl], self.mask[sl]
            task[pos:pos + length], segments[pos:pos + length] = self.task[sl], segment
            pos, segment = pos + length, segment + 1
        # padding: its own segment so every position attends to at least itself; never in the loss
        seq[pos:], segments[pos:] = self.eot, segment
        return seq, mask, task, segments


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
        x, y, task, seg = (torch.from_numpy(np.stack(col)) for col in zip(*rows))
        single_segment = bool((seg == seg[:, :1]).all())
        return Batch(x, y, task, None if single_segment else seg)
