"""Tests for prepare/shapes.py and the pictures prepare/drawing.py draws for it: determinism, well-formed rows of
every kind, and answers that can be read back from the pixels alone (colour blobs found by distance from the
background, no metadata)."""
import hashlib
import re
from collections import deque
from pathlib import Path

import numpy as np
import pytest

from minimm.formats import read_examples, write_jsonl
from prepare import shapes
from prepare.shapes import COLORS, KINDS, SHAPES, WHERE, WORDS, make_example, make_image_examples, split_seed

SIZE = shapes.IMAGE_SIZE
PALETTE = np.array(list(COLORS.values()), dtype=np.float64)
NAMES = list(COLORS)
DESCRIBE = re.compile(rf"a ({'|'.join(NAMES)}) ({'|'.join(SHAPES)})(?: left of a ({'|'.join(NAMES)}) "
                      rf"({'|'.join(SHAPES)})){{0,2}}")


def _kind_of(question: str) -> str:
    """The kind whose template (shapes.QUESTIONS) the question fills."""
    return next(k for k, q in shapes.QUESTIONS.items() if re.fullmatch(
        re.escape(q).replace(r"\{shape\}", r"\w+").replace(r"\{color\}", r"\w+"), question))


def _digests(out_dir: Path, rows: list[dict]) -> list[str]:
    return [hashlib.sha256((out_dir / row["image"]).read_bytes()).hexdigest() for row in rows]


def test_same_seed_same_bytes(tmp_path):
    rows_a = make_image_examples(tmp_path / "a", 15, seed=7, image_size=SIZE)
    rows_b = make_image_examples(tmp_path / "b", 15, seed=7, image_size=SIZE)
    assert rows_a == rows_b
    assert _digests(tmp_path / "a", rows_a) == _digests(tmp_path / "b", rows_b)
    rows_c = make_image_examples(tmp_path / "c", 15, seed=8, image_size=SIZE)
    assert len(set(_digests(tmp_path / "a", rows_a)) & set(_digests(tmp_path / "c", rows_c))) == 0


def test_validation_seed_differs_from_training(tmp_path):
    seeds = [split_seed(s, split) for s in range(100) for split in ("train", "val")]
    assert len(set(seeds)) == len(seeds)  # no val split of one seed is the train split of another
    train = make_image_examples(tmp_path / "train", 20, split_seed(1337, "train"), SIZE)
    val = make_image_examples(tmp_path / "val", 20, split_seed(1337, "val"), SIZE)
    assert not set(_digests(tmp_path / "train", train)) & set(_digests(tmp_path / "val", val))


def test_rows_are_well_formed_and_readable_by_formats(tmp_path):
    rows = make_image_examples(tmp_path / "images", 120, seed=3, image_size=SIZE, relative_to=tmp_path)
    assert {row["kind"] for row in rows} == set(KINDS)
    schemas = {"conversations" if "conversations" in row else "response" for row in rows}
    assert schemas == {"conversations", "response"}
    for row in rows:
        assert (tmp_path / row["image"]).is_file() and row["image"].startswith("images/")
        if "conversations" in row:
            user, assistant = row["conversations"]
            assert user["role"] == "user" and user["content"].startswith("<image>\n")
            question, answer = user["content"][len("<image>\n"):], assistant["content"]
        else:
            question, answer = row["text"], row["response"]
        kind = row["kind"]
        if kind == "describe":
            assert question == "Describe the image." and DESCRIBE.fullmatch(answer), answer
        elif kind == "count":
            assert answer in ("1", "2", "3")
        elif kind == "color":
            assert re.fullmatch(rf"What color is the ({'|'.join(SHAPES)})\?", question) and answer in COLORS
        elif kind == "where":
            assert re.fullmatch(rf"Where is the ({'|'.join(NAMES)}) shape\?", question) and answer in WHERE
        else:
            assert question == "What does the text say?" and answer in WORDS
    write_jsonl(tmp_path / "train.jsonl", rows)
    examples = list(read_examples(tmp_path / "train.jsonl", log=lambda line: pytest.fail(line)))
    assert len(examples) == len(rows) and all(e.task == "image" and len(e.images) == 1 for e in examples)


