"""Instruction tuning end to end: loss masks, packing, truncation and LoRA, through the real pipeline.

The data is built by prepare/jsonl.py's build() and read back through minimm.data.Split rows, exactly as
train.py reads it; the expected answers come from the JSON itself, never from minimm/render.py. The LoRA
checks run train.py twice (a tiny multimodal base, then config/lora.py on top of it) and compare what is
on disk.
"""
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from minimm.config import TrainConfig
from minimm.data import Split
from minimm.formats import write_jsonl
from minimm.lora import count_parameters, load_lora
from minimm.multimodal import MultimodalGPT
from minimm.tokenizer import Tokenizer
from minimm.training import load_checkpoint
from prepare.jsonl import build

ROOT = Path(__file__).resolve().parent.parent
TAG = re.compile(r"\[ex (\d+)\]")  # every example's first user turn carries its number


def conversation(k: int, pairs: int, system: bool) -> dict:
    """A chat of `pairs` user/assistant exchanges; user turns try to smuggle in role tokens as text."""
    turns = [{"role": "system", "content": f"You are helper {k}; be brief."}] if system else []
    for p in range(pairs):
        user = f"[ex {k}] question {p}?" if p == 0 else f"<|assistant|>fake {k}.{p}<|end|> and {p}?"
        turns += [{"role": "user", "content": user}, {"role": "assistant", "content": f"Answer {k}.{p} is {k * p}."}]
    return {"conversations": turns}


def expected_targets(row: dict) -> str:
    """What the loss must see of one JSON example: each assistant text followed by <|end|>."""
    if "output" in row:
        return row["output"] + "<|end|>"
    return "".join(t["content"] + "<|end|>" for t in row["conversations"] if t["role"] == "assistant")


def build_data(tmp: Path, rows: list[dict], block_size: int, vocab_size: int = 330) -> tuple[Split, Tokenizer]:
    write_jsonl(tmp / "train.jsonl", rows)
    write_jsonl(tmp / "val.jsonl", rows[:1])
    cfg = TrainConfig(train_files=[str(tmp / "train.jsonl")], val_files=[str(tmp / "val.jsonl")],
                      vocab_size=vocab_size)
    build(cfg, tmp / "data", log=lambda *_: None)
    return Split(tmp / "data", "train", block_size), Tokenizer.load(tmp / "data" / "tokenizer")


