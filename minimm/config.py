"""Configuration: defaults in one dataclass, a config file of plain Python, then --key=value overrides.

What this file teaches:
- nanoGPT's convention (`python train.py config/mixed.py --batch_size=32`) with its two sharp edges filed
  off: an unknown key is an error that names the key and the closest known ones (a typo never silently
  trains the wrong model), and a value of the wrong type is an error that names the key, the expected
  type and the given one.
- Defaults live in one place, `TrainConfig`; a config file only lists what it changes.
- The resolved config is printed and saved beside the run's outputs (and inside each checkpoint).

Values on the command line are parsed with `ast.literal_eval` (`--lr=3e-4`, `--tasks=['text','code']`,
`--compile=True`); anything that is not a Python literal is taken as a bare string (`--device=cuda`).
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from minimm.lora import DEFAULT_TARGETS as DEFAULT_LORA_TARGETS


@dataclass
class TrainConfig:
    # where things go
    out_dir: str = "out/mixed"
    dataset: str = "mixed"  # data lives in data_dir/dataset
    data_dir: str = "data"
    train_files: list = field(default_factory=list)  # your own .jsonl/.txt files; empty: the bundled default
    val_files: list = field(default_factory=list)  # empty: a val_fraction of train_files is held out
    val_fraction: float = 0.05
    media_dir: str = ""  # images/audio paths in JSONL are relative to this (default: the JSONL's folder)
    init_from: str = "scratch"  # "scratch", "resume" (out_dir/ckpt.pt), or another run dir to start from
    # data and tokenizer
    tasks: list = field(default_factory=lambda: ["text", "code", "image", "audio"])
    vocab_size: int = 2048  # BPE merges learned from the training split (special tokens come on top)
    tokenizer_from: str = ""  # a run dir (its ckpt.pt) or data dir whose tokenizer is reused; "": train one
    data_seed: int = 1337
    data_scale: float = 1.0  # multiplies how many bundled examples prepare/mixed.py makes
    max_bad_fraction: float = 0.1
    strict: bool = False  # stop at the first unreadable image or audio file instead of skipping it
    task_weights: dict = field(default_factory=dict)  # {task: weight}: how often packed examples are drawn
    # {task: weight}: how much each of its supervised tokens counts in the loss (default 1; minimm/training.py)
    task_loss_weights: dict = field(default_factory=dict)
    n_images: int = 4000  # bundled pictures (training split; times data_scale); a tenth as many held out, at least 50
    # the share of the bundled training answers that need no lookup (a count, the colour or place of the only shape)
    # that are kept (prepare/shapes.py)
    image_easy_keep: float = 1.0
    n_read_images: int = 0  # more training pictures of a word alone, "What does the text say?" (prepare/shapes.py)
    # {"color": n}: a bundled training scene asks the colour of up to n of its shapes, not one; {"where": n} the place
    # of up to n of its colours (prepare/shapes.py)
    image_lookups: dict = field(default_factory=dict)
    # {kind: n}: each bundled training row of that question kind ("describe", ...) is written n times, so it is drawn
    # n times as often as the task's other rows (prepare/mixed.py)
    image_repeats: dict = field(default_factory=dict)
    n_audio: int = 2000  # bundled audio clips (training split; times data_scale)
    # model
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 256
    dropout: float = 0.0
    bias: bool = True
    pos_emb: str = "rope"
    activation: str = "gelu"  # the GPT's MLP: "gelu" or "relu2" (gpt.GPTConfig.activation)
    qk_norm: bool = False  # RMS-normalise each head's queries and keys before attention (gpt.GPTConfig.qk_norm)
    smear: int = 1  # each input also carries learned maps of the previous 1 or 2 inputs (gpt.GPT.smear_previous)
    # vision encoder, used when the data has images
    image_size: int = 48
    patch_size: int = 8
    resize: str = "pad"  # "pad" to square or centre-"crop"
    vit_n_layer: int = 3
    vit_n_head: int = 4
    vit_n_embd: int = 128
    pixel_shuffle: int = 1  # merge s x s patches into one token: s^2 fewer image tokens
    image_pos_emb: bool = True  # each image token's place, learned in the GPT's space (projector.Projector)
    audio_pos_emb: bool = True  # each audio token's place in time, learned in the GPT's space (Projector)
    projector_norm: bool = True  # projected image and audio tokens enter the GPT at a set, large scale (Projector)
    # the bundled pictures ask each question before the image ("What color is the triangle?\n<image>"), one row per
    # question, and sample.py / the chat page put a picture after the question (prepare/shapes.py). With your own
    # train_files, set it to match where your data puts <image>
    image_after_question: bool = False
    # with image_after_question, the question is asked again after the picture ("What color is the triangle?\n<image>\n
    # What color is the triangle?"): the image tokens read it before them, the answer right beside it (on in
    # config/mixed.py; prepare/shapes.py, EXPERIMENTS.md)
    repeat_question: bool = False
    vision_pretrain_iters: int = 0  # steps training the ViT + projector on labelled bundled pictures first
    vision_pretrain_lr: float = 0.0  # > 0: that pretraining warms up to this rate, then decays linearly (0: it runs
    # at learning_rate x media_lr_scale throughout; prepare/vision_pretrain.py)
    vision_pretrain_words: float = 0.0  # > 0: that pretraining also learns the words, its loss weighted by this
    vision_pretrain_letters: float = 0.0  # > 0: ... and the letters in each cell of a text picture (weight)
    # audio encoder, used when the data has audio
    audio_n_layer: int = 3
    audio_n_head: int = 4
    audio_n_embd: int = 128
    audio_stack: int = 1  # merge k neighbouring audio encoder frames into one token: k times fewer
    # what trains
    freeze_vision: bool = False
    freeze_audio: bool = False
    freeze_llm: bool = False
    freeze_projector: bool = False
    # LoRA / QLoRA (lora_rank = 0: off)
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: list = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))
    lora_quantize: typing.Optional[str] = None  # None, "nf4" or "int8": the frozen base weights
    lora_trainable: list = field(default_factory=lambda: ["projector"])  # trained fully beside the adapters
    # optimisation
    batch_size: int = 16
    gradient_accumulation_steps: int = 1
    max_iters: int = 2000
    learning_rate: float = 1e-3
    media_lr_scale: float = 1.0  # the image/audio encoders' and projectors' learning rate, as a multiple
    min_lr: float = 1e-5
    warmup_iters: int = 100
    lr_decay_iters: typing.Optional[int] = None  # None: max_iters
    warmdown_frac: float = 0.0  # 0: cosine after the warmup; > 0: the full rate, then linear over this last share
    optimizer: str = "adamw"  # or "muon": Muon for the Linear weights, AdamW for the rest (minimm/muon.py)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    # > 0: add this times -log(1 - p) of each wrong induction copy to the loss (minimm/unlikelihood.py)
    unlikelihood: float = 0.0
    # > 0: from seq_unlikelihood_from x lr_decay_iters on, each step the model also answers a few training prompts
    # greedily and this times -log(1 - p) of every token of a repeated n-gram of its answers joins the loss
    # (minimm/unlikelihood.py, sequence_unlikelihood)
    seq_unlikelihood: float = 0.0
    seq_unlikelihood_from: float = 0.7
    # evaluation and logging
    eval_interval: int = 250
    eval_iters: int = 10
    eval_samples: int = 50  # held-out prompts per task for the task metrics at the end
    eval_media_samples: int = 250  # held-out image / audio questions per task (several question kinds)
    log_interval: int = 10
    wandb_log: bool = False
    wandb_project: str = "minimm"
    # system
    device: str = "auto"  # auto: cuda > mps > cpu
    dtype: str = "auto"  # auto: bfloat16 on CUDA when supported, else float16 on CUDA, float32 elsewhere
    compile: bool = False
    kernels: str = "auto"  # "auto", "triton", "torch": see minimm/ops.py
    seed: int = 1337


class ConfigError(ValueError):
    pass


def _type_ok(value, annotation) -> bool:
    """Does value fit the annotated type? An int is accepted where a float is expected."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, origin or annotation)


