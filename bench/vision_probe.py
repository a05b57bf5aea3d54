"""How fast does the default image encoder learn the bundled pictures on its own? Against a small CNN.

    python bench/vision_probe.py                          # the default config's ViT + projector vs a CNN
    python bench/vision_probe.py --steps 1500 --n_train 20000 --word_weight 0
    python bench/vision_probe.py --models run --from_run out/mixed   # what a trained run's image tokens carry

The default run asks the GPT questions about pictures, and its answers are only as good as what the image
tokens carry. This bench takes the language model out: the config's ViT and projector (config/mixed.py: 48
pixels, 8-pixel patches, pixel shuffle 2 -> 9 tokens, one per cell of the 3x3 grid that prepare/shapes.py
places shapes on) are trained with linear heads straight on the answers' raw material:
- per token: the colour of the shape whose centre is in that cell (or "none"), and its shape name;
- per picture, for the text images: which of the WORDS it shows (one head over all 9 tokens);
- with --letter_weight, per token of a text image: which letters have their centre in its cell (F1 printed).
The same data and batches train a small CNN with the same 3x3 output grid, the usual peer when a vision
model must learn from few images: convolutions build in locality and translation equivariance, which a
ViT has to learn (Dosovitskiy et al. 2020, "An Image is Worth 16x16 Words",
https://arxiv.org/abs/2010.11929, section 4.2; Xiao et al. 2021, "Early Convolutions Help Transformers
See Better", https://arxiv.org/abs/2106.14881).

With `--models run --from_run OUT_DIR` the encoder is a trained run's own ViT and projector, frozen: only
the linear heads learn, so the accuracies say what its image tokens carry (a linear probe, Alain & Bengio
2016, https://arxiv.org/abs/1610.01644), whatever the GPT makes of them.

It prints held-out accuracy as training goes and, at the end, the ViT / CNN ratio. What it taught us
(EXPERIMENTS.md): colour and place are learned in a few hundred steps; with Muon and no word head the ViT
alone tells the shapes apart (0.90 per cell after 19,000 pictures), but the default run's image tokens, which
learn only through the GPT's answers, carry them at about 0.4: the encoder can learn shapes, and the answers
teach it too little of them. So the default run now trains its encoder on these heads first
(`vision_pretrain_iters`, prepare/vision_pretrain.py, which holds the heads and the training loop used here).
"""
import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from minimm.chat import load_model  # noqa: E402
from minimm.config import load_config  # noqa: E402
from minimm.multimodal import MultimodalGPT, model_args_from_config  # noqa: E402
from prepare.shapes import WORDS, split_seed  # noqa: E402
from prepare.vision_pretrain import GRID, Probe, fit, scenes  # noqa: E402


class ViTEncoder(nn.Module):
    """The default model's image path, built by MultimodalGPT from the config: ViT, then the projector
    (pixel shuffle, MLP, the image tokens' positions, norm). The GPT it also builds is dropped."""

    def __init__(self, cfg) -> None:
        super().__init__()
        model = MultimodalGPT.from_args(model_args_from_config(cfg, vocab_size=2, image_token_id=0,
                                                               audio_token_id=1, audio=False))
        self.vit, self.projector = model.vision, model.image_projector
        side = cfg.image_size // cfg.patch_size // cfg.pixel_shuffle
        if side != GRID:
            raise SystemExit(f"image_size {cfg.image_size} / patch_size {cfg.patch_size} / pixel_shuffle "
                             f"{cfg.pixel_shuffle} gives {side}x{side} image tokens; this probe needs 3x3")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.projector(self.vit(images))  # (B, 3, H, W) -> (B, 9, C)


class TrainedEncoder(nn.Module):
    """A trained run's image path (out_dir/ckpt.pt: its ViT and projector), frozen."""

    def __init__(self, out_dir: str, image_size: int, n_embd: int) -> None:
        super().__init__()
        model = load_model(out_dir)[0]
        self.vit, self.projector = model.vision, model.image_projector
        self.requires_grad_(False)
        shape = None if self.vit is None or self.vit.config.image_size != image_size else \
            tuple(self(torch.zeros(1, 3, image_size, image_size)).shape[1:])
        if shape != (GRID * GRID, n_embd):
            raise SystemExit(f"{out_dir}: its image tokens for {image_size}-pixel pictures are {shape}, the "
                             f"probe needs {(GRID * GRID, n_embd)}: pass the run's own --config")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.projector(self.vit(images))  # (B, 3, H, W) -> (B, 9, C)


