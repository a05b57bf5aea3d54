"""Images and audio through train.py and sample.py end to end, on a tiny JSONL dataset with media."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from minimm.formats import write_jsonl
from minimm.multimodal import MultimodalGPT
from minimm.training import load_checkpoint
from prepare.shapes import make_image_examples
from prepare.sounds import make_audio_examples

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=96", "--batch_size=4", "--vocab_size=300",
        "--eval_iters=1", "--eval_media_samples=6", "--log_interval=1", "--warmup_iters=2", "--device=cpu",
        "--eval_interval=1000", "--image_size=24", "--patch_size=8", "--vit_n_layer=1", "--vit_n_embd=32",
        "--vit_n_head=2", "--audio_n_layer=1", "--audio_n_embd=32", "--audio_n_head=2", "--val_fraction=0.3"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A media dataset (with one broken image and one missing clip), built and trained for a few steps."""
    root = tmp_path_factory.mktemp("mm")
    rows = make_image_examples(root / "images", 24, seed=5, image_size=24, relative_to=root)
    rows += make_audio_examples(root, 12, seed=5, split="train")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    rows.append({"conversations": [{"role": "user", "content": "<image>\nWhat?"},
                                   {"role": "assistant", "content": "broken"}], "image": "broken.png"})
    write_jsonl(root / "data.jsonl", rows)
    args = [sys.executable, "train.py", f"--train_files=['{root / 'data.jsonl'}']", f"--data_dir={root / 'data'}",
            "--dataset=mm", f"--out_dir={root / 'out'}", *TINY, "--max_iters=4", "--media_lr_scale=3"]
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, proc


def test_media_are_packed_once_and_the_broken_image_is_reported(run):
    root, proc = run
    meta = json.loads((root / "data" / "mm" / "meta.json").read_text())
    stats = meta["splits"]
    assert stats["train"]["images"] + stats["val"]["images"] == 24
    assert stats["train"]["audio_clips"] + stats["val"]["audio_clips"] == 12
    assert stats["train"]["skipped_media"] + stats["val"]["skipped_media"] == 1
    assert "broken.png" in proc.stdout + proc.stderr
    assert (root / "data" / "mm" / "train_images.bin").stat().st_size == stats["train"]["images"] * 24 * 24 * 3


def test_checkpoint_has_both_encoders_and_eval_reports_kinds(run):
    root, _ = run
    args = load_checkpoint(root / "out" / "ckpt.pt")["model_args"]
    assert args["vision"]["image_size"] == 24 and args["audio"] is not None
    results = json.loads((root / "out" / "eval.json").read_text())
    assert 0.0 <= results["image"]["exact_match"] <= 1.0 and results["image"]["n"] > 0
    assert 0.0 <= results["audio"]["exact_match"] <= 1.0


def test_media_lr_scale_multiplies_the_encoders_and_projectors_learning_rate(run):
    root, _ = run
    ckpt = load_checkpoint(root / "out" / "ckpt.pt")
    groups = ckpt["optimizer"]["param_groups"]
    lrs = {g["lr_scale"]: g["lr"] for g in groups}
    assert sorted(lrs) == [1.0, 3.0] and lrs[3.0] == pytest.approx(3 * lrs[1.0]) and lrs[1.0] > 0
    n_scaled = sum(len(g["params"]) for g in groups if g["lr_scale"] == 3.0)
    media = ("vision.", "audio.", "image_projector.", "audio_projector.")
    model = MultimodalGPT.from_args(ckpt["model_args"])
    assert n_scaled == sum(1 for n, _ in model.named_parameters() if n.startswith(media))


def test_sample_answers_about_an_image_and_a_clip(run, tmp_path):
    root, _ = run
    picture = tmp_path / "x.png"
    Image.new("RGBA", (40, 30), (255, 0, 0, 128)).save(picture)  # another size and mode than training
    base = [sys.executable, "sample.py", f"--out_dir={root / 'out'}", "--device=cpu", "--max_new_tokens=5"]
    for extra in (["--task", "image", "--image", str(picture), "--prompt", "How many shapes are there?"],
                  ["--task", "audio", "--audio", str(next((root / "audio").rglob("*.wav")))],
                  ["--task", "image", "--prompt", "Generate an image of a cat."]):
        proc = subprocess.run(base + extra, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
    proc = subprocess.run(base + ["--task", "image", "--image", str(tmp_path / "missing.png")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "missing.png" in proc.stderr