def _type_name(annotation) -> str:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(annotation))
    return "None" if annotation is type(None) else getattr(annotation, "__name__", str(annotation))


def parse_value(text: str):
    """'3e-4' -> 0.0003, "['a','b']" -> list, 'True' -> True; anything else stays the string itself."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_overrides(config, overrides: dict, source: str):
    """Set each key of overrides on the dataclass instance, checking names and types; return config."""
    hints = typing.get_type_hints(type(config))
    for key, value in overrides.items():
        if key not in hints:
            close = difflib.get_close_matches(key, list(hints), n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"unknown config key '{key}' (from {source}){hint}")
        if isinstance(value, int) and not isinstance(value, bool) and hints[key] is float:
            value = float(value)
        if not _type_ok(value, hints[key]):
            raise ConfigError(f"config key '{key}' (from {source}) expects {_type_name(hints[key])}, "
                              f"got {type(value).__name__} {value!r}")
        setattr(config, key, value)
    return config


def load_config(argv: list[str], config_cls=TrainConfig):
    """Build a config from the command line: [config_file.py] [--key=value | --key value ...].

    A config file is plain Python; every top-level name that does not start with '_' is a setting.
    For keys of type str the text is taken as it is (so --prompt 42 is the string "42").
    """
    config = config_cls()
    hints = typing.get_type_hints(config_cls)
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg.startswith("--"):
            key, sep, value = arg[2:].partition("=")
            if not sep:
                if not args:
                    raise ConfigError(f"'{arg}' needs a value: --{key}=VALUE or --{key} VALUE")
                value = args.pop(0)
            parsed = value if hints.get(key) is str else parse_value(value)
            apply_overrides(config, {key: parsed}, "the command line")
        else:
            path = Path(arg)
            if not path.is_file():
                raise ConfigError(f"config file not found: {arg}")
            namespace: dict = {"__file__": str(path)}  # so a config can build on its neighbours
            exec(compile(path.read_text(), str(path), "exec"), namespace)
            settings = {k: v for k, v in namespace.items()
                        if not k.startswith("_") and not isinstance(v, types.ModuleType)}
            apply_overrides(config, settings, str(path))
    return config


def to_dict(config) -> dict:
    return dataclasses.asdict(config)


def describe(config) -> str:
    """The resolved config, one key per line, for the log."""
    width = max(len(k) for k in to_dict(config))
    return "\n".join(f"  {k:<{width}} = {v!r}" for k, v in to_dict(config).items())


def save_config(config, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(to_dict(config), indent=2) + "\n")
    tmp.replace(path)
