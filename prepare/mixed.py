"""Build data/mixed: the bundled default dataset, offline and deterministic from a seed.

    python prepare/mixed.py [config/mixed.py] [--key=value ...]

Everything comes from what every Python installation has, plus synthetic data drawn from the seed:
- text: the prose of the Python documentation that the standard library ships (`pydoc_data.topics`) and
  the standard library's module docstrings, both as instructions ("Explain the Python topic 'with'." ->
  its opening paragraphs) and as plain pretraining text;
- code: standard-library functions whose source parses with `ast`: instruction = the first sentence of
  the docstring, input = the signature, output = the function without its docstring (the instruction
  already says what it does; leaving the prose out keeps answers short enough for the CPU default). The
  functions without a docstring are training examples too ("Write this function."); the held-out
  instructions are documented ones;
- image prompts: "Generate an image of ..." -> a detailed text-to-image prompt composed from subject,
  style, lighting and setting vocabularies;
- images (prepare/shapes.py): scenes of coloured shapes and rendered words, with questions whose answers
  are exact strings ("How many shapes are there?" -> "2", "What does the text say?" -> "owl"); a
  training scene is one conversation that asks all its well-posed questions, a validation one asks one;
- audio (prepare/sounds.py): telephone keypad tones and note sequences ("Which keys were pressed?" ->
  "4 1 7 #", "Name the notes." -> "C5 E5 G5").
Validation images and clips are drawn from their own seeds, so none is seen in training.
The examples are written first as JSONL in the schemas of minimm/formats.py (so the default data
exercises every reader), then read back, the tokenizer is trained on the training split, and the data
is packed by minimm/pack.py.
"""
from __future__ import annotations

import ast
import os
import random
import re
import sys
import sysconfig
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from minimm.config import TrainConfig, load_config  # noqa: E402
from minimm.data import MediaSpec  # noqa: E402
from minimm.pack import build_dataset, describe_meta  # noqa: E402
from minimm.formats import IMAGE_MARKER, AUDIO_MARKER, read_examples, write_jsonl  # noqa: E402
from minimm.tokenizer import Tokenizer  # noqa: E402
from prepare.shapes import KINDS, check_counts, make_image_examples, split_seed  # noqa: E402
from prepare.sounds import make_audio_examples  # noqa: E402

N_CODE_VAL = 60  # held-out code instructions; the final evaluation asks 50 of them
MAX_CODE_LINES = 8  # after the docstring is removed: short answers a small model can finish (~46 tokens)
SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "turtledemo", "ensurepip", "site-packages", "__pycache__"}


def settings_from_config(cfg: TrainConfig) -> dict:
    """Everything that changes the bytes of data/mixed; a change makes the dataset stale."""
    return {"builder": "mixed-v6", "seed": cfg.data_seed, "vocab_size": cfg.vocab_size,
            "tasks": list(cfg.tasks), "scale": cfg.data_scale, "python": sys.version.split()[0],
            "n_images": cfg.n_images if "image" in cfg.tasks else 0,
            "n_audio": cfg.n_audio if "audio" in cfg.tasks else 0, "media": vars(MediaSpec.from_config(cfg)),
            "image_after_question": cfg.image_after_question, "repeat_question": cfg.repeat_question,
            "image_easy_keep": cfg.image_easy_keep, "n_read_images": cfg.n_read_images,
            "image_lookups": cfg.image_lookups, "image_repeats": cfg.image_repeats}



