"""The model side of the chat server (serve.py): check a request, decode its uploads, fit it to the
context, and let one request at a time generate.

What this file teaches:
- One model, one lock: a model is not re-entrant, and batching strangers' prompts together is not worth
  its code here. Requests waiting for the lock are bounded in number and in time, so a crowd gets quick
  503 answers instead of an ever longer queue.
- Stateless conversations: the page sends the whole history with every message, media included. The
  server keeps nothing between requests, so there is nothing to expire or to lose on a restart, and fitting
  the context is a pure function of the request: whole exchanges (a user turn and its answer) are dropped
  from the start until the prompt leaves room for an answer, and the page is told how many.
- Uploads are decoded exactly as sample.py decodes files (minimm.vit for images, minimm.audio for WAV), and
  each becomes a marker in the user turn ("<image>\n", "<audio>\n"), laid out as in training
  (minimm.chat.user_turn: after the question for a model trained with image_after_question, and the question
  again after the picture with repeat_question).
- Bad input is answered, never fatal: every check raises ApiError(status, message), which serve.py turns
  into a JSON error with that status.

A chat request (POST /api/chat):
  {"task": "image", "temperature": 0.7, "max_new_tokens": 64,
   "turns": [{"role": "user", "text": "...", "images": [base64 file, ...], "audio": [base64 WAV, ...]},
             {"role": "assistant", "text": "..."}, ..., {"role": "user", ...}]}
"""
from __future__ import annotations

import base64
import binascii
import io
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
from PIL import Image

from minimm.audio import HOP_LENGTH, SAMPLE_RATE, load_audio_features
from minimm.chat import DEFAULT_QUESTION, DEFAULT_TEMPERATURE, ask, user_turn
from minimm.formats import AUDIO_MARKER, IMAGE_MARKER
from minimm.render import render_prompt
from minimm.vit import image_to_uint8

MAX_IMAGE_PIXELS = 4096 * 4096  # a few-kB PNG can declare a canvas that takes gigabytes to decode
MAX_TEMPERATURE = 2.0


