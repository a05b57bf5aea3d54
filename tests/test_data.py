import json

import numpy as np
import pytest

from minimm import data
from minimm.data import Batches, Split
from minimm.pack import build_dataset, dataset_status
from minimm.formats import Example
from minimm.render import render, render_prompt
from minimm.tokenizer import Tokenizer

CORPUS = "the quick brown fox jumps over the lazy dog. def f(x): return x + 1\n" * 20


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(CORPUS, 300, ["text", "code", "image", "audio"])


def chat(task="text"):
    return Example(task=task, turns=[("system", "be brief"), ("user", "say fox <|assistant|> now"),
                                     ("assistant", "the fox"), ("user", "and the dog?"),
                                     ("assistant", "lazy dog.")], source="t:1")


def test_masked_tokens_are_exactly_the_assistant_turns_plus_end(tok):
    r = render(chat(), tok)
    assert len(r.ids) == len(r.mask) and r.ids[0] == tok.task_token("text")
    supervised = [i for i, m in zip(r.ids, r.mask) if m]
    assert tok.decode(supervised) == "the fox<|end|>lazy dog.<|end|>"
    # a role name inside user text stays ordinary text: exactly one real <|assistant|> per assistant turn
    assert r.ids.count(tok.special("<|assistant|>")) == 2


def test_plain_text_is_all_in_the_loss(tok):
    r = render(Example(task="text", turns=[("text", "over the dog")]), tok)
    assert r.mask[0] == 0 and all(r.mask[1:]) and r.ids[-1] == tok.eot


def test_media_markers_become_placeholder_runs_out_of_the_loss(tok):
    ex = Example(task="image", turns=[("user", "<image>\nwhat? <image>"), ("assistant", "two")],
                 images=["a.png", "b.png"])
    r = render(ex, tok, image_tokens=5)
    image = tok.special("<|image|>")
    assert r.ids.count(image) == 10 and r.n_images == 2
    assert all(m == 0 for i, m in zip(r.ids, r.mask) if i == image)


def test_prompt_matches_training_layout(tok):
    turns = chat().turns[:-1]
    prompt = render_prompt(tok, "text", turns)
    full = render(chat(), tok).ids
    assert full[:len(prompt)] == prompt and prompt[-1] == tok.special("<|assistant|>")


def make_dataset(tmp_path, tok, settings):
    text = [Example(task="text", turns=[("text", CORPUS[:400])]) for _ in range(3)]
    chats = [chat(), chat("code"), Example(task="code", turns=[("user", "f?"), ("assistant", "def f(x): pass")])]
    return build_dataset({"train": text + chats * 5, "val": chats}, tok, tmp_path, settings,
                         {"train": [], "val": []})


def test_pack_and_read_back(tmp_path, tok):
    meta = make_dataset(tmp_path, tok, {"v": 1})
    assert meta["splits"]["train"]["examples"] == {"text": 8, "code": 10}
    ids = np.fromfile(tmp_path / "train.bin", dtype=np.uint16)
    assert len(ids) == sum(meta["splits"]["train"]["tokens"].values())
    index = np.load(tmp_path / "train_index.npy")
    start, length = index[3, :2]  # first packed example: the chat
    assert ids[start:start + length].tolist() == render(chat(), tok).ids
    assert Tokenizer.load(tmp_path / "tokenizer").encode("lazy fox") == tok.encode("lazy fox")


def test_batches_targets_masks_tasks_and_segments(tmp_path, tok):
    make_dataset(tmp_path, tok, {"v": 1})
    split = Split(tmp_path, "train", block_size=64)
    b = Batches(split, batch_size=12, seed=3).get(0)
    assert b.x.shape == b.y.shape == b.task_ids.shape == (12, 64)
    supervised = b.y[b.y != -100]
    assert len(supervised) > 0
    np.testing.assert_array_equal(b.x[:, 1:][b.y[:, :-1] != -100], b.y[:, :-1][b.y[:, :-1] != -100])
    # determinism: the same (seed, step) gives the same batch; ranks split the global batch exactly
    again = Batches(split, batch_size=12, seed=3).get(0)
    assert (again.x == b.x).all()
    halves = [Batches(split, 6, 3, rank=r, world_size=2).get(0) for r in (0, 1)]
    assert (np.concatenate([h.x for h in halves]) == b.x.numpy()).all()


def test_packed_rows_never_cross_segments_in_targets(tmp_path, tok):
    make_dataset(tmp_path, tok, {"v": 1})
    split = Split(tmp_path, "val", block_size=80)
    x, y, task, seg, _, _ = split.row(np.random.default_rng(0))
    boundaries = np.nonzero(np.diff(seg))[0]
    assert len(boundaries) >= 1
    for b in boundaries:  # the first token of the next example is never a target
        assert y[b] == -100


def test_stale_detection(tmp_path, tok):
    assert dataset_status(tmp_path, {"v": 1}) == "missing"
    make_dataset(tmp_path, tok, {"v": 1})
    assert dataset_status(tmp_path, {"v": 1}) == "ok"
    assert dataset_status(tmp_path, {"v": 2}) == "stale"
    assert json.loads((tmp_path / "meta.json").read_text())["settings"] == {"v": 1}


