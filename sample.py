"""Ask a trained minimm model: any task the tokenizer knows, streamed token by token.

    python sample.py --task code --prompt "Return the larger of two numbers."
    python sample.py --task text --prompt "Explain the Python topic 'with'."
    python sample.py --task image --prompt "Generate an image of a koi pond."
    python sample.py --task text                    # no prompt: free generation from the task token
    python sample.py --out_dir=out/mixed --num_samples=3 --temperature=0.9 --top_k=50

The prompt is laid out exactly as in training (task token, user turn, assistant start) and each answer
stops at <|end|>. Without --temperature, each task uses its own default (low for code, higher for prose).
"""
import sys
from dataclasses import dataclass
from typing import Optional

import torch

from minimm.chat import DEFAULT_TEMPERATURE, ask, load_model
from minimm.config import ConfigError, load_config


@dataclass
class SampleConfig:
    out_dir: str = "out/mixed"
    task: str = "text"
    prompt: str = ""
    num_samples: int = 1
    max_new_tokens: int = 256
    temperature: Optional[float] = None  # None: the task's default
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    seed: int = 1337
    device: str = "auto"


def main(argv: list[str]) -> None:
    cfg = load_config(argv, SampleConfig)
    if cfg.device == "auto":
        cfg.device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(cfg.seed)
    try:
        model, tok, _ = load_model(cfg.out_dir, cfg.device)
    except FileNotFoundError as e:
        sys.exit(str(e))
    try:
        tok.task_token(cfg.task)
    except ValueError as e:
        sys.exit(str(e))
    temperature = cfg.temperature if cfg.temperature is not None else DEFAULT_TEMPERATURE.get(cfg.task, 0.8)
    for i in range(cfg.num_samples):
        if cfg.num_samples > 1:
            print(f"--- sample {i + 1}")
        if cfg.prompt:
            ask(model, tok, cfg.task, [("user", cfg.prompt)], cfg.max_new_tokens, temperature, cfg.top_k,
                cfg.top_p, on_text=lambda piece: print(piece, end="", flush=True))
        else:  # free generation: the model writes whole examples of the task, roles and all
            idx = torch.tensor([[tok.task_token(cfg.task)]], device=cfg.device)
            out = model.generate(idx, cfg.max_new_tokens, temperature, cfg.top_k, cfg.top_p, stop_tokens=(tok.eot,))
            print(tok.decode(out[0, 1:].tolist()).removesuffix("<|endoftext|>"), end="")
        print()


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except ConfigError as e:
        sys.exit(f"error: {e}")