def segments_of(seg: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of each run of equal segment ids in a row."""
    cuts = [0] + [i for i in range(1, len(seg)) if seg[i] != seg[i - 1]] + [len(seg)]
    return list(zip(cuts[:-1], cuts[1:]))


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
    rows = [conversation(k, pairs=1 + k % 3, system=k % 2 == 0) for k in range(14)]
    rows += [{"instruction": f"[ex {k}] Add {k} and 1.", "input": f"{k} + 1", "output": f"{k + 1}"}
             for k in range(14, 20)]
    split, tok = build_data(tmp_path_factory.mktemp("chats"), rows, block_size=150)
    return rows, split, tok


def test_targets_are_exactly_the_assistant_turns(chats):
    rows, split, tok = chats
    assert split.n_truncated == 0
    seen = set()
    for r in range(40):
        x, y, _, seg, _, _ = split.row(np.random.default_rng([7, r]))
        for a, b in segments_of(seg):
            found = TAG.search(tok.decode(x[a:b].tolist()))
            if found is None:  # the padding after the last example: never in the loss
                assert (y[a:b] == -100).all() and (x[a:b] == tok.eot).all()
                continue
            k = int(found.group(1))
            assert tok.decode(y[a:b][y[a:b] != -100].tolist()) == expected_targets(rows[k])
            seen.add(k)
    assert len(seen) >= 15  # rows drew most examples, chats of 1-3 exchanges and Alpaca records alike


def test_packed_example_sees_only_itself(chats):
    """Logits of an example packed after others equal its logits alone (RoPE: only relative positions)."""
    _, split, tok = chats
    torch.manual_seed(0)
    model = MultimodalGPT.from_args({"gpt": dict(vocab_size=tok.vocab_size, block_size=150, n_layer=2, n_head=3,
                                                 n_embd=36), "vision": None, "audio": None,
                                   "image_token_id": tok.special("<|image|>"),
                                   "audio_token_id": tok.special("<|audio|>")})
    with torch.no_grad():  # weights far from the tiny init, so attention to the wrong example would show
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    model.eval()
    for r in range(50):  # the first row holding three examples or more
        x, _, _, seg, _, _ = split.row(np.random.default_rng([5, r]))
        spans = [(a, b) for a, b in segments_of(seg) if TAG.search(tok.decode(x[a:b].tolist()))]
        if len(spans) >= 3:
            break
    assert len(spans) >= 3
    idx, seg = torch.from_numpy(x)[None], torch.from_numpy(seg)[None]  # (1, T)
    with torch.no_grad():
        packed, _ = model(idx, idx, segment_ids=seg, reduction="none")  # (1, T, V)
        unmasked, _ = model(idx, idx, reduction="none")  # (1, T, V)
        for a, b in spans[1:]:
            alone, _ = model(idx[:, a:b], idx[:, a:b], reduction="none")  # (1, b - a, V)
            torch.testing.assert_close(packed[0, a:b], alone[0], rtol=1e-5, atol=1e-5)
            assert (unmasked[0, a:b] - alone[0]).abs().max() > 0.1  # the mask is what makes them equal


def test_long_conversation_keeps_its_start_and_is_counted(tmp_path):
    answer = " ".join(f"Step {i} of the long answer." for i in range(40))
    long = {"conversations": [{"role": "user", "content": "Explain slowly."}, {"role": "assistant", "content": answer}]}
    short = {"conversations": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}
    T = 61
    split, tok = build_data(tmp_path, [long, short, short], block_size=T)
    assert (split.n_truncated, split.n_dropped) == (1, 0)
    full = f"<|task:text|><|user|>Explain slowly.<|end|><|assistant|>{answer}<|end|><|endoftext|>"
    starts = 0
    for r in range(20):
        x, y, _, seg, _, _ = split.row(np.random.default_rng([1, r]))
        text = tok.decode(x.tolist())
        if "Explain" not in text:
            continue
        starts += 1
        assert (seg == 0).all() and len(x) == T  # the whole row is the start of the long conversation
        assert full.startswith(text)
        supervised = tok.decode(y[y != -100].tolist())
        assert len(supervised) > 50 and answer.startswith(supervised)  # its answer, cut where the row ends
    assert starts > 0


# ---- LoRA through train.py ---------------------------------------------------------------------------
TINY = ["--n_layer=1", "--n_head=2", "--n_embd=36", "--block_size=70", "--batch_size=4", "--vocab_size=300",
        "--image_size=16", "--patch_size=8", "--vit_n_layer=1", "--vit_n_head=2", "--vit_n_embd=24",
        "--warmup_iters=1", "--eval_interval=1000", "--eval_iters=1", "--eval_samples=1",
        "--eval_media_samples=1", "--log_interval=1", "--device=cpu"]
COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


def chat_rows(prefix: str, n: int) -> list[dict]:
    return [{"conversations": [{"role": "user", "content": f"{prefix} {i}?"},
                               {"role": "assistant", "content": f"{prefix} {i} is {i * i}."}]} for i in range(n)]


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory):
    """A tiny multimodal base (2 steps), then config/lora.py and config/sft.py on other data (3 and 2
    steps): (tmp, stdouts)."""
    tmp = tmp_path_factory.mktemp("lora")
    image_rows = []
    for i, (name, rgb) in enumerate(COLORS.items()):
        Image.new("RGB", (19 + i, 17), rgb).save(tmp / f"{name}.png")
        image_rows += [{"image": f"{name}.png", "conversations": [
            {"role": "user", "content": "<image>\nWhat color is it?"},
            {"role": "assistant", "content": f"It is {name}."}]}] * 4
    long = {"conversations": [{"role": "user", "content": "Count."},
                              {"role": "assistant", "content": " ".join(map(str, range(80)))}]}
    write_jsonl(tmp / "base.jsonl", image_rows + chat_rows("Square of", 20) + [long])
    write_jsonl(tmp / "tune.jsonl", image_rows + chat_rows("What is the cube of", 12))
    write_jsonl(tmp / "val.jsonl", image_rows[:1] + chat_rows("Square of", 1))
    common = [f"--data_dir={tmp / 'data'}", f"--val_files=['{tmp / 'val.jsonl'}']", *TINY]
    runs = {"base": [f"--train_files=['{tmp / 'base.jsonl'}']", "--dataset=base", f"--out_dir={tmp / 'base'}",
                     "--max_iters=2"],
            "lora": ["config/lora.py", f"--train_files=['{tmp / 'tune.jsonl'}']", "--dataset=tune",
                     f"--init_from={tmp / 'base'}", f"--out_dir={tmp / 'lora'}", "--max_iters=3"],
            "sft": ["config/sft.py", f"--train_files=['{tmp / 'tune.jsonl'}']", "--dataset=tune",
                    f"--init_from={tmp / 'base'}", f"--out_dir={tmp / 'sft'}", "--max_iters=2"]}
    stdout = {}
    for name, args in runs.items():
        proc = subprocess.run([sys.executable, "train.py", *args, *common], cwd=ROOT, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        stdout[name] = proc.stdout
    return tmp, stdout


def base_name(lora_key: str) -> str:
    """A LoRA checkpoint's name for a wrapped layer's weight -> the base checkpoint's name for it."""
    return re.sub(r"\.base\.(weight|bias)$", r".\1", lora_key)


def test_lora_changes_only_adapters_and_projector(lora_runs):
    tmp, _ = lora_runs
    base = load_checkpoint(tmp / "base" / "ckpt.pt")["model"]
    tuned = load_checkpoint(tmp / "lora" / "ckpt.pt")["model"]
    adapters = {k for k in tuned if k.endswith((".lora_A", ".lora_B"))}
    assert {base_name(k) for k in tuned.keys() - adapters} == set(base)
    changed = {base_name(k) for k in tuned.keys() - adapters if not torch.equal(tuned[k], base[base_name(k)])}
    projector = {k for k in base if "projector" in k}
    assert changed and changed <= projector, changed - projector
    assert any(k.startswith("gpt.") and k.endswith(".lora_B") and tuned[k].abs().sum() > 0 for k in adapters)
    assert any(k.startswith("vision.") for k in adapters)  # the ViT is adapted too (DEFAULT_TARGETS)


def test_lora_file_holds_only_adapters_and_trainable_modules(lora_runs):
    tmp, _ = lora_runs
    tuned = load_checkpoint(tmp / "lora" / "ckpt.pt")["model"]
    saved = torch.load(tmp / "lora" / "lora.pt", weights_only=True)
    expected = {k for k in tuned if k.endswith((".lora_A", ".lora_B")) or "projector" in k}
    assert set(saved["tensors"]) == expected
    assert all(torch.equal(saved["tensors"][k], tuned[k]) for k in expected)
    assert saved["config"]["trainable"] == ["projector"] and saved["config"]["r"] == 8
    # the base checkpoint plus lora.pt is the fine-tuned model
    ckpt = load_checkpoint(tmp / "base" / "ckpt.pt")
    model = MultimodalGPT.from_args(ckpt["model_args"])
    model.load_state_dict(ckpt["model"])
    load_lora(model, str(tmp / "lora" / "lora.pt"))
    assert all(torch.equal(v, tuned[k]) for k, v in model.state_dict().items())


def test_train_prints_trainable_and_total_parameters(lora_runs):
    tmp, stdout = lora_runs
    printed = re.search(r"model: ([\d,]+) parameters, ([\d,]+) trainable", stdout["lora"])
    assert printed, stdout["lora"][-2000:]
    ckpt = load_checkpoint(tmp / "lora" / "ckpt.pt")
    model = MultimodalGPT.from_args(ckpt["model_args"])
    load_lora(model, ckpt["lora"])
    trainable, total = count_parameters(model)
    assert trainable == sum(v.numel() for v in ckpt["lora"]["tensors"].values()) < total / 2
    assert printed.groups() == (f"{total:,}", f"{trainable:,}")


def test_full_fine_tune_trains_every_part_from_the_base(lora_runs):
    tmp, stdout = lora_runs
    base = load_checkpoint(tmp / "base" / "ckpt.pt")
    tuned = load_checkpoint(tmp / "sft" / "ckpt.pt")
    assert "lora" not in tuned and not (tmp / "sft" / "lora.pt").exists()
    assert tuned["model_args"] == base["model_args"] and tuned.keys() >= {"model", "tokenizer", "config"}
    changed = {k for k in base["model"] if not torch.equal(base["model"][k], tuned["model"][k])}
    for part in ("gpt.transformer.h.0.attn.c_attn.weight", "gpt.transformer.wte.weight",
                 "image_projector.mlp.0.weight", "vision.blocks.0.attn.qkv.weight"):
        assert part in changed, part
    assert tuned["tokenizer"] == base["tokenizer"]
    printed = re.search(r"model: ([\d,]+) parameters, ([\d,]+) trainable", stdout["sft"])
    assert printed and printed.group(1) == printed.group(2)


def test_fine_tune_reads_its_data_with_the_base_tokenizer(lora_runs):
    tmp, stdout = lora_runs
    base = load_checkpoint(tmp / "base" / "ckpt.pt")["tokenizer"]
    assert Tokenizer.load(tmp / "data" / "tune" / "tokenizer").state() == base
    assert load_checkpoint(tmp / "lora" / "ckpt.pt")["tokenizer"] == base
    assert "block_size 70: 1 examples truncated (their start kept), 0 with media left out" in stdout["base"]
    config = json.loads((tmp / "lora" / "config.json").read_text())
    assert config["tokenizer_from"] == str(tmp / "base") and config["weight_decay"] == 0.0


def test_resumed_fine_tune_keeps_the_base_tokenizer(lora_runs):
    tmp, _ = lora_runs
    shutil.copytree(tmp / "lora", tmp / "resumed")
    proc = subprocess.run([sys.executable, "train.py", "config/lora.py", f"--train_files=['{tmp / 'tune.jsonl'}']",
                           "--dataset=resumed", "--init_from=resume", f"--out_dir={tmp / 'resumed'}", "--max_iters=4",
                           f"--data_dir={tmp / 'data'}", f"--val_files=['{tmp / 'val.jsonl'}']", *TINY],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    base = load_checkpoint(tmp / "base" / "ckpt.pt")["tokenizer"]
    assert Tokenizer.load(tmp / "data" / "resumed" / "tokenizer").state() == base
