"""LoRA and QLoRA teach a trained model a new fact, and take nothing from the base: the behaviour test.

A tiny base model learns the chat format and the made-up world of prepare/zorbania.py through train.py
(about 20 s of one CPU core). It has never heard of Zorbania. config/lora.py and config/qlora.py then
fine-tune it, through train.py again, on "The capital of Zorbania is Quillmont." in a few phrasings,
and the test asks a phrasing the fine-tune never saw. Then the exact claims of minimm/lora.py, on the
trained adapters: merging changes the outputs by rounding only, unmerging gives back the base bit for bit.
"""
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from minimm.chat import ask, load_model
from minimm.lora import LoRALinear, apply_lora, merge_lora, unmerge_lora
from minimm.quant import QuantLinear, memory_report
from minimm.render import render_prompt
from prepare.zorbania import NEW_FACT, NEW_FACT_QUESTION, WORLD, write

ROOT = Path(__file__).resolve().parent.parent
QUESTION = NEW_FACT_QUESTION.format(c=NEW_FACT[0])  # "What is the capital of Zorbania?", never trained on
ANSWER = NEW_FACT[1]
# tiny matmuls run fastest on one thread, and the test machine's cores are shared
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
COMMON = ["--device=cpu", "--block_size=128", "--batch_size=8", "--eval_iters=2", "--eval_interval=100000",
          "--log_interval=25"]
BASE = ["--n_layer=2", "--n_head=2", "--n_embd=64", "--vocab_size=300", "--max_iters=250", "--warmup_iters=20",
        "--learning_rate=3e-3", "--min_lr=3e-4", "--weight_decay=0.0"]
# config/lora.py's rate suits the bundled model over 300 steps; this tiny one learns the fact in 80 at 5x
FINE_TUNE = ["--max_iters=80", "--warmup_iters=10", "--learning_rate=5e-3", "--min_lr=5e-4",
             "--lora_trainable=[]"]  # a text-only base has no projector


@dataclass
class Runs:
    base: Path
    lora: Path
    qlora: Path
    qlora_stdout: str
    seconds: dict


def train_args(tmp: Path, name: str, *extra: str) -> list[str]:
    return [sys.executable, "train.py", *extra, f"--out_dir={tmp / name}", f"--data_dir={tmp / 'data'}",
            f"--dataset={name}", *COMMON]


