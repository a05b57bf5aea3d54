"""Training data in the schemas people already have, read into one `Example` type.

What this file teaches:
- Every dataset, whatever its spelling, becomes an `Example`: a task name, a list of (role, text) turns and
  the media files it mentions. Everything after this file (tokenizer, data.py) sees only that one type.
- Images and audio live in the text as the literal markers `<image>` and `<audio>`, the way LLaVA writes
  them; the n-th marker means the n-th file. data.py later splits the text at the markers and puts the
  encoder's placeholder tokens there. Schemas that carry media without markers get them added at the start
  of the first user turn, so the count of markers always equals the count of files.
- Real datasets have bad lines. One bad line must not cost a day of training, and a file that is mostly bad
  must not train silently either: bad lines are skipped, counted by reason, the first few are printed with
  file:line, and the reader raises at the end when nothing was read or too much was skipped (every
  skipped record counts, a missing media file included: a half-downloaded image set should be noticed).

Schemas, detected per record by its keys (a .jsonl line, or an element of a .json array as LLaVA ships it):
  "conversations"  {"conversations": [{"role", "content"} | {"from", "value"}], "image"?, "audio"?, "task"?}
                   chat, and LLaVA's human/gpt spelling (https://arxiv.org/abs/2304.08485)
  "instruction"    {"instruction", "input"?, "output", "task"?, "image"?, "audio"?}: Alpaca
                   (https://github.com/tatsu-lab/stanford_alpaca); user = instruction, blank line, input
  "response"       {"text", "image", "response", "task"?}: one question about an image, and its answer
  "text"           {"text", "task"?, "image"?, "audio"?}: pretraining text, one turn with role "text"
  COCO captions    a .json object {"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}:
                   each caption a "response" record asking coco.CAPTION_QUESTION (minimm/coco.py)
The task defaults to "image" when the record has images, "audio" when it has audio, else "text".
A .txt file is pretraining text: paragraphs (blank-line separated) are gathered into documents of about
TXT_DOCUMENT_CHARS characters, never splitting a paragraph, so a book is not one giant example and a file
of short notes is not thousands of tiny ones.
"""
from __future__ import annotations

import collections
import json
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

from minimm.coco import caption_records, is_coco_captions

IMAGE_MARKER = "<image>"
AUDIO_MARKER = "<audio>"
DEFAULT_TASKS = ("text", "code", "image", "audio")
ROLES = ("system", "user", "assistant", "text")
# Both chat spellings: OpenAI-style role names and the ShareGPT/LLaVA "from" names.
ROLE_NAMES = {"system": "system", "user": "user", "assistant": "assistant", "human": "user", "gpt": "assistant"}
N_REPORTED = 5  # bad records printed in full; the rest are only counted
TXT_DOCUMENT_CHARS = 8000  # a few thousand tokens: long enough for context, short enough to shuffle well


@dataclass
class Example:
    """One training example. turns: (role, text) with role in ROLES; images/audio: absolute paths, in the
    order of their markers in the turns; source: "file:line" for error messages."""

    task: str
    turns: list[tuple[str, str]]
    images: list[str] = field(default_factory=list)
    audio: list[str] = field(default_factory=list)
    source: str = ""
    kind: str = ""  # optional label of the question type (a record's "kind"), for per-kind metrics

    def __post_init__(self) -> None:
        for role, _ in self.turns:
            if role not in ROLES:
                raise ValueError(f"{self.source}: unknown role {role!r}, expected one of {', '.join(ROLES)}")
        for marker, files in ((IMAGE_MARKER, self.images), (AUDIO_MARKER, self.audio)):
            n_markers = sum(text.count(marker) for _, text in self.turns)
            if n_markers != len(files):
                raise ValueError(f"{self.source}: {n_markers} {marker} markers but {len(files)} files")


