"""Train minimm. One script for every task and modality; what it trains comes from the config.

    python train.py config/mixed.py                       # the bundled default, on whatever you have
    python train.py config/mixed.py --device=cpu --batch_size=8 --max_iters=200
    python train.py config/mixed.py --init_from=resume    # continue out_dir/ckpt.pt exactly
    torchrun --nproc_per_node=4 train.py config/mixed.py  # DistributedDataParallel over 4 GPUs
    python train.py config/mixed.py --device=opencl       # the text model on any OpenCL device

Read it top to bottom: config, devices, data (built first when missing or stale), model, optimizer, then
the loop: schedule, evaluation, token-weighted gradient accumulation, clipping, checkpoints.
"""
import json
import math
import os
import random
import re
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from minimm import ops
from minimm.chat import stop_tokens
from minimm.config import describe, load_config, save_config, to_dict
from minimm.data import Batches, Split
from minimm.pack import dataset_status
from minimm.evaluate import evaluate_tasks
from minimm.lora import apply_lora, count_parameters, lora_state_dict, mark_trainable, save_lora
from minimm.multimodal import MEDIA_PARTS, MultimodalGPT, model_args_from_config, set_trainable
from minimm.plot import plot_losses
from minimm.quant import memory_report
from minimm.tokenizer import Tokenizer
from minimm.training import (backward_sequence_unlikelihood, backward_token_weighted, backward_token_weighted_opencl,
                             configure_optimizer, evaluate_loss, learning_rate_at, load_checkpoint, save_checkpoint,
                             task_loss_weight_vector, unwrap)
from minimm.unlikelihood import answer_prompts

cfg = load_config(sys.argv[1:])

# ---- processes and devices -----------------------------------------------------------------------------
ddp = int(os.environ.get("RANK", -1)) != -1
rank, world_size = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
master = rank == 0
if cfg.device == "auto":
    cfg.device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
opencl = cfg.device.startswith("opencl")  # minimm/opencl trains the decoder; PyTorch holds it on the CPU
if ddp:
    if opencl:
        sys.exit("--device=opencl runs in one process; start it with python, not torchrun")
    torch.distributed.init_process_group(backend="nccl" if cfg.device.startswith("cuda") else "gloo")
    if cfg.device.startswith("cuda"):
        cfg.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(cfg.device)
device = "cpu" if opencl else cfg.device  # where PyTorch's tensors live
device_type = "cuda" if device.startswith("cuda") else device.split(":")[0]
if cfg.dtype == "auto":
    cfg.dtype = ("bfloat16" if torch.cuda.is_bf16_supported() else "float16") if device_type == "cuda" else "float32"
ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.dtype]
autocast = nullcontext() if ptdtype == torch.float32 else torch.autocast(device_type, dtype=ptdtype)
scaler = torch.amp.GradScaler(device_type, enabled=cfg.dtype == "float16")
torch.manual_seed(cfg.seed + rank)
backend = "opencl" if opencl else ops.set_backend(cfg.kernels, device)
out_dir = Path(cfg.out_dir)
log = tqdm.write if master else (lambda *a, **k: None)

# ---- data: built here when missing or stale ------------------------------------------------------------
data_dir = Path(cfg.data_dir) / cfg.dataset
base_ckpt = None
if cfg.init_from not in ("scratch", "resume"):  # a fine-tune reads its data as the base model was built
    base_ckpt = load_checkpoint(Path(cfg.init_from) / "ckpt.pt", device)
    base_config = base_ckpt["config"]
    for key in ("image_size", "patch_size", "pixel_shuffle", "resize", "audio_stack"):
        setattr(cfg, key, base_config[key])
    if cfg.train_files and not cfg.tokenizer_from:
        cfg.tokenizer_from = cfg.init_from  # with the base model's own vocabulary
    if cfg.block_size > base_config["block_size"]:
        sys.exit(f"block_size={cfg.block_size} exceeds the base model's {base_config['block_size']} ({cfg.init_from})")
elif cfg.init_from == "resume" and (out_dir / "config.json").is_file() and not cfg.tokenizer_from:
    cfg.tokenizer_from = json.loads((out_dir / "config.json").read_text())["tokenizer_from"]
if cfg.train_files:
    from prepare.jsonl import build, settings_from_config
