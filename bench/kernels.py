"""Time minimm's Triton kernels against what PyTorch ships, side by side, and print ratios.

    python bench/kernels.py            # on a CUDA GPU: the full sweep and a markdown table for RESULTS.md

What it compares (bf16 throughout on the GPU):
- attention, causal, B*T = 16k tokens, head size 64 and 128 (nh * hs = 2048), T = 1k, 4k, 16k: our
  triton_attention against F.scaled_dot_product_attention with the FLASH backend pinned, forward and
  forward+backward. Goal: forward+backward at least 1.0x FLASH's speed at T = 4k, hs = 128.
- cross-entropy forward+backward, N = 16384 rows, V = 32768 and 131072: against eager F.cross_entropy
  and torch.compile of it. Goals: <= 0.5x eager time, <= 1.0x compiled time, peak extra memory <= 1.1x
  the logits' size.
- linear + cross-entropy forward+backward, N = 32768, H = 4096, V = 128256 (a Llama-3 sized output
  layer): the chunked linear_cross_entropy against materialised logits. Goal: <= 0.25x peak memory at
  <= 1.1x time.
Attention TFLOP/s count the matmuls only, causal halved: forward 4 * B * nh * T^2 * hs / 2, backward
2.5x that (five matmuls to the forward's two). Times are medians of triton.testing.do_bench.

Without a GPU the script runs each kernel once in Triton's CPU interpreter at toy sizes, checks it
against the reference, and says plainly that no GPU figures were taken.
"""
import datetime
import os
import sys

import torch

GPU = torch.cuda.is_available()
if not GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import torch.nn.functional as F  # noqa: E402
import triton.testing  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from minimm import ops  # noqa: E402
from minimm.kernels.attention import triton_attention  # noqa: E402
from minimm.kernels.cross_entropy import triton_cross_entropy  # noqa: E402
from minimm.kernels.linear_cross_entropy import linear_cross_entropy  # noqa: E402

GiB = 2 ** 30


def measure(fn) -> tuple[float, float]:
    """(median milliseconds, peak bytes allocated above what was allocated before the call)."""
    fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"), peak


def fwd_bwd(f, *inputs):
    """A closure running f forward and backward (gradients w.r.t. every input that requires them).
    The upstream gradient is ones, as loss.backward() gives a loss."""
    wrt = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]
    upstream = torch.ones_like(f(*inputs))
    return lambda: torch.autograd.grad(f(*inputs), wrt, upstream)


