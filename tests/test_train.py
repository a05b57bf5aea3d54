"""train.py and sample.py end to end, as subprocesses on a tiny dataset built from JSONL in tmp_path."""
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

from minimm.data import Batch
from minimm.formats import write_jsonl
from minimm.gpt import GPT, GPTConfig
from minimm.multimodal import MultimodalGPT
from minimm.training import backward_token_weighted, configure_optimizer, load_checkpoint, task_loss_weight_vector

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=64", "--batch_size=4", "--vocab_size=300",
        "--eval_iters=2", "--eval_samples=2", "--log_interval=1", "--warmup_iters=2", "--device=cpu",
        "--eval_interval=1000", "--lr_decay_iters=20", "--val_fraction=0.25"]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("jsonl")
    rows = []
    for i in range(60):
        rows.append({"task": "code", "instruction": f"Return {i} plus x.", "input": f"def add{i}(x):",
                     "output": f"def add{i}(x):\n    return x + {i}"})
        rows.append({"conversations": [{"role": "user", "content": f"Say {i}."},
                                       {"role": "assistant", "content": f"{i} it is."}]})
        rows.append({"text": f"Number {i} is a number, and {i + 1} comes after it. " * 3})
    write_jsonl(folder / "data.jsonl", rows)
    return folder / "data.jsonl"


def train(tmp_path, data_file, *extra, check=True, env=None):
    args = [sys.executable, "train.py", f"--train_files=['{data_file}']", f"--data_dir={tmp_path / 'data'}",
            "--dataset=tiny", f"--out_dir={tmp_path / 'out'}", *TINY, *extra]
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_the_gpu_config_builds_its_bundled_data_first(tmp_path):
    """config/mixed_gpu.py names its own dataset (mixed_gpu): train.py builds it with prepare/mixed.py, as it
    builds data/mixed, instead of stopping for want of data. Model and data shrunk to run on a CPU in seconds."""
    small = ["--data_scale=0.01", "--n_images=20", "--n_audio=20", "--image_size=64", "--patch_size=16",
             "--vit_n_layer=1", "--vit_n_head=2", "--vit_n_embd=32", "--audio_n_layer=1", "--audio_n_head=2",
             "--audio_n_embd=32", "--compile=False", "--eval_media_samples=2"]
    args = [sys.executable, "train.py", "config/mixed_gpu.py", f"--data_dir={tmp_path / 'data'}",
            f"--out_dir={tmp_path / 'out'}", *TINY, "--block_size=128", *small, "--max_iters=1"]
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "data/mixed_gpu is missing: building it" in proc.stderr + proc.stdout
    meta = json.loads((tmp_path / "data" / "mixed_gpu" / "meta.json").read_text())
    assert meta["splits"]["train"]["examples"]["image"] > 0 and (tmp_path / "out" / "eval.json").is_file()


def train_losses(out_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r["train"]["all"] for r in records if "train" in r}


def test_task_loss_weights_reach_the_step_and_a_misspelt_task_is_an_error(tmp_path, data_file):
    """--task_loss_weights changes the updates (the first step's loss, logged unweighted, is the same; later ones
    differ); a task name the data does not have stops the run with the names it has."""
    train(tmp_path / "plain", data_file, "--max_iters=3")
    train(tmp_path / "weighted", data_file, "--max_iters=3", "--task_loss_weights={'code': 5.0}")
    plain, weighted = (train_losses(tmp_path / run / "out") for run in ("plain", "weighted"))
    first = min(plain)
    assert weighted[first] == pytest.approx(plain[first], abs=1e-6)
    assert weighted[max(plain)] != pytest.approx(plain[max(plain)], abs=1e-4)
    proc = train(tmp_path / "typo", data_file, "--max_iters=1", "--task_loss_weights={'cod': 2.0}", check=False)
    assert proc.returncode != 0 and "['cod']" in proc.stderr and "'code'" in proc.stderr