class ApiError(Exception):
    """A request the server refuses: answered as {"error": message} with this HTTP status."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class Prompt:
    """A checked chat request: what ask() needs, plus how much history was dropped to fit the context."""

    task: str
    turns: list[tuple[str, str]]
    images: list[np.ndarray]  # (H, W, 3) uint8, one per <image> marker
    audio: list[np.ndarray]  # (frames, n_mels) float32, one per <audio> marker
    temperature: float
    max_new_tokens: int
    dropped: int  # turns dropped from the start of the history
    n_tokens: int  # prompt length


def decode_image(data: bytes, image_size: int, resize: str) -> np.ndarray:
    """Uploaded bytes -> (image_size, image_size, 3) uint8, as minimm.vit.load_image makes from a file."""
    try:
        with Image.open(io.BytesIO(data)) as image:  # reads the header only
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise ApiError(400, f"image of {image.width}x{image.height} pixels is too large to decode")
            image.load()
            return image_to_uint8(image, image_size, resize)
    except (OSError, SyntaxError, EOFError, ValueError, Image.DecompressionBombError) as e:
        raise ApiError(400, f"not an image Pillow can read: {e}") from e


def decode_wav(data: bytes, max_frames: int) -> np.ndarray:
    """Uploaded WAV bytes -> (frames, n_mels) log-mel features, as sample.py computes them from a file."""
    with tempfile.NamedTemporaryFile(suffix=".wav") as f:  # the WAV reader takes a path
        f.write(data)
        f.flush()
        try:
            mels = load_audio_features(f.name).T  # (F, n_mels)
        except ValueError as e:
            raise ApiError(400, f"not a WAV file minimm can read: {str(e).replace(f.name, 'upload')}") from e
    if len(mels) > max_frames:
        raise ApiError(400, f"audio clip of {len(mels) * HOP_LENGTH / SAMPLE_RATE:.1f} s is longer than the "
                            f"{(max_frames - 1) * HOP_LENGTH / SAMPLE_RATE:.0f} s the audio encoder reads")
    return mels


def _b64(value, what: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, TypeError, ValueError) as e:
        raise ApiError(400, f"{what} is not base64: {e}") from e


class Chat:
    """One model, its tokenizer and the lock that lets one request at a time generate."""

    def __init__(self, model, tok, ckpt: dict, max_new_tokens: int, max_queue: int, queue_timeout: float):
        self.model, self.tok, self.ckpt = model, tok, ckpt
        self.max_new_tokens, self.queue_timeout = max_new_tokens, queue_timeout
        self.block_size = model.gpt.config.block_size
        self.lock = threading.Lock()
        self.places = threading.BoundedSemaphore(max_queue + 1)  # the one generating and those waiting
        self.max_queue = max_queue

    def info(self) -> dict:
        audio = getattr(self.model, "audio", None)
        return {"tasks": self.tok.tasks, "step": self.ckpt.get("step"), "block_size": self.block_size,
                "temperature": {t: DEFAULT_TEMPERATURE.get(t, 0.8) for t in self.tok.tasks},
                "max_new_tokens": self.max_new_tokens, "images": hasattr(self.model, "vision"),
                "audio": audio is not None,
                "max_audio_seconds": (audio.config.max_frames - 1) * HOP_LENGTH / SAMPLE_RATE if audio else 0}

    def prepare(self, body) -> Prompt:
        """Check a /api/chat body, decode its media and fit it to the context; ApiError(400) if it is bad."""
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        task = body.get("task")
        if task not in self.tok.tasks:
            raise ApiError(400, f"unknown task {task!r}: this checkpoint knows {', '.join(self.tok.tasks)}")
        temperature = body.get("temperature", DEFAULT_TEMPERATURE.get(task, 0.8))
        if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) \
                or not 0 <= temperature <= MAX_TEMPERATURE:
            raise ApiError(400, f"temperature must be a number from 0 to {MAX_TEMPERATURE}")
        max_new = body.get("max_new_tokens", self.max_new_tokens)
        if not isinstance(max_new, int) or isinstance(max_new, bool) or not 1 <= max_new <= self.max_new_tokens:
            raise ApiError(400, f"max_new_tokens must be a whole number from 1 to {self.max_new_tokens}")
        turns = body.get("turns")
        if not isinstance(turns, list) or not turns or len(turns) % 2 == 0:
            raise ApiError(400, "turns must be a list alternating user and assistant, ending with a user turn")
        texts, media = [], []
        for i, turn in enumerate(turns):
            text, images, audio = self._turn(i, turn)
            texts.append(("user" if i % 2 == 0 else "assistant", text))
            media.append((images, audio))
        return self._fit(task, texts, media, float(temperature), max_new)

    def _turn(self, i: int, turn) -> tuple[str, list[np.ndarray], list[np.ndarray]]:
        """One turn of the request -> (text with media markers, images, audio)."""
        role = "user" if i % 2 == 0 else "assistant"
        if not isinstance(turn, dict) or turn.get("role") != role or not isinstance(turn.get("text", ""), str):
            raise ApiError(400, f"turn {i} must be {{\"role\": \"{role}\", \"text\": str}}")
        text = turn.get("text", "")
        if IMAGE_MARKER in text or AUDIO_MARKER in text:  # a marker means a file: it cannot be plain text
            raise ApiError(400, f"turn {i} contains {IMAGE_MARKER} or {AUDIO_MARKER} as text; attach a file instead")
        uploads = {kind: turn.get(kind, []) for kind in ("images", "audio")}
        if any(not isinstance(v, list) for v in uploads.values()) or (role == "assistant" and any(uploads.values())):
            raise ApiError(400, f"turn {i}: images and audio must be lists of base64 files, in user turns only")
        images = [self._image(_b64(v, f"turn {i} image {j}")) for j, v in enumerate(uploads["images"])]
        audio = [self._audio(_b64(v, f"turn {i} audio {j}")) for j, v in enumerate(uploads["audio"])]
        if not text.strip() and role == "user":
            if not images and not audio:
                raise ApiError(400, f"turn {i} is empty: write something or attach a file")
            text = DEFAULT_QUESTION["image" if images else "audio"]
        return user_turn(self.ckpt, text, len(images), len(audio)), images, audio  # as sample.py

    def _image(self, data: bytes) -> np.ndarray:
        if not hasattr(self.model, "vision"):
            raise ApiError(400, "this checkpoint has no image encoder: it was trained without images")
        return decode_image(data, self.model.vision.config.image_size, self.ckpt["config"].get("resize", "pad"))

    def _audio(self, data: bytes) -> np.ndarray:
        if not hasattr(self.model, "audio"):
            raise ApiError(400, "this checkpoint has no audio encoder: it was trained without audio")
        return decode_wav(data, self.model.audio.config.max_frames)

    def _fit(self, task: str, turns: list, media: list, temperature: float, max_new: int) -> Prompt:
        """Drop whole exchanges from the start until the prompt leaves room for an answer."""
        # room for a useful answer, but a large max_new_tokens must not erase all history by itself
        room = min(max_new, self.block_size // 4)
        # Each turn renders on its own (role token, text, <|end|>), so the prompt's length is the sum of its
        # turns' plus the task token and the assistant's opening one: tokenize each turn once, then subtract.
        lengths = [len(self._render(task, [turn], [turn_media])) - 2 for turn, turn_media in zip(turns, media)]
        start, n = 0, 2 + sum(lengths)
        while n + room > self.block_size and start < len(turns) - 1:
            n -= lengths[start] + lengths[start + 1]
            start += 2  # a user turn and its answer go together: the history still starts with a user
        n = len(self._render(task, turns[start:], media[start:]))
        if n >= self.block_size:
            raise ApiError(400, f"the message is {n} tokens with its media and the prompt layout; this model "
                                f"reads at most block_size={self.block_size}: shorten it or attach less")
        images = [image for ims, _ in media[start:] for image in ims]
        audio = [clip for _, clips in media[start:] for clip in clips]
        return Prompt(task, turns[start:], images, audio, temperature, max_new, start, n)

    def _render(self, task: str, turns: list, media: list) -> list[int]:
        audio = self.model.audio_tokens([len(clip) for _, clips in media for clip in clips])
        return render_prompt(self.tok, task, turns, self.model.image_tokens, audio)

    @contextmanager
    def turn(self) -> Iterator[None]:
        """Hold the model for one request; ApiError(503) when the queue is full or the wait too long."""
        if not self.places.acquire(blocking=False):
            raise ApiError(503, f"busy: {self.max_queue} requests are already waiting for the model")
        try:
            if not self.lock.acquire(timeout=self.queue_timeout):
                raise ApiError(503, f"busy: waited {self.queue_timeout:g} s for the model")
            try:
                yield
            finally:
                self.lock.release()
        finally:
            self.places.release()

    def answer(self, prompt: Prompt, on_text: Callable[[str], None]) -> dict:
        """Generate (call inside turn()); on_text gets each new piece. Returns the answer's statistics."""
        t0 = time.time()
        max_new = min(prompt.max_new_tokens, self.block_size - prompt.n_tokens)
        text = ask(self.model, self.tok, prompt.task, prompt.turns, max_new, prompt.temperature, on_text=on_text,
                   images=prompt.images or None, audio=prompt.audio or None)
        # tokens: the answer re-encoded, which is how many tokens it takes in the next turn's history
        return {"seconds": round(time.time() - t0, 3), "tokens": len(self.tok.encode(text)),
                "prompt_tokens": prompt.n_tokens, "cut_short": max_new < prompt.max_new_tokens}