class _BadRecord(Exception):
    """A record to skip: `reason` is the counter key, `message` the line printed for it."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason, self.message = reason, message


class ExampleReader:
    """Iterable over the Examples of one file; see read_examples. Each iteration rereads the file and
    resets `skipped` (reason -> count), `n_yielded` and `n_lines` (non-blank records seen)."""

    def __init__(self, path: str, media_dir: str | None, tasks: Iterable[str], max_bad_fraction: float,
                 strict_media: bool, log: Callable[[str], Any]):
        self.path = os.fspath(path)
        self.media_dir = os.path.abspath(media_dir if media_dir is not None else os.path.dirname(
            os.path.abspath(self.path)))
        self.tasks = tuple(tasks)
        self.max_bad_fraction = max_bad_fraction
        self.strict_media = strict_media
        self.log = log
        self.skipped: collections.Counter[str] = collections.Counter()
        self.n_yielded = 0
        self.n_lines = 0

    def describe_skipped(self) -> str:
        """One line such as "skipped 3 of 120 lines: 2 not JSON, 1 missing media"."""
        summary = f"skipped {sum(self.skipped.values())} of {self.n_lines} lines"
        if self.skipped:
            summary += ": " + ", ".join(f"{n} {reason}" for reason, n in self.skipped.most_common())
        return summary

    def __iter__(self) -> Iterator[Example]:
        self.skipped, self.n_yielded, self.n_lines = collections.Counter(), 0, 0
        records = self._text_documents() if self.path.endswith(".txt") else self._records()
        for source, record in records:
            self.n_lines += 1
            try:
                example = self._parse(record, source)
            except _BadRecord as bad:
                self._skip(bad)
                continue
            self.n_yielded += 1
            yield example
        self._check_totals()

    def _skip(self, bad: _BadRecord) -> None:
        self.skipped[bad.reason] += 1
        n_bad = sum(self.skipped.values())
        if n_bad <= N_REPORTED:
            self.log(bad.message)
        if n_bad == N_REPORTED + 1:
            self.log(f"{self.path}: more bad lines; counting them without printing")

    def _check_totals(self) -> None:
        n_bad = sum(self.skipped.values())
        if self.n_yielded == 0:
            raise ValueError(f"{self.path}: no examples could be read; {self.describe_skipped()}")
        if n_bad > self.max_bad_fraction * self.n_lines:
            raise ValueError(f"{self.path}: {n_bad / self.n_lines:.0%} of lines are bad, more than "
                             f"max_bad_fraction={self.max_bad_fraction}; {self.describe_skipped()}")
        if n_bad:
            self.log(f"{self.path}: {self.describe_skipped()}")

    def _records(self) -> Iterator[tuple[str, Any]]:
        """Yield (source, raw record); a line that is not JSON comes out as a _BadRecord to skip."""
        if self.path.endswith(".json"):
            with open(self.path, encoding="utf-8") as f:
                try:
                    items = json.load(f)  # LLaVA ships one JSON array; there is no lazy way to read that
                except json.JSONDecodeError as e:
                    raise ValueError(f"{self.path}: not valid JSON ({e})") from None
            if is_coco_captions(items):  # one record per caption (minimm/coco.py)
                for source, record in caption_records(items, self.path):
                    yield source, record if isinstance(record, dict) else _BadRecord(*record)
                return
            if not isinstance(items, list):
                raise ValueError(f"{self.path}: a .json file must hold an array of records, or be a COCO "
                                 f"caption file (an object with 'images' and 'annotations')")
            for i, item in enumerate(items):
                yield f"{self.path}:{i + 1}", item  # the element number stands in for the line
            return
        with open(self.path, encoding="utf-8") as f:
            for line_number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                source = f"{self.path}:{line_number}"
                try:
                    yield source, json.loads(line)
                except json.JSONDecodeError as e:
                    yield source, _BadRecord("not JSON", f"{source}: not JSON ({e.msg})")

    def _text_documents(self) -> Iterator[tuple[str, dict]]:
        """Yield a .txt file as documents of whole paragraphs, about TXT_DOCUMENT_CHARS each."""
        lines: list[str] = []
        start, n_chars = 1, 0
        with open(self.path, encoding="utf-8") as f:
            for line_number, line in enumerate(f, start=1):
                if not lines and not line.strip():
                    start = line_number + 1
                    continue
                if not line.strip() and n_chars >= TXT_DOCUMENT_CHARS:
                    yield f"{self.path}:{start}", {"text": "".join(lines).strip()}
                    lines, start, n_chars = [], line_number + 1, 0
                    continue
                lines.append(line)
                n_chars += len(line)
        if lines:
            yield f"{self.path}:{start}", {"text": "".join(lines).strip()}

    def _parse(self, record: Any, source: str) -> Example:
        """Turn one raw record into an Example, or raise _BadRecord saying why not."""
        if isinstance(record, _BadRecord):
            raise record
        if not isinstance(record, dict):
            raise _BadRecord("not an object", f"{source}: not a JSON object but {type(record).__name__}")
        task = record.get("task")
        if task is not None and not isinstance(task, str):
            raise _BadRecord("wrong type", f"{source}: 'task' must be a string, not {type(task).__name__}")
        if task is not None and task not in self.tasks:
            raise _BadRecord("unknown task", f"Invalid task type '{task}' ({source}): known tasks are "
                             f"{', '.join(self.tasks)}")
        turns = self._turns(record, source)
        if not any(text.strip() for role, text in turns if role in ("assistant", "text")):
            raise _BadRecord("empty", f"{source}: nothing to learn from (empty text or assistant reply)")
        images = self._media(record, "image", source)
        audio = self._media(record, "audio", source)
        for marker, files in ((IMAGE_MARKER, images), (AUDIO_MARKER, audio)):
            turns = _add_markers(turns, marker, len(files), source)
        default_task = "image" if images else "audio" if audio else "text"
        kind = record.get("kind", "")
        if not isinstance(kind, str):
            raise _BadRecord("wrong type", f"{source}: 'kind' must be a string, not {type(kind).__name__}")
        return Example(task or default_task, turns, images, audio, source, kind)

    def _turns(self, record: dict, source: str) -> list[tuple[str, str]]:
        """Detect the record's schema by its keys and return its turns."""
        if "conversations" in record:
            return self._conversation_turns(record, source)
        if "instruction" in record:
            user = _string(record, "instruction", source)
            extra = record.get("input")
            if extra is not None and not isinstance(extra, str):
                raise _BadRecord("wrong type", f"{source}: 'input' must be a string, not {type(extra).__name__}")
            return [("user", instruction_text(user, extra)), ("assistant", _string(record, "output", source))]
        if "response" in record:
            if "image" not in record:
                raise _BadRecord("missing field", f"{source}: missing field 'image'")
            return [("user", _string(record, "text", source)), ("assistant", _string(record, "response", source))]
        if "text" in record:
            return [("text", _string(record, "text", source))]
        raise _BadRecord("no schema", f"{source}: matches no schema (keys: {', '.join(sorted(record))})")

    def _conversation_turns(self, record: dict, source: str) -> list[tuple[str, str]]:
        messages = record["conversations"]
        if not isinstance(messages, list):
            raise _BadRecord("wrong type", f"{source}: 'conversations' must be a list of messages")
        turns = []
        for i, message in enumerate(messages):
            if not isinstance(message, dict):
                raise _BadRecord("wrong type", f"{source}: conversation message {i} is not an object")
            role_key, text_key = ("from", "value") if "from" in message else ("role", "content")
            role = _string(message, role_key, source)
            if role not in ROLE_NAMES:
                raise _BadRecord("unknown role", f"{source}: message {i} has unknown role {role!r}; "
                                 f"known roles are {', '.join(ROLE_NAMES)}")
            turns.append((ROLE_NAMES[role], _string(message, text_key, source)))
        if not any(role == "assistant" for role, _ in turns):
            raise _BadRecord("no assistant turn", f"{source}: the conversation has no assistant turn")
        return turns

    def _media(self, record: dict, key: str, source: str) -> list[str]:
        """The record's media paths for `key`, resolved and checked to exist."""
        value = record.get(key, [])
        paths = [value] if isinstance(value, str) else value
        if not isinstance(paths, list) or not all(isinstance(p, str) and p for p in paths):
            raise _BadRecord("wrong type", f"{source}: {key!r} must be a path or a list of paths")
        resolved = [p if os.path.isabs(p) else os.path.normpath(os.path.join(self.media_dir, p)) for p in paths]
        for path in resolved:
            if not os.path.isfile(path):
                if self.strict_media:
                    raise FileNotFoundError(f"{source}: missing {key} file {path}")
                raise _BadRecord("missing media", f"{source}: missing {key} file {path}")
        return resolved