def test_train_writes_everything_and_sample_answers(tmp_path, data_file):
    train(tmp_path, data_file, "--max_iters=6")
    out = tmp_path / "out"
    for name in ("ckpt.pt", "log.jsonl", "eval.json", "loss.png", "config.json"):
        assert (out / name).is_file(), name
    results = json.loads((out / "eval.json").read_text())
    assert "val_loss" in results["code"] and 0.0 <= results["code"]["ast_parse_rate"] <= 1.0
    ckpt = load_checkpoint(out / "ckpt.pt")
    assert ckpt["step"] == 6 and ckpt["config"]["n_embd"] == 32 and "tokenizer" in ckpt
    assert ckpt["model_args"]["vision"] is None and ckpt["model_args"]["audio"] is None  # text-only data
    sample = [sys.executable, "sample.py", f"--out_dir={out}", "--device=cpu", "--max_new_tokens=8"]
    proc = subprocess.run(sample + ["--task", "code", "--prompt", "Return 3 plus x."], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    proc = subprocess.run(sample + ["--task=poetry"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "Invalid task type 'poetry'" in proc.stderr and "code" in proc.stderr
    proc = subprocess.run(sample[:2] + [f"--out_dir={tmp_path / 'nothing'}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0 and "python train.py" in proc.stderr


SEQ = ["--seq_unlikelihood=0.5", "--seq_unlikelihood_from=0.1"]  # from step 2 of lr_decay_iters=20 on


@pytest.mark.parametrize("extra", [["--optimizer=adamw"], ["--optimizer=muon"], ["--optimizer=muon", *SEQ]],
                         ids=["adamw", "muon", "muon-seq-unlikelihood"])
def test_resume_equals_uninterrupted(tmp_path, data_file, extra):
    straight, split = tmp_path / "a", tmp_path / "b"
    train(straight, data_file, "--max_iters=8", *extra)
    train(split, data_file, "--max_iters=4", *extra)
    train(split, data_file, "--max_iters=8", "--init_from=resume", *extra)
    a, b = train_losses(straight / "out"), train_losses(split / "out")
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-6, (step, a[step], b[step])
    if "--seq_unlikelihood=0.5" in extra:  # logged from the step it starts at (index 2, logged as step 3) on
        records = [json.loads(line) for line in (straight / "out" / "log.jsonl").read_text().splitlines()]
        costs = {r["step"]: r["seq_unlikelihood"] for r in records if "seq_unlikelihood" in r}
        assert sorted(costs) == list(range(3, 9)) and all(c >= 0 for c in costs.values())
        b_records = [json.loads(line) for line in (split / "out" / "log.jsonl").read_text().splitlines()]
        assert {r["step"]: r["seq_unlikelihood"] for r in b_records if "seq_unlikelihood" in r} == costs


def test_ddp_two_gloo_ranks_equal_one_process(tmp_path, data_file):
    one = train(tmp_path / "one", data_file, "--max_iters=3", "--batch_size=4")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
            "train.py", f"--train_files=['{data_file}']", f"--data_dir={tmp_path / 'two' / 'data'}",
            "--dataset=tiny", f"--out_dir={tmp_path / 'two' / 'out'}", *TINY, "--max_iters=3", "--batch_size=2"]
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = train_losses(tmp_path / "one" / "out"), train_losses(tmp_path / "two" / "out")
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-5, (step, a[step], b[step])
    wa = load_checkpoint(tmp_path / "one" / "out" / "ckpt.pt")["model"]
    wb = load_checkpoint(tmp_path / "two" / "out" / "ckpt.pt")["model"]
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=1e-4)
    assert one.returncode == 0


def test_sigint_leaves_a_loadable_checkpoint(tmp_path, data_file):
    train(tmp_path, data_file, "--max_iters=1")  # build the data first so the run below is quick to start
    args = [sys.executable, "train.py", f"--train_files=['{data_file}']", f"--data_dir={tmp_path / 'data'}",
            "--dataset=tiny", f"--out_dir={tmp_path / 'run'}", *TINY, "--max_iters=100000"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = tmp_path / "run" / "log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.is_file() and len(log.read_text().splitlines()) >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    ckpt = load_checkpoint(tmp_path / "run" / "ckpt.pt")
    assert 3 <= ckpt["step"] < 100000
    MultimodalGPT.from_args(ckpt["model_args"]).load_state_dict(ckpt["model"])


def test_nan_stops_and_keeps_the_last_checkpoint(tmp_path, data_file):
    train(tmp_path, data_file, "--max_iters=3")
    before = load_checkpoint(tmp_path / "out" / "ckpt.pt")
    proc = train(tmp_path, data_file, "--init_from=resume", "--max_iters=50", "--learning_rate=1e38",
                 "--min_lr=1e38", "--warmup_iters=0", "--grad_clip=0.0", check=False)
    assert proc.returncode != 0 and "loss became" in proc.stderr and "learning_rate" in proc.stderr
    after = load_checkpoint(tmp_path / "out" / "ckpt.pt")
    assert after["step"] == before["step"] == 3
    for k, v in after["model"].items():
        assert torch.equal(v, before["model"][k]) and torch.isfinite(v).all()


def test_token_weighted_accumulation_equals_one_big_batch():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=53, block_size=16, n_layer=1, n_head=2, n_embd=16))
    x = torch.randint(0, 53, (4, 16))
    y = torch.randint(0, 53, (4, 16))
    y[:2, :11] = -100  # the first micro-batch has few supervised tokens ...
    y_empty = y.clone()
    y_empty[:2] = -100  # ... or none at all
    tasks = torch.zeros_like(x)
    no_scale = torch.amp.GradScaler("cpu", enabled=False)
    for targets in (y, y_empty):
        grads = []
        for micro in ([Batch(x, targets, tasks, None)],
                      [Batch(x[:2], targets[:2], tasks[:2], None), Batch(x[2:], targets[2:], tasks[2:], None)]):
            model.zero_grad()
            backward_token_weighted(model, micro, 1, nullcontext(), no_scale)
            grads.append([p.grad.clone() for p in model.parameters()])
        for a, b in zip(*grads):
            assert torch.isfinite(b).all()
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_task_loss_weights_make_a_weighted_mean_over_the_accumulated_batch():
    """task_loss_weights: the step's gradient is that of sum(w * loss) / sum(w) over all supervised tokens, the same
    whether the batch comes whole or in micro-batches; the returned per-task losses stay unweighted."""
    torch.manual_seed(1)
    model = GPT(GPTConfig(vocab_size=37, block_size=12, n_layer=1, n_head=2, n_embd=16))
    x, y = torch.randint(0, 37, (5, 12)), torch.randint(0, 37, (5, 12))
    y[0, :7] = -100
    tasks = torch.randint(0, 3, (5, 12))
    weights = torch.tensor([1.0, 3.0, 0.5])
    no_scale = torch.amp.GradScaler("cpu", enabled=False)

    model.zero_grad()
    _, token_loss = model(x, y, reduction="none", return_logits=False)  # (B, T)
    w = weights[tasks] * (y != -100)
    ((token_loss * w).sum() / w.sum()).backward()
    expected = [p.grad.clone() for p in model.parameters()]
    plain = [token_loss.detach()[(y != -100) & (tasks == t)].mean() for t in range(3)]
    halves = [Batch(x[:2], y[:2], tasks[:2], None), Batch(x[2:], y[2:], tasks[2:], None)]
    for micro in ([Batch(x, y, tasks, None)], halves):
        model.zero_grad()
        task_loss, task_count = backward_token_weighted(model, micro, 3, nullcontext(), no_scale, loss_weights=weights)
        for a, b in zip(expected, (p.grad for p in model.parameters())):
            torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(task_loss / task_count, torch.stack(plain), atol=1e-6, rtol=1e-5)
    model.zero_grad()  # weights of 1 are no weights
    backward_token_weighted(model, [Batch(x, y, tasks, None)], 3, nullcontext(), no_scale, loss_weights=torch.ones(3))
    ones = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    backward_token_weighted(model, [Batch(x, y, tasks, None)], 3, nullcontext(), no_scale)
    for a, b in zip(ones, (p.grad for p in model.parameters())):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-6)
    assert not torch.allclose(ones[0], expected[0])  # and other weights change the gradient


def test_task_loss_weight_vector_follows_the_task_order_and_rejects_unknown_tasks():
    tasks = ["text", "code", "image", "audio"]
    assert task_loss_weight_vector({}, tasks) is None
    assert task_loss_weight_vector({"image": 3, "text": 0}, tasks).tolist() == [0.0, 1.0, 3.0, 1.0]
    with pytest.raises(ValueError, match=r"\['imge'\].*'image'"):
        task_loss_weight_vector({"imge": 3}, tasks)
    with pytest.raises(ValueError, match=">= 0"):
        task_loss_weight_vector({"code": -1}, tasks)


def test_configure_optimizer_scales_the_learning_rate_of_named_parts():
    """lr_scales puts each prefix's parameters in their own groups (decay and no-decay kept apart)."""
    model = torch.nn.ModuleDict({"vision": torch.nn.Linear(3, 4), "gpt": torch.nn.Linear(4, 5)})
    model["gpt"].bias.requires_grad_(False)  # frozen: in no group
    opt = configure_optimizer(model, 0.1, 1e-3, (0.9, 0.95), "cpu", lr_scales={"vision.": 3.0})
    groups = {(g["lr_scale"], g["weight_decay"]): g["params"] for g in opt.param_groups}
    assert set(groups) == {(3.0, 0.1), (3.0, 0.0), (1.0, 0.1)}
    assert groups[(3.0, 0.1)][0] is model["vision"].weight and groups[(3.0, 0.0)][0] is model["vision"].bias
    assert groups[(1.0, 0.1)][0] is model["gpt"].weight
    assert sum(len(p) for p in groups.values()) == 3
    plain = configure_optimizer(model, 0.1, 1e-3, (0.9, 0.95), "cpu")
    assert [g["lr_scale"] for g in plain.param_groups] == [1.0, 1.0]
