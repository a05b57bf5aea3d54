"""BPE training: the incremental trainer against the recount-everything reference, the ranks layout,
early stop, tie-breaking, and the `re` pre-split against tiktoken's own (Rust) pre-split."""
import random

import pytest
import tiktoken
from hypothesis import given, settings
from hypothesis import strategies as st

from minimm.bpe import GPT4_SPLIT_PATTERN, count_chunks, pre_split, train_bpe, train_bpe_naive

# Characters that trip pre-splitting: apostrophes and case-folded contraction letters (U+017F long s folds
# to s), \r\n, White_Space outside ASCII, the separators U+001C..U+001F that `re` alone calls \s, digits
# of several scripts, letters of several scripts, marks, symbols and characters beyond U+FFFF.
TRICKY = ("'sSdDmMtTlLvVeErRſK \t\n\r\x0b\x0c\x1c\x1f\x85\xa0\u2000\u2028\u3000_-.,:;!?()[]{}\"#"
          "0123456789٣४½Ⅻ①aZéßǅʰΩжא中ـ\u0301\u064b😀𝔘𐐀🇫🇷€")


def random_text(seed: int, n_chars: int) -> str:
    """Text with repeated words (so chunk counts matter) mixed with random characters."""
    rng = random.Random(seed)
    words = ["".join(rng.choice(TRICKY) for _ in range(rng.randint(1, 6))) for _ in range(12)]
    parts = []
    while sum(map(len, parts)) < n_chars:
        parts.append(rng.choice(words) if rng.random() < 0.7 else rng.choice(TRICKY))
    return "".join(parts)


def tiktoken_chunks(text: str, chunks: list[str], pattern: str = GPT4_SPLIT_PATTERN) -> list[bytes]:
    """How tiktoken's Rust engine pre-splits `text`, seen through its encoder.

    The vocabulary holds every substring of every two adjacent `chunks`. Then BPE turns any chunk tiktoken
    cuts that equals one of ours into exactly one token, while a tiktoken chunk spanning two or more of ours
    cannot end as our pieces (the first two would still merge), and one cut inside ours cannot either. So
    the tokens equal `chunks` exactly when both pre-splits agree.
    """
    vocab = {bytes([b]) for b in range(256)}
    pieces = [chunk.encode() for chunk in chunks]
    for left, right in zip(pieces, pieces[1:] + [b""]):
        pair = left + right
        vocab.update(pair[i:j] for i in range(len(pair)) for j in range(i + 1, len(pair) + 1))
    ranks = {token: rank for rank, token in enumerate(sorted(vocab, key=lambda t: (len(t), t)))}
    encoding = tiktoken.Encoding("oracle", pat_str=pattern, mergeable_ranks=ranks, special_tokens={})
    return [encoding.decode_single_token_bytes(token) for token in encoding.encode_ordinary(text)]


def assert_splits_like_tiktoken(text: str, pattern: str = GPT4_SPLIT_PATTERN) -> None:
    chunks = pre_split(text, pattern)
    assert "".join(chunks) == text
    assert [chunk.encode() for chunk in chunks] == tiktoken_chunks(text, chunks, pattern)


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_pre_split_matches_tiktoken_on_tricky_text(seed):
    assert_splits_like_tiktoken(random_text(seed, 1500))


def test_pre_split_matches_tiktoken_on_python_source():
    assert_splits_like_tiktoken(open(random.__file__, encoding="utf-8").read()[:20000] + "  \n\n  ")


# Python's Unicode database (unicodedata.unidata_version) may be older than tiktoken's: leave out the
# characters it calls unassigned (Cn), and surrogates (Cs), which are not valid UTF-8 at all.
assigned = st.characters(exclude_categories=("Cn", "Cs"))


@settings(max_examples=150, deadline=None)
@given(st.text(st.one_of(assigned, st.sampled_from(TRICKY)), max_size=40))
def test_pre_split_matches_tiktoken_on_any_assigned_unicode(text):
    assert_splits_like_tiktoken(text)


