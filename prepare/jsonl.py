"""Build a dataset from your own JSONL or text files (any schema of minimm/formats.py).

    python prepare/jsonl.py --dataset=mydata --train_files="['chat.jsonl']" [--val_files=...] [--vocab_size=4096]

train.py calls the same build() when its config sets train_files and the data is missing or stale.
With tokenizer_from (a run dir or a data dir) the data is tokenized with that tokenizer instead of a
new one: fine-tuning a checkpoint must read its own vocabulary (train.py sets it to init_from).
Without val_files, a val_fraction of the training examples is held out (chosen from data_seed), whole
pictures at a time: the examples that show the same first picture (COCO's five captions of it, LLaVA's
several conversations about it) or play the same first clip all go to one side, so a held-out picture or
clip is never one the model trained on (as VQA and CLEVR split their questions by image).
The validation examples are written back as JSONL (the conversation schema) so the final evaluation can ask
the model the held-out prompts.
"""
from __future__ import annotations

import hashlib
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from minimm.config import TrainConfig, load_config  # noqa: E402
from minimm.data import MediaSpec  # noqa: E402
from minimm.pack import build_dataset, describe_meta, settings_hash  # noqa: E402
from minimm.formats import Example, read_examples, write_jsonl  # noqa: E402
from minimm.tokenizer import Tokenizer  # noqa: E402
from minimm.training import load_checkpoint  # noqa: E402


def file_digest(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def settings_from_config(cfg: TrainConfig) -> dict:
    """The inputs' contents (not just their names) are part of the settings: edit a file, rebuild."""
    return {"builder": "jsonl-v2", "train_files": {f: file_digest(f) for f in cfg.train_files},
            "val_files": {f: file_digest(f) for f in cfg.val_files}, "val_fraction": cfg.val_fraction,
            "seed": cfg.data_seed, "vocab_size": cfg.vocab_size, "tasks": list(cfg.tasks),
            "media_dir": cfg.media_dir,
            "tokenizer": settings_hash(reuse_tokenizer(cfg.tokenizer_from).state()) if cfg.tokenizer_from else None,
            "media": vars(MediaSpec.from_config(cfg))}



def reuse_tokenizer(path: str) -> Tokenizer:
    """The tokenizer inside a run's checkpoint, or a dataset's tokenizer/ folder."""
    folder = Path(path)
    if (folder / "ckpt.pt").is_file():
        return Tokenizer.from_state(load_checkpoint(folder / "ckpt.pt")["tokenizer"])
    if (folder / "tokenizer").is_dir():
        return Tokenizer.load(folder / "tokenizer")
    raise FileNotFoundError(f"tokenizer_from={path!r}: neither {folder / 'ckpt.pt'} nor {folder / 'tokenizer'} exists")


def hold_out(examples: list[Example], fraction: float, seed: int,
             log=print) -> tuple[list[Example], list[Example]]:
    """(train, val): about `fraction` of the examples held out, chosen from `seed`, the examples that share a
    first picture (or, without one, a first clip) kept together (module docstring); examples without media
    are each their own group. A group that would make val more than twice its share stays in train; when no
    group fits, or nothing is left to train on, the examples are held out one by one, and the log says so."""
    groups: dict = {}
    for i, ex in enumerate(examples):
        groups.setdefault((ex.images or ex.audio or [i])[0], []).append(ex)
    order = list(groups.values())
    random.Random(seed).shuffle(order)
    n_val = max(1, int(len(examples) * fraction))
    train, val = [], []
    for group in order:
        (val if len(val) < n_val and len(val) + len(group) <= 2 * n_val else train).extend(group)
    if val and train:
        return train, val
    log(f"val_fraction={fraction}: too few pictures or clips to hold out whole ones; held out {n_val} examples "
        f"one by one, so the evaluation may ask about media it trained on")
    order = [ex for group in order for ex in group]
    return order[n_val:], order[:n_val]


def as_row(ex: Example) -> dict:
    row = {"task": ex.task, "conversations": [{"role": r, "content": t} for r, t in ex.turns]}
    if ex.turns[0][0] == "text":
        row = {"task": ex.task, "text": ex.turns[0][1]}
    if ex.images:
        row["image"] = ex.images
    if ex.audio:
        row["audio"] = ex.audio
    return row


def build(cfg: TrainConfig, out_dir: str | Path, log=print) -> dict:
    out_dir = Path(out_dir)
    tok = reuse_tokenizer(cfg.tokenizer_from) if cfg.tokenizer_from else None
    tasks = tok.tasks if tok else cfg.tasks
    read = lambda files: [ex for f in files  # noqa: E731
                          for ex in read_examples(f, cfg.media_dir or None, tasks, cfg.max_bad_fraction, log=log)]
    train = read(cfg.train_files)
    val = read(cfg.val_files)
    if not val:
        train, val = hold_out(train, cfg.val_fraction, cfg.data_seed, log)
    write_jsonl(out_dir / "jsonl" / "val.jsonl", [as_row(ex) for ex in val])
    if tok is None:
        corpus = "\n".join(text for ex in train for _, text in ex.turns)
        tok = Tokenizer.train(corpus, cfg.vocab_size, list(cfg.tasks))
    meta = build_dataset({"train": train, "val": val}, tok, out_dir, settings_from_config(cfg),
                         {"train": [str(Path(f).resolve()) for f in cfg.train_files], "val": ["jsonl/val.jsonl"]},
                         MediaSpec.from_config(cfg), str(Path(cfg.media_dir).resolve()) if cfg.media_dir else None, log)
    log(describe_meta(meta))
    return meta


if __name__ == "__main__":
    config = load_config(sys.argv[1:])
    build(config, Path(config.data_dir) / config.dataset)
