"""Tests for minimm/formats.py: every schema, marker insertion, media paths and every kind of bad input."""
import json
import os
import wave

import pytest
from PIL import Image

from minimm.formats import (AUDIO_MARKER, IMAGE_MARKER, TXT_DOCUMENT_CHARS, Example, read_examples, user_text,
                            write_jsonl)


def png(path, size=(7, 5)):
    Image.new("RGB", size, (200, 30, 90)).save(path)
    return str(path)


def wav(path, n_frames=1601):
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(bytes(2 * n_frames))
    return str(path)


def jsonl(path, rows):
    """Write rows as lines; a str row is written verbatim (for bad JSON)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def read_all(path, **kw):
    logs = []
    reader = read_examples(path, log=logs.append, **kw)
    return list(reader), reader, logs


def test_instruction_schema(tmp_path):
    f = jsonl(tmp_path / "d.jsonl", [
        {"task": "code", "instruction": "Reverse a list.", "input": "[1, 2]", "output": "xs[::-1]"},
        {"task": "text", "instruction": "Say hi.", "input": "", "output": "hi"},
        {"instruction": "No input key.", "output": "ok"},
    ])
    examples, reader, logs = read_all(f)
    assert [e.task for e in examples] == ["code", "text", "text"]
    assert examples[0].turns == [("user", "Reverse a list.\n\n[1, 2]"), ("assistant", "xs[::-1]")]
    assert examples[1].turns == [("user", "Say hi."), ("assistant", "hi")]
    assert examples[0].source == f"{f}:1" and examples[2].source == f"{f}:3"
    assert reader.n_yielded == 3 and reader.n_lines == 3 and not reader.skipped and logs == []


def test_instruction_with_image_and_audio_gets_markers(tmp_path):
    image, clip = png(tmp_path / "a.png"), wav(tmp_path / "a.wav")
    f = jsonl(tmp_path / "d.jsonl", [{"instruction": "Describe.", "output": "red", "image": "a.png",
                                      "audio": ["a.wav"]}])
    (e,), _, _ = read_all(f)
    assert e.task == "image"  # images win the default over audio
    assert e.images == [image] and e.audio == [clip]
    assert e.turns[0] == ("user", f"{AUDIO_MARKER}\n{IMAGE_MARKER}\nDescribe.")


def test_vision_response_schema(tmp_path):
    image = png(tmp_path / "cat.png")
    f = jsonl(tmp_path / "v.jsonl", [{"text": "What colour?", "image": "cat.png", "response": "Magenta."}])
    (e,), _, _ = read_all(f)
    assert e.task == "image" and e.images == [image] and e.audio == []
    assert e.turns == [("user", f"{IMAGE_MARKER}\nWhat colour?"), ("assistant", "Magenta.")]


def test_conversations_role_content_with_audio(tmp_path):
    clip = wav(tmp_path / "s.wav")
    f = jsonl(tmp_path / "c.jsonl", [{"audio": "s.wav", "conversations": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Transcribe."},
        {"role": "assistant", "content": "silence"},
    ]}])
    (e,), _, _ = read_all(f)
    assert e.task == "audio" and e.audio == [clip]
    assert e.turns == [("system", "Be brief."), ("user", f"{AUDIO_MARKER}\nTranscribe."), ("assistant", "silence")]


def test_llava_json_array_keeps_its_markers(tmp_path):
    first, second = png(tmp_path / "1.png"), png(tmp_path / "2.png", (3, 11))
    f = tmp_path / "llava.json"
    f.write_text(json.dumps([
        {"id": "0", "image": "1.png", "conversations": [
            {"from": "human", "value": "What is shown?\n<image>"}, {"from": "gpt", "value": "A square."},
            {"from": "human", "value": "Colour?"}, {"from": "gpt", "value": "Magenta."}]},
        {"id": "1", "image": ["1.png", "2.png"], "conversations": [
            {"from": "system", "value": "Compare."},
            {"from": "human", "value": "<image> vs <image>"}, {"from": "gpt", "value": "Same colour."}]},
    ]))
    examples, reader, _ = read_all(f)
    assert [e.task for e in examples] == ["image", "image"]
    assert examples[0].turns[0] == ("user", "What is shown?\n<image>")  # no marker added: it has one
    assert [r for r, _ in examples[0].turns] == ["user", "assistant", "user", "assistant"]
    assert examples[1].images == [first, second]
    assert examples[1].turns[:2] == [("system", "Compare."), ("user", "<image> vs <image>")]
    assert examples[1].source == f"{f}:2" and reader.n_lines == 2


def test_missing_markers_go_first_in_the_first_user_turn(tmp_path):
    for name in ("a.png", "b.png", "c.png"):
        png(tmp_path / name)
    f = jsonl(tmp_path / "c.jsonl", [{"image": ["a.png", "b.png", "c.png"], "conversations": [
        {"role": "system", "content": "sys"}, {"role": "user", "content": "see <image>"},
        {"role": "assistant", "content": "ok"}, {"role": "user", "content": "more"},
        {"role": "assistant", "content": "done"}]}])
    (e,), _, _ = read_all(f)
    assert e.turns[0] == ("system", "sys")
    assert e.turns[1] == ("user", "<image>\n<image>\nsee <image>")
    assert e.turns[3] == ("user", "more")
    assert sum(t.count(IMAGE_MARKER) for _, t in e.turns) == len(e.images) == 3


def test_user_text_lays_out_markers_as_the_readers_do(tmp_path):
    """sample.py and the chat page build a user turn with user_text: the layout the reader gives a record with
    the same files, markers first (missing ones are prepended), or the picture after the question."""
    png(tmp_path / "a.png")
    f = jsonl(tmp_path / "r.jsonl", [{"text": "Colour?", "image": "a.png", "response": "red"},
                                     {"text": "Colour?\n<image>", "image": "a.png", "response": "red"},
                                     {"text": "Colour?\n<image>\nColour?", "image": "a.png", "response": "red"}])
    (first, after, again), _, _ = read_all(f)
    assert user_text("Colour?", n_images=1) == first.turns[0][1] == "<image>\nColour?"
    assert user_text("Colour?", n_images=1, image_after_text=True) == after.turns[0][1] == "Colour?\n<image>"
    assert (user_text("Colour?", n_images=1, image_after_text=True, repeat_text=True) == again.turns[0][1]
            == "Colour?\n<image>\nColour?")
    assert user_text("Colour?", n_images=1, repeat_text=True) == "<image>\nColour?"  # only after the picture
    assert user_text("Plain.", image_after_text=True, repeat_text=True) == "Plain."  # no picture: said once
    assert user_text("Keys?", n_audio=1) == "<audio>\nKeys?"
    assert user_text("Both?", 2, 1, image_after_text=True) == "<audio>\nBoth?\n<image>\n<image>"
    assert user_text("Both?", 1, 1) == "<image>\n<audio>\nBoth?"
    assert user_text("Plain.") == "Plain."


def test_text_lines_and_code_task(tmp_path):
    rows = [{"text": "Once upon a time."}, "", "   ", {"text": "def f(): pass", "task": "code"}]
    f = jsonl(tmp_path / "t.jsonl", rows)
    examples, reader, logs = read_all(f)
    assert [(e.task, e.turns) for e in examples] == [("text", [("text", "Once upon a time.")]),
                                                     ("code", [("text", "def f(): pass")])]
    assert examples[1].source == f"{f}:4"  # blank lines are skipped silently but still numbered
    assert reader.n_lines == 2 and not reader.skipped and logs == []


def test_txt_file_is_split_into_documents_at_blank_lines(tmp_path):
    paragraph = "word " * 700  # 3500 chars: three of these pass TXT_DOCUMENT_CHARS
    assert 2 * len(paragraph) < TXT_DOCUMENT_CHARS < 3 * len(paragraph)
    f = tmp_path / "book.txt"
    f.write_text("\n\n" + "\n\n".join([paragraph] * 4) + "\n\n\n")
    examples, reader, _ = read_all(f)
    assert [e.task for e in examples] == ["text", "text"]
    assert [e.turns[0][1].count("word") for e in examples] == [2100, 700]
    assert examples[0].source == f"{f}:3" and examples[1].source == f"{f}:9"


def test_small_txt_file_is_one_example(tmp_path):
    f = tmp_path / "note.txt"
    f.write_text("first paragraph\n\nsecond paragraph\n")
    (e,), _, _ = read_all(f)
    assert e.turns == [("text", "first paragraph\n\nsecond paragraph")]


def test_media_resolved_against_media_dir_and_absolute_paths_kept(tmp_path):
    media = tmp_path / "media"
    media.mkdir()
    inside = png(media / "x.png")
    elsewhere = png(tmp_path / "abs.png")
    data = tmp_path / "data"
    data.mkdir()
    f = jsonl(data / "d.jsonl", [{"text": "q", "image": ["x.png", elsewhere], "response": "a"}])
    (e,), _, _ = read_all(f, media_dir=str(media))
    assert e.images == [inside, elsewhere]
    assert all(os.path.isabs(p) for p in e.images)


def test_relative_jsonl_path_resolves_media_against_its_folder(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    image = png(tmp_path / "sub" / "y.png")
    jsonl(tmp_path / "sub" / "d.jsonl", [{"text": "q", "image": "y.png", "response": "a"}])
    monkeypatch.chdir(tmp_path)
    (e,), _, _ = read_all(os.path.join("sub", "d.jsonl"))
    assert e.images == [image]


BAD_LINES = [  # (line, reason counted)
    ("{not json", "not JSON"),
    ("[1, 2]", "not an object"),
    ({"prompt": "x", "completion": "y"}, "no schema"),
    ({"instruction": "x"}, "missing field"),
    ({"text": "q", "response": "a"}, "missing field"),
    ({"conversations": [{"role": "user"}, {"role": "assistant", "content": "a"}]}, "missing field"),
    ({"text": 42}, "wrong type"),
    ({"instruction": "x", "input": 3, "output": "y"}, "wrong type"),
    ({"conversations": "hi"}, "wrong type"),
    ({"conversations": ["hi"]}, "wrong type"),
    ({"text": "q", "image": 5, "response": "a"}, "wrong type"),
    ({"text": "t", "task": 1}, "wrong type"),
    ({"text": "t", "task": "music"}, "unknown task"),
    ({"conversations": [{"from": "bot", "value": "a"}]}, "unknown role"),
    ({"conversations": [{"role": "user", "content": "q"}]}, "no assistant turn"),
    ({"text": "<image> with no image"}, "too many markers"),
    ({"text": "   "}, "empty"),
    ({"text": "q", "image": "absent.png", "response": "a"}, "missing media"),
]


@pytest.mark.parametrize("line,reason", BAD_LINES, ids=[r for _, r in BAD_LINES])
def test_each_bad_line_is_skipped_counted_and_reported(tmp_path, line, reason):
    good = [{"text": f"good {i}"} for i in range(11)]
    f = jsonl(tmp_path / "d.jsonl", good[:6] + [line] + good[6:])
    examples, reader, logs = read_all(f)
    assert len(examples) == 11 and reader.n_yielded == 11 and reader.n_lines == 12
    assert reader.skipped == {reason: 1}
    assert f"{f}:7" in logs[0]
    assert logs[-1] == f"{f}: skipped 1 of 12 lines: 1 {reason}"
    assert reader.describe_skipped() == f"skipped 1 of 12 lines: 1 {reason}"


def test_unknown_task_message_lists_known_tasks(tmp_path):
    f = jsonl(tmp_path / "d.jsonl", [{"text": "ok"}] * 10 + [{"text": "t", "task": "x"}])
    _, _, logs = read_all(f)
    assert logs[0] == f"Invalid task type 'x' ({f}:11): known tasks are text, code, image, audio"


def test_extra_tasks_come_from_the_tasks_argument(tmp_path):
    f = jsonl(tmp_path / "d.jsonl", [{"task": "math", "instruction": "1+2?", "output": "3"}])
    (e,), _, _ = read_all(f, tasks=("text", "math"))
    assert e.task == "math"
    with pytest.raises(ValueError, match="1 unknown task"):
        read_all(f)


def test_missing_media_names_file_line_and_path(tmp_path):
    rows = [{"text": "x"}] * 12 + [{"audio": "gone.wav", "instruction": "q", "output": "a"}]
    f = jsonl(tmp_path / "d.jsonl", rows)
    _, reader, logs = read_all(f)
    assert reader.skipped == {"missing media": 1}
    assert f"{f}:13" in logs[0] and str(tmp_path / "gone.wav") in logs[0]


def test_strict_media_raises_at_once(tmp_path):
    f = jsonl(tmp_path / "d.jsonl", [{"text": "x"}, {"text": "q", "image": "gone.png", "response": "a"},
                                     {"text": "never reached"}])
    reader = read_examples(f, strict_media=True, log=lambda m: None)
    seen = []
    with pytest.raises(FileNotFoundError, match=r"d\.jsonl:2.*gone\.png"):
        for e in reader:
            seen.append(e)
    assert len(seen) == 1


def test_only_the_first_five_bad_lines_are_printed(tmp_path):
    rows = [{"text": f"ok {i}"} for i in range(70)] + ["{bad"] * 7
    f = jsonl(tmp_path / "d.jsonl", rows)
    _, reader, logs = read_all(f)
    assert reader.skipped == {"not JSON": 7}
    reported = [m for m in logs if "not JSON (" in m]
    assert [m.split(": ")[0] for m in reported] == [f"{f}:{n}" for n in range(71, 76)]
    assert len(logs) == 7  # five reports, one "counting without printing", one summary
    assert logs[-1] == f"{f}: skipped 7 of 77 lines: 7 not JSON"


def test_too_many_bad_lines_raise_at_the_end(tmp_path):
    rows = [{"text": f"ok {i}"} for i in range(8)] + ["{bad", "[]", "{oops"]
    f = jsonl(tmp_path / "d.jsonl", rows)
    reader = read_examples(f, log=lambda m: None)
    seen = []
    with pytest.raises(ValueError) as info:
        for e in reader:
            seen.append(e)
    assert len(seen) == 8  # the good examples were yielded before the verdict
    message = str(info.value)
    assert str(f) in message and "2 not JSON" in message and "1 not an object" in message
    assert len(list(read_examples(f, max_bad_fraction=0.3, log=lambda m: None))) == 8


def test_nothing_left_raises(tmp_path):
    f = jsonl(tmp_path / "d.jsonl", [{"text": "q", "image": "gone.png", "response": "a"}, "{x"])
    with pytest.raises(ValueError, match=r"no examples.*skipped 2 of 2 lines"):
        read_all(f, max_bad_fraction=1.0)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="no examples"):
        read_all(empty)


def test_reader_can_be_iterated_twice(tmp_path):
    f = jsonl(tmp_path / "d.jsonl", [{"text": f"t{i}"} for i in range(13)] + ["{bad"])
    reader = read_examples(f, log=lambda m: None)
    assert [e.turns for e in reader] == [e.turns for e in reader]
    assert reader.n_yielded == 13 and reader.skipped == {"not JSON": 1}


def test_missing_file_and_unsupported_extension(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl"):
        read_examples(tmp_path / "nowhere.jsonl")
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unsupported"):
        read_examples(tmp_path / "d.csv")
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(ValueError, match="broken.json"):
        list(read_examples(tmp_path / "broken.json"))


def test_example_checks_marker_counts_and_roles():
    Example("image", [("user", "<image>\nhi"), ("assistant", "yo")], images=["/a.png"])
    with pytest.raises(ValueError, match="markers"):
        Example("image", [("user", "hi"), ("assistant", "yo")], images=["/a.png"])
    with pytest.raises(ValueError, match="role"):
        Example("text", [("robot", "hi")])


def test_write_jsonl_round_trips_and_is_atomic(tmp_path):
    png(tmp_path / "p.png")
    rows = [{"text": "héllo"}, {"text": "q", "image": "p.png", "response": "a"},
            {"task": "code", "instruction": "x", "input": "", "output": "y"}]
    target = tmp_path / "out" / "d.jsonl"
    assert write_jsonl(target, rows) == 3
    assert [json.loads(line) for line in target.read_text(encoding="utf-8").splitlines()] == rows
    assert os.listdir(target.parent) == ["d.jsonl"]  # no temp file left behind
    before = target.read_text(encoding="utf-8")

    def failing():
        yield {"text": "partial"}
        raise RuntimeError("generator broke")

    with pytest.raises(RuntimeError):
        write_jsonl(target, failing())
    assert target.read_text(encoding="utf-8") == before and os.listdir(target.parent) == ["d.jsonl"]
    examples = list(read_examples(target, media_dir=str(tmp_path), log=lambda m: None))
    assert [e.task for e in examples] == ["text", "image", "code"]
