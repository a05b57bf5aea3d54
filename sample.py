"""Ask a trained minimm model: any task the tokenizer knows, streamed token by token.

    python sample.py --task code --prompt "Acquire the I/O thread lock." \
        --input "def acquire(self):" --temperature=0  # code: the instruction, the signature as its input
    python sample.py --task text --prompt "Explain the Python topic 'with'."
    python sample.py --task image --prompt "Generate an image of a koi pond."
    python sample.py --task image --image x.png [--prompt "How many shapes are there?"]
    python sample.py --task audio --audio clip.wav [--prompt "Which keys were pressed?"]
    python sample.py --out_dir=out/mixed --lora=out/lora/lora.pt --task text --prompt "..."
    python sample.py --device=opencl --task code --prompt "..."   # decode on any OpenCL device
    python sample.py --task text                    # no prompt: free generation from the task token
    python sample.py --out_dir=out/mixed --num_samples=3 --temperature=0.9 --top_k=50

The prompt is laid out exactly as in training (task token, user turn, assistant start) and each answer
stops at <|end|>. Without --temperature, each task uses its own default (low for code, higher for prose).
"""
import sys
from dataclasses import dataclass
from typing import Optional

import torch

from minimm.audio import load_audio_features
from minimm.chat import DEFAULT_QUESTION, DEFAULT_TEMPERATURE, ask, load_model, user_turn
from minimm.config import ConfigError, load_config
from minimm.formats import instruction_text
from minimm.vit import load_image


@dataclass
class SampleConfig:
    out_dir: str = "out/mixed"
    task: str = "text"
    prompt: str = ""
    input: str = ""  # an instruction's input (for code, the function's signature): after a blank line, as in training
    num_samples: int = 1
    max_new_tokens: int = 256
    temperature: Optional[float] = None  # None: the task's default
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    seed: int = 1337
    device: str = "auto"
    image: str = ""  # a picture to ask about (any format Pillow reads)
    audio: str = ""  # a WAV file to ask about
    lora: str = ""  # an adapter file to apply on top of the checkpoint


def main(argv: list[str]) -> None:
    cfg = load_config(argv, SampleConfig)
    if cfg.device == "auto":
        cfg.device = "cuda" if torch.cuda.is_available() else "cpu"
    opencl = cfg.device.startswith("opencl")
    device = "cpu" if opencl else cfg.device  # with OpenCL, PyTorch keeps the encoders on the CPU
    torch.manual_seed(cfg.seed)
    try:
        model, tok, ckpt = load_model(cfg.out_dir, device, cfg.lora or None)
        if opencl:
            from minimm.lora import merge_lora
            from minimm.opencl import use_opencl_decoder
            merge_lora(model)  # the decoder is copied with each adapter folded into its weight
            use_opencl_decoder(model, cfg.device)
        tok.task_token(cfg.task)
        images, audio, turns = media_turns(cfg, model, ckpt)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        sys.exit(str(e))
    temperature = cfg.temperature if cfg.temperature is not None else DEFAULT_TEMPERATURE.get(cfg.task, 0.8)
    for i in range(cfg.num_samples):
        if cfg.num_samples > 1:
            print(f"--- sample {i + 1}")
        if turns:
            ask(model, tok, cfg.task, turns, cfg.max_new_tokens, temperature, cfg.top_k, cfg.top_p,
                on_text=lambda piece: print(piece, end="", flush=True), images=images, audio=audio)
        else:  # free generation: the model writes whole examples of the task, roles and all
            idx = torch.tensor([[tok.task_token(cfg.task)]], device=device)
            out = model.generate(idx, cfg.max_new_tokens, temperature, cfg.top_k, cfg.top_p, stop_tokens=(tok.eot,))
            print(tok.decode(out[0, 1:].tolist()).removesuffix("<|endoftext|>"), end="")
        print()


def media_turns(cfg: SampleConfig, model, ckpt: dict):
    """(images, audio, turns) for the prompt: each media file becomes a marker in the user turn."""
    images, audio = [], []
    if cfg.image:
        if not hasattr(model, "vision"):
            raise ValueError(f"{cfg.out_dir}/ckpt.pt has no image encoder: train on data with images first")
        images.append(load_image(cfg.image, model.vision.config.image_size, ckpt["config"].get("resize", "pad")))
    if cfg.audio:
        if not hasattr(model, "audio"):
            raise ValueError(f"{cfg.out_dir}/ckpt.pt has no audio encoder: train on data with audio first")
        audio.append(load_audio_features(cfg.audio).T)
    question = cfg.prompt or (DEFAULT_QUESTION["image" if cfg.image else "audio"] if images or audio else "")
    if cfg.input:  # laid out as minimm/formats.py lays out an instruction record in training
        question = instruction_text(question, cfg.input) if question else cfg.input
    if not question:
        return images, audio, []
    return images, audio, [("user", user_turn(ckpt, question, len(images), len(audio)))]


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except ConfigError as e:
        sys.exit(f"error: {e}")