def flash_sdpa(q, k, v):
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def bench_attention(rows: list) -> None:
    for hs in (64, 128):
        for T in (1024, 4096, 16384):
            B, nh = 16384 // T, 2048 // hs
            q, k, v = (torch.randn(B, nh, T, hs, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                       for _ in range(3))
            ours = lambda q, k, v: triton_attention(q, k, v, causal=True)  # noqa: E731
            fwd_flops = 4 * B * nh * T * T * hs / 2
            for mode, flops in (("fwd", fwd_flops), ("fwd+bwd", 3.5 * fwd_flops)):
                if mode == "fwd":
                    with torch.no_grad():
                        ms, mem = measure(lambda: ours(q, k, v))
                        ref_ms, ref_mem = measure(lambda: flash_sdpa(q, k, v))
                else:
                    ms, mem = measure(fwd_bwd(ours, q, k, v))
                    ref_ms, ref_mem = measure(fwd_bwd(flash_sdpa, q, k, v))
                rows.append((f"attention {mode} B={B} nh={nh} T={T} hs={hs}", "SDPA FLASH", ms, ref_ms,
                             f"{flops / ms / 1e9:.0f} vs {flops / ref_ms / 1e9:.0f} TFLOP/s",
                             f"{mem / GiB:.2f} vs {ref_mem / GiB:.2f} GiB",
                             f"speed {ref_ms / ms:.2f}x FLASH" + (" (goal >= 1.0x)" if (T, hs, mode) ==
                                                                  (4096, 128, "fwd+bwd") else "")))


def bench_cross_entropy(rows: list) -> None:
    compiled = torch.compile(F.cross_entropy)
    for V in (32768, 131072):
        N = 16384
        logits = torch.randn(N, V, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        targets = torch.randint(0, V, (N,), device="cuda")
        logits_bytes = logits.numel() * logits.element_size()
        ms, mem = measure(fwd_bwd(triton_cross_entropy, logits, targets))
        for name, f in (("eager F.cross_entropy", F.cross_entropy), ("torch.compile", compiled)):
            ref_ms, ref_mem = measure(fwd_bwd(f, logits, targets))
            goal = "<= 0.5x" if name.startswith("eager") else "<= 1.0x"
            rows.append((f"cross-entropy fwd+bwd N={N} V={V}", name, ms, ref_ms, "",
                         f"{mem / logits_bytes:.2f}x vs {ref_mem / logits_bytes:.2f}x logits (goal <= 1.1x)",
                         f"time {ms / ref_ms:.2f}x (goal {goal})"))
        del logits


def bench_linear_cross_entropy(rows: list) -> None:
    N, H, V = 32768, 4096, 128256
    hidden = torch.randn(N, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(V, H, device="cuda", dtype=torch.bfloat16) / H ** 0.5).requires_grad_()
    targets = torch.randint(0, V, (N,), device="cuda")
    ms, mem = measure(fwd_bwd(linear_cross_entropy, hidden, weight, targets))
    ref_ms, ref_mem = measure(fwd_bwd(lambda h, w, t: F.cross_entropy(h @ w.t(), t), hidden, weight, targets))
    flops = 3 * 2 * N * H * V  # the forward matmul and the two backward ones
    rows.append((f"linear+CE fwd+bwd N={N} H={H} V={V}", "materialised logits", ms, ref_ms,
                 f"{flops / ms / 1e9:.0f} vs {flops / ref_ms / 1e9:.0f} TFLOP/s",
                 f"{mem / GiB:.2f} vs {ref_mem / GiB:.2f} GiB = {mem / ref_mem:.2f}x (goal <= 0.25x)",
                 f"time {ms / ref_ms:.2f}x (goal <= 1.1x)"))


def gpu_main() -> None:
    rows = []
    for bench in (bench_attention, bench_cross_entropy, bench_linear_cross_entropy):
        bench(rows)
        torch.cuda.empty_cache()
    for row in rows:
        case, against, ms, ref_ms, tput, mem, ratio = row
        print(f"{case:<45} vs {against:<22} {ms:8.3f} ms vs {ref_ms:8.3f} ms  {ratio}  {tput}  {mem}")
    print(f"\n### {torch.cuda.get_device_name()}, {datetime.date.today()}, torch {torch.__version__}, "
          f"triton {triton.__version__}\n")
    print("| case | against | ours ms | theirs ms | ratio | throughput | peak memory |")
    print("|---|---|---|---|---|---|---|")
    for case, against, ms, ref_ms, tput, mem, ratio in rows:
        print(f"| {case} | {against} | {ms:.3f} | {ref_ms:.3f} | {ratio} | {tput} | {mem} |")


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def interpreter_main() -> None:
    """Toy sizes, one run each in the interpreter: a correctness smoke test, not a benchmark."""
    print("No CUDA GPU: running the kernels once in Triton's CPU interpreter at toy sizes as a correctness "
          "check.\nNo GPU figures were taken; interpreter times say nothing about GPU speed.\n")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 77, 64, generator=g, dtype=torch.float16).requires_grad_() for _ in range(3))
    lengths = torch.tensor([77, 50])
    ours = triton_attention(q, k, v, causal=True, key_lengths=lengths)
    grads = torch.autograd.grad(ours.float().sum(), (q, k, v))
    ref_in = [x.detach().float().requires_grad_() for x in (q, k, v)]
    ref = ops.attention(*ref_in, True, key_lengths=lengths, backend="math")
    ref_grads = torch.autograd.grad(ref.sum(), ref_in)
    print(f"attention fp16 B=2 nh=2 T=77 hs=64 causal, padded: max |out - math| = "
          f"{max_error(ours, ref):.1e}, max |grad - math| = "
          f"{max(max_error(a, b) for a, b in zip(grads, ref_grads)):.1e}")

    logits = (3 * torch.randn(64, 1000, generator=g)).to(torch.float16).requires_grad_()
    targets = torch.randint(0, 1000, (64,), generator=g)
    targets[::7] = -100
    loss = triton_cross_entropy(logits, targets)
    grad, = torch.autograd.grad(loss, logits)
    ref_logits = logits.detach().float().requires_grad_()
    ref_loss = F.cross_entropy(ref_logits, targets)
    ref_grad, = torch.autograd.grad(ref_loss, ref_logits)
    print(f"cross-entropy fp16 N=64 V=1000: |loss - torch| = {max_error(loss, ref_loss):.1e}, "
          f"max |grad - torch| = {max_error(grad, ref_grad):.1e}")

    hidden = torch.randn(64, 48, generator=g, requires_grad=True)
    weight = (torch.randn(1000, 48, generator=g) / 7).requires_grad_()
    loss = linear_cross_entropy(hidden, weight, targets, chunk_size=24)
    grads = torch.autograd.grad(loss, (hidden, weight))
    ref_loss = F.cross_entropy(hidden @ weight.t(), targets)
    ref_grads = torch.autograd.grad(ref_loss, (hidden, weight))
    print(f"linear+CE fp32 N=64 H=48 V=1000, chunks of 24: |loss - materialised| = "
          f"{max_error(loss, ref_loss):.1e}, max |grad - materialised| = "
          f"{max(max_error(a, b) for a, b in zip(grads, ref_grads)):.1e}")


if __name__ == "__main__":
    if GPU:
        gpu_main()
    else:
        interpreter_main()