def instruction_text(instruction: str, extra: str | None) -> str:
    """The user turn of an instruction record (Alpaca's layout): the instruction, a blank line, its input."""
    return instruction + "\n\n" + extra if extra else instruction


def user_text(text: str, n_images: int = 0, n_audio: int = 0, image_after_text: bool = False,
              repeat_text: bool = False) -> str:
    """A user turn's text with markers for its attached files, laid out as in training: each file's marker on
    a line of its own before the text (LLaVA's "<image>\nWhat is this?"), or with image_after_text the image
    markers after it (a model trained with image_after_question: "What color is the triangle?\n<image>"), and
    with repeat_text the text again after them (repeat_question: "...triangle?\n<image>\nWhat color is the
    triangle?")."""
    audio = (AUDIO_MARKER + "\n") * n_audio
    if image_after_text:
        again = "\n" + text if repeat_text and n_images else ""
        return audio + text + ("\n" + IMAGE_MARKER) * n_images + again
    return (IMAGE_MARKER + "\n") * n_images + audio + text


def _string(record: dict, key: str, source: str) -> str:
    if key not in record:
        raise _BadRecord("missing field", f"{source}: missing field {key!r}")
    value = record[key]
    if not isinstance(value, str):
        raise _BadRecord("wrong type", f"{source}: {key!r} must be a string, not {type(value).__name__}")
    return value