class CNNEncoder(nn.Module):
    """Four 3x3 convolutions, three with stride 2, then 2x2 average pooling: 48 -> 24 -> 12 -> 6 -> 3."""

    def __init__(self, out_dim: int) -> None:
        super().__init__()
        widths = (3, 32, 64, 128, out_dim)
        layers = []
        for i in range(4):
            layers += [nn.Conv2d(widths[i], widths[i + 1], 3, stride=1 if i == 0 else 2, padding=1), nn.GELU()]
        self.net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(GRID))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images).flatten(2).transpose(1, 2)  # (B, 3, H, W) -> (B, C, 3, 3) -> (B, 9, C)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="config/mixed.py", help="the model sizes come from here")
    parser.add_argument("--steps", type=int, default=900)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3, help="the ViT's rate in config/mixed.py: 2e-3 x 0.5")
    parser.add_argument("--n_train", type=int, default=8000)
    parser.add_argument("--n_val", type=int, default=500)
    parser.add_argument("--word_weight", type=float, default=1.0, help="0: train colour and shape only")
    parser.add_argument("--letter_weight", type=float, default=0.0, help="> 0: also which letters lie in each cell of "
                        "a text picture (prepare/vision_pretrain.py; config/mixed.py's vision_pretrain_letters)")
    parser.add_argument("--eval_every", type=int, default=300)
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--models", default="vit,cnn", help="which encoders to train, in this order: vit, "
                        "cnn, run (--from_run's frozen encoder)")
    parser.add_argument("--from_run", default="", help="a train.py out_dir, for --models run")
    parser.add_argument("--optimizer", default="adamw", choices=["adamw", "muon"], help="minimm/muon.py")
    parser.add_argument("--decay", action="store_true", help="warm up to --lr, then decay linearly, as "
                        "train.py's vision pretraining does (prepare/vision_pretrain.py)")
    args = parser.parse_args()
    names = args.models.split(",")
    if not set(names) <= {"vit", "cnn", "run"}:
        parser.error(f"--models={args.models}: choose from vit, cnn, run")
    if "run" in names and not args.from_run:
        parser.error("--models run needs --from_run OUT_DIR (a trained run)")
    cfg = load_config([args.config])
    start = time.perf_counter()
    train_set = scenes(split_seed(args.seed, "train"), args.n_train, cfg.image_size)
    val_set = scenes(split_seed(args.seed, "val"), args.n_val, cfg.image_size)
    print(f"{args.n_train} training and {args.n_val} held-out pictures of {cfg.image_size} pixels drawn in "
          f"{time.perf_counter() - start:.0f} s; {args.steps} steps of {args.batch_size} pictures each "
          f"({args.steps * args.batch_size / args.n_train:.1f} passes)")
    results = {}
    encoders = {"vit": lambda: ViTEncoder(cfg), "cnn": lambda: CNNEncoder(cfg.n_embd),
                "run": lambda: TrainedEncoder(args.from_run, cfg.image_size, cfg.n_embd)}
    for name in names:
        torch.manual_seed(args.seed)
        encoder = encoders[name]()
        probe = Probe(encoder, cfg.n_embd)
        trained = sum(p.numel() for p in encoder.parameters() if p.requires_grad)
        print(f"{name}: {sum(p.numel() for p in encoder.parameters()):,} encoder parameters, {trained:,} trained")
        results[name] = fit(probe, train_set, val_set, args.steps, args.batch_size, args.lr, args.optimizer,
                            args.word_weight, args.seed, args.eval_every, decay=args.decay,
                            log=lambda line: print(f"{name:>4} {line}"), letter_weight=args.letter_weight)
    print("\nheld-out accuracy after the last step (chance: shape 0.20, word 1/%d)" % len(WORDS))
    print(f"{'':>6}{'colour':>8}{'shape':>8}{'word':>8}{'letters':>8}{'pictures/s':>12}")  # letters: F1 per cell
    for name, (acc, speed) in results.items():
        print(f"{name:>6}{acc['color']:8.2f}{acc['shape']:8.2f}{acc['word']:8.2f}{acc['letters']:8.2f}{speed:12.0f}")
    if not {"vit", "cnn"} <= set(results):
        return
    vit, cnn = results["vit"][0], results["cnn"][0]
    ratios = {k: f"{vit[k] / cnn[k]:.2f}x" if cnn[k] > 0 else "n/a (CNN at 0)" for k in ("color", "shape", "word")}
    print(f"ViT / CNN: colour {ratios['color']}, shape {ratios['shape']}, word {ratios['word']}")


if __name__ == "__main__":
    main()