def stdlib_modules() -> list[tuple[Path, str, ast.Module]]:
    """(path, source, syntax tree) of every standard-library module that parses, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = []
    for folder, subfolders, files in os.walk(root):  # not root.rglob, which walks all of site-packages too (0.4-1.6 s)
        subfolders[:] = [d for d in subfolders if d not in SKIP_DIRS]
        paths += [Path(folder) / f for f in files if f.endswith(".py")]
    modules = []
    for path in sorted(paths):
        try:
            source = path.read_text(encoding="utf-8")
            modules.append((path, source, ast.parse(source)))
        except (SyntaxError, UnicodeDecodeError):
            continue
    return modules


def clean(text: str) -> str:
    """Drop the media markers a reader would take for an image or audio slot."""
    return text.replace(IMAGE_MARKER, "<img>").replace(AUDIO_MARKER, "<aud>").strip()


def paragraphs(text: str, max_chars: int) -> str:
    """The opening paragraphs of text, whole, up to about max_chars."""
    out = ""
    for para in re.split(r"\n\s*\n", text.strip()):
        if out and len(out) + len(para) > max_chars:
            break
        out = f"{out}\n\n{para}" if out else para
    return out[: max_chars * 2]


def text_rows(modules: list[tuple[Path, str, ast.Module]]) -> tuple[list[dict], list[dict]]:
    """(instruction rows, plain-text rows) from the documentation topics and module docstrings."""
    from pydoc_data.topics import topics
    instructions, plain = [], []
    for name in sorted(topics):
        body = clean(topics[name])
        instructions.append({"task": "text", "instruction": f"Explain the Python topic '{name}'.",
                             "input": "", "output": paragraphs(body, 400)})
        plain.append({"text": body})
    for path, _, tree in modules:
        doc = ast.get_docstring(tree)
        if doc and len(doc) > 80:
            module = path.stem if path.stem != "__init__" else path.parent.name
            instructions.append({"task": "text", "instruction": f"What does the Python module '{module}' do?",
                                 "input": "", "output": paragraphs(clean(doc), 300)})
            plain.append({"text": clean(doc)})
    return instructions, plain


def function_code(node: ast.FunctionDef, lines: list[str]) -> str | None:
    """The function's own lines, dedented and unparsed without its docstring (a method parses on its own
    too); None when it does not parse alone or is longer than MAX_CODE_LINES."""
    if node.end_lineno - node.lineno > 3 * MAX_CODE_LINES:
        return None
    try:
        func = ast.parse(textwrap.dedent("".join(lines[node.lineno - 1:node.end_lineno]))).body[0]
    except SyntaxError:
        return None
    if ast.get_docstring(func):
        func.body = func.body[1:]  # the docstring goes; the instruction already says it
    code = ast.unparse(func)
    return code if func.body and code.count("\n") + 1 <= MAX_CODE_LINES else None


def code_rows(modules: list[tuple[Path, str, ast.Module]]) -> tuple[list[dict], list[dict]]:
    """Instructions from the standard library's short functions: (documented, more).

    documented: one per short, undecorated, documented function; instruction = the docstring's first
      sentence. The held-out instructions come from these.
    more (training only): the short functions without a docstring (about twice as many), and the decorated
      documented ones (from their def line, without the docstring), whose instruction says only "Write this
      function.". They teach the syntax of bodies from more code than the documented functions hold: with
      those alone the code train loss fell to 1.1 while the val loss stayed at 1.6 (the model learned the
      answers, not Python); with them fewer answers break on a malformed line (EXPERIMENTS.md).
    """
    rows, seen, others = [], set(), []
    for path, source, tree in modules:
        lines = source.splitlines(keepends=True)
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef):
                continue
            doc = ast.get_docstring(node)
            if not doc or node.decorator_list:
                if (code := function_code(node, lines)) is not None:
                    others.append(code)
                continue
            if len(node.body) < 2 or (code := function_code(node, lines)) is None:
                continue
            sentence = re.split(r"(?<=\.)\s", " ".join(doc.split()), maxsplit=1)[0]
            if len(sentence) > 200 or code in seen:
                continue
            seen.add(code)
            rows.append({"task": "code", "instruction": clean(sentence), "input": code.split("\n", 1)[0],
                         "output": code})
    more = []
    for code in others:  # after all documented ones, so none of those comes back here
        if code not in seen:
            seen.add(code)
            more.append({"task": "code", "instruction": "Write this function.", "input": code.split("\n", 1)[0],
                         "output": code})
    return rows, more


SUBJECTS = ["a red fox", "an old lighthouse", "a tiny robot", "a paper boat", "a mountain village", "a koi pond",
            "a steam train", "a sleeping cat", "a glass greenhouse", "a hot air balloon", "a desert cactus",
            "an owl on a branch", "a city street at night", "a bowl of ramen", "a snowy forest cabin",
            "a sailing ship", "a vintage bicycle", "a field of sunflowers", "a giant tortoise", "a wizard's desk"]
STYLES = ["watercolor painting", "oil painting", "pencil sketch", "isometric 3D render", "pixel art",
          "studio photograph", "ukiyo-e woodblock print", "low-poly illustration", "charcoal drawing",
          "children's book illustration"]
LIGHTING = ["soft golden-hour light", "dramatic rim lighting", "overcast diffuse light", "neon glow",
            "candlelight", "harsh midday sun", "moonlight", "foggy morning light"]
SETTINGS = ["on a quiet hillside", "in a bustling market", "under a starry sky", "beside a misty lake",
            "in a cozy attic", "on a windswept beach", "in an overgrown garden", "inside a cathedral"]
DETAILS = ["highly detailed", "shallow depth of field", "muted pastel palette", "vivid colors",
           "wide-angle composition", "centered composition", "fine film grain", "crisp lines"]


def image_prompt_rows(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for _ in range(n):
        subject = rng.choice(SUBJECTS)
        prompt = (f"{subject[0].upper()}{subject[1:]} {rng.choice(SETTINGS)}, {rng.choice(STYLES)}, "
                  f"{rng.choice(LIGHTING)}, {', '.join(rng.sample(DETAILS, 2))}.")
        rows.append({"task": "image", "instruction": f"Generate an image of {subject}.", "input": "",
                     "output": prompt})
    return rows


def split_rows(rng: random.Random, rows: list[dict], n_val: int) -> tuple[list[dict], list[dict]]:
    rows = rows[:]
    rng.shuffle(rows)
    return rows[n_val:], rows[:n_val]


def unanswered(train_rows: list[dict], val_rows: list[dict]) -> list[dict]:
    """The training code rows without a held-out row's instruction and input, so that no held-out question
    is answered in training: the standard library defines some functions twice, in two branches ("Return
    true if the object is a getset descriptor." is `return False` in one, an isinstance check in the other).
    (Not for the image prompts: they share their 20 subjects on purpose.)"""
    held_out = {(row["instruction"], row["input"]) for row in val_rows}
    return [row for row in train_rows if (row["instruction"], row["input"]) not in held_out]


def repeat_kinds(rows: list[dict], repeats: dict[str, int]) -> list[dict]:
    """Each row whose "kind" is a key of repeats written that many times, one after another: a per-question-kind
    draw weight inside the image task (task_weights weighs whole tasks). A row's kind is its first question's (the
    only one with image_after_question). Repeats of a row share its picture, which the packed dataset stores once."""
    check_counts("image_repeats", repeats, KINDS)
    return [row for row in rows for _ in range(repeats.get(row["kind"], 1))]


def build(cfg: TrainConfig, out_dir: str | Path, log=print) -> dict:
    """Write the JSONL files, train the tokenizer, pack; returns meta."""
    t0 = time.time()
    settings = settings_from_config(cfg)
    out_dir = Path(out_dir)
    rng = random.Random(cfg.data_seed)
    modules = stdlib_modules()
    instructions, plain = text_rows(modules)
    code, more_code = code_rows(modules)
    image_prompts = image_prompt_rows(rng, max(60, int(600 * cfg.data_scale)))  # 30 are held out
    jsonl = out_dir / "jsonl"
    parts = {"text_instructions": (instructions, 20), "text_plain": (plain, 20), "code": (code, N_CODE_VAL),
             "image_prompts": (image_prompts, 30), "code_more": (more_code, 0)}
    task_of = {"text_instructions": "text", "text_plain": "text", "code": "code", "image_prompts": "image",
               "code_more": "code"}
    parts = {name: part for name, part in parts.items() if task_of[name] in cfg.tasks}  # --tasks=[...] subsets
    paths = {"train": [], "val": []}
    n_media = {"train": lambda n: max(1, int(n * cfg.data_scale)), "val": lambda n: max(50, n // 10)}
    for split in ("train", "val"):  # media rows come with their own seeds per split
        if "image" in cfg.tasks and cfg.n_images:
            rows = make_image_examples(out_dir / "images" / split, n_media[split](cfg.n_images),
                                       split_seed(cfg.data_seed, split), cfg.image_size, relative_to=out_dir,
                                       all_questions=split == "train", question_first=cfg.image_after_question,
                                       repeat_question=cfg.repeat_question, easy_keep=cfg.image_easy_keep,
                                       n_read=int(cfg.n_read_images * cfg.data_scale) if split == "train" else 0,
                                       lookups=cfg.image_lookups)
            if split == "train":
                rows = repeat_kinds(rows, cfg.image_repeats)
            write_jsonl(jsonl / f"{split}_images.jsonl", rows)
            paths[split].append(jsonl / f"{split}_images.jsonl")
        if "audio" in cfg.tasks and cfg.n_audio:
            rows = make_audio_examples(out_dir, n_media[split](cfg.n_audio), cfg.data_seed, split)
            write_jsonl(jsonl / f"{split}_audio.jsonl", rows)
            paths[split].append(jsonl / f"{split}_audio.jsonl")
    for name, (rows, n_val) in parts.items():
        train_rows, val_rows = split_rows(rng, rows, n_val)
        if name == "code":
            train_rows = unanswered(train_rows, val_rows)
        train_rows = train_rows[: max(1, int(len(train_rows) * min(cfg.data_scale, 1.0)))]
        for split, split_part in (("train", train_rows), ("val", val_rows)):
            if not split_part:  # code_more holds nothing out
                continue
            path = jsonl / f"{split}_{name}.jsonl"
            write_jsonl(path, split_part)
            paths[split].append(path)
    splits = {split: [ex for p in ps for ex in read_examples(p, str(out_dir), tasks=cfg.tasks, log=log)]
              for split, ps in paths.items()}
    corpus = "\n".join(text for ex in splits["train"] for _, text in ex.turns)
    log(f"training the tokenizer: vocab {cfg.vocab_size} on {len(corpus) / 1e6:.1f} MB")
    tok = Tokenizer.train(corpus, cfg.vocab_size, list(cfg.tasks))
    sources = {split: [str(p.relative_to(out_dir)) for p in ps] for split, ps in paths.items()}
    meta = build_dataset(splits, tok, out_dir, settings, sources, MediaSpec.from_config(cfg), ".", log)
    log(describe_meta(meta))
    log(f"built {out_dir} in {time.time() - t0:.0f} s")
    return meta


if __name__ == "__main__":
    config = load_config(sys.argv[1:])
    build(config, Path(config.data_dir) / config.dataset)