def _blobs(pixels: np.ndarray) -> list[tuple[str, float, float]]:
    """(colour name, centre x, centre y) of each 8-connected region that stands out from the background."""
    background = np.median(pixels.reshape(-1, 3), axis=0)
    foreground = np.linalg.norm(pixels - background, axis=-1) > 60
    seen = np.zeros_like(foreground)
    blobs = []
    for start in zip(*np.nonzero(foreground)):
        if seen[start]:
            continue
        seen[start] = True
        queue, members = deque([start]), []
        while queue:
            y, x = queue.popleft()
            members.append((y, x))
            for ny, nx in ((y + dy, x + dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)):
                if 0 <= ny < SIZE and 0 <= nx < SIZE and foreground[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        ys, xs = np.array(members).T
        nearest = np.linalg.norm(pixels[ys, xs, None] - PALETTE, axis=-1).argmin(axis=1)
        blobs.append((NAMES[np.bincount(nearest).argmax()], xs.mean(), ys.mean()))
    return blobs


def _cell(x: float, y: float) -> str:
    return WHERE[3 * int(y * 3 // SIZE) + int(x * 3 // SIZE)]


def test_answers_agree_with_the_pixels():
    checked = dict.fromkeys(KINDS, 0)
    for i in range(150):
        example = make_example(11, i, SIZE)
        pixels = np.asarray(example.image, dtype=np.float64)
        checked[example.kind] += 1
        if example.kind == "read":
            continue
        blobs = sorted(_blobs(pixels), key=lambda blob: blob[1])
        assert len(blobs) == len(example.shapes), (i, blobs)  # count: one blob per shape
        if example.kind == "count":
            assert str(len(blobs)) == example.answer
        elif example.kind == "describe":
            assert [name for name, _, _ in blobs] == re.findall(rf"a ({'|'.join(NAMES)}) ", example.answer)
        elif example.kind == "where":
            colour = example.question.split()[3]
            (x, y), = [(x, y) for name, x, y in blobs if name == colour]
            assert _cell(x, y) == example.answer
        else:  # colour: the pixels at the named shape's centre have the answered colour
            shape, = [s for s in example.shapes if s.name == example.question.split()[-1][:-1]]
            centre = pixels[round(shape.y) - 1:round(shape.y) + 2, round(shape.x) - 1:round(shape.x) + 2]
            nearest = np.linalg.norm(centre.reshape(-1, 1, 3) - PALETTE, axis=-1).argmin(axis=1)
            assert all(NAMES[k] == example.answer for k in nearest)
    assert min(checked.values()) >= 15


def test_shapes_and_text_are_big_enough_to_see():
    for i in range(150):
        example = make_example(5, i, SIZE)
        if example.kind != "read":
            assert all(2 * s.r >= 9 for s in example.shapes)  # at least 9 pixels across
            continue
        pixels = np.asarray(example.image, dtype=np.float64)
        ink = np.linalg.norm(pixels - np.median(pixels.reshape(-1, 3), axis=0), axis=-1) > 60
        ys, xs = np.nonzero(ink)
        assert ys.min() > 0 and xs.min() > 0 and ys.max() < SIZE - 1 and xs.max() < SIZE - 1  # not cut off
        assert ys.max() - ys.min() + 1 >= 7  # letters at least 7 pixels tall: legible
        assert (xs.max() - xs.min() + 1) >= 4 * len(example.word)
        # each letter's centre (what prepare/vision_pretrain.py labels a cell by): left to right inside the ink
        centres = np.array(example.letters)
        assert len(centres) == len(example.word) and (np.diff(centres[:, 0]) > 0).all()
        assert xs.min() < centres[0, 0] < xs.min() + (xs.max() - xs.min()) / len(example.word) + 1
        assert xs.max() - (xs.max() - xs.min()) / len(example.word) - 1 < centres[-1, 0] < xs.max()
        assert (ys.min() <= centres[:, 1]).all() and (centres[:, 1] <= ys.max()).all()


@pytest.mark.parametrize("image_size", [36, 64])
def test_other_image_sizes(image_size):
    for i in range(10):
        example = make_example(2, i, image_size)
        assert example.image.size == (image_size, image_size) and example.image.mode == "RGB"


def test_all_questions_asks_every_well_posed_question_once(tmp_path):
    single = make_image_examples(tmp_path / "one", 60, seed=11, image_size=SIZE)
    multi = make_image_examples(tmp_path / "all", 60, seed=11, image_size=SIZE, all_questions=True)
    assert _digests(tmp_path / "one", single) == _digests(tmp_path / "all", multi)  # the same pictures
    lengths = set()
    for one, row in zip(single, multi):
        assert row["kind"] == one["kind"]
        if "conversations" not in row:  # the {"text", "response"} schema holds one question
            assert row == one | {"image": row["image"]}
            continue
        turns = row["conversations"]
        assert turns[:2] == one["conversations"]  # the picture's own question comes first, unchanged
        assert [t["role"] for t in turns] == ["user", "assistant"] * (len(turns) // 2)
        assert all("<image>" not in t["content"] for t in turns[2:])  # one picture, one placeholder
        questions = [t["content"].removeprefix("<image>\n") for t in turns[::2]]
        kinds = [_kind_of(question) for question in questions]
        assert len(set(kinds)) == len(kinds)  # no kind twice
        if row["kind"] == "read":
            assert len(turns) == 2
        else:  # describe and count are always well posed; color and where when one shape is unique
            assert {"describe", "count"} <= set(kinds) and "read" not in kinds
        lengths.add(len(turns) // 2)
    assert {3, 4} <= lengths  # scenes where a question would be ambiguous, and scenes with all four


def test_all_questions_answers_match_the_scene():
    rng = np.random.default_rng(0)
    for index in range(40):
        example = make_example(3, index)
        for _, question, answer in shapes.scene_questions(rng, example):
            if question == "How many shapes are there?":
                assert answer == str(len(example.shapes))
            elif question.startswith("What color is the "):
                name = question.removeprefix("What color is the ").removesuffix("?")
                assert [s.color for s in example.shapes if s.name == name] == [answer]
            elif question.startswith("Where is the "):
                color = question.removeprefix("Where is the ").removesuffix(" shape?")
                assert [s.where for s in example.shapes if s.color == color] == [answer]


def test_question_first_asks_each_question_before_its_own_picture(tmp_path):
    conversation = make_image_examples(tmp_path / "conv", 40, seed=11, image_size=SIZE, all_questions=True)
    first = make_image_examples(tmp_path / "first", 40, seed=11, image_size=SIZE, all_questions=True,
                                question_first=True)
    assert first[0]["kind"] == make_example(11, 0, SIZE).kind
    by_picture: dict[str, list[dict]] = {}
    for row in first:
        by_picture.setdefault(row["image"], []).append(row)
    assert len(by_picture) == 40 and len(first) > 80  # several rows per scene
    for row in conversation:  # the same questions and answers, each now a row of its own
        rows = by_picture[row["image"]]
        if "conversations" in row:
            turns = row["conversations"]
            asked = [(t["content"].removeprefix("<image>\n"), a["content"]) for t, a in zip(turns[::2], turns[1::2])]
        else:  # that schema holds the picture's own question only; question_first asks every one
            asked = [(row["text"], row["response"])]
            assert all("text" in r for r in rows)
        got = [(r["text"], r["response"]) if "text" in r else
               (r["conversations"][0]["content"], r["conversations"][1]["content"]) for r in rows]
        assert got[:len(asked)] == [(f"{q}\n<image>", a) for q, a in asked]
        assert len(got) == len(asked) or "text" in row
        for r, (question, _) in zip(rows, asked):  # each row's kind is its own question's
            template = shapes.QUESTIONS[r["kind"]]
            pattern = re.escape(template).replace(r"\{shape\}", r"\w+").replace(r"\{color\}", r"\w+")
            assert re.fullmatch(pattern, question)
    again = make_image_examples(tmp_path / "again", 40, seed=11, image_size=SIZE, all_questions=True,
                                question_first=True, repeat_question=True)
    assert len(again) == len(first)
    for r_first, r_again in zip(first, again):  # the same rows, each question asked again after its picture
        said = r_first["text"] if "text" in r_first else r_first["conversations"][0]["content"]
        question = said.removesuffix("\n<image>")
        assert (r_again["text"] if "text" in r_again else r_again["conversations"][0]["content"]) == \
            f"{question}\n<image>\n{question}"
    write_jsonl(tmp_path / "first.jsonl", first)
    examples = list(read_examples(tmp_path / "first.jsonl", str(tmp_path / "first"), log=lambda *_: None))
    assert len(examples) == len(first)
    for ex in examples:  # the reader keeps the placeholder where the row puts it: after the question
        (role, text), (answer_role, _) = ex.turns
        assert role == "user" and answer_role == "assistant" and len(ex.images) == 1
        assert text.endswith((".\n<image>", "?\n<image>"))


def _asked(row: dict) -> list[tuple[str, str]]:
    """(question, answer) of each exchange of a row, the image placeholder taken out."""
    if "text" in row:
        return [(row["text"].replace("\n<image>", ""), row["response"])]
    turns = row["conversations"]
    return [(t["content"].replace("<image>\n", "").replace("\n<image>", ""), a["content"])
            for t, a in zip(turns[::2], turns[1::2])]


@pytest.mark.parametrize("question_first", [True, False])
def test_easy_keep_leaves_out_only_answers_that_need_no_lookup(tmp_path, question_first):
    kw = dict(image_size=SIZE, all_questions=True, question_first=question_first)
    full = make_image_examples(tmp_path / "full", 80, seed=5, **kw)
    none = make_image_examples(tmp_path / "none", 80, seed=5, easy_keep=0.0, **kw)
    some = make_image_examples(tmp_path / "some", 80, seed=5, easy_keep=0.5, **kw)
    assert make_image_examples(tmp_path / "one", 80, seed=5, easy_keep=1.0, **kw) == full
    n_shapes = {i: len(make_example(5, i, SIZE).shapes) for i in range(80)}

    def exchanges(rows):  # picture index -> [(kind, question, answer)], in order
        out: dict[int, list] = {}
        for row in rows:
            i = int(Path(row["image"]).stem)
            for question, answer in _asked(row):
                out.setdefault(i, []).append((_kind_of(question), question, answer))
        return out

    asked_full, asked_none, asked_some = exchanges(full), exchanges(none), exchanges(some)
    easy = {i: [e for e in asked if shapes.needs_no_lookup(e[0], n_shapes[i])] for i, asked in asked_full.items()}
    assert 40 < sum(map(len, easy.values())) < sum(map(len, asked_full.values()))  # both sorts are there
    one_question = {int(Path(r["image"]).stem) for r in full if "text" in r and not question_first}
    for i in one_question:  # that schema holds one question, in conversation layout: the first one kept
        assert len(asked_none[i]) == 1
        del easy[i]
    for i, asked in asked_full.items():
        if i in one_question:
            continue
        hard = [e for e in asked if e not in easy[i]]
        assert hard and asked_none[i] == hard  # every picture keeps the rest, in its order
        kept = asked_some[i]
        assert [e for e in kept if e in hard] == hard and set(kept) <= set(asked)
        if n_shapes[i] == 1:  # the only shape's colour and place, and the count, are the ones left out
            assert {e[0] for e in hard} == {"describe"}
    n_easy_kept = sum(len(asked_some[i]) - len(asked_none[i]) for i in easy)
    assert 0.3 < n_easy_kept / sum(map(len, easy.values())) < 0.7
    for row in none:  # a row's kind is its first question's, and a conversation's picture comes with it
        assert row["kind"] == exchanges([row])[int(Path(row["image"]).stem)][0][0]
        if "conversations" in row and not question_first:
            assert row["conversations"][0]["content"].startswith("<image>\n")
    with pytest.raises(ValueError, match="easy_keep"):
        make_image_examples(tmp_path / "bad", 2, seed=5, easy_keep=1.5, **kw)


def test_n_read_adds_text_pictures_after_the_scenes(tmp_path):
    """n_read pictures of a word alone follow the n scenes, which stay byte for byte what they were; each asks
    "What does the text say?" and its answer is the word drawn (make_example at its READ_INDEX index)."""
    kw = dict(seed=5, image_size=SIZE, all_questions=True, question_first=True, repeat_question=True)
    plain = make_image_examples(tmp_path / "plain", 12, **kw)
    more = make_image_examples(tmp_path / "more", 12, n_read=20, **kw)
    assert more[:len(plain)] == plain
    assert _digests(tmp_path / "more", more[:len(plain)]) == _digests(tmp_path / "plain", plain)
    added = more[len(plain):]
    assert len(added) == 20 and all(row["kind"] == "read" for row in added)
    words = set()
    for row in added:
        index = int(Path(row["image"]).stem)
        ((question, answer),) = _asked(row)
        assert index >= shapes.READ_INDEX and question.count(shapes.QUESTIONS["read"]) == 2
        assert answer == make_example(5, index, SIZE, "read").word
        words.add(answer)
    assert len(words) > 5
