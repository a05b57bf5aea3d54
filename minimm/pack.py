"""Packing: rendered examples written to flat memmaps on disk, with their media decoded once.

What this file teaches:
- One flat array of token ids per split (`train.bin`, `val.bin`; uint16 when the vocabulary fits, else
  uint32), a uint8 loss mask and a uint8 task id per token, and an index of (start, length, task, kind,
  first image slot, images, first clip, clips) per example. minimm/data.py reads them back as batches.
- Plain text goes first, as one contiguous stream (cut into random windows later); instruction, chat and
  media examples follow, each kept whole.
- Media are decoded once, here: images to a uint8 memmap (N, H, W, 3) at the model's image size, audio
  to log-mel features in a float16 memmap (frames, n_mels) with an index of (offset, frames) per clip.
  Training never decodes a PNG or computes a spectrogram per step. An example whose media cannot be
  read is reported with its file:line and skipped (or stops the build when strict).
- A picture that several examples show is stored once: COCO has five captions per picture, and the bundled
  data asks each of a scene's questions in a row of its own. An example's images are slots of
  `{split}_image_ids.npy`, each naming its picture's row of the memmap (the bundled training split: 13,323
  slots, 4,000 pictures, 28 MB instead of 92).
- `meta.json` records what built the data and a hash of those settings; when the settings change the
  data is stale and gets rebuilt instead of silently training on the old one. It is written last, so a
  build that dies half-way reads as missing, never as valid.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from pathlib import Path
from typing import Iterable

import numpy as np

from minimm.audio import load_audio_features
from minimm.data import PACKED, TEXT_STREAM, MediaSpec, audio_tokens
from minimm.formats import Example
from minimm.render import render
from minimm.tokenizer import Tokenizer
from minimm.vit import load_image

N_REPORTED = 5  # unreadable media files printed one by one; the rest are counted
PACK_LAYOUT = 2  # the files' layout; data packed by another is stale (2: pictures stored once, image_ids.npy)


def settings_hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def dataset_status(data_dir: str | Path, settings: dict) -> str:
    """'ok', 'missing' or 'stale' (built from other settings, or by an older layout)."""
    meta_path = Path(data_dir) / "meta.json"
    if not meta_path.is_file():
        return "missing"
    meta = json.loads(meta_path.read_text())
    same = meta.get("settings_hash") == settings_hash(settings) and meta.get("layout") == PACK_LAYOUT
    return "ok" if same else "stale"


def _atomic_save(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object, so np.save does not append ".npy" to the temp name
        np.save(f, array)


def _load_media(ex: Example, media: MediaSpec, known: dict[str, int]) -> tuple[dict, list[np.ndarray]]:
    """The example's images not in `known` (path -> (H, W, 3) uint8) and its mel features (frames, n_mels)
    float16; ValueError if one is unreadable."""
    if ex.images and not media.image_size:
        raise ValueError(f"{ex.source}: has images but the model has no image encoder (image_size=0)")
    images = {path: load_image(path, media.image_size, media.resize) for path in ex.images if path not in known}
    mels = [load_audio_features(path).T.astype(np.float16) for path in ex.audio]
    return images, mels


def pack_split(examples: Iterable[Example], tok: Tokenizer, out_dir: Path, split: str,
               media: MediaSpec | None = None, log=print) -> dict:
    """Render and write one split; returns its statistics (examples and tokens per task)."""
    media = media or MediaSpec()
    stream, packed = [], []
    images: list[np.ndarray] = []  # each picture once
    row_of: dict[str, int] = {}  # a picture's path -> its row in images
    image_ids: list[int] = []  # per image slot, in the examples' placeholder order: a row of images
    mels: list[np.ndarray] = []
    skipped = 0
    for ex in examples:
        try:
            new_images, ex_mels = _load_media(ex, media, row_of) if ex.images or ex.audio else ({}, [])
        except (ValueError, OSError) as e:
            if media.strict:
                raise
            skipped += 1
            if skipped <= N_REPORTED:
                log(f"skipped {ex.source}: {e}")
            continue
        r = render(ex, tok, media.image_tokens, [audio_tokens(len(m), media.audio_stack) for m in ex_mels])
        task_id = tok.tasks.index(ex.task)
        is_text = len(ex.turns) == 1 and ex.turns[0][0] == "text" and not ex.images and not ex.audio
        (stream if is_text else packed).append((r, task_id, len(image_ids), len(mels)))
        for path, pixels in new_images.items():
            row_of[path] = len(images)
            images.append(pixels)
        image_ids += [row_of[path] for path in ex.images]
        mels += ex_mels
    if skipped:
        log(f"{split}: skipped {skipped} examples whose media could not be read")
    rows = stream + packed  # the text stream first, so it is one contiguous range
    dtype = np.uint16 if tok.vocab_size <= 2 ** 16 else np.uint32
    n_tokens = sum(len(r.ids) for r, *_ in rows)
    ids = np.empty(n_tokens, dtype=dtype)
    mask = np.empty(n_tokens, dtype=np.uint8)
    task = np.empty(n_tokens, dtype=np.uint8)
    # start, length, task id, kind, first image slot, images, first clip, clips
    index = np.empty((len(rows), 8), dtype=np.int64)
    examples_per_task, tokens_per_task = Counter(), Counter()
    pos = 0
    for i, (r, task_id, first_image, first_clip) in enumerate(rows):
        n = len(r.ids)
        ids[pos:pos + n], mask[pos:pos + n], task[pos:pos + n] = r.ids, r.mask, task_id
        kind = TEXT_STREAM if i < len(stream) else PACKED
        index[i] = (pos, n, task_id, kind, first_image, r.n_images, first_clip, r.n_audio)
        examples_per_task[tok.tasks[task_id]] += 1
        tokens_per_task[tok.tasks[task_id]] += n
        pos += n
    _atomic_save(out_dir / f"{split}.bin", lambda p: ids.tofile(p))
    _atomic_save(out_dir / f"{split}_mask.bin", lambda p: mask.tofile(p))
    _atomic_save(out_dir / f"{split}_task.bin", lambda p: task.tofile(p))
    _atomic_save(out_dir / f"{split}_index.npy", lambda p: _save_npy(p, index))
    if images:
        _atomic_save(out_dir / f"{split}_images.bin", lambda p: np.stack(images).tofile(p))
        _atomic_save(out_dir / f"{split}_image_ids.npy", lambda p: _save_npy(p, np.array(image_ids, np.int64)))
    if mels:
        clips = np.array([[0, len(m)] for m in mels], dtype=np.int64)
        clips[1:, 0] = np.cumsum(clips[:-1, 1])
        _atomic_save(out_dir / f"{split}_audio.bin", lambda p: np.concatenate(mels).tofile(p))
        _atomic_save(out_dir / f"{split}_audio_index.npy", lambda p: _save_npy(p, clips))
    return {"examples": dict(examples_per_task), "tokens": dict(tokens_per_task),
            "text_stream_tokens": int(sum(len(r.ids) for r, *_ in stream)), "images": len(images),
            "image_slots": len(image_ids),
            "audio_clips": len(mels), "skipped_media": skipped}


def build_dataset(splits: dict[str, Iterable[Example]], tok: Tokenizer, out_dir: str | Path,
                  settings: dict, sources: dict[str, list[str]], media: MediaSpec | None = None,
                  media_dir: str | None = None, log=print) -> dict:
    """Pack every split, save the tokenizer beside the data, and write meta.json last (so a crash
    half-way leaves a dataset that reads as missing, never as valid). sources: split -> the files read,
    relative to out_dir or absolute; the final evaluation reads its held-out prompts from sources["val"]
    (with media paths resolved against media_dir, as when they were read; relative to out_dir or absolute)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "meta.json").unlink(missing_ok=True)
    tok.save(out_dir / "tokenizer")
    meta = {
        "tokenizer": "tokenizer", "vocab_size": tok.vocab_size, "eot": tok.eot, "tasks": list(tok.tasks),
        "dtype": "uint16" if tok.vocab_size <= 2 ** 16 else "uint32",
        "image_size": media.image_size if media else 0, "image_tokens": media.image_tokens if media else 0,
        "resize": media.resize if media else "pad", "media_dir": media_dir, "layout": PACK_LAYOUT,
        "splits": {split: pack_split(examples, tok, out_dir, split, media, log) for split, examples in splits.items()},
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


