"""prepare/mixed.py: deterministic from its seed, and stale when a setting that shapes it changes."""
import hashlib
from pathlib import Path

from minimm.config import load_config
from minimm.pack import dataset_status
from prepare.mixed import build, settings_from_config

SMALL = ["--data_scale=0.05", "--n_images=60", "--n_audio=20", "--vocab_size=400"]


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_and_changed_settings_are_stale(tmp_path):
    cfg = load_config(SMALL)
    metas = [build(cfg, tmp_path / name, log=lambda *_: None) for name in ("a", "b")]
    a, b = digest(tmp_path / "a"), digest(tmp_path / "b")
    assert a == b and len(a) > 100  # jsonl, tokenizer, memmaps, every PNG and WAV
    for task in ("text", "code", "image", "audio"):
        assert metas[0]["splits"]["train"]["examples"][task] > 0, task
    assert metas[0]["splits"]["val"]["examples"]["code"] >= 50  # the held-out code instructions
    assert dataset_status(tmp_path / "a", settings_from_config(cfg)) == "ok"
    for change in ("--data_seed=7", "--vocab_size=512", "--image_size=32", "--pixel_shuffle=2"):
        changed = load_config(SMALL + [change])
        assert dataset_status(tmp_path / "a", settings_from_config(changed)) == "stale", change