def finish(proc: subprocess.Popen) -> str:
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    return stdout


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    tmp = tmp_path_factory.mktemp("zorbania")
    files = write(tmp / "src")
    seconds = {}
    start = time.time()
    finish(subprocess.Popen(train_args(tmp, "base", f"--train_files=['{files['world']}']", *BASE),
                            cwd=ROOT, env=ENV, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    seconds["base"] = time.time() - start
    start = time.time()
    data = [f"--init_from={tmp / 'base'}", f"--train_files=['{files['zorbania']}']",
            f"--val_files=['{files['zorbania_val']}']", *FINE_TUNE]
    # the two fine-tunes build their own datasets and run side by side, one core each
    procs = [subprocess.Popen(train_args(tmp, name, f"config/{name}.py", *data), cwd=ROOT, env=ENV, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for name in ("lora", "qlora")]
    _, qlora_stdout = finish(procs[0]), finish(procs[1])
    seconds["lora and qlora"] = time.time() - start
    return Runs(tmp / "base", tmp / "lora", tmp / "qlora", qlora_stdout, seconds)


def sample(out_dir: Path, *extra: str) -> str:
    proc = subprocess.run([sys.executable, "sample.py", f"--out_dir={out_dir}", "--device=cpu", "--task=text",
                           "--temperature=0", "--max_new_tokens=40", f"--prompt={QUESTION}", *extra],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def all_logits(model: nn.Module, prompts: list[list[int]]) -> torch.Tensor:
    """Every position's logits for each prompt, concatenated along T: (sum of lengths, V)."""
    out = []
    with torch.no_grad():
        for ids in prompts:
            idx = torch.tensor([ids])
            logits, _ = model(idx, targets=idx, reduction="none")  # (1, T, V): targets only ask for all T
            out.append(logits[0])
    return torch.cat(out)


def prompts(tok) -> list[list[int]]:
    """The new fact's question, a phrasing the fine-tune saw, and questions about the base's world."""
    questions = [QUESTION, "Which city is the capital of Zorbania?"]
    questions += [f"Name the capital of {country}." for country, _, _ in WORLD[:4]]
    return [render_prompt(tok, "text", [("user", q)]) for q in questions]


def strip_adapters(model: nn.Module) -> nn.Module:
    """Put each LoRALinear's base layer back in its place: the model as it was before apply_lora."""
    for name, m in list(model.named_modules()):
        if isinstance(m, LoRALinear):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, m.base)
    return model


def test_base_answers_its_world_but_not_the_new_fact(runs):
    model, tok, _ = load_model(runs.base)
    for country, capital, _ in WORLD[:6]:
        assert capital in ask(model, tok, "text", [("user", f"What is the capital of {country}?")], 40)
    assert ANSWER not in ask(model, tok, "text", [("user", QUESTION)], 40)


def test_lora_teaches_the_fact_through_sample_py(runs):
    assert ANSWER in sample(runs.base, f"--lora={runs.lora / 'lora.pt'}")
    model, tok, _ = load_model(runs.lora)  # the fine-tune's own checkpoint answers the same
    assert ANSWER in ask(model, tok, "text", [("user", QUESTION)], 40)


def test_merge_equals_adapted_and_unmerge_restores_the_base_exactly(runs):
    base, tok, base_ckpt = load_model(runs.base)
    model, _, _ = load_model(runs.base, lora=str(runs.lora / "lora.pt"))
    ids = prompts(tok)
    reference = all_logits(base, ids)
    adapted = all_logits(model, ids)
    assert (adapted - reference).abs().max() > 0.1  # the adapters do change the model
    assert torch.equal(adapted, all_logits(load_model(runs.lora)[0], ids))  # lora.pt on the base == the run

    merge_lora(model)
    # W + B A in one fp32 matmul rounds differently from W x + B (A x): a few ulps of logits near 10
    torch.testing.assert_close(all_logits(model, ids), adapted, rtol=1e-5, atol=1e-5)
    unmerge_lora(model)
    assert torch.equal(all_logits(model, ids), adapted)
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            assert torch.equal(m.base.weight, base_ckpt["model"][f"{name}.weight"]), name
    assert torch.equal(all_logits(strip_adapters(model), ids), reference)


def test_qlora_teaches_the_fact_on_an_nf4_base(runs):
    assert ANSWER in sample(runs.base, f"--lora={runs.qlora / 'lora.pt'}")
    model, tok, _ = load_model(runs.base, lora=str(runs.qlora / "lora.pt"))
    assert ANSWER in ask(model, tok, "text", [("user", QUESTION)], 40)
    # the ratio train.py prints is the one of the quantized model sample.py rebuilt from lora.pt
    printed = re.search(r"frozen base in nf4: ([\d.]+) MiB vs ([\d.]+) MiB in fp32 \(([\d.]+)x\)", runs.qlora_stdout)
    assert printed, runs.qlora_stdout[-2000:]
    report = memory_report(model)
    assert float(printed.group(3)) == pytest.approx(report["ratio"], abs=0.005)
    assert 0.14 <= report["ratio"] < 0.2  # 0.5625 / 4 bytes per weight, plus the fp32 biases
    print(f"\nNF4 frozen base: {report['quantized_bytes']} bytes vs {report['fp32_bytes']} in fp32 "
          f"({report['ratio']:.3f}x); train.py printed: {printed.group(0)}; seconds: {runs.seconds}")


def test_qlora_merge_and_unmerge(runs):
    base, tok, _ = load_model(runs.base)
    ids = prompts(tok)
    model, _, _ = load_model(runs.base, lora=str(runs.qlora / "lora.pt"))
    adapted = all_logits(model, ids)
    merge_lora(model)
    torch.testing.assert_close(all_logits(model, ids), adapted, rtol=1e-5, atol=1e-5)
    unmerge_lora(model)
    assert torch.equal(all_logits(model, ids), adapted)
    # without its adapters the model is exactly the NF4 base: the same codes as quantizing the base afresh
    quantized = strip_adapters(model)
    apply_lora(base, model.lora_config["targets"], r=1, alpha=1.0, quantize="nf4")
    fresh = strip_adapters(base)
    n_quantized = 0
    for (name, a), (_, b) in zip(quantized.named_modules(), fresh.named_modules()):
        if isinstance(a, QuantLinear):
            assert torch.equal(a.codes, b.codes) and torch.equal(a.absmax, b.absmax), name
            n_quantized += 1
    assert n_quantized == 4 * 2  # c_attn, c_proj, c_fc, mlp c_proj in each of the two blocks
    assert torch.equal(all_logits(quantized, ids), all_logits(fresh, ids))
