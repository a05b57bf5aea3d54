"""sample.py's prompt: an instruction with its input (--prompt, --input) is laid out as the data reader lays out
the instruction schema in training, so the model sees the question in the form it learned; a picture goes before
or after the question as the checkpoint's config says it was trained (image_after_question)."""
import importlib.util
from pathlib import Path

import pytest
from PIL import Image

from minimm.config import load_config
from minimm.formats import read_examples, write_jsonl

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("sample_script", ROOT / "sample.py")
sample = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sample)


@pytest.mark.parametrize("record", [
    {"task": "code", "instruction": "Return the larger of two numbers.", "input": "def larger(a, b):"},
    {"task": "code", "instruction": "Say hi.", "input": ""},
])
def test_prompt_and_input_make_the_training_user_turn(tmp_path, record):
    write_jsonl(tmp_path / "one.jsonl", [record | {"output": "pass"}])
    (example,) = list(read_examples(tmp_path / "one.jsonl", log=lambda *_: None))
    cfg = load_config([f"--prompt={record['instruction']}", f"--input={record['input']}", "--task=code"],
                      sample.SampleConfig)
    images, audio, turns = sample.media_turns(cfg, model=None, ckpt={})
    assert (images, audio) == ([], [])
    assert turns == example.turns[:-1]  # the user turn; the reader's last turn is the answer


class _Vision:
    class vision:
        class config:
            image_size = 16


LAYOUTS = [  # (image_after_question, repeat_question) in the checkpoint's config -> the user turn
    (False, False, "<image>\nWhat color is it?"),
    (True, False, "What color is it?\n<image>"),
    (True, True, "What color is it?\n<image>\nWhat color is it?"),
]


@pytest.mark.parametrize("after, repeat, turn", LAYOUTS)
def test_a_picture_goes_where_the_checkpoint_was_trained_to_see_it(tmp_path, after, repeat, turn):
    Image.new("RGB", (20, 20), (200, 0, 0)).save(tmp_path / "red.png")
    cfg = load_config(["--task=image", f"--image={tmp_path / 'red.png'}", "--prompt=What color is it?"],
                      sample.SampleConfig)
    trained = {"config": {"image_after_question": after, "repeat_question": repeat}}
    images, audio, turns = sample.media_turns(cfg, _Vision(), trained)
    assert len(images) == 1 and images[0].shape == (16, 16, 3) and audio == []
    assert turns == [("user", turn)]