elif cfg.dataset == "mixed" or cfg.dataset.startswith("mixed_"):  # the bundled builder's (config/mixed_gpu.py too)
    from prepare.mixed import build, settings_from_config
else:
    build = settings_from_config = None
if master:
    status = dataset_status(data_dir, settings_from_config(cfg)) if build else "ok"
    if status != "ok":
        log(f"dataset {data_dir} is {status}: building it")
        build(cfg, data_dir, log=log)
    elif not (data_dir / "meta.json").is_file():
        sys.exit(f"no dataset at {data_dir}: set train_files=[...] in the config or use dataset='mixed'")
if ddp:
    torch.distributed.barrier()
tok = Tokenizer.load(data_dir / "tokenizer")
try:
    loss_weights = task_loss_weight_vector(cfg.task_loss_weights, tok.tasks)
except ValueError as e:
    sys.exit(str(e))
train_split = Split(data_dir, "train", cfg.block_size, cfg.task_weights)
train_batches = Batches(train_split, cfg.batch_size, cfg.seed, rank, world_size)
val_batches = Batches(Split(data_dir, "val", cfg.block_size), cfg.batch_size, cfg.seed + 1)
tokens_per_step = cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps * world_size
if train_split.n_truncated or train_split.n_dropped:
    log(f"block_size {cfg.block_size}: {train_split.n_truncated} examples truncated (their start kept), "
        f"{train_split.n_dropped} with media left out")

# ---- model and optimizer -------------------------------------------------------------------------------
# the model sees what the data holds: a vision encoder when there are images, an audio one for audio
model_args = model_args_from_config(cfg, tok.vocab_size, tok.special("<|image|>"), tok.special("<|audio|>"),
                                    images=train_split.images is not None, audio=train_split.audio is not None)
start_step, ckpt = 0, None
if cfg.init_from == "resume":
    ckpt = load_checkpoint(out_dir / "ckpt.pt", device)
    model_args, start_step = ckpt["model_args"], ckpt["step"]
elif base_ckpt is not None:
    ckpt = base_ckpt  # fine-tune: weights only
    model_args = {**ckpt["model_args"], "gpt": {**ckpt["model_args"]["gpt"], "dropout": cfg.dropout}}
model = MultimodalGPT.from_args(model_args)
if ckpt is not None and cfg.init_from != "resume":
    model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()})
flops_per_token = model.gpt.flops_per_token()  # before QLoRA turns weights into buffers
if cfg.lora_rank > 0:  # after the base weights are in (QLoRA quantizes them), before the optimizer
    apply_lora(model, cfg.lora_targets, r=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
               quantize=cfg.lora_quantize)
if cfg.vision_pretrain_iters > 0 and getattr(model, "vision", None) is not None and ckpt is None:
    # a fresh run's image encoder first learns to see the bundled pictures (prepare/vision_pretrain.py)
    from prepare.vision_pretrain import pretrain_vision
    pretrain_vision(model.to(device), cfg, log)
elif cfg.freeze_vision and getattr(model, "vision", None) is not None and ckpt is None:
    log("freeze_vision=True on a fresh run without vision_pretrain_iters: the ViT stays as initialised")
set_trainable(model, freeze_vision=cfg.freeze_vision, freeze_audio=cfg.freeze_audio, freeze_llm=cfg.freeze_llm,
              freeze_projector=cfg.freeze_projector)
if cfg.lora_rank > 0 and cfg.lora_trainable:  # modules trained fully beside the adapters, if the model has them
    names = [n for n, _ in model.named_parameters()]
    present = [p for p in cfg.lora_trainable if any(re.search(p, n) for n in names)]
    if present:
        mark_trainable(model, present)
    if len(present) < len(cfg.lora_trainable):
        log(f"lora_trainable: nothing matches {sorted(set(cfg.lora_trainable) - set(present))} in this model")
if cfg.init_from == "resume":
    model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()})
model.to(device)
optimizer = configure_optimizer(model, cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), device_type,
                                lr_scales={part: cfg.media_lr_scale for part in MEDIA_PARTS}, optimizer=cfg.optimizer)
if cfg.init_from == "resume":
    optimizer.load_state_dict(ckpt["optimizer"])
    scaler.load_state_dict(ckpt["scaler"])
    torch.set_rng_state(ckpt["rng"]["torch"].cpu())
