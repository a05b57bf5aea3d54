"""Time the OpenCL backend against PyTorch on the same machine and print ratios.

    python bench/opencl.py                   # the default OpenCL device (PoCL's CPU device if no GPU)
    python bench/opencl.py --device=opencl:0:0 --steps=50

What it measures:
- SGEMM at 512, 1024 and 2048 (square, float32): GFLOP/s of minimm.opencl's tiled kernel and of
  torch.matmul. Goal on PoCL: >= 0.3x torch at 1024 (a naive one-element-per-work-item kernel: ~0.03x).
- Sampling: tokens/s of greedy generation with a KV cache, the same small random GPT (GPTConfig's
  defaults: 4 layers, 128 channels, 4096 tokens) on both sides; the tokens must agree. Goal: >= 0.3x.
- Training: --steps steps of AdamW from the same weights on the same batches, the relative difference of
  the last loss (spec: <= 1e-3 after 50 steps) and, for information, the time per step.
Timings interleave the two sides and keep the best of several runs, because other work on the machine
slows whichever side it lands on; each side is checked for the same result before it is timed. PyTorch
runs with its default thread count and with one thread, and the faster is the baseline: on a shared,
busy machine its OpenMP threads can wait on each other so badly that one thread is 10x faster, and a
ratio against that slowdown would flatter OpenCL.
"""
import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from minimm.gpt import GPT, GPTConfig  # noqa: E402
from minimm.opencl import OpenCLGPT, OpenCLTrainer, get_device  # noqa: E402
from minimm.opencl.kernels.gemm import sgemm  # noqa: E402
from minimm.training import configure_optimizer  # noqa: E402


def best_of(opencl, torch_fn, repeats: int) -> tuple[float, float]:
    """Best wall seconds of opencl() and of torch_fn() (at the default thread count or at one thread),
    run in turn `repeats` times."""
    default_threads = torch.get_num_threads()
    best = {"opencl": float("inf"), default_threads: float("inf"), 1: float("inf")}
    try:
        for _ in range(repeats):
            for key in best:
                if key != "opencl":
                    torch.set_num_threads(key)
                start = time.perf_counter()
                (opencl if key == "opencl" else torch_fn)()
                best[key] = min(best[key], time.perf_counter() - start)
    finally:
        torch.set_num_threads(default_threads)
    return best["opencl"], min(best[default_threads], best[1])


def bench_sgemm(device, n: int, repeats: int) -> tuple[float, float]:
    a, b = torch.randn(n, n), torch.randn(n, n)
    A, B, C = device.upload(a.numpy()), device.upload(b.numpy()), device.alloc(n * n * 4)

    def opencl():
        sgemm(device, n, n, n, A, B, C)
        device.synchronize()
    opencl()
    error = np.abs(device.download(C, (n, n), np.float32) - (a @ b).numpy()).max()
    assert error < 1e-2, f"SGEMM {n}: wrong result (max error {error})"
    t_cl, t_torch = best_of(opencl, lambda: a @ b, repeats)
    flop = 2 * n ** 3
    return flop / t_cl / 1e9, flop / t_torch / 1e9


def bench_sampling(device_name: str, prompt_len: int, new_tokens: int, repeats: int) -> tuple[float, float]:
    torch.manual_seed(0)
    model = GPT(GPTConfig()).eval()
    cl = OpenCLGPT.from_torch(model, device_name)
    prompt = torch.randint(0, model.config.vocab_size, (1, prompt_len))
    expected = model.generate(prompt, new_tokens, temperature=0)
    assert torch.equal(cl.generate(prompt, new_tokens, temperature=0), expected), "greedy tokens differ"
    t_cl, t_torch = best_of(lambda: cl.generate(prompt, new_tokens, temperature=0),
                            lambda: model.generate(prompt, new_tokens, temperature=0), repeats)
    return new_tokens / t_cl, new_tokens / t_torch


def bench_training(device_name: str, steps: int) -> tuple[float, float, float, float]:
    """(last loss torch, last loss OpenCL, seconds per step OpenCL, seconds per step torch)."""
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=512, block_size=64, n_layer=2, n_head=4, n_embd=64)
    model = GPT(config)
    trainer = OpenCLTrainer(OpenCLGPT.from_torch(model, device_name), 1e-3, (0.9, 0.95), 0.1, grad_clip=1.0)
    optimizer = configure_optimizer(model, 0.1, 1e-3, (0.9, 0.95), "cpu")
    data = torch.Generator().manual_seed(1)
    pattern = torch.randint(0, config.vocab_size, (config.vocab_size,), generator=data)  # a learnable map
    t_cl = t_torch = 0.0
    for step in range(steps):
        x = torch.randint(0, config.vocab_size, (8, config.block_size), generator=data)
        y = pattern[x]
        lr = 1e-3 * min(1.0, (step + 1) / 10)  # warmup: the rate changes every step
        start = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t_torch += time.perf_counter() - start
        start = time.perf_counter()
        cl_loss = trainer.step(x, y, lr)
        t_cl += time.perf_counter() - start
    return loss.item(), cl_loss, t_cl / steps, t_torch / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="opencl")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--new_tokens", type=int, default=100)
    args = parser.parse_args()
    device = get_device(args.device)
    print(f"OpenCL device: {device.name}; torch {torch.__version__} with {torch.get_num_threads()} threads")
    for n in (512, 1024, 2048):
        cl, ref = bench_sgemm(device, n, args.repeats if n < 2048 else max(2, args.repeats // 2))
        print(f"SGEMM {n:>4}: OpenCL {cl:7.1f} GFLOP/s   torch {ref:7.1f} GFLOP/s   ratio {cl / ref:.2f}x")
    cl, ref = bench_sampling(args.device, 16, args.new_tokens, args.repeats)
    print(f"sampling (greedy, KV cache, GPTConfig defaults): OpenCL {cl:.0f} tok/s   torch {ref:.0f} tok/s   "
          f"ratio {cl / ref:.2f}x   (tokens identical)")
    ref, cl, t_cl, t_torch = bench_training(args.device, args.steps)
    print(f"training {args.steps} AdamW steps: last loss torch {ref:.7f} OpenCL {cl:.7f} "
          f"(relative difference {abs(cl - ref) / ref:.1e})   step {t_cl * 1e3:.0f} ms vs torch "
          f"{t_torch * 1e3:.0f} ms at {torch.get_num_threads()} threads (informational)")


if __name__ == "__main__":
    main()
