"""The task-aware tokenizer: round trips, special tokens that data cannot inject, their ids and order,
tasks from config, persistence (files, checkpoint state) and the offline-only tiktoken base encodings."""
import json

import pytest
import tiktoken
import tiktoken.load
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minimm.bpe import train_bpe
from minimm.tokenizer import DEFAULT_TASKS, Tokenizer

TEXT = ("def greet(name):\n    return f'Hello, {name}!'  # 1234\n"
        "Grüße, мир, 世界 😀. <|endoftext|> isn't a token here <|user|>\r\n") * 40
SPECIALS_IN_ORDER = ["<|endoftext|>", "<|task:text|>", "<|task:code|>", "<|task:image|>", "<|task:audio|>",
                     "<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|image|>", "<|audio|>"]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(TEXT, 301)


def test_train_sizes(tok):
    assert tok.n_base == len(tok.ranks) == 301
    tiny = Tokenizer.train("a b c a b c", 400)  # only 3 merges exist: BPE stops early, specials follow
    assert tiny.n_base == 259 and tiny.eot == 259 and tiny.vocab_size == 259 + len(SPECIALS_IN_ORDER)
    assert tok.vocab_size == 301 + len(SPECIALS_IN_ORDER) == tok.encoding.n_vocab
    assert tok.tasks == list(DEFAULT_TASKS)


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_round_trip_any_unicode(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert all(0 <= i < tok.n_base for i in ids)


def test_special_ids_follow_base_vocab_in_documented_order(tok):
    assert tok.specials == SPECIALS_IN_ORDER
    assert [tok.special(name) for name in SPECIALS_IN_ORDER] == list(range(301, 301 + len(SPECIALS_IN_ORDER)))
    assert tok.eot == tok.special("<|endoftext|>") == 301
    assert [tok.task_token(task) for task in DEFAULT_TASKS] == [302, 303, 304, 305]
    assert [tok.is_special(i) for i in (0, 300, 301, tok.vocab_size - 1, tok.vocab_size)] == \
        [False, False, True, True, False]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(SPECIALS_IN_ORDER), st.text(max_size=5)), max_size=8))
def test_data_text_never_becomes_a_special_token(tok, pieces):
    text = "".join(pieces)
    ids = tok.encode(text)
    assert not any(tok.is_special(i) for i in ids)
    assert tok.decode(ids) == text


def test_specials_decode_to_their_names(tok):
    ids = [tok.task_token("code"), *tok.encode("x = 1"), tok.special("<|end|>"), tok.eot]
    assert tok.decode(ids) == "<|task:code|>x = 1<|end|><|endoftext|>"


def test_encode_is_the_raw_tiktoken_encoding_and_batches(tok):
    assert tok.encode(TEXT) == tok.encoding.encode_ordinary(TEXT)
    texts = [TEXT[:17], "", TEXT[5:300], "<|user|>"]
    assert tok.encode_batch(texts) == [tok.encode(text) for text in texts]


def test_extra_tasks_from_config(tok):
    tasks = ["text", "code", "image", "audio", "math", "speech_to_text"]
    extended = Tokenizer(tok.ranks, tasks)
    assert extended.vocab_size == tok.vocab_size + 2
    assert extended.task_token("math") == 306 and extended.task_token("speech_to_text") == 307
    assert extended.special("<|system|>") == 308 and extended.special("<|audio|>") == 313
    assert extended.decode([extended.task_token("math")]) == "<|task:math|>"
    assert Tokenizer.train(TEXT, 263, tasks=["only"]).task_token("only") == 263 + 1


def test_unknown_task_and_special_errors_list_the_known_ones(tok):
    with pytest.raises(ValueError, match=r"Invalid task type 'video': known tasks are text, code, image, audio"):
        tok.task_token("video")
    with pytest.raises(KeyError, match=r"<\|task:code\|>.*<\|audio\|>"):
        tok.special("<|bogus|>")


@pytest.mark.parametrize("tasks", [["text", "text"], ["text", "bad|>name"], [""]])
def test_bad_task_lists_are_rejected(tok, tasks):
    with pytest.raises(ValueError):
        Tokenizer(tok.ranks, tasks)


def assert_same_tokenizer(a: Tokenizer, b: Tokenizer) -> None:
    assert b.ranks == a.ranks and b.tasks == a.tasks and b.pattern == a.pattern and b.name == a.name
    assert b.encode(TEXT) == a.encode(TEXT)
    assert b.specials == a.specials
    assert [b.special(name) for name in b.specials] == list(range(b.n_base, b.vocab_size))


def test_save_load_round_trip(tok, tmp_path, monkeypatch):
    custom = Tokenizer(tok.ranks, ["text", "dialog"])
    custom.save(tmp_path / "tok")
    assert_same_tokenizer(custom, Tokenizer.load(tmp_path / "tok"))
    assert json.loads((tmp_path / "tok" / "tokenizer.json").read_text())["tasks"] == ["text", "dialog"]
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # read the file directly, without tiktoken's cache
    assert tiktoken.load.load_tiktoken_bpe(str(tmp_path / "tok" / "ranks.tiktoken")) == custom.ranks


def test_state_round_trip_through_a_weights_only_checkpoint(tok, tmp_path):
    state = tok.state()
    assert json.loads(json.dumps(state)) == state  # only str/int/list/dict values, no bytes
    torch.save({"tokenizer": state, "weights": torch.zeros(3)}, tmp_path / "ckpt.pt")
    loaded = torch.load(tmp_path / "ckpt.pt", weights_only=True)["tokenizer"]
    assert_same_tokenizer(tok, Tokenizer.from_state(loaded))


def test_from_tiktoken_refuses_to_download(tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))  # an empty cache: the file is not here
    download = tiktoken.load.read_file
    with pytest.raises(FileNotFoundError, match="'cl100k_base' is not cached locally"):
        Tokenizer.from_tiktoken("cl100k_base")
    assert tiktoken.load.read_file is download  # tiktoken is left as it was
    assert list(tmp_path.iterdir()) == []


def test_from_tiktoken_appends_our_specials_after_the_base(monkeypatch):
    ranks = train_bpe(TEXT, 290)
    base = tiktoken.Encoding("tiny_base", pat_str=r"\S+|\s+", mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 290, "<|fim_prefix|>": 291})
    monkeypatch.setattr(tiktoken, "get_encoding", {"tiny_base": base}.__getitem__)
    tok = Tokenizer.from_tiktoken("tiny_base", ["text", "code"])
    assert tok.ranks == ranks and tok.pattern == r"\S+|\s+" and tok.name == "tiny_base"
    assert tok.eot == 290 and tok.task_token("code") == 292 and tok.vocab_size == 290 + 9
    assert tok.encode("a  b") == base.encode_ordinary("a  b")
    with pytest.raises(KeyError):
        tok.special("<|fim_prefix|>")
