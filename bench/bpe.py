"""Benchmark of BPE training and of the tokenizer's encoding speed: prints times and ratios.

    python bench/bpe.py                      # 10 MB, vocab 8192; naive comparison on 1 MB, vocab 512
    python bench/bpe.py --mb 2 --vocab 4096 --naive-mb 0.5 --naive-vocab 300

What it measures, on text built offline from this Python's standard library (pydoc topics, then the
stdlib's .py files in sorted order, repeated if needed and cut to the requested size):
  1. the time of `train_bpe` at the requested vocab size (goal: <= 60 s for 10 MB at 8192 on one core);
  2. the speed-up of `train_bpe` over `train_bpe_naive` (which recounts every pair after every merge),
     on a smaller text and vocab so the naive loop finishes in reasonable time; both must agree, and
     both times include the same pre-split;
  3. `Tokenizer.encode` throughput against the raw tiktoken Encoding it wraps, as a ratio (goal >= 0.9).
The process is pinned to one CPU core when the OS allows it (os.sched_setaffinity, Linux).
"""
from __future__ import annotations

import argparse
import os
import sys
import sysconfig
import time
from pathlib import Path

import pydoc_data.topics

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from minimm.bpe import count_chunks, train_bpe, train_bpe_naive  # noqa: E402
from minimm.tokenizer import Tokenizer  # noqa: E402

MB = 1_000_000


def stdlib_text(n_chars: int) -> str:
    """About `n_chars` characters of the standard library's docs and source, the same on every run."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    parts = [pydoc_data.topics.topics[key] for key in sorted(pydoc_data.topics.topics)]
    total = sum(map(len, parts))
    for path in sorted(stdlib.rglob("*.py")):
        if total >= n_chars:
            break
        if "site-packages" in path.parts:
            continue
        source = path.read_text(encoding="utf-8", errors="replace")
        parts.append(source)
        total += len(source)
    text = "\n".join(parts)
    return (text * (n_chars // len(text) + 1))[:n_chars]


def timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=10.0, help="training text size for train_bpe (MB)")
    parser.add_argument("--vocab", type=int, default=8192, help="BPE vocab size for train_bpe")
    parser.add_argument("--naive-mb", type=float, default=1.0, help="text size for the naive comparison")
    parser.add_argument("--naive-vocab", type=int, default=512, help="vocab size for the naive comparison")
    args = parser.parse_args()

    if hasattr(os, "sched_setaffinity"):
        core = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {core})
        print(f"pinned to CPU core {core}")
    else:
        print("not pinned: os.sched_setaffinity is not available here")

    text = stdlib_text(int(args.mb * MB))
    print(f"text: {len(text) / MB:.1f} M characters, {len(text.encode()) / MB:.1f} MB of UTF-8")
    chunks, seconds = timed(count_chunks, text)
    print(f"pre-split   {seconds:.1f} s: {sum(chunks.values())} chunks, {len(chunks)} distinct (part of train_bpe)")
    ranks, seconds = timed(train_bpe, text, args.vocab)
    print(f"train_bpe   vocab {args.vocab} on {args.mb:g} MB: {seconds:.1f} s ({len(ranks)} ranks; goal <= 60 s)")

    small = text[: int(args.naive_mb * MB)]
    fast, fast_s = timed(train_bpe, small, args.naive_vocab)
    naive, naive_s = timed(train_bpe_naive, small, args.naive_vocab)
    print(f"vs naive    vocab {args.naive_vocab} on {args.naive_mb:g} MB: train_bpe {fast_s:.2f} s, "
          f"train_bpe_naive {naive_s:.1f} s, speed-up {naive_s / fast_s:.0f}x, "
          f"same ranks: {fast == naive}")

    tokenizer = Tokenizer(ranks)
    raw = tokenizer.encoding
    assert tokenizer.encode(text) == raw.encode_ordinary(text)
    # Alternate the two so that load from other processes hits both alike; keep each one's best time.
    times = [(timed(tokenizer.encode, text)[1], timed(raw.encode_ordinary, text)[1]) for _ in range(5)]
    ours_s, raw_s = min(t[0] for t in times), min(t[1] for t in times)
    print(f"encode      {len(text) / MB / ours_s:.2f} MB/s Tokenizer.encode, {len(text) / MB / raw_s:.2f} MB/s "
          f"tiktoken encode_ordinary: ratio {raw_s / ours_s:.2f}x (goal >= 0.9x)")


if __name__ == "__main__":
    main()
