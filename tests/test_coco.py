"""COCO caption files (minimm/coco.py): read through read_examples, bad captions counted, the wrong COCO file
refused, and a caption file trained on by train.py end to end. The files are written here in COCO's layout."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from minimm.coco import CAPTION_QUESTION
from minimm.formats import IMAGE_MARKER, read_examples

ROOT = Path(__file__).resolve().parent.parent


def _coco(tmp_path: Path, n_images: int = 2, annotations: list | None = None) -> Path:
    """A captions_*.json for n_images pictures saved under tmp_path/train2017, COCO's own folder layout."""
    folder = tmp_path / "train2017"
    folder.mkdir(exist_ok=True)
    images = []
    for i in range(n_images):
        name = f"{i + 1:012d}.jpg"
        Image.new("RGB", (40, 30), (20 * i, 100, 200 - 20 * i)).save(folder / name)
        images.append({"id": 100 + i, "file_name": name, "height": 30, "width": 40, "license": 1})
    if annotations is None:
        annotations = [{"id": 7 + i, "image_id": 100 + i % n_images, "caption": f"A picture number {i}. "}
                       for i in range(2 * n_images)]
    path = tmp_path / "captions_train2017.json"
    path.write_text(json.dumps({"info": {}, "licenses": [], "images": images, "annotations": annotations}))
    return path


def test_each_caption_becomes_a_question_about_its_picture(tmp_path):
    path = _coco(tmp_path)
    examples = list(read_examples(path, media_dir=tmp_path / "train2017"))
    assert len(examples) == 4
    for i, example in enumerate(examples):
        assert example.task == "image"
        assert example.turns == [("user", f"{IMAGE_MARKER}\n{CAPTION_QUESTION}"),
                                 ("assistant", f"A picture number {i}.")]
        assert example.images == [str(tmp_path / "train2017" / f"{i % 2 + 1:012d}.jpg")]
        assert example.source == f"{path}:{i + 1}"


def test_bad_captions_are_skipped_counted_and_named(tmp_path):
    annotations = [{"image_id": 100, "caption": "A red square."}, {"image_id": 999, "caption": "Lost."},
                   {"image_id": 101, "caption": None}, "not an object", {"image_id": 101, "caption": "Blue."}]
    path = _coco(tmp_path, annotations=annotations)
    (tmp_path / "train2017" / "000000000002.jpg").unlink()  # the second picture is missing from disk
    lines = []
    reader = read_examples(path, media_dir=tmp_path / "train2017", max_bad_fraction=0.9, log=lines.append)
    examples = list(reader)
    assert [e.turns[1][1] for e in examples] == ["A red square."]
    assert reader.skipped == {"unknown image": 1, "wrong type": 1, "not an object": 1, "missing media": 1}
    printed = "\n".join(lines)
    assert f"{path}:2: image_id 999" in printed and f"{path}:3: 'caption' must be a string" in printed
    assert f"{path}:5: missing image file" in printed and "000000000002.jpg" in printed


def test_an_instances_file_is_refused_with_a_clear_error(tmp_path):
    path = _coco(tmp_path, annotations=[{"id": 1, "image_id": 100, "bbox": [1, 2, 3, 4], "category_id": 18}])
    with pytest.raises(ValueError, match="without captions.*captions_train2017.json"):
        list(read_examples(path, media_dir=tmp_path / "train2017"))


def test_a_json_object_that_is_not_coco_is_refused(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps({"records": []}))
    with pytest.raises(ValueError, match="array of records, or be a COCO caption file"):
        list(read_examples(path))


def test_train_py_trains_on_a_coco_caption_file(tmp_path):
    path = _coco(tmp_path, n_images=6)
    tiny = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=64", "--batch_size=4", "--vocab_size=300",
            "--eval_iters=1", "--eval_media_samples=4", "--warmup_iters=1", "--device=cpu", "--image_size=16",
            "--patch_size=8", "--vit_n_layer=1", "--vit_n_embd=32", "--vit_n_head=2", "--val_fraction=0.25",
            "--tasks=['text','image']"]
    args = [sys.executable, "train.py", f"--train_files=['{path}']", f"--media_dir={tmp_path / 'train2017'}",
            f"--data_dir={tmp_path / 'data'}", "--dataset=coco", f"--out_dir={tmp_path / 'out'}", *tiny,
            "--max_iters=2"]
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = json.loads((tmp_path / "data" / "coco" / "meta.json").read_text())["splits"]
    assert stats["train"]["examples"]["image"] + stats["val"]["examples"]["image"] == 12  # every caption
    assert stats["train"]["image_slots"] + stats["val"]["image_slots"] == 12
    assert stats["train"]["images"] <= 6 and stats["val"]["images"] <= 6  # each picture stored once per split
    assert "val_loss" in json.loads((tmp_path / "out" / "eval.json").read_text())["image"]
    held_out = [json.loads(line)["image"][0] for line in (tmp_path / "data" / "coco" / "jsonl" / "val.jsonl").open()]
    assert held_out and all(held_out.count(p) == 2 for p in held_out)  # both captions of a held-out picture


def test_held_out_pictures_are_never_trained_on():
    sys.path.insert(0, str(ROOT))
    from minimm.formats import Example
    from prepare.jsonl import hold_out
    examples = [Example("image", [("user", f"{IMAGE_MARKER}\nQ"), ("assistant", f"caption {i}")],
                        images=[f"/p/{i % 7}.jpg"], source=f"f:{i}") for i in range(35)]
    examples += [Example("audio", [("user", "<audio>\nKeys?"), ("assistant", f"{i}")], audio=[f"/c/{i % 4}.wav"],
                         source=f"a:{i}") for i in range(12)]
    examples += [Example("text", [("text", f"prose {i}")], source=f"g:{i}") for i in range(10)]
    for seed in range(5):
        train, val = hold_out(examples, 0.2, seed)
        assert sorted(e.source for e in train + val) == sorted(e.source for e in examples)
        assert 11 <= len(val) <= 11 + 4  # the fraction, give or take the last picture's other captions
        media = lambda split: {(e.images or e.audio)[0] for e in split if e.images or e.audio}  # noqa: E731
        assert not media(val) & media(train)


def test_too_few_pictures_to_hold_out_whole_ones_falls_back_and_says_so():
    sys.path.insert(0, str(ROOT))
    from minimm.formats import Example
    from prepare.jsonl import hold_out
    examples = [Example("image", [("user", f"{IMAGE_MARKER}\nQ{i}"), ("assistant", "A")], images=["/p/one.jpg"],
                        source=f"f:{i}") for i in range(10)]
    lines = []
    train, val = hold_out(examples, 0.2, 0, log=lines.append)
    assert len(val) == 2 and len(train) == 8  # one picture for all ten: held out one by one, not all ten
    assert "too few pictures or clips" in lines[0]