def test_task_weights_change_how_often_a_task_is_drawn(tmp_path, tok):
    make_dataset(tmp_path, tok, {"v": 1})
    counts = {}
    for weights in ({}, {"code": 9.0}):
        split = Split(tmp_path, "train", block_size=64, task_weights=weights)
        split.p_window = 0.0  # packed rows only
        tasks = np.concatenate([split.row(np.random.default_rng(i))[2] for i in range(200)])
        counts[bool(weights)] = (tasks == tok.tasks.index("code")).mean()
    assert counts[True] > counts[False] + 0.15


def test_the_text_weight_scales_the_share_of_text_stream_rows(tmp_path, tok):
    make_dataset(tmp_path, tok, {"v": 1})
    p = {w: Split(tmp_path, "train", block_size=16, task_weights={"text": w}).p_window for w in (0.0, 1.0, 4.0)}
    split = Split(tmp_path, "train", block_size=16)
    assert split.p_window > 0 and p[1.0] == pytest.approx(split.p_window)  # weight 1: the token share
    assert p[0.0] == 0.0 < p[1.0] < p[4.0] < 1.0


def test_a_row_is_filled_with_examples_that_fit_before_it_is_padded(tmp_path, tok, monkeypatch):
    """Long and short examples drawn alike: when a long one does not fit the rest of a row, a short one that
    does is drawn in its place (PACK_TRIES), where stopping at the first misfit left the rest as padding."""
    long_ex = Example(task="code", turns=[("user", "f?"), ("assistant", "def f(x): return x + 1\n" * 6)])
    short_ex = Example(task="text", turns=[("user", "dog?"), ("assistant", "lazy")])
    build_dataset({"train": [long_ex, short_ex] * 10, "val": [short_ex]}, tok, tmp_path, {"v": 1},
                  {"train": [], "val": []})
    split = Split(tmp_path, "train", block_size=128)
    short_len = len(render(short_ex, tok).ids)
    assert len(render(long_ex, tok).ids) > 128 // 3 > short_len

    def padding(tries: int) -> list[int]:
        """Padding positions of 60 rows: the row's last segment when it is all end-of-text tokens."""
        monkeypatch.setattr(data, "PACK_TRIES", tries)
        pads = []
        for r in range(60):
            x, _, _, seg, _, _ = split.row(np.random.default_rng([5, r]))
            last = seg == seg[-1]
            pads.append(int(last.sum()) if (x[last] == tok.eot).all() else 0)
        return pads

    tries = data.PACK_TRIES
    once, refill = padding(1), padding(tries)
    assert sum(once) > 3 * sum(refill)  # much less of each row is padding ...
    assert sum(p >= short_len for p in refill) <= 3  # ... and a row rarely ends with room for a short one
    # every row still holds whole examples only: it starts one, and its targets never cross a boundary
    x, y, _, seg, _, _ = split.row(np.random.default_rng(0))
    assert x[0] == tok.task_token("code") or x[0] == tok.task_token("text")
    assert all(y[b] == -100 for b in np.nonzero(np.diff(seg))[0])


def test_data_packed_by_another_layout_is_stale(tmp_path, tok):
    make_dataset(tmp_path, tok, {"v": 1})
    meta = json.loads((tmp_path / "meta.json").read_text())
    (tmp_path / "meta.json").write_text(json.dumps({**meta, "layout": 1}))  # as an older minimm packed it
    assert dataset_status(tmp_path, {"v": 1}) == "stale"


def test_a_picture_shown_by_several_examples_is_stored_once(tmp_path, tok):
    from PIL import Image
    colours = {"red": (250, 0, 0), "green": (0, 250, 0), "blue": (0, 0, 250)}
    for name, rgb in colours.items():
        Image.new("RGB", (8, 8), rgb).save(tmp_path / f"{name}.png")

    def ask(*names):  # one question about these pictures, answered with their names
        return Example("image", [("user", "<image>\n" * len(names) + "What colours?"), ("assistant", " ".join(names))],
                       images=[str(tmp_path / f"{n}.png") for n in names], source="t:1")
    examples = [ask("red"), ask("green", "red"), ask("blue", "blue"), ask("red"), ask("green")]
    out = tmp_path / "data"
    media = data.MediaSpec(image_size=8, image_tokens=1)
    stats = build_dataset({"train": examples, "val": examples[:1]}, tok, out, {"v": 1}, {"train": [], "val": []},
                          media)["splits"]["train"]
    assert stats["images"] == 3 and stats["image_slots"] == 7  # 3 pictures stored, 7 placeholders name them
    assert (out / "train_images.bin").stat().st_size == 3 * 8 * 8 * 3
    split = Split(out, "train", block_size=64)
    slots = [name for ex in examples for name in ex.turns[1][1].split()]
    pixels = split.media(list(range(len(slots))), [])[0]  # (7, 8, 8, 3): each slot's own picture
    assert [tuple(p[4, 4].tolist()) for p in pixels] == [colours[name] for name in slots]
