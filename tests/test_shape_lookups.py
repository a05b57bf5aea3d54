"""Tests for prepare/shapes.py's lookups: a training scene that asks the colour of several of its shapes and the place
of several of its colours. Every question must name one shape of the scene, its answer must be that shape's, none
may be asked twice, and without added lookups the rows must be those of before, byte for byte."""
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from prepare import shapes
from prepare.shapes import make_example, make_image_examples

SIZE = shapes.IMAGE_SIZE
KW = dict(image_size=SIZE, all_questions=True, question_first=True, repeat_question=True)


def _question(row: dict) -> tuple[str, str]:
    """(question as first asked, answer) of a question-first row."""
    user, answer = (row["text"], row["response"]) if "text" in row else \
        (row["conversations"][0]["content"], row["conversations"][1]["content"])
    return user.split("\n<image>")[0], answer


def test_every_unambiguous_shape_is_asked_once_with_its_own_answer():
    rng, more = np.random.default_rng(0), np.random.default_rng(1)
    n_asked = Counter()
    for index in range(60):
        example = make_example(3, index)
        asked = shapes.scene_questions(rng, example, {"color": 3, "where": 3}, more)
        questions = [q for _, q, _ in asked]
        assert len(questions) == len(set(questions)), questions  # nothing asked twice
        if example.kind == "read":
            assert len(asked) == 1
            continue
        names = [s.name for s in example.shapes]
        colors = [s.color for s in example.shapes]
        for kind, question, answer in asked:
            if kind == "color":
                name = question.removeprefix("What color is the ").removesuffix("?")
                assert names.count(name) == 1 and answer == example.shapes[names.index(name)].color
            elif kind == "where":
                color = question.removeprefix("Where is the ").removesuffix(" shape?")
                assert colors.count(color) == 1 and answer == example.shapes[colors.index(color)].where
        kinds = Counter(kind for kind, _, _ in asked)
        # every shape with a name of its own is asked its colour, every colour of its own its place
        assert kinds["color"] == sum(names.count(n) == 1 for n in names)
        assert kinds["where"] == sum(colors.count(c) == 1 for c in colors)
        n_asked[len(example.shapes)] += kinds["color"]
    assert n_asked[3] > n_asked[1] > 0  # scenes of three shapes asked the most


def test_lookups_caps_each_kind_and_keeps_the_first_questions():
    for index in range(60):
        example = make_example(4, index)
        one = shapes.scene_questions(np.random.default_rng([4, index]), example)
        one_of = Counter(kind for kind, _, _ in one)
        for lookups in ({"color": 2}, {"where": 2}, {"color": 3, "where": 2}):
            many = shapes.scene_questions(np.random.default_rng([4, index]), example, lookups,
                                          np.random.default_rng([4, index, 3]))
            assert many[:len(one)] == one  # the questions asked without lookups first, in their order
            kinds = Counter(kind for kind, _, _ in many)
            for kind in shapes.LOOKUPS:  # a kind left out of lookups is asked as before
                assert kinds[kind] <= lookups.get(kind, one_of[kind])
            assert {kind for kind, _, _ in many[len(one):]} <= set(lookups)


def test_make_image_examples_with_lookups(tmp_path):
    base = make_image_examples(tmp_path / "one", 50, seed=5, **KW)
    assert make_image_examples(tmp_path / "same", 50, seed=5, lookups={"color": 1}, **KW) == base
    rows = make_image_examples(tmp_path / "all", 50, seed=5, lookups={"color": 3, "where": 3}, easy_keep=0.25, **KW)
    thinned = make_image_examples(tmp_path / "thin", 50, seed=5, easy_keep=0.25, **KW)
    by_picture: dict[int, list[tuple[str, str]]] = {}
    for row in rows:
        by_picture.setdefault(int(Path(row["image"]).stem), []).append(_question(row))
    for row in thinned:  # every question asked without lookups is still asked, with the same answer
        assert _question(row) in by_picture[int(Path(row["image"]).stem)]
    kinds, kinds_before = Counter(r["kind"] for r in rows), Counter(r["kind"] for r in thinned)
    assert kinds["color"] > kinds_before["color"] and kinds["where"] > kinds_before["where"]
    assert {k: kinds[k] for k in ("describe", "count", "read")} == \
        {k: kinds_before[k] for k in ("describe", "count", "read")}
    for i, asked in by_picture.items():  # a scene of one shape adds nothing: its lookups need none
        if len(make_example(5, i, SIZE).shapes) == 1:
            assert len(asked) == len([r for r in thinned if int(Path(r["image"]).stem) == i])
    colour_only = make_image_examples(tmp_path / "colour", 50, seed=5, lookups={"color": 3}, easy_keep=0.25, **KW)
    assert Counter(r["kind"] for r in colour_only) == {**kinds, "where": kinds_before["where"]}
    for bad in ({"color": 0}, {"count": 2}, {"where": 1.5}):
        with pytest.raises(ValueError, match="lookups"):
            make_image_examples(tmp_path / "bad", 2, seed=5, lookups=bad, **KW)
