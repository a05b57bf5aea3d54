"""train.py and sample.py with --device=opencl against PyTorch on the CPU (PoCL's CPU device in CI)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from minimm.formats import write_jsonl

pytest.importorskip("pyopencl", reason="pyopencl is not installed: pip install -e '.[opencl]'")
from minimm.opencl import is_available  # noqa: E402

if not is_available():
    pytest.skip("no OpenCL platform: pip install pocl-binary-distribution", allow_module_level=True)

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=64", "--batch_size=4", "--vocab_size=300",
        "--eval_iters=1", "--eval_samples=2", "--log_interval=1", "--warmup_iters=5", "--eval_interval=25",
        "--max_iters=50", "--lr_decay_iters=50", "--val_fraction=0.2", "--learning_rate=3e-3"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same 50 steps from the same seed: once in PyTorch on the CPU, once on the OpenCL device."""
    root = tmp_path_factory.mktemp("opencl")
    rows = [{"task": "code", "instruction": f"Add {i}.", "input": f"def add{i}(x):",
             "output": f"def add{i}(x):\n    return x + {i}"} for i in range(80)]
    rows += [{"text": f"The number {i} comes before {i + 1}. " * 3} for i in range(40)]
    write_jsonl(root / "data.jsonl", rows)
    for device in ("cpu", "opencl"):
        args = [sys.executable, "train.py", f"--train_files=['{root / 'data.jsonl'}']", f"--data_dir={root / 'data'}",
                "--dataset=tiny", f"--out_dir={root / device}", f"--device={device}", *TINY]
        proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return root


def losses(out_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r["train"]["all"] for r in records if "train" in r}


def test_train_on_opencl_follows_pytorch_for_50_steps(runs):
    cpu, cl = losses(runs / "cpu"), losses(runs / "opencl")
    assert sorted(cpu) == sorted(cl) == list(range(1, 51))
    assert cpu[50] < cpu[1] - 1.0  # it learned something
    for step in cpu:  # fp32 on both sides; only the order of the sums differs
        assert abs(cpu[step] - cl[step]) <= 1e-3 * abs(cpu[step]), (step, cpu[step], cl[step])


def test_sample_on_opencl_equals_pytorch_greedy(runs):
    outputs = {}
    for device in ("cpu", "opencl"):
        proc = subprocess.run([sys.executable, "sample.py", f"--out_dir={runs / 'cpu'}", f"--device={device}",
                               "--task", "code", "--prompt", "Add 3.", "--temperature=0", "--max_new_tokens=24"],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        outputs[device] = proc.stdout
    assert outputs["cpu"] == outputs["opencl"] and outputs["cpu"].strip()
