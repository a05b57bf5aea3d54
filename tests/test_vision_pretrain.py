"""Tests for prepare/vision_pretrain.py: pretraining teaches a fresh encoder the pictures' colours, touches only
the image path, leaves the global RNG alone, pools grids other than 3x3, and train.py runs it for fresh runs."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from minimm.config import load_config
from minimm.multimodal import MultimodalGPT, model_args_from_config
from prepare import vision_pretrain
from prepare.vision_pretrain import LETTERS, ImagePath, Probe, accuracy, lr_factor, pretrain_vision, scenes
from prepare.shapes import WORDS, split_seed

ROOT = Path(__file__).resolve().parent.parent


def tiny_model(**overrides):
    cfg = load_config([f"--{k}={v}" for k, v in {
        "n_layer": 1, "n_head": 2, "n_embd": 32, "vit_n_layer": 1, "vit_n_head": 2, "vit_n_embd": 32,
        "image_size": 48, "patch_size": 8, "pixel_shuffle": 2, "optimizer": "muon", "learning_rate": 1e-2,
        "media_lr_scale": 0.5, **overrides}.items()])
    torch.manual_seed(0)
    model = MultimodalGPT.from_args(model_args_from_config(cfg, vocab_size=10, image_token_id=0, audio_token_id=1,
                                                           audio=False))
    return model, cfg


def test_pretraining_teaches_colours_and_touches_only_the_image_path():
    """60 steps: per-cell colour on held-out pictures goes from near chance to most cells (colour is the quick
    lesson; shapes take hundreds of steps, EXPERIMENTS.md). The GPT's weights and the global RNG are untouched."""
    model, cfg = tiny_model(vision_pretrain_iters=60)
    val = scenes(split_seed(cfg.data_seed, "val"), 200, cfg.image_size)
    torch.manual_seed(1)
    before = accuracy(Probe(ImagePath(model.vision, model.image_projector), cfg.n_embd), val)
    gpt = {k: v.clone() for k, v in model.gpt.state_dict().items()}
    vit = {k: v.clone() for k, v in model.vision.state_dict().items()}
    rng = torch.get_rng_state()
    acc = pretrain_vision(model, cfg, log=lambda line: None)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, model.gpt.state_dict()[k]) for k, v in gpt.items())
    assert any(not torch.equal(v, model.vision.state_dict()[k]) for k, v in vit.items())
    assert before["color"] < 0.4, before
    assert acc["color"] > 0.7, acc


def test_the_rate_warms_up_then_decays_to_near_zero():
    factors = [lr_factor(step, 600, 30) for step in range(1, 601)]
    assert factors[0] == 1 / 30 and factors[29] == 1.0 == factors[30]  # linear warmup to the peak at step 30
    assert all(a > b for a, b in zip(factors[30:], factors[31:]))  # then down every step ...
    assert factors[-1] == 1 / 570  # ... to one step's share, never zero: the last step still learns


def test_pretraining_runs_at_vision_pretrain_lr_warmed_up_and_decayed(monkeypatch):
    """The rate of every optimizer group, step by step: cfg.vision_pretrain_lr x lr_factor; unset, the encoders'
    own rate (learning_rate x media_lr_scale) throughout."""
    seen = []
    make = vision_pretrain.configure_optimizer

    def configure_optimizer(*args, **kwargs):  # the real optimizer, its rates noted before each step
        opt = make(*args, **kwargs)
        step = opt.step
        opt.step = lambda: (seen.append({group["lr"] for group in opt.param_groups}), step())[1]
        return opt

    monkeypatch.setattr(vision_pretrain, "configure_optimizer", configure_optimizer)
    monkeypatch.setattr(vision_pretrain, "N_VAL", 20)
    for lr_key, expected in ((3e-3, [{3e-3 * lr_factor(s, 20, 2)} for s in range(1, 21)]),  # warmup: 20 // 10
                             (0.0, [{1e-2 * 0.5}] * 20)):
        seen.clear()
        model, cfg = tiny_model(vision_pretrain_iters=20, vision_pretrain_lr=lr_key)
        pretrain_vision(model, cfg, log=lambda line: None)
        assert seen == expected, (lr_key, seen[:3], expected[:3])


def test_a_finer_token_grid_is_pooled_to_the_3x3_cells():
    """patch 8 without pixel shuffle: 6x6 tokens, averaged 2x2 into the 9 cells the labels name."""
    model, cfg = tiny_model(pixel_shuffle=1)
    probe = Probe(ImagePath(model.vision, model.image_projector), cfg.n_embd)
    pixels = scenes(3, 4, cfg.image_size)[0]
    colors, shapes, words, letters = probe(pixels)
    assert colors.shape == (4, 9, 8) and shapes.shape == (4, 9, 6) and words.shape[0] == 4
    assert letters.shape == (4, 9, 26)