opencl_trainer = None
if opencl:
    if (model_args["vision"] or model_args["audio"] or cfg.lora_rank or cfg.dropout or cfg.optimizer != "adamw"
            or cfg.unlikelihood or cfg.seq_unlikelihood or loss_weights is not None):
        sys.exit("--device=opencl trains the text decoder with AdamW (no images, audio, LoRA, dropout, Muon, "
                 "unlikelihood, seq_unlikelihood or task_loss_weights yet)")
    from minimm.opencl import OpenCLGPT, OpenCLTrainer
    opencl_trainer = OpenCLTrainer(OpenCLGPT.from_torch(model.gpt, cfg.device), cfg.learning_rate,
                                   (cfg.beta1, cfg.beta2), cfg.weight_decay, cfg.grad_clip)
    if cfg.init_from == "resume":
        opencl_trainer.load_optimizer_state_dict(ckpt["optimizer"])
ckpt = base_ckpt = None  # free them
# the sequence-level unlikelihood asks the model the training split's text-only questions (minimm/unlikelihood.py)
seq_prompts = answer_prompts(data_dir, tok, cfg.block_size) if cfg.seq_unlikelihood > 0 else {}
if cfg.seq_unlikelihood > 0 and not seq_prompts:
    log("seq_unlikelihood > 0, but no text-only training example ends with an answer: nothing to ask, so it is off")
lr_decay_iters = cfg.lr_decay_iters or cfg.max_iters
seq_from = math.ceil(cfg.seq_unlikelihood_from * lr_decay_iters)  # a point of the schedule, as a resume sees it
trainable, total = count_parameters(model)
log(f"config:\n{describe(cfg)}")
log(f"model: {total:,} parameters, {trainable:,} trainable "
    f"({', '.join(n for n in ('vision', 'audio') if getattr(model, n, None) is not None) or 'text only'}); "
    f"decoder {flops_per_token / 1e6:.1f} MFLOP per token; kernels: {backend}; device {cfg.device} {cfg.dtype}")
if cfg.lora_quantize:
    report = memory_report(model)
    log(f"frozen base in {cfg.lora_quantize}: {report['quantized_bytes'] / 2**20:.2f} MiB vs "
        f"{report['fp32_bytes'] / 2**20:.2f} MiB in fp32 ({report['ratio']:.2f}x)")
if cfg.compile:
    model = torch.compile(model)
if ddp:
    # a batch without images leaves the vision encoder unused; DDP must be told that can happen
    model = DDP(model, device_ids=[torch.device(cfg.device).index] if device_type == "cuda" else None,
                find_unused_parameters=model_args["vision"] is not None or model_args["audio"] is not None)
if master:
    save_config(cfg, out_dir / "config.json")
wandb = None
if cfg.wandb_log and master:
    try:
        import wandb
        wandb.init(project=cfg.wandb_project, name=out_dir.name, config=to_dict(cfg))
    except ImportError:
        log("wandb_log=True but wandb is not installed: pip install wandb (logging to log.jsonl only)")


def sync_from_opencl() -> None:
    """The OpenCL trainer holds the weights being trained; PyTorch's copy evaluates and saves them."""
    if opencl_trainer:
        opencl_trainer.copy_to(model)


def checkpoint(step: int) -> None:
    if master:
        sync_from_opencl()
        lora = {"lora": lora_state_dict(unwrap(model))} if cfg.lora_rank > 0 else {}
        state = opencl_trainer.optimizer_state_dict() if opencl_trainer else optimizer.state_dict()
        save_checkpoint({"model": unwrap(model).state_dict(), "model_args": model_args,
                         "optimizer": state, "scaler": scaler.state_dict(), "step": step,
                         "rng": {"torch": torch.get_rng_state()}, "config": to_dict(cfg),
                         "tokenizer": tok.state(), **lora}, out_dir / "ckpt.pt")
        if lora:  # the adapters alone, to apply to the base model: sample.py --lora=out_dir/lora.pt
            save_lora(out_dir / "lora.pt", unwrap(model))


