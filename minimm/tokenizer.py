"""The task-aware tokenizer: a tiktoken Encoding over our BPE ranks, plus minimm's special tokens.

What this file teaches:
- Encoding is tiktoken's job (Rust, fast); this class only decides the vocabulary: the BPE ranks from
  minimm/bpe.py (or a tiktoken base encoding found offline), then special tokens appended after them.
- Special tokens, in this order after the base vocabulary:
      <|endoftext|>                        separates documents
      <|task:NAME|> for each task          tells the one GPT which job it does (text, code, image, audio, ...)
      <|system|> <|user|> <|assistant|>    chat roles, and <|end|> closes a turn
      <|image|> <|audio|>                  placeholders where minimm/multimodal.py splices encoder outputs
  Tasks come from the config, so a new task is a new string, not new code.
- Data can never inject a special token: `encode` treats "<|assistant|>" in a document as ordinary text
  (tiktoken's encode_ordinary); special ids only come from `special()` / `task_token()`, called by the
  code that builds examples (minimm/render.py).
- The vocabulary travels as strings: `state()` is plain str/int/list values (the ranks in tiktoken's
  text format: one "base64(token) rank" line per token), so it fits in a checkpoint loaded with
  torch.load(weights_only=True); `save()` writes the same as ranks.tiktoken + tokenizer.json.

BPE: Sennrich et al. 2016, https://arxiv.org/abs/1508.07909; tiktoken: https://github.com/openai/tiktoken
"""
from __future__ import annotations

import base64
import json
from pathlib import Path

import tiktoken
import tiktoken.load

from minimm.bpe import GPT4_SPLIT_PATTERN, train_bpe

DEFAULT_TASKS = ("text", "code", "image", "audio")
EOT = "<|endoftext|>"
ROLES = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
PLACEHOLDERS = ("<|image|>", "<|audio|>")
RANKS_FILE = "ranks.tiktoken"
CONFIG_FILE = "tokenizer.json"


def task_special(task: str) -> str:
    return f"<|task:{task}|>"


def ranks_to_text(ranks: dict[bytes, int]) -> str:
    """tiktoken's .tiktoken file format: 'base64(token) rank' per line, in rank order."""
    return "".join(f"{base64.b64encode(token).decode()} {rank}\n"
                   for token, rank in sorted(ranks.items(), key=lambda item: item[1]))


def ranks_from_text(text: str) -> dict[bytes, int]:
    return {base64.b64decode(token): int(rank) for token, rank in map(str.split, text.splitlines())}


