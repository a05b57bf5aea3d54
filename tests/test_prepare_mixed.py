"""prepare/mixed.py: deterministic from its seed, and stale when a setting that shapes it changes."""
import hashlib
import json
from pathlib import Path

from minimm.config import load_config
from minimm.pack import dataset_status
from prepare.mixed import build, settings_from_config

SMALL = ["--data_scale=0.05", "--n_images=60", "--n_audio=20", "--vocab_size=400"]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_training_code_rows_never_answer_a_held_out_question():
    from prepare.mixed import unanswered
    val = [{"instruction": "Return true if x.", "input": "def f(x):", "output": "return True"}]
    train = [{"instruction": "Return true if x.", "input": "def f(x):", "output": "return isinstance(x, int)"},
             {"instruction": "Return true if x.", "input": "def g(x):", "output": "return x"},
             {"instruction": "Write this function.", "input": "def f(x):", "output": "return 1"}]
    assert unanswered(train, val) == train[1:]


def test_repeat_kinds_writes_each_row_of_a_kind_n_times_in_place_and_refuses_bad_values():
    import pytest
    from prepare.mixed import repeat_kinds
    rows = [{"kind": "count", "id": 0}, {"kind": "describe", "id": 1}, {"kind": "read", "id": 2},
            {"kind": "describe", "id": 3}]
    assert repeat_kinds(rows, {}) == rows
    assert [r["id"] for r in repeat_kinds(rows, {"describe": 3, "read": 2})] == [0, 1, 1, 1, 2, 2, 3, 3, 3]
    for bad in ({"shape": 2}, {"describe": 0}, {"describe": 1.5}):
        with pytest.raises(ValueError, match="image_repeats"):
            repeat_kinds(rows, bad)


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_and_changed_settings_are_stale(tmp_path):
    cfg = load_config(SMALL)
    metas = [build(cfg, tmp_path / name, log=lambda *_: None) for name in ("a", "b")]
    a, b = digest(tmp_path / "a"), digest(tmp_path / "b")
    assert a == b and len(a) > 100  # jsonl, tokenizer, memmaps, every PNG and WAV
    for task in ("text", "code", "image", "audio"):
        assert metas[0]["splits"]["train"]["examples"][task] > 0, task
    assert metas[0]["splits"]["val"]["examples"]["code"] >= 50  # the held-out code instructions
    asked = {(r["instruction"], r["input"]) for r in read_jsonl(tmp_path / "a" / "jsonl" / "val_code.jsonl")}
    taught = {(r["instruction"], r["input"]) for r in read_jsonl(tmp_path / "a" / "jsonl" / "train_code.jsonl")}
    assert len(asked) >= 50 and len(taught) > 50 and not asked & taught  # no held-out question answered
    assert dataset_status(tmp_path / "a", settings_from_config(cfg)) == "ok"
    for change in ("--data_seed=7", "--vocab_size=512", "--image_size=32", "--pixel_shuffle=2",
                   "--image_after_question=True", "--repeat_question=True", "--n_read_images=5",
                   "--image_lookups={'color': 3}", "--image_repeats={'describe': 2}"):
        changed = load_config(SMALL + [change])
        assert dataset_status(tmp_path / "a", settings_from_config(changed)) == "stale", change
    build(load_config(SMALL + ["--image_repeats={'count': 2}"]), tmp_path / "c", log=lambda *_: None)
    kinds = {name: [r["kind"] for r in read_jsonl(tmp_path / name / "jsonl" / "train_images.jsonl")] for name in "ac"}
    assert kinds["c"].count("count") == 2 * kinds["a"].count("count") > 0  # the training rows only
    assert [k for k in kinds["c"] if k != "count"] == [k for k in kinds["a"] if k != "count"]
    assert a["jsonl/val_images.jsonl"] == digest(tmp_path / "c")["jsonl/val_images.jsonl"]


SOURCE = '''
def documented(a, b):
    """Add two numbers. More prose here."""
    total = a + b
    return total

def plain(x):
    return [x, x]

def copy_of_documented(a, b):
    total = a + b
    return total

class Box:
    @property
    def size(self):
        """The size."""
        return self._size

    def _long(self):
''' + "".join(f"        v{i} = {i}\n" for i in range(12)) + '''

def only_docstring():
    """Nothing else."""
'''


def test_code_rows_documented_ones_are_held_out_material_and_the_rest_is_training_only():
    import ast
    from prepare.mixed import code_rows
    rows, more = code_rows([(Path("m.py"), SOURCE, ast.parse(SOURCE))])
    assert [(r["instruction"], r["input"]) for r in rows] == [("Add two numbers.", "def documented(a, b):")]
    assert '"""' not in rows[0]["output"]  # the instruction says what the docstring did
    by_input = {r["input"]: r for r in more}
    # undocumented and decorated functions; not the long one, not a body that is only a docstring
    assert set(by_input) == {"def plain(x):", "def copy_of_documented(a, b):", "def size(self):"}
    assert by_input["def size(self):"]["output"] == "def size(self):\n    return self._size"  # from its def line
    assert all(r["instruction"] == "Write this function." and ast.parse(r["output"]) for r in more)
    # a body already among the documented functions does not come back as a training-only row
    src = SOURCE.replace("def copy_of_documented", "def documented")
    rows, more = code_rows([(Path("m.py"), src, ast.parse(src))])
    assert len(rows) == 1 and "def documented(a, b):" not in {r["input"] for r in more}
