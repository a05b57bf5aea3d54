"""Train the same model twice, with kernels="torch" and with kernels="triton", and compare the loss curves.

    python bench/kernels_train_curve.py                       # on a CUDA GPU: 300 steps, config/mixed.py
    python bench/kernels_train_curve.py --config=config/mixed_gpu.py --steps=500

A kernel can match its reference on every unit test and still hurt training (a gradient off by a
little everywhere, a mask wrong only at some length). This is the end-to-end check: same seed, same
model, same batches, only minimm.ops' backend differs. The curves should lie on top of each other; in
bf16 they drift apart by rounding noise only (the two backends add in different orders), so the script
prints both curves and the largest relative difference between them.

The data is synthetic so that the script needs nothing but the repository: token sequences walked
through a fixed random Markov chain in which every token has SUCCESSORS possible next tokens. The loss
can fall from ln(vocab_size) to ln(SUCCESSORS), so the curve has a shape worth comparing.

Without a GPU it runs a tiny model for a few steps in Triton's CPU interpreter: a smoke test of the
script and of the kernels inside a real model, not a loss curve worth reading.
"""
import argparse
import math
import os
import runpy
import sys

import torch

GPU = torch.cuda.is_available()
if not GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
from minimm import ops  # noqa: E402
from minimm.gpt import GPT, GPTConfig  # noqa: E402

SUCCESSORS = 4  # next tokens each token can have: the loss floor is ln(4) = 1.39 nats
MODEL_KEYS = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd")


def markov_batch(successors: torch.Tensor, batch_size: int, T: int,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets), each (B, T), walked through the chain successors: (V, SUCCESSORS)."""
    V = successors.shape[0]
    tokens = torch.empty(batch_size, T + 1, dtype=torch.long)
    tokens[:, 0] = torch.randint(0, V, (batch_size,), generator=generator)
    choice = torch.randint(0, SUCCESSORS, (batch_size, T), generator=generator)
    for t in range(T):
        tokens[:, t + 1] = successors[tokens[:, t], choice[:, t]]
    return tokens[:, :-1], tokens[:, 1:]


def train(backend: str, config: GPTConfig, steps: int, batch_size: int, lr: float, seed: int,
          device: str) -> list[float]:
    """Loss after each step of AdamW on the Markov data, with every attention and loss on `backend`."""
    ops.set_backend(backend, device)
    torch.manual_seed(seed)
    model = GPT(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    data = torch.Generator().manual_seed(seed + 1)
    successors = torch.randint(0, config.vocab_size, (config.vocab_size, SUCCESSORS), generator=data)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda")
    losses = []
    for step in range(steps):
        x, y = (t.to(device) for t in markov_batch(successors, batch_size, config.block_size, data))
        with autocast:
            _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=os.path.join(ROOT, "config", "mixed.py"),
                        help="config file whose model sizes, batch_size and learning_rate are used")
    parser.add_argument("--steps", type=int, default=300 if GPU else 3)
    parser.add_argument("--seed", type=int, default=1337)
    args = parser.parse_args()
    if GPU:
        values = runpy.run_path(args.config)
        config = GPTConfig(**{k: values[k] for k in MODEL_KEYS if k in values})
        batch_size, lr, device = values.get("batch_size", 16), values.get("learning_rate", 1e-3), "cuda"
        print(f"{torch.cuda.get_device_name()}: {args.config}, {args.steps} steps, bf16 autocast")
    else:
        config = GPTConfig(vocab_size=256, block_size=48, n_layer=1, n_head=2, n_embd=96)  # hs = 48
        batch_size, lr, device = 2, 1e-3, "cpu"
        print("No CUDA GPU: a smoke test in Triton's CPU interpreter, tiny model, fp32; not a loss curve "
              "worth reading, and no GPU figures were taken.")
    print(config)
    curves = {backend: train(backend, config, args.steps, batch_size, lr, args.seed, device)
              for backend in ("torch", "triton")}
    torch_curve, triton_curve = curves["torch"], curves["triton"]
    rel = [abs(a - b) / abs(a) for a, b in zip(torch_curve, triton_curve)]
    every = max(1, args.steps // 20)
    print(f"\n{'step':>6} {'torch':>9} {'triton':>9} {'rel diff':>9}")
    for step in list(range(0, args.steps, every)) + ([args.steps - 1] if (args.steps - 1) % every else []):
        print(f"{step:>6} {torch_curve[step]:9.4f} {triton_curve[step]:9.4f} {rel[step]:9.2e}")
    worst = max(range(args.steps), key=rel.__getitem__)
    print(f"\nmax relative difference {rel[worst]:.2e} at step {worst}; final losses {torch_curve[-1]:.4f} "
          f"(torch) vs {triton_curve[-1]:.4f} (triton); floor ln({SUCCESSORS}) = {math.log(SUCCESSORS):.4f}, "
          f"start ln({config.vocab_size}) = {math.log(config.vocab_size):.4f}")


if __name__ == "__main__":
    main()
