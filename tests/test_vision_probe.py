"""Tests for bench/vision_probe.py: its per-cell labels agree with the pixels, its encoders give one token
per cell, and the script runs end to end and prints accuracies."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from minimm.config import load_config
from prepare.shapes import COLORS

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import vision_probe  # noqa: E402

PALETTE = np.array(list(COLORS.values()), dtype=np.float64)


def test_cell_labels_match_the_pixels():
    """Each labelled cell holds pixels of its colour, and the labels of a picture are consistent."""
    pixels, colors, shapes, words, _ = vision_probe.scenes(seed=11, n=40, image_size=48)
    assert pixels.shape == (40, 48, 48, 3) and colors.shape == shapes.shape == (40, 9)
    assert ((colors > 0) == (shapes > 0)).all()  # a cell has a colour exactly when it has a shape
    assert ((words >= 0) == (colors == 0).all(1)).all()  # text pictures have no shapes, scenes have no word
    checked = 0
    for img, cell_colors in zip(pixels.numpy().astype(np.float64), colors.numpy()):
        for k, c in enumerate(cell_colors):
            # the cell plus a 3-pixel border (a shape's edge may cross into a neighbour; its centre may not)
            r, col = divmod(k, 3)
            patch = img[max(0, r * 16 - 3):r * 16 + 19, max(0, col * 16 - 3):col * 16 + 19].reshape(-1, 3)
            nearest = np.linalg.norm(patch[:, None] - PALETTE[None], axis=-1).min(0)  # (7,) per colour
            if c:
                assert nearest[c - 1] < 40, f"cell {k} labelled {list(COLORS)[c - 1]} has no such pixel"
                checked += 1
    assert checked > 20


def test_both_encoders_give_one_token_per_cell():
    cfg = load_config([str(ROOT / "config" / "mixed.py")])
    images = torch.randn(2, 3, cfg.image_size, cfg.image_size)
    for encoder in (vision_probe.ViTEncoder(cfg), vision_probe.CNNEncoder(cfg.n_embd)):
        assert encoder(images).shape == (2, 9, cfg.n_embd)


def test_script_runs_and_prints_both_models():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "vision_probe.py"), "--steps", "3", "--eval_every",
                          "3", "--n_train", "40", "--n_val", "30", "--batch_size", "8", "--optimizer", "muon",
                          "--letter_weight", "0.3"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    rows = {line.split()[0]: line.split()[1:] for line in out.stdout.splitlines()
            if line.split()[:1] in (["vit"], ["cnn"]) and len(line.split()) == 6}
    assert set(rows) == {"vit", "cnn"}
    for values in rows.values():
        assert all(0.0 <= float(v) <= 1.0 for v in values[:4]) and float(values[4]) > 0
    assert "ViT / CNN:" in out.stdout


def test_a_trained_runs_encoder_is_probed_frozen(tmp_path):
    """--models run: a run's own ViT and projector, loaded from its checkpoint, give one token per cell and
    train nothing; a config that does not match the run is refused with a message that says so."""
    import pytest
    from PIL import Image

    from minimm.formats import write_jsonl

    rows = []
    for i, rgb in enumerate([(220, 30, 30), (30, 200, 40), (30, 40, 220)] * 4):
        Image.new("RGB", (24, 24), rgb).save(tmp_path / f"{i}.png")
        rows.append({"image": f"{i}.png", "conversations": [{"role": "user", "content": "<image>\nColour?"},
                                                             {"role": "assistant", "content": str(rgb)}]})
    write_jsonl(tmp_path / "data.jsonl", rows)
    sizes = ["--n_embd=32", "--image_size=24", "--patch_size=8", "--pixel_shuffle=1"]
    train = subprocess.run([sys.executable, "train.py", f"--train_files=['{tmp_path / 'data.jsonl'}']",
                            f"--data_dir={tmp_path / 'data'}", "--dataset=tiny", f"--out_dir={tmp_path / 'run'}",
                            "--n_layer=1", "--n_head=2", "--block_size=64", "--batch_size=2", "--vocab_size=300",
                            "--vit_n_layer=1", "--vit_n_head=2", "--vit_n_embd=32", "--max_iters=2",
                            "--warmup_iters=1", "--eval_interval=1000", "--eval_iters=1", "--eval_samples=1",
                            "--eval_media_samples=1", "--val_fraction=0.2", "--device=cpu", *sizes],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert train.returncode == 0, train.stderr[-2000:]
    encoder = vision_probe.TrainedEncoder(str(tmp_path / "run"), image_size=24, n_embd=32)
    assert not any(p.requires_grad for p in encoder.parameters())
    assert encoder(torch.randn(2, 3, 24, 24)).shape == (2, 9, 32)
    with pytest.raises(SystemExit, match="pass the run's own --config"):
        vision_probe.TrainedEncoder(str(tmp_path / "run"), image_size=48, n_embd=256)  # config/mixed.py's sizes

    config = tmp_path / "tiny_config.py"
    config.write_text("".join(f"{s[2:].split('=')[0]} = {s.split('=')[1]}\n" for s in sizes))
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "vision_probe.py"), "--config", str(config),
                          "--models", "run", "--from_run", str(tmp_path / "run"), "--steps", "2",
                          "--eval_every", "2", "--n_train", "20", "--n_val", "10", "--batch_size", "4"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "run: " in out.stdout and ", 0 trained" in out.stdout
    missing = subprocess.run([sys.executable, str(ROOT / "bench" / "vision_probe.py"), "--models", "run"],
                             capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert missing.returncode != 0 and "--from_run" in missing.stderr
