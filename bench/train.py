"""Throughput of train.py's step against a bare PyTorch loop on the same model shape.

    python bench/train.py                      # CPU: the default config's model shape
    python bench/train.py --device=cuda --gpt2 --compile   # GPU: a GPT-2-124M-shaped model at T=1024
    python bench/train.py --dtype=bfloat16     # CPU with bf16 autocast (config/mixed.py's, where the CPU has bf16)

Both sides run the same GPT with the same batch shape and AdamW. train.py's side goes through everything
the script does per step: batches drawn from the packed memmaps (data.Batches), the token-weighted
backward of every micro-batch (training.backward_token_weighted), the per-task loss bookkeeping, gradient
clipping and the learning-rate update. The bare side is the minimal loop: random ids already in memory,
model(x, y), backward, step. The ratio says what our machinery costs; the goal is >= 0.95x.
Both read windows of one text stream, so attention is plain causal on both sides (packed instruction
rows add a block-diagonal mask; that is a property of the data, not overhead of the loop).
On CUDA it also prints MFU against the GPU's bf16 peak (pass --peak_tflops for other GPUs).
"""
import argparse
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from minimm.data import Batches, Split  # noqa: E402
from minimm.pack import build_dataset  # noqa: E402
from minimm.formats import Example  # noqa: E402
from minimm.gpt import GPT, GPTConfig  # noqa: E402
from minimm.tokenizer import Tokenizer  # noqa: E402
from minimm.training import backward_token_weighted, configure_optimizer, learning_rate_at  # noqa: E402


def text_dataset(folder: Path, vocab_size: int, n_tokens: int) -> Tokenizer:
    """A packed dataset of one long text stream, tokenized with a small trained BPE."""
    from pydoc_data.topics import topics
    text = "\n".join(topics[k] for k in sorted(topics))
    tok = Tokenizer.train(text[:300_000], vocab_size)
    copies = max(1, n_tokens // max(1, len(tok.encode(text))) + 1)
    docs = [Example(task="text", turns=[("text", text)]) for _ in range(copies)]
    build_dataset({"train": docs}, tok, folder, {"bench": 1}, {"train": []}, log=lambda *_: None)
    return tok


def timed(step_fn, first: int, steps: int, device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(first, first + steps):
        step_fn(i)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def race(a, b, steps: int, warmup: int, rounds: int, device: str) -> tuple[float, float]:
    """Best time of `steps` steps for a and for b, in rounds that alternate which side goes first, so that
    a busy machine (or a warm cache) favours neither."""
    timed(a, 0, warmup, device)
    timed(b, 0, warmup, device)
    best = {"a": float("inf"), "b": float("inf")}
    for r in range(rounds):
        for name in ("ab" if r % 2 == 0 else "ba"):
            fn = a if name == "a" else b
            best[name] = min(best[name], timed(fn, warmup + r * steps, steps, device))
    return best["a"], best["b"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch_size", type=int, default=16)
    ap.add_argument("--block_size", type=int, default=256)
    ap.add_argument("--n_layer", type=int, default=4)
    ap.add_argument("--n_head", type=int, default=4)
    ap.add_argument("--n_embd", type=int, default=256)
    ap.add_argument("--vocab_size", type=int, default=2048)
    ap.add_argument("--gpt2", action="store_true", help="GPT-2 124M shape: 12 layers, 12 heads, 768, T=1024")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="autocast dtype of both sides; auto: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--peak_tflops", type=float, default=989.0, help="bf16 dense peak (H100 SXM: 989)")
    args = ap.parse_args()
    if args.gpt2:
        args.n_layer, args.n_head, args.n_embd, args.block_size, args.vocab_size = 12, 12, 768, 1024, 50304 - 11
    device = args.device
    if args.dtype == "auto":
        args.dtype = "bfloat16" if device.startswith("cuda") else "float32"
    autocast = (nullcontext() if args.dtype == "float32"
                else torch.autocast(device.split(":")[0], dtype=torch.bfloat16))
    tokens_per_step = args.batch_size * args.block_size

    with tempfile.TemporaryDirectory() as tmp:
        vocab = min(args.vocab_size, 4096)  # the BPE for the stream; the model's vocab is set below
        tok = text_dataset(Path(tmp), vocab, tokens_per_step * 4)
        batches = Batches(Split(tmp, "train", args.block_size), args.batch_size, seed=0)
        config = GPTConfig(vocab_size=max(args.vocab_size, tok.vocab_size), block_size=args.block_size,
                           n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd)

        def make():
            torch.manual_seed(0)
            model = GPT(config).to(device)
            optimizer = configure_optimizer(model, 0.1, 1e-3, (0.9, 0.95), device.split(":")[0])
            return (torch.compile(model) if args.compile else model), optimizer

        model, optimizer = make()
        bare_model, bare_optimizer = make()
        scaler = torch.amp.GradScaler(device.split(":")[0], enabled=False)

        def ours(step: int) -> None:
            lr = learning_rate_at(step, 1e-3, 1e-5, 10, 1000)
            for group in optimizer.param_groups:
                group["lr"] = lr
            micro = [batches.get(step).to(device)]
            task_loss, task_count = backward_token_weighted(model, micro, len(tok.tasks), autocast, scaler)
            (task_loss.sum() / task_count.sum()).item()  # train.py reads the loss every step
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        x = torch.randint(0, tok.vocab_size, (args.batch_size, args.block_size), device=device)
        y = torch.randint(0, tok.vocab_size, (args.batch_size, args.block_size), device=device)

        def bare(step: int) -> None:
            with autocast:
                _, loss = bare_model(x, y)
            loss.backward()
            bare_optimizer.step()
            bare_optimizer.zero_grad(set_to_none=True)

        t_ours, t_bare = race(ours, bare, args.steps, args.warmup, args.rounds, device)

    name = torch.cuda.get_device_name() if device.startswith("cuda") else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}; model: {args.n_layer} layers, {args.n_embd} wide, T={args.block_size}, "
          f"batch {args.batch_size}, vocab {config.vocab_size}, {args.dtype}{', compiled' if args.compile else ''}")
    ours_tps, bare_tps = tokens_per_step * args.steps / t_ours, tokens_per_step * args.steps / t_bare
    print(f"train.py step : {ours_tps:12,.0f} tokens/s")
    print(f"bare loop     : {bare_tps:12,.0f} tokens/s")
    print(f"ratio         : {ours_tps / bare_tps:.3f}x (goal >= 0.95x)")
    if device.startswith("cuda"):
        flops = GPT(config).flops_per_token(args.block_size)
        print(f"MFU (train.py step): {ours_tps * flops / (args.peak_tflops * 1e12):.1%} of {args.peak_tflops} TFLOP/s")


if __name__ == "__main__":
    main()