def _add_markers(turns: list[tuple[str, str]], marker: str, n_files: int, source: str) -> list[tuple[str, str]]:
    """Make the count of `marker` equal n_files by prepending the missing ones to the first user turn (the
    first turn when there is no user turn); the prepended markers take the first files."""
    n_markers = sum(text.count(marker) for _, text in turns)
    if n_markers > n_files:
        raise _BadRecord("too many markers", f"{source}: {n_markers} {marker} markers but {n_files} files")
    if n_markers == n_files:
        return turns
    i = next((i for i, (role, _) in enumerate(turns) if role == "user"), 0)
    role, text = turns[i]
    return turns[:i] + [(role, (marker + "\n") * (n_files - n_markers) + text)] + turns[i + 1:]


def read_examples(path: str | os.PathLike, media_dir: str | None = None,
                  tasks: Iterable[str] = DEFAULT_TASKS, max_bad_fraction: float = 0.1,
                  strict_media: bool = False, log: Callable[[str], Any] = print) -> ExampleReader:
    """Read a .jsonl, .json (array) or .txt file as Examples, lazily.

    media_dir: folder that relative media paths are resolved against (default: the file's folder).
    tasks: task names accepted; a config adds its own tasks here.
    max_bad_fraction: iteration ends with ValueError when more than this fraction of records was skipped.
    strict_media: raise FileNotFoundError at the first missing media file instead of skipping the record.
    log: where the first N_REPORTED bad records and the final skip summary are written.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such data file: {path}")
    if not path.endswith((".jsonl", ".json", ".txt")):
        raise ValueError(f"{path}: unsupported file type; expected .jsonl, .json or .txt")
    return ExampleReader(path, media_dir, tasks, max_bad_fraction, strict_media, log)


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> int:
    """Write rows as JSON lines atomically (temp file, then os.replace): a reader never sees half a file.
    Returns the number of rows written."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".jsonl")
    try:
        n_rows = 0
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                n_rows += 1
        os.replace(tmp_path, path)
    except BaseException:
        os.unlink(tmp_path)
        raise
    return n_rows
