"""Synthetic image tasks from a seed: the bundled image data of the default run (drawn by prepare/drawing.py).

What this file teaches:
- A task a small model can learn from scratch on a CPU in minutes: scenes of 1 to 3 flat shapes and short
  words, with questions whose exact answers are decidable from the pixels at the configured image size.
- How to keep every answer unambiguous by construction: each shape of a scene sits in its own column of a
  3x3 grid, its centre well inside a cell, so "where" and "left of" never depend on a pixel; "What color
  is the triangle?" is asked only when one triangle is in the scene, "Where is the red shape?" only when
  one shape is red.
- Determinism: image i of a seed comes from its own generator, numpy's default_rng([seed, i]), so the same
  seed gives the same PNG bytes (with the same numpy and Pillow) and a longer run starts with the images of
  a shorter one.
- Several answers per picture: with all_questions (the training split of prepare/mixed.py) a scene's
  conversation asks every well-posed question about it, so one pass of the image encoder and one set of
  image placeholders pay for up to four supervised answers (the default run then trains on about 1.4x
  the image answer tokens per step, at the same row budget).
- Where a step's answers go (easy_keep; config key image_easy_keep, 0.25 in config/mixed.py): an answer that needs
  no lookup (a count, or the colour or place of the only shape) is learned early, while the ones that do (the colour
  of the triangle among three shapes) are learned late, and only from pictures with more than one shape. A scene of
  the training split keeps each answer of the first sort with probability easy_keep, and more scenes take the rows
  freed. In the default run (easy_keep 0.25, 5,920 scenes instead of 4,000, about as many rows), seeds 1 / 2 / 3:
  colour 0.94 / 0.75 / 0.93 -> 0.99 / 1.00 / 0.96, place 0.61 / 0.65 / 0.73 -> 0.88 / 0.77 / 0.72 (EXPERIMENTS.md).
- The question before the picture (question_first; config key image_after_question, on in config/mixed.py):
  each question is a row of its own, "What color is the triangle?\n<image>". The GPT is causal, so only then
  can each image token read the question and tell whether it holds the shape asked about; with the picture
  first the answer must find that token itself, a two-step lookup learned late. Images alone, 300 steps:
  colour 0.70 -> 0.87, describe 0.80 -> 0.87, though an answer costs ~24 tokens instead of ~11 (EXPERIMENTS.md).
- The question again after the picture (repeat_question; on in config/mixed.py): "What color is the triangle?\n<image>\n
  What color is the triangle?". The image tokens still read the question before them, and the positions right
  before the answer hold it too, so a query for "red" can go straight to the token of that colour instead of
  through what the image tokens made of the first copy (a prompt repeated so that a causal model reads it whole:
  Leviathan et al. 2025, https://arxiv.org/abs/2512.14982). Tried first with every answer kept (four seeds: place
  0.65 -> 0.73, colour 0.77 -> 0.69, a trade); with easy_keep 0.25, seeds 1 / 2 / 3: place 0.88 / 0.77 / 0.72 ->
  0.96 / 0.83 / 0.91, colour 0.99 / 1.00 / 0.96 -> 0.96 / 0.97 / 0.98 (EXPERIMENTS.md).
- More pictures of a word (n_read; config key n_read_images): a scene set is a fifth text pictures, 1,183 of the
  default's 5,920, about 22 of each word, and the GPT learned to read next to none of the held-out words (0.02-0.03).
  The added pictures come after the scenes, at indices from READ_INDEX, so the scenes stay as they were; with the
  encoder pretrained on each cell's letters (prepare/vision_pretrain.py) the default reads (EXPERIMENTS.md).
- More lookups per scene (lookups; config key image_lookups): a scene asks one colour and one place, though a scene of
  three shapes has up to three of each. Asked of every shape ({"color": 3, "where": 3}), the same picture answers
  "What color is the triangle?" and "What color is the circle?" differently: the answer cannot come from the picture
  alone, only from the shape named. With the task's weight lowered so that pictures keep their share of a step's
  tokens, seeds 1337 / 2 / 3: colour 0.75 / 0.95 / 0.89 -> 1.00 / 0.98 / 0.98, place held (0.98-1.00), but the
  descriptions, now fewer a step, 0.97 / 0.92 / 0.96 -> 0.96 / 0.86 / 0.898. Colour alone ({"color": 3}): seed 2's
  place 0.99 -> 0.65; the two lookups take turns unless both are asked (EXPERIMENTS.md).

Questions (the "kind" of each row, so the evaluation can report accuracy per question type):
  describe  "Describe the image."         -> "a red circle left of a blue square" (shapes left to right)
  count     "How many shapes are there?"  -> "2"
  color     "What color is the triangle?" -> "green"
  where     "Where is the red shape?"     -> "top left" (one of WHERE, the 3x3 cell holding its centre)
  read      "What does the text say?"     -> "fish" (a word of WORDS drawn with Pillow's built-in font)

Default size: 48x48 pixels (IMAGE_SIZE). A 6-letter word then gets about 7 pixels per letter, which is
the least at which the letters stay legible after anti-aliasing; 32x32 leaves 5 and smears them.
Run: python prepare/shapes.py --out_dir data/shapes --n_train 4000 --n_val 200
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from minimm.formats import IMAGE_MARKER, user_text, write_jsonl  # noqa: E402
from prepare.drawing import COLORS, SHAPES, Shape, background, draw_shapes, draw_word  # noqa: E402

IMAGE_SIZE = 48
ROWS = ("top", "", "bottom")
COLUMNS = ("left", "", "right")
WHERE = tuple(" ".join(w for w in (row, col) if w) or "center" for row in ROWS for col in COLUMNS)
WORDS = ("cat", "dog", "sun", "map", "box", "jam", "cup", "hat", "key", "pen", "fox", "owl", "bee", "ice",
         "tree", "fish", "bird", "moon", "sand", "rain", "ship", "lamp", "frog", "milk", "door", "book",
         "kite", "wolf", "leaf", "snow", "apple", "house", "river", "plant", "cloud", "horse", "bread",
         "chair", "light", "water", "stone", "tiger", "garden", "window", "candle", "button", "pirate",
         "silver", "rocket", "forest", "pencil", "monkey", "bottle", "jungle")
KINDS = ("describe", "count", "color", "where", "read")
LOOKUPS = ("color", "where")  # the kinds whose answer is found by looking up the shape the question names
QUESTIONS = {
    "describe": "Describe the image.",
    "count": "How many shapes are there?",
    "color": "What color is the {shape}?",
    "where": "Where is the {color} shape?",
    "read": "What does the text say?",
}
READ_INDEX = 10 ** 6  # the indices of added text pictures (examples_with_words): never those of a scene
TEXT_SCHEMA_FRACTION = 0.2  # rows written as {"text", "image", "response"}, so that reader is exercised too

# Geometry, as fractions of a grid cell (image_size / 3). A centre stays 0.5 - JITTER = 0.32 cells (7.7
# pixels at 48) from every cell edge, so the cell that holds it is plain to see.
JITTER = 0.18
RADIUS = (0.30, 0.45)  # circumradius: 4.8 to 7.2 pixels at 48, so every shape spans at least 9 pixels
GAP = 2.0  # pixels between the bounding circles of two shapes: their blurred edges never touch


@dataclass
class ImageExample:
    """One picture and its question. shapes is empty for "read"; word and letters (the centre (x, y) of each
    letter of the word, in pixels) are empty otherwise."""

    image: Image.Image
    kind: str
    question: str
    answer: str
    shapes: list[Shape] = field(default_factory=list)
    word: str = ""
    letters: list[tuple[float, float]] = field(default_factory=list)


def split_seed(seed: int, split: str) -> int:
    """The seed of a split: train and val never share a generator, whatever seed the user picks."""
    return 2 * seed + {"train": 0, "val": 1}[split]


def make_example(seed: int, index: int, image_size: int = IMAGE_SIZE, kind: str | None = None) -> ImageExample:
    """Image `index` of `seed`: a question kind drawn uniformly (or the given `kind`), then a scene where it
    is well posed."""
    rng = np.random.default_rng([seed, index])
    drawn = KINDS[rng.integers(len(KINDS))]
    kind = kind or drawn
    tint = background(rng)
    if kind == "read":
        word = WORDS[rng.integers(len(WORDS))]
        image, letters = draw_word(rng, word, image_size, tint)
        return ImageExample(image, kind, QUESTIONS[kind], word, word=word, letters=letters)
    while True:  # rejection: redraw until the question has exactly one right answer
        shapes = _place_shapes(rng, image_size)
        question, answer = _ask(rng, kind, shapes)
        if answer is not None:
            image = draw_shapes(rng, shapes, image_size, tint)
            return ImageExample(image, kind, question, answer, shapes)


def examples_with_words(seed: int, n: int, image_size: int, n_words: int) -> Iterator[tuple[int, ImageExample]]:
    """(index, example) for pictures 0..n-1 of `seed` (any kind), then n_words pictures of a word alone at indices
    READ_INDEX.. of the same seed: the added ones never change the n."""
    for i in [*range(n), *range(READ_INDEX, READ_INDEX + n_words)]:
        yield i, make_example(seed, i, image_size, kind="read" if i >= READ_INDEX else None)


def scene_questions(rng: np.random.Generator, example: ImageExample, lookups: dict[str, int] | None = None,
                    more: np.random.Generator | None = None) -> list[tuple[str, str, str]]:
    """Every well-posed question about a scene as (kind, question, answer), the example's own first, the rest
    (one of each other kind that has a unique answer) in random order. A text image has only its own.
    lookups: {kind: n} for the lookup kinds (color, where): that kind is asked about up to n shapes of the scene,
    not one (a kind left out: one). The added questions (about shapes not yet asked of, in an order drawn from
    `more`, or from rng when None) come after the others, so the list begins as it does without them."""
    asked = [(example.kind, example.question, example.answer)]
    if example.kind == "read":
        return asked
    others = [k for k in KINDS if k not in ("read", example.kind)]
    for kind in (others[i] for i in rng.permutation(len(others))):
        question, answer = _ask(rng, kind, example.shapes)
        if answer is not None:
            asked.append((kind, question, answer))
    more = rng if more is None else more
    for kind in (k for k in LOOKUPS if (lookups or {}).get(k, 1) > 1):
        done = [question for k, question, _ in asked if k == kind]
        candidates = [pair for pair in _lookup_pairs(kind, example.shapes) if pair[0] not in done]
        for j in more.permutation(len(candidates))[:max(0, lookups[kind] - len(done))]:
            asked.append((kind, *candidates[j]))
    return asked


def make_image_examples(out_dir: str | Path, n: int, seed: int, image_size: int = IMAGE_SIZE,
                        relative_to: str | Path | None = None, all_questions: bool = False,
                        question_first: bool = False, repeat_question: bool = False,
                        easy_keep: float = 1.0, n_read: int = 0, lookups: dict[str, int] | None = None) -> list[dict]:
    """Write n PNGs under out_dir (and n_read more) and return one JSONL row per image.

    Rows are in the conversation schema, or for a TEXT_SCHEMA_FRACTION of them the {"text", "image",
    "response"} schema; both carry "kind" (of the first question). "image" paths are relative to
    `relative_to` (default out_dir), which should be the directory of the JSONL file the rows go into.
    all_questions: a scene's conversation goes on to ask every other well-posed question about it
    (scene_questions; why: the module docstring). prepare/mixed.py uses it for the training split only,
    so each validation picture asks one question and is scored alone.
    question_first: each question is a row of its own, the question before the picture ("What color is the
    triangle?\n<image>"), so the image tokens can attend to it (why: the module docstring); with all_questions,
    a scene gives one row per well-posed question.
    repeat_question: with question_first, the question again after the picture ("What color is the triangle?\n
    <image>\nWhat color is the triangle?"; why: the module docstring).
    easy_keep: with all_questions, each answer that needs no lookup (needs_no_lookup) is kept with this
    probability, drawn from the picture's own generator np.random.default_rng([seed, i, 2]); a scene always keeps
    its description (why: the module docstring).
    n_read: that many more pictures of a word alone (the read kind), indices READ_INDEX + j of the same seed, so
    they never change the n scenes (why: the module docstring).
    lookups: with all_questions, {"color": n} asks a scene the colour of up to n of its shapes, {"where": n} the
    place of up to n of its colours, not one (scene_questions); the added questions are drawn from
    np.random.default_rng([seed, i, 3]) (why: the module docstring).
    """
    if not 0.0 <= easy_keep <= 1.0:
        raise ValueError(f"easy_keep={easy_keep}: the share of answers kept must be between 0 and 1")
    check_counts("lookups", lookups or {}, LOOKUPS)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    relative_to = Path(relative_to) if relative_to is not None else out_dir
    rows = []
    for i, example in examples_with_words(seed, n, image_size, n_read):
        path = out_dir / f"{i:06d}.png"
        example.image.save(path, format="PNG")
        image = path.resolve().relative_to(relative_to.resolve()).as_posix()
        rng = np.random.default_rng([seed, i, 1])
        text_schema = rng.random() < TEXT_SCHEMA_FRACTION
        asked = (scene_questions(rng, example, lookups, np.random.default_rng([seed, i, 3])) if all_questions
                 else [(example.kind, example.question, example.answer)])
        if all_questions and easy_keep < 1:  # fewer answers that need no lookup (module docstring)
            thin = np.random.default_rng([seed, i, 2])
            asked = [(kind, question, answer) for kind, question, answer in asked
                     if not needs_no_lookup(kind, len(example.shapes)) or thin.random() < easy_keep]
        if question_first:  # one row per question, each with the picture after it (module docstring)
            # the layout sample.py and the chat page give a question about a picture (minimm.formats.user_text)
            rows += [_row(image, kind, [(user_text(question, 1, image_after_text=True, repeat_text=repeat_question),
                                         answer)], text_schema) for kind, question, answer in asked]
        elif text_schema:  # that schema holds one question: the picture's own (unless easy_keep left it out)
            kind, question, answer = asked[0]
            rows.append(_row(image, kind, [(question, answer)], True))
        else:
            exchanges = [((f"{IMAGE_MARKER}\n" if j == 0 else "") + question, answer)
                         for j, (_, question, answer) in enumerate(asked)]
            rows.append(_row(image, asked[0][0], exchanges, False))
    return rows


def check_counts(name: str, counts: dict, kinds: tuple[str, ...]) -> None:
    """ValueError unless counts maps some of `kinds` to whole numbers of at least 1 (lookups, image_repeats)."""
    if any(kind not in kinds or not isinstance(n, int) or n < 1 for kind, n in counts.items()):
        raise ValueError(f"{name}={counts}: each key one of {kinds}, each value a whole number of at least 1")


def needs_no_lookup(kind: str, n_shapes: int) -> bool:
    """Whether the answer to a question of `kind` about a scene of n_shapes is found without looking up the shape
    or colour the question names among others: a count, or the colour or place of the only shape."""
    return kind == "count" or (kind in ("color", "where") and n_shapes == 1)


def _row(image: str, kind: str, exchanges: list[tuple[str, str]], text_schema: bool) -> dict:
    """One JSONL row from (user text, answer) exchanges: the {"text", "image", "response"} schema (one exchange)
    or the conversation schema."""
    if text_schema:
        ((user, answer),) = exchanges
        return {"task": "image", "text": user, "image": image, "response": answer, "kind": kind}
    turns = [turn for user, answer in exchanges
             for turn in ({"role": "user", "content": user}, {"role": "assistant", "content": answer})]
    return {"task": "image", "conversations": turns, "image": image, "kind": kind}


def _place_shapes(rng: np.random.Generator, image_size: int) -> list[Shape]:
    """1 to 3 shapes, each in its own column, sorted left to right, not touching, inside the image."""
    cell = image_size / 3
    n = int(rng.integers(1, 4))
    while True:
        columns = np.sort(rng.choice(3, size=n, replace=False))
        shapes = []
        for col in columns:
            row = int(rng.integers(3))
            x = (col + 0.5 + rng.uniform(-JITTER, JITTER)) * cell
            y = (row + 0.5 + rng.uniform(-JITTER, JITTER)) * cell
            r = min(rng.uniform(*RADIUS) * cell, x, y, image_size - x, image_size - y)
            shapes.append(Shape(SHAPES[rng.integers(len(SHAPES))], list(COLORS)[rng.integers(len(COLORS))],
                                x, y, r, rng.uniform(0, 2 * math.pi), WHERE[3 * row + int(col)]))
        if all(math.dist((a.x, a.y), (b.x, b.y)) >= a.r + b.r + GAP
               for i, a in enumerate(shapes) for b in shapes[i + 1:]):
            return shapes


def _ask(rng: np.random.Generator, kind: str, shapes: list[Shape]) -> tuple[str, str | None]:
    """The question of `kind` about these shapes and its answer; answer None when it would be ambiguous."""
    if kind == "describe":
        return QUESTIONS[kind], " left of ".join(f"a {s.color} {s.name}" for s in shapes)
    if kind == "count":
        return QUESTIONS[kind], str(len(shapes))
    pairs = _lookup_pairs(kind, shapes)
    return pairs[rng.integers(len(pairs))] if pairs else ("", None)


def _lookup_pairs(kind: str, shapes: list[Shape]) -> list[tuple[str, str]]:
    """(question, answer) of `kind` (color or where) about each shape the question names unambiguously: the only
    triangle of the scene, the only red shape."""
    attribute = "name" if kind == "color" else "color"
    values = [getattr(s, attribute) for s in shapes]
    unique = [s for s, v in zip(shapes, values) if values.count(v) == 1]
    if kind == "color":
        return [(QUESTIONS[kind].format(shape=s.name), s.color) for s in unique]
    return [(QUESTIONS[kind].format(color=s.color), s.where) for s in unique]


def _write_split(out_dir: Path, split: str, n: int, seed: int, image_size: int) -> None:
    start = time.perf_counter()
    rows = make_image_examples(out_dir / split, n, split_seed(seed, split), image_size, relative_to=out_dir)
    write_jsonl(out_dir / f"{split}.jsonl", rows)
    print(f"{split}: {n} images in {time.perf_counter() - start:.1f} s -> {out_dir / split}.jsonl")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out_dir", default="data/shapes")
    parser.add_argument("--n_train", type=int, default=4000)
    parser.add_argument("--n_val", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--image_size", type=int, default=IMAGE_SIZE)
    args = parser.parse_args()
    for split, n in (("train", args.n_train), ("val", args.n_val)):
        _write_split(Path(args.out_dir), split, n, args.seed, args.image_size)