class Tokenizer:
    """Text <-> token ids. ids [0, n_base) are BPE tokens, [n_base, vocab_size) the special tokens."""

    def __init__(self, ranks: dict[bytes, int], tasks: list[str] | tuple[str, ...] = DEFAULT_TASKS,
                 pattern: str = GPT4_SPLIT_PATTERN, name: str = "minimm") -> None:
        tasks = list(tasks)
        for task in tasks:
            if not task or not task.replace("_", "").replace("-", "").isalnum():
                raise ValueError(f"Invalid task name {task!r}: use letters, digits, '_' and '-'")
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"Duplicate task names in {tasks}")
        self.ranks, self.pattern, self.name, self._tasks = ranks, pattern, name, tasks
        self.n_base = max(ranks.values()) + 1
        specials = [EOT, *map(task_special, tasks), *ROLES, *PLACEHOLDERS]
        self._special_ids = {token: self.n_base + i for i, token in enumerate(specials)}
        self.encoding = tiktoken.Encoding(name=name, pat_str=pattern, mergeable_ranks=ranks,
                                          special_tokens=self._special_ids)

    @classmethod
    def train(cls, text: str, vocab_size: int, tasks: list[str] | tuple[str, ...] = DEFAULT_TASKS) -> Tokenizer:
        """Train BPE ranks on `text`. vocab_size counts BPE tokens only and the specials come after them;
        if the text runs out of pairs first, the BPE vocabulary is smaller and the specials move down."""
        return cls(train_bpe(text, vocab_size), tasks, name=f"minimm-bpe-{vocab_size}")

    @classmethod
    def from_tiktoken(cls, name: str, tasks: list[str] | tuple[str, ...] = DEFAULT_TASKS) -> Tokenizer:
        """Reuse a tiktoken base encoding (e.g. "cl100k_base") if its file is already cached locally.

        Its own special tokens are dropped for ours. Never downloads: tiktoken fetches a missing file
        from the network inside `tiktoken.load.read_file`, which is replaced for the duration of this
        call by one that raises FileNotFoundError instead.
        """
        def refuse_download(blobpath: str) -> bytes:
            raise FileNotFoundError(
                f"tiktoken encoding {name!r} is not cached locally and minimm never downloads. On a machine "
                f"with network, run tiktoken.get_encoding({name!r}) with TIKTOKEN_CACHE_DIR set, then copy "
                f"that directory here and set TIKTOKEN_CACHE_DIR to it (missing file: {blobpath})")

        download = tiktoken.load.read_file
        tiktoken.load.read_file = refuse_download
        try:
            base = tiktoken.get_encoding(name)
        finally:
            tiktoken.load.read_file = download
        return cls(base._mergeable_ranks, tasks, base._pat_str, name)

    # ---- text <-> ids -------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Ordinary text -> ids. Special-token strings in `text` are encoded as the text they are."""
        return self.encoding.encode_ordinary(text)

    def encode_batch(self, texts: list[str], num_threads: int = 8) -> list[list[int]]:
        """`encode` of each text, spread over tiktoken's threads."""
        return self.encoding.encode_ordinary_batch(texts, num_threads=num_threads)

    def decode(self, ids: list[int]) -> str:
        """ids -> text; special tokens come back as their names, e.g. "<|user|>"."""
        return self.encoding.decode(ids)

    # ---- special tokens -----------------------------------------------------------------------

    def special(self, name: str) -> int:
        if name not in self._special_ids:
            raise KeyError(f"Unknown special token {name!r}: known are {', '.join(self._special_ids)}")
        return self._special_ids[name]

    def task_token(self, task: str) -> int:
        if task not in self._tasks:
            raise ValueError(f"Invalid task type {task!r}: known tasks are {', '.join(self._tasks)}")
        return self._special_ids[task_special(task)]

    def is_special(self, token_id: int) -> bool:
        return self.n_base <= token_id < self.vocab_size

    @property
    def eot(self) -> int:
        return self._special_ids[EOT]

    @property
    def tasks(self) -> list[str]:
        return list(self._tasks)

    @property
    def specials(self) -> list[str]:
        """The special tokens' names in id order, starting at id n_base."""
        return list(self._special_ids)

    @property
    def vocab_size(self) -> int:
        """Base vocabulary plus special tokens: the size of the model's embedding table."""
        return self.n_base + len(self._special_ids)

    # ---- persistence ----------------------------------------------------------------------------

    def state(self) -> dict:
        """Everything needed to rebuild this tokenizer, as str/list values only (checkpoint-safe)."""
        return {"name": self.name, "pattern": self.pattern, "tasks": self.tasks,
                "ranks": ranks_to_text(self.ranks)}

    @classmethod
    def from_state(cls, state: dict) -> Tokenizer:
        return cls(ranks_from_text(state["ranks"]), state["tasks"], state["pattern"], state["name"])

    def save(self, directory: str | Path) -> None:
        """Write ranks.tiktoken (readable by tiktoken.load.load_tiktoken_bpe) and tokenizer.json."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = self.state()
        (directory / RANKS_FILE).write_text(state.pop("ranks"), encoding="ascii")
        (directory / CONFIG_FILE).write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, directory: str | Path) -> Tokenizer:
        directory = Path(directory)
        state = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))
        state["ranks"] = (directory / RANKS_FILE).read_text(encoding="ascii")
        return cls.from_state(state)

    def __repr__(self) -> str:
        return (f"Tokenizer(name={self.name!r}, n_base={self.n_base}, vocab_size={self.vocab_size}, "
                f"tasks={self._tasks})")
