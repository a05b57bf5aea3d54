"""Rendering: an Example becomes token ids plus a loss mask, and a prompt becomes exactly what training saw.

What this file teaches:
- The chat template is a small piece of data (`CHAT_TEMPLATE`): each role opens with its token and closes
  with `<|end|>`. Every example starts with its task token, so one model learns many tasks.
- The loss mask comes from the rendering itself: while we append the assistant's tokens we mark them, so
  no string in user data can move the loss region (nothing is searched for after the fact).
- Only assistant turns and the `<|end|>` closing them are in the loss for instruction and chat data, the
  recipe of InstructGPT-style supervised fine-tuning (Ouyang et al. 2022, https://arxiv.org/abs/2203.02155);
  plain text is all in the loss, as in pretraining.
- Media: each `<image>` / `<audio>` marker in a turn becomes that many `<|image|>` / `<|audio|>` placeholder
  tokens, one per embedding the encoder produces; the model later overwrites those positions with the
  projected image or audio embeddings. Placeholders are never in the loss.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from minimm.formats import AUDIO_MARKER, IMAGE_MARKER, Example
from minimm.tokenizer import Tokenizer

# role -> (token that opens the turn, token that closes it). Edit here to change the chat layout.
CHAT_TEMPLATE = {
    "system": ("<|system|>", "<|end|>"),
    "user": ("<|user|>", "<|end|>"),
    "assistant": ("<|assistant|>", "<|end|>"),
}
_MEDIA_SPLIT = re.compile(f"({re.escape(IMAGE_MARKER)}|{re.escape(AUDIO_MARKER)})")


@dataclass
class Rendered:
    ids: list[int]
    mask: list[int]  # 1 where the token is a training target
    n_images: int = 0
    n_audio: int = 0


def _render_text(tok: Tokenizer, text: str, image_tokens: int, audio_tokens: list[int],
                 counts: list[int]) -> list[int]:
    """Ordinary text with media markers replaced by placeholder runs; counts = [images, audio] so far."""
    ids: list[int] = []
    for piece in _MEDIA_SPLIT.split(text):
        if piece == IMAGE_MARKER:
            ids += [tok.special("<|image|>")] * image_tokens
            counts[0] += 1
        elif piece == AUDIO_MARKER:
            ids += [tok.special("<|audio|>")] * audio_tokens[counts[1]]
            counts[1] += 1
        elif piece:
            ids += tok.encode(piece)
    return ids


def render(example: Example, tok: Tokenizer, image_tokens: int = 0,
           audio_tokens: list[int] | None = None) -> Rendered:
    """Token ids and loss mask for one example.

    image_tokens: placeholders per image (the image encoder's output length after projection).
    audio_tokens: placeholders for each audio clip of the example, in order (clips differ in length).
    """
    audio_tokens = audio_tokens or []
    ids, mask = [tok.task_token(example.task)], [0]
    counts = [0, 0]
    if len(example.turns) == 1 and example.turns[0][0] == "text":  # pretraining text: all in the loss
        body = _render_text(tok, example.turns[0][1], image_tokens, audio_tokens, counts)
        body.append(tok.eot)
        ids += body
        mask += [0 if t in (tok.special("<|image|>"), tok.special("<|audio|>")) else 1 for t in body]
        return Rendered(ids, mask, *counts)
    for role, text in example.turns:
        opening, closing = CHAT_TEMPLATE[role]
        body = [tok.special(opening)] + _render_text(tok, text, image_tokens, audio_tokens, counts)
        body.append(tok.special(closing))
        ids += body
        if role == "assistant":  # its words and the <|end|> that closes them; not the opening role token
            mask += [0] + [1] * (len(body) - 1)
        else:
            mask += [0] * len(body)
    ids.append(tok.eot)
    mask.append(0)
    return Rendered(ids, mask, *counts)


def render_prompt(tok: Tokenizer, task: str, turns: list[tuple[str, str]], image_tokens: int = 0,
                  audio_tokens: list[int] | None = None) -> list[int]:
    """The ids a model continues from: the conversation so far, then the assistant's opening token.

    turns: [(role, text)] ending with a user turn. With no turns at all the task token alone is the
    prompt (free generation, e.g. `--task text` without a prompt).
    """
    if not turns:
        return [tok.task_token(task)]
    n_images = sum(text.count(IMAGE_MARKER) for _, text in turns)
    n_audio = sum(text.count(AUDIO_MARKER) for _, text in turns)
    # the media themselves go to the model separately; rendering needs only one name per marker
    example = Example(task=task, turns=list(turns), images=["<prompt>"] * n_images, audio=["<prompt>"] * n_audio)
    rendered = render(example, tok, image_tokens, audio_tokens)
    return rendered.ids[:-1] + [tok.special(CHAT_TEMPLATE["assistant"][0])]  # drop the final eot