def write_log(record: dict) -> None:
    with open(out_dir / "log.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    if wandb:
        wandb.log(record, step=record["step"])


stop_requested = False


def request_stop(signum, frame):  # first Ctrl-C: finish the step, save, exit; second: stop at once
    global stop_requested
    if stop_requested:
        raise KeyboardInterrupt
    stop_requested = True


signal.signal(signal.SIGINT, request_stop)

# ---- the loop ------------------------------------------------------------------------------------------
step = start_step
lr = learning_rate_at(step, cfg.learning_rate, cfg.min_lr, cfg.warmup_iters, lr_decay_iters,
                      cfg.warmdown_frac)
bar = tqdm(total=cfg.max_iters, initial=step, disable=not master, dynamic_ncols=True, desc="train")
t_last, tokens_since = time.time(), 0
while step < cfg.max_iters and not stop_requested:
    lr = learning_rate_at(step, cfg.learning_rate, cfg.min_lr, cfg.warmup_iters, lr_decay_iters,
                          cfg.warmdown_frac)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)  # a checkpoint from before lr_scale has none
    if step % cfg.eval_interval == 0 and step > start_step and master:
        sync_from_opencl()
        val = evaluate_loss(unwrap(model), val_batches, cfg.eval_iters, tok.tasks, device, autocast)
        write_log({"step": step, "val": val, "lr": lr})
        checkpoint(step)

    seq_cost = None
    if seq_prompts and step >= seq_from:  # prompts drawn from (seed, step, rank): a resumed run asks the same
        seq_cost = backward_sequence_unlikelihood(model, seq_prompts, cfg.seq_unlikelihood,
                                                  random.Random(f"{cfg.seed}/{step}/{rank}"), stop_tokens(tok),
                                                  autocast, scaler, ddp)
    micro_batches = [train_batches.get(step * cfg.gradient_accumulation_steps + m).to(device)
                     for m in range(cfg.gradient_accumulation_steps)]
    if opencl_trainer:
        task_loss, task_count = backward_token_weighted_opencl(opencl_trainer, micro_batches, len(tok.tasks))
    else:
        task_loss, task_count = backward_token_weighted(model, micro_batches, len(tok.tasks), autocast, scaler,
                                                        world_size, ddp, cfg.unlikelihood, loss_weights)
    step_loss = (task_loss.sum() / task_count.sum().clamp(min=1)).item()
    if not torch.isfinite(torch.tensor(step_loss)):
        bar.close()
        sys.exit(f"loss became {step_loss} at step {step}; stopped without saving, so {out_dir / 'ckpt.pt'} "
                 f"still holds the last good weights. Try a lower learning_rate, a longer warmup_iters, "
                 f"grad_clip=1.0, or dtype=float32/bfloat16 instead of float16; then --init_from=resume.")
    if opencl_trainer:
        opencl_trainer.update(lr)  # clipping, AdamW and zeroing, on the device
    else:
        if cfg.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
    step += 1
    tokens_since += tokens_per_step
    if master and (step % cfg.log_interval == 0 or step == cfg.max_iters):
        tokens_per_sec = tokens_since / (time.time() - t_last)
        t_last, tokens_since = time.time(), 0
        per_task = {t: (task_loss[i] / task_count[i]).item() for i, t in enumerate(tok.tasks) if task_count[i] > 0}
        seq = {} if seq_cost is None else {"seq_unlikelihood": seq_cost}  # this step's, per answer token
        write_log({"step": step, "train": {"all": step_loss, **per_task}, "lr": lr, "tokens_per_sec": tokens_per_sec,
                   **seq})
        bar.set_postfix(loss=f"{step_loss:.3f}", lr=f"{lr:.1e}", tok_s=f"{tokens_per_sec:,.0f}")
    bar.update(1)
bar.close()

# ---- the end: checkpoint, final evaluation, loss curves -------------------------------------------------
checkpoint(step)
if stop_requested:
    log(f"interrupted at step {step}; saved {out_dir / 'ckpt.pt'} (continue with --init_from=resume)")
elif master:
    val = evaluate_loss(unwrap(model), val_batches, cfg.eval_iters, tok.tasks, device, autocast)
    write_log({"step": step, "val": val, "lr": lr})
    results = evaluate_tasks(unwrap(model), tok, data_dir, val, cfg, log=log)
    (out_dir / "eval.json").write_text(json.dumps(results, indent=2) + "\n")
    log("final evaluation:\n" + "\n".join(f"  {t}: {m}" for t, m in results.items()))
    plot_losses(out_dir / "log.jsonl", out_dir / "loss.png")
if ddp:  # every rank leaves together: one that tore its gloo connections down while rank 0 was still evaluating
    torch.distributed.barrier()  # (the 2-rank test once died of std::terminate there)
    torch.distributed.destroy_process_group()