def test_dollar_means_end_of_text_as_in_tiktoken():
    # `re` alone lets $ match before a final newline, which would make "ab" one chunk here.
    pattern = r"\p{L}+$|\p{L}|\s"
    assert pre_split("ab\n", pattern) == ["a", "b", "\n"]
    assert_splits_like_tiktoken("ab\n", pattern)


def test_pre_split_rejects_properties_it_cannot_translate():
    with pytest.raises(ValueError, match=r"\\p\{Lu\}"):
        pre_split("abc", r"\p{Lu}+|.")


@pytest.mark.parametrize("seed", range(8))
def test_same_ranks_as_naive_reference(seed):
    rng = random.Random(seed)
    text = random_text(seed, rng.randint(50, 700))
    vocab_size = rng.randint(257, 420)
    fast = train_bpe(text, vocab_size)
    assert list(fast.items()) == list(train_bpe_naive(text, vocab_size).items())
    assert len(fast) > 256 + 10  # the comparison covered real merges, not just the byte tokens


def test_same_ranks_as_naive_on_overlapping_pairs():
    # "aaaa" style runs: a pair (a, a) overlaps itself, and its left-to-right replacement must match.
    text = " ".join("a" * n + "b" * (n % 3) for n in range(1, 30)) * 3
    assert list(train_bpe(text, 300).items()) == list(train_bpe_naive(text, 300).items())


def test_ranks_layout():
    text = random_text(7, 2000)
    ranks = train_bpe(text, 333)
    assert len(ranks) == 333
    assert sorted(ranks.values()) == list(range(333))
    assert all(ranks[bytes([b])] == b for b in range(256))
    by_rank = sorted(ranks, key=ranks.get)
    for rank, token in enumerate(by_rank[256:], start=256):
        # each learned token joins two tokens learned before it
        assert any(ranks.get(token[:i], rank) < rank and ranks.get(token[i:], rank) < rank
                   for i in range(1, len(token))), token


def test_merges_never_cross_chunks():
    text = random_text(11, 3000)
    chunks = count_chunks(text)
    learned = [token for token, rank in train_bpe(text, 400).items() if rank >= 256]
    encoded_chunks = [chunk.encode() for chunk in chunks]
    assert all(any(token in chunk for chunk in encoded_chunks) for token in learned)


def test_chunks_are_counted_once_with_their_frequency():
    counts = count_chunks("the cat the dog the")
    assert counts == {"the": 1, " cat": 1, " the": 2, " dog": 1}


def test_ties_break_to_smallest_byte_pair_then_stop_when_pairs_run_out():
    # Every pair occurs once, so byte order decides: (b" ", b"c") < (b"a", b"b"); after " c" is made,
    # (b" c", b"d") < (b"a", b"b") again. Then each chunk is one token and training stops at 259 < 300.
    ranks = train_bpe("ab cd", 300)
    assert [token for token in ranks if ranks[token] >= 256] == [b" c", b" cd", b"ab"]


def test_highest_count_wins():
    ranks = train_bpe("xy xy xy ab", 257)
    assert max(ranks, key=ranks.get) == b"xy"  # "xy" occurs 3 times, " x" only twice


def test_stops_early_when_every_chunk_is_one_token():
    text = "hello world hello there 1234"
    ranks = train_bpe(text, 10_000)
    assert 256 < len(ranks) < 10_000
    encoding = tiktoken.Encoding("t", pat_str=GPT4_SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens={})
    assert len(encoding.encode_ordinary(text)) == len(pre_split(text))


def test_training_is_reproducible_and_rejects_small_vocab():
    text = random_text(3, 1000)
    assert list(train_bpe(text, 300).items()) == list(train_bpe(text, 300).items())
    with pytest.raises(ValueError, match="at least 256"):
        train_bpe(text, 255)


def test_unicode_round_trips_through_tiktoken_with_trained_ranks():
    text = random_text(5, 3000)
    ranks = train_bpe(text, 500)
    encoding = tiktoken.Encoding("t", pat_str=GPT4_SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens={})
    ids = encoding.encode_ordinary(text)
    assert encoding.decode(ids) == text
    assert len(ids) < len(text.encode())  # the merges compress the text they were trained on