def test_train_py_pretrains_a_fresh_runs_encoder(tmp_path):
    """--vision_pretrain_iters on a run with images logs the pretraining; on a resumed run it does not repeat.
    With --freeze_vision=True (config/mixed.py) the main run's steps leave the pretrained ViT as it was and
    train the projector; a frozen fresh ViT without pretraining is warned about."""
    from PIL import Image

    from minimm.formats import write_jsonl

    rows = []
    for i, rgb in enumerate([(220, 30, 30), (30, 200, 40), (30, 40, 220)] * 4):
        Image.new("RGB", (48, 48), rgb).save(tmp_path / f"{i}.png")
        rows.append({"image": f"{i}.png", "conversations": [{"role": "user", "content": "<image>\nColour?"},
                                                             {"role": "assistant", "content": str(rgb)}]})
    write_jsonl(tmp_path / "data.jsonl", rows)
    args = [sys.executable, "train.py", f"--train_files=['{tmp_path / 'data.jsonl'}']",
            f"--data_dir={tmp_path / 'data'}", "--dataset=tiny", f"--out_dir={tmp_path / 'run'}", "--n_layer=1",
            "--n_head=2", "--n_embd=32", "--block_size=64", "--batch_size=2", "--vocab_size=300", "--vit_n_layer=1",
            "--vit_n_head=2", "--vit_n_embd=32", "--image_size=48", "--patch_size=8", "--pixel_shuffle=2",
            "--warmup_iters=1", "--eval_interval=1000", "--eval_iters=1", "--eval_samples=1",
            "--eval_media_samples=1", "--val_fraction=0.2", "--device=cpu", "--freeze_vision=True"]
    first = subprocess.run([*args, "--vision_pretrain_iters=3", "--max_iters=2"], cwd=ROOT, capture_output=True,
                           text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "vision pretraining: 3 steps of 32 pictures (96 drawn)" in first.stdout + first.stderr
    assert "stays as initialised" not in first.stdout + first.stderr
    before = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["model"]
    resumed = subprocess.run([*args, "--vision_pretrain_iters=3", "--max_iters=4", "--init_from=resume"], cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "vision pretraining" not in resumed.stdout + resumed.stderr
    after = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["model"]
    vit = [k for k in before if k.startswith("vision.")]
    projector = [k for k in before if k.startswith("image_projector.")]
    assert vit and projector
    assert all(torch.equal(before[k], after[k]) for k in vit)
    assert any(not torch.equal(before[k], after[k]) for k in projector)
    fresh = subprocess.run([*args, "--max_iters=1", f"--out_dir={tmp_path / 'fresh'}"], cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    assert "freeze_vision=True on a fresh run without vision_pretrain_iters" in fresh.stdout + fresh.stderr


def test_word_pictures_are_added_after_the_scenes():
    """n_words text pictures follow the n pictures, which stay exactly what they were without them; a text
    picture has a word and no shape in any cell."""
    plain = scenes(3, 10, 48)
    with_words = scenes(3, 10, 48, n_words=6)
    assert [t.shape[0] for t in with_words] == [16] * 5
    assert all(torch.equal(a, b[:10]) for a, b in zip(plain, with_words))
    pixels, colors, shapes, words, letters = with_words
    assert (words[10:] >= 0).all() and (colors[10:] == 0).all() and (shapes[10:] == 0).all()
    assert len({tuple(p.flatten()[:200].tolist()) for p in pixels[10:]}) == 6  # six different pictures
    assert (letters[words < 0] == 0).all()  # a scene has no letters


def test_letter_labels_lie_where_the_ink_is():
    """Each text picture's cells name exactly the word's letters (a letter twice, as in "apple", in one cell or
    two), and every cell said to hold a letter has ink in it."""
    pixels, _, _, words, letters = scenes(7, 0, 48, n_words=40)
    for img, word, cells in zip(pixels.numpy().astype(np.float64), words.tolist(), letters.numpy()):
        word = WORDS[word]
        assert set(np.nonzero(cells.sum(0))[0]) == {LETTERS.index(c) for c in word}
        assert len(word) >= cells.sum() >= len(set(word))
        ink = np.linalg.norm(img - np.median(img.reshape(-1, 3), axis=0), axis=-1) > 60  # (48, 48)
        for k in np.nonzero(cells.sum(1))[0]:
            r, c = divmod(int(k), 3)
            assert ink[r * 16:r * 16 + 16, c * 16:c * 16 + 16].sum() >= 3, (word, k)


def test_pretraining_with_letters_reports_them():
    model, cfg = tiny_model(vision_pretrain_iters=4, vision_pretrain_letters=0.3)
    lines = []
    acc = pretrain_vision(model, cfg, log=lines.append)
    assert "(192 drawn)" in lines[0] and ", letters " in lines[0] and ", word" not in lines[0], lines
    assert 0.0 <= acc["letters"] <= 1.0


def test_pretraining_with_words_draws_text_pictures_and_reports_the_word():
    model, cfg = tiny_model(vision_pretrain_iters=4, vision_pretrain_words=1.0)
    lines = []
    acc = pretrain_vision(model, cfg, log=lines.append)
    assert "(192 drawn)" in lines[0] and ", word " in lines[0], lines  # 128 scenes + 64 text pictures
    assert 0.0 <= acc["word"] <= 1.0
