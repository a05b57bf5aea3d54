"""Asking a trained model: load a checkpoint, lay out the prompt as training did, stream the answer.

What this file teaches:
- A checkpoint carries the model's shape, its weights, the resolved config and the tokenizer itself, so
  it answers on its own wherever it is copied (no data folder needed).
- The prompt is rendered by the same code as the training data (minimm/render.py): task token, the turns,
  then `<|assistant|>`; generation stops at `<|end|>`, the token that closed every answer in training.
- Images and audio go in as the same placeholder runs as in training, and the model splices their
  embeddings in (minimm/multimodal.py).
- Streaming text from tokens: a token can end in the middle of a UTF-8 character, so we decode the whole
  answer so far and emit only what is new and complete.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from minimm.formats import user_text
from minimm.lora import load_lora
from minimm.multimodal import MultimodalGPT
from minimm.render import render_prompt
from minimm.tokenizer import Tokenizer
from minimm.training import load_checkpoint
from minimm.vit import to_tensor

# when the user gives no temperature: near-greedy for code (one wrong token breaks it), freer for prose
DEFAULT_TEMPERATURE = {"code": 0.2, "text": 0.8, "image": 0.7, "audio": 0.0}
# what a file sent without a question is asked (sample.py, the chat page)
DEFAULT_QUESTION = {"image": "Describe the image.", "audio": "Which keys were pressed?"}


def user_turn(ckpt: dict, text: str, n_images: int = 0, n_audio: int = 0) -> str:
    """A user turn with markers for its files, laid out as the checkpoint's model was trained to read them: the
    picture after the question if its config set image_after_question, else before, and the question again after
    the picture if it set repeat_question (minimm.formats.user_text)."""
    config = ckpt.get("config", {})
    return user_text(text, n_images, n_audio, image_after_text=config.get("image_after_question", False),
                     repeat_text=config.get("repeat_question", False))


def load_model(out_dir: str | Path, device: str = "cpu",
               lora: str | None = None) -> tuple[MultimodalGPT, Tokenizer, dict]:
    """The model (eval mode, on device), its tokenizer and the raw checkpoint from out_dir/ckpt.pt.

    lora: an adapter file (train.py writes out_dir/lora.pt) applied on top of this base checkpoint.
    """
    ckpt = load_checkpoint(Path(out_dir) / "ckpt.pt", device)
    model = MultimodalGPT.from_args(ckpt["model_args"])
    if "lora" in ckpt:  # a LoRA run's own checkpoint: adapters in place before the weights load
        load_lora(model, ckpt["lora"])
    model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()})
    if lora:
        load_lora(model, torch.load(lora, map_location=device, weights_only=True))
    model.to(device).eval()
    return model, Tokenizer.from_state(ckpt["tokenizer"]), ckpt


class TextStream:
    """Turns generated ids into text pieces as they arrive; call with each new id."""

    def __init__(self, tok: Tokenizer, on_text: Callable[[str], None]):
        self.tok, self.on_text, self.ids, self.emitted = tok, on_text, [], ""

    def __call__(self, token_id: int) -> None:
        self.ids.append(token_id)
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for the next token
            return
        self.on_text(text[len(self.emitted):])
        self.emitted = text


def _media(images: list[np.ndarray], audio: list[np.ndarray], device: torch.device) -> dict:
    """The generate() keywords for these pictures (H, W, 3) and clips (frames, n_mels), in placeholder order."""
    media = {}
    if images:
        media["images"] = to_tensor(np.stack(images)).to(device)  # (N, 3, H, W)
    if audio:
        lengths = torch.tensor([len(m) for m in audio])
        padded = torch.zeros(len(audio), audio[0].shape[1], int(lengths.max()))  # (N, n_mels, F)
        for j, m in enumerate(audio):
            padded[j, :, :len(m)] = torch.from_numpy(np.asarray(m, dtype=np.float32).T)
        media["audio"], media["audio_lengths"] = padded.to(device), lengths.to(device)
    return media


def stop_tokens(tok: Tokenizer) -> tuple[int, ...]:
    """What ends an answer: <|end|>, which closed every answer in training, or the end of the text."""
    return tok.special("<|end|>"), tok.eot


def _answer(tok: Tokenizer, new: list[int], stops: tuple[int, ...]) -> str:
    """The generated ids up to the first stop token, as text."""
    return tok.decode(new[:next((i for i, t in enumerate(new) if t in stops), len(new))])


@torch.no_grad()
def ask(model: MultimodalGPT, tok: Tokenizer, task: str, turns: list[tuple[str, str]], max_new_tokens: int = 256,
        temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
        on_text: Callable[[str], None] | None = None, images: list[np.ndarray] | None = None,
        audio: list[np.ndarray] | None = None) -> str:
    """The model's answer to the conversation `turns` (ending with a user turn) for `task`.

    images: (H, W, 3) uint8 arrays at the model's image size (minimm.vit.load_image), one per <image>
    marker in the turns; audio: (frames, n_mels) log-mel features, one per <audio> marker.
    """
    device = next(model.parameters()).device
    prompt = render_prompt(tok, task, turns, model.image_tokens, model.audio_tokens([len(m) for m in audio or []]))
    idx = torch.tensor([prompt], dtype=torch.long, device=device)
    stops = stop_tokens(tok)
    stream = TextStream(tok, on_text) if on_text else None
    stopped = False

    def on_token(token: torch.Tensor) -> None:  # token: (1,)
        nonlocal stopped
        stopped = stopped or int(token[0]) in stops
        if stream and not stopped:
            stream(int(token[0]))

    out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                         stop_tokens=stops, callback=on_token, **_media(images or [], audio or [], device))
    return _answer(tok, out[0, len(prompt):].tolist(), stops)


@torch.no_grad()
def ask_many(model: MultimodalGPT, tok: Tokenizer, task: str, conversations: list[list[tuple[str, str]]],
             max_new_tokens: int = 256, images: list[list[np.ndarray]] | None = None,
             audio: list[list[np.ndarray]] | None = None, batch_size: int = 64) -> list[str]:
    """Greedy answers to many conversations, as ask() gives them one by one, in far fewer model calls.

    Prompts of the same length are decoded together as the rows of one batch: no padding, so each row's
    positions, attention and KV cache are exactly its own, and a row that reaches <|end|> idles until its
    batch is done. (A batch of prompts of different lengths would need left padding and per-row positions.)
    The final evaluation asks 400 questions about pictures and 600 about clips, whose prompts come in a few
    lengths: one call per batch instead of one per question. images / audio: per conversation, its pictures
    and clips (as in ask()).
    """
    device = next(model.parameters()).device
    images = images or [[] for _ in conversations]
    audio = audio or [[] for _ in conversations]
    stops = stop_tokens(tok)
    prompts = [render_prompt(tok, task, turns, model.image_tokens, model.audio_tokens([len(m) for m in clips]))
               for turns, clips in zip(conversations, audio)]
    same_length: dict[int, list[int]] = {}
    for i, prompt in enumerate(prompts):
        same_length.setdefault(len(prompt), []).append(i)
    answers = [""] * len(prompts)
    for length, rows in same_length.items():
        for start in range(0, len(rows), batch_size):
            batch = rows[start:start + batch_size]
            idx = torch.tensor([prompts[i] for i in batch], dtype=torch.long, device=device)  # (b, length)
            media = _media([m for i in batch for m in images[i]], [m for i in batch for m in audio[i]], device)
            out = model.generate(idx, max_new_tokens, temperature=0.0, stop_tokens=stops, **media)  # (b, T)
            for row, i in zip(out, batch):
                answers[i] = _answer(tok, row[length:].tolist(), stops)
    return answers
