"""Shared fixtures for the tests that chat with a real model (the server's and the page's):
tiny_run, a tiny multimodal checkpoint (text, images, audio) trained once per session by train.py itself;
serve, which starts serve.py on it on a free port."""
import math
import re
import struct
import subprocess
import sys
import time
import wave
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from minimm.formats import write_jsonl

ROOT = Path(__file__).resolve().parent.parent
COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
TINY_MULTIMODAL = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=128", "--batch_size=4",
                   "--vocab_size=300", "--image_size=16", "--patch_size=8", "--vit_n_layer=1", "--vit_n_head=2",
                   "--vit_n_embd=32", "--audio_n_layer=1", "--audio_n_head=2", "--audio_n_embd=32",
                   "--max_iters=8", "--learning_rate=3e-3", "--warmup_iters=2", "--eval_interval=1000",
                   "--eval_iters=2", "--eval_samples=2", "--eval_media_samples=2", "--log_interval=1",
                   "--val_fraction=0.1", "--device=cpu"]


@dataclass
class TinyRun:
    out_dir: Path  # the checkpoint folder (ckpt.pt, log.jsonl, eval.json, config.json)
    runs_dir: Path  # its parent: the run is named out_dir.name there
    images: dict[str, Path]  # color name -> a PNG of that color, odd sizes
    wavs: dict[str, Path]  # color name -> a 0.3 s tone at 16 kHz


def write_tone(path: Path, hz: float, seconds: float, rate: int = 16000) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(b"".join(struct.pack("<h", int(8000 * math.sin(2 * math.pi * hz * t / rate)))
                               for t in range(int(seconds * rate))))


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> TinyRun:
    media = tmp_path_factory.mktemp("tiny_media")
    images, wavs, rows = {}, {}, []
    for k in range(15):
        for i, (name, rgb) in enumerate(COLORS.items()):  # a picture and a clip of their own for every example
            image, wav = media / f"{name}_{k}.png", media / f"{name}_{k}.wav"
            Image.new("RGB", (20 + 3 * i + k % 4, 17 + k % 3), rgb).save(image)
            write_tone(wav, 300 + 200 * i + k, 0.3)
            images.setdefault(name, image)
            wavs.setdefault(name, wav)
            rows.append({"image": image.name, "conversations": [
                {"role": "user", "content": "<image>\nWhat color is it?"},
                {"role": "assistant", "content": f"It is {name}."}]})
            rows.append({"audio": wav.name, "conversations": [
                {"role": "user", "content": "<audio>\nWhich tone?"},
                {"role": "assistant", "content": f"The {name} tone."}]})
        rows.append({"conversations": [{"role": "user", "content": f"Say {k}."},
                                       {"role": "assistant", "content": f"{k} it is."}]})
    write_jsonl(media / "data.jsonl", rows)
    runs_dir = tmp_path_factory.mktemp("tiny_runs")
    args = [sys.executable, "train.py", f"--train_files=['{media / 'data.jsonl'}']",
            f"--data_dir={runs_dir.parent / (runs_dir.name + '_data')}", "--dataset=tiny",
            f"--out_dir={runs_dir / 'tiny'}", *TINY_MULTIMODAL]
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return TinyRun(runs_dir / "tiny", runs_dir, images, wavs)


@pytest.fixture(scope="module")
def serve(tiny_run, tmp_path_factory):
    """start(*flags) -> port: serve.py on tiny_run at a free port (--port 0, the `--key value` form),
    stopped when the test module ends."""
    procs = []

    def start(*flags: str) -> int:
        log_path = tmp_path_factory.mktemp("serve") / "serve.log"
        with open(log_path, "w") as log:
            procs.append(subprocess.Popen([sys.executable, "serve.py", f"--out_dir={tiny_run.out_dir}",
                                           f"--runs_dir={tiny_run.runs_dir}", "--port", "0", "--device=cpu",
                                           *flags], cwd=ROOT, stdout=log, stderr=log))
        deadline = time.time() + 120
        while time.time() < deadline and procs[-1].poll() is None:
            found = re.search(r"http://127\.0\.0\.1:(\d+)", log_path.read_text())
            if found:
                return int(found.group(1))
            time.sleep(0.1)
        raise AssertionError(f"serve.py did not start:\n{log_path.read_text()[-3000:]}")

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(timeout=30)
