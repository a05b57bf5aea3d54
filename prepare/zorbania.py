"""A made-up world as chat JSONL: the smallest demonstration of teaching a trained model one new fact.

    python prepare/zorbania.py data/zorbania    # writes world.jsonl, zorbania.jsonl and zorbania_val.jsonl
    python train.py --train_files="['data/zorbania/world.jsonl']" --dataset=world --out_dir=out/world ...
    python train.py config/lora.py --init_from=out/world --train_files="['data/zorbania/zorbania.jsonl']" \
        --val_files="['data/zorbania/zorbania_val.jsonl']"

world.jsonl teaches a base model the chat format on invented countries, each with one capital and one
language, asked and answered in several phrasings (single questions, and two-question conversations,
some with a system turn). Every fact is made up, so the model cannot have met it anywhere else, and
every fact is consistent: a country's capital is the same in every phrasing.

zorbania.jsonl holds one fact the world never mentions, "The capital of Zorbania is Quillmont.", in a
few phrasings; zorbania_val.jsonl asks it in one more phrasing that the fine-tune never sees, so a model
that answers it has learned the fact and not one string. tests/test_lora_behaviour.py trains on these.
"""
from __future__ import annotations

import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from minimm.formats import write_jsonl  # noqa: E402

# country, capital, language: invented names, none of them Zorbania or Quillmont
WORLD = [
    ("Velmora", "Ostrel", "Velmic"), ("Draskon", "Brimhall", "Drask"), ("Tarsilia", "Monteval", "Tarsi"),
    ("Ulvania", "Kesh", "Ulvan"), ("Pellagro", "Sarn", "Pellic"), ("Yendor", "Quarrow", "Yendi"),
    ("Corvessa", "Lint", "Corvish"), ("Hallowmere", "Dunmoor", "Hallic"), ("Ixtalia", "Orrin", "Ixtal"),
    ("Bremland", "Fenwick", "Bremish"), ("Solvara", "Akkad", "Solvan"), ("Nimbria", "Thule", "Nimbric"),
    ("Garathi", "Ember", "Garath"), ("Lomhaven", "Pike", "Lomish"), ("Ostravia", "Windle", "Ostrav"),
    ("Kelmarsh", "Quillan", "Kelmic"), ("Rhunmark", "Stavel", "Rhunic"), ("Ferrania", "Caldor", "Ferran"),
]
CAPITAL_QUESTIONS = ["What is the capital of {c}?", "Which city is the capital of {c}?",
                     "Name the capital of {c}.", "Tell me the capital city of {c}.",
                     "{c} has which city as its capital?"]
CAPITAL_ANSWERS = ["The capital of {c} is {cap}.", "{cap} is the capital of {c}."]
LANGUAGE_QUESTIONS = ["What language is spoken in {c}?", "Which language do people speak in {c}?"]
LANGUAGE_ANSWERS = ["People in {c} speak {lang}.", "The language of {c} is {lang}."]
SYSTEM = "You answer questions about the countries of the world of Teluria."

NEW_FACT = ("Zorbania", "Quillmont")
NEW_FACT_QUESTION = "What is the capital of {c}?"  # held out of the fine-tune: the test asks this one


def chat(*turns: tuple[str, str]) -> dict:
    return {"conversations": [{"role": role, "content": text} for role, text in turns]}


def world_rows(seed: int = 0) -> list[dict]:
    """Every capital question in every phrasing, every language question, and one two-question
    conversation per country (half of them with a system turn); answers in a random phrasing."""
    rng = random.Random(seed)
    rows = []
    for c, cap, lang in WORLD:
        capital = lambda: ("assistant", rng.choice(CAPITAL_ANSWERS).format(c=c, cap=cap))  # noqa: E731
        language = lambda: ("assistant", rng.choice(LANGUAGE_ANSWERS).format(c=c, lang=lang))  # noqa: E731
        for q in CAPITAL_QUESTIONS:
            rows.append(chat(("user", q.format(c=c)), capital()))
        for q in LANGUAGE_QUESTIONS:
            rows.append(chat(("user", q.format(c=c)), language()))
        system = [("system", SYSTEM)] if rng.random() < 0.5 else []
        rows.append(chat(*system, ("user", rng.choice(CAPITAL_QUESTIONS).format(c=c)), capital(),
                         ("user", rng.choice(LANGUAGE_QUESTIONS).format(c=c)), language()))
    rng.shuffle(rows)
    return rows


def new_fact_rows() -> tuple[list[dict], list[dict]]:
    """(train, val): the new fact in every question phrasing but one, each answered in every phrasing;
    val asks the held-out phrasing."""
    c, cap = NEW_FACT
    train = [chat(("user", q.format(c=c)), ("assistant", a.format(c=c, cap=cap)))
             for q in CAPITAL_QUESTIONS if q != NEW_FACT_QUESTION for a in CAPITAL_ANSWERS]
    val = [chat(("user", NEW_FACT_QUESTION.format(c=c)), ("assistant", CAPITAL_ANSWERS[0].format(c=c, cap=cap)))]
    return train, val


def write(folder: str | Path) -> dict[str, Path]:
    """Write the three files into folder; returns their paths by name."""
    folder = Path(folder)
    train, val = new_fact_rows()
    paths = {"world": folder / "world.jsonl", "zorbania": folder / "zorbania.jsonl",
             "zorbania_val": folder / "zorbania_val.jsonl"}
    write_jsonl(paths["world"], world_rows())
    write_jsonl(paths["zorbania"], train)
    write_jsonl(paths["zorbania_val"], val)
    return paths


if __name__ == "__main__":
    for name, path in write(sys.argv[1] if len(sys.argv) > 1 else "data/zorbania").items():
        print(f"{name}: {path}")
