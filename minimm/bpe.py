"""Byte-level BPE training: learn the merges that tiktoken then uses to encode text.

What this file teaches:
- Byte-level BPE (Sennrich et al. 2016, https://arxiv.org/abs/1508.07909, on bytes as in GPT-2,
  https://cdn.openai.com/better-language-models/language_models_are_unsupervised_multitask_learners.pdf):
  start from the 256 byte values and repeatedly add the most frequent adjacent pair as a new token.
- The regex pre-split: text is first cut into chunks (words, numbers, punctuation runs, whitespace) by
  the GPT-4 pattern, and merges never cross a chunk boundary, so " the" can become one token but "e." cannot.
  Identical chunks are stored once with their count: 10 MB of stdlib source has 2.3M chunks but 55k distinct.
- Incremental pair counts: `train_bpe_naive` recounts every pair after every merge (obviously right, slow);
  `train_bpe` keeps the counts, an index pair -> chunks that hold it, and a heap of candidates, so a merge
  only revisits the chunks that contain the merged pair, and only updates the counts of the pairs next to
  each merge site. The tests check that both learn the same merges; bench/bpe.py times them.

The output is tiktoken's "mergeable ranks": {token bytes: rank}, the 256 single bytes first (rank = byte
value), then each learned token in the order it was learned. tiktoken encodes with it directly.

Ties are broken deterministically, so training is reproducible: the pair with the highest count wins, and
among equal counts the pair whose (first token bytes, second token bytes) is lexicographically smallest.
If the text runs out of pairs (every chunk is one token) before `vocab_size` tokens, training stops early
and returns fewer ranks. Should a chosen pair ever concatenate to bytes that are already a token, its
occurrences become that token and no rank is added: tiktoken needs one rank per distinct byte string.

Why the pre-split needs a translation: tiktoken applies the pattern inside its Rust encoder and never
shows the chunks, and Python's `re` lacks \\p{L} (any letter) and \\p{N} (any number) and reads \\s and $
slightly differently (its \\s also matches U+001C..U+001F; its $ also matches before a final newline).
So `pre_split` rewrites the pattern for `re`: \\p{L}, \\p{N} and \\s become explicit classes, computed
from `unicodedata` categories and the Unicode White_Space list for the characters that occur in the text
being split, and $ becomes \\Z. The tests check that it cuts varied Unicode text exactly where tiktoken
does. Caveat: `unicodedata` has Python's Unicode version; a character assigned in a newer version is not a
letter to us but may be to tiktoken. That only changes which merges training sees, never the correctness
of encode/decode, which tiktoken does on its own. The possessive quantifiers (?+, ++) need Python 3.11.
"""
from __future__ import annotations

import heapq
import re
import unicodedata
from collections import Counter, defaultdict

# The cl100k_base (GPT-4) pre-split pattern, exactly as tiktoken uses it: contractions, letters with an
# optional leading non-letter, numbers of 1-3 digits, punctuation runs, then the whitespace rules.
GPT4_SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)

N_BYTES = 256  # byte-level BPE: every string is a sequence of these, so no input is ever unknown

# The Unicode White_Space property (PropList.txt): what \s means in tiktoken's Rust regex.
_WHITE_SPACE = set("\t\n\x0b\x0c\r \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000")
_WHITE_SPACE |= set(map(chr, range(0x2000, 0x200B)))  # U+2000..U+200A, the typographic spaces
_ASCII = set(map(chr, range(128)))


def _class_body(chars: set[str]) -> str:
    """A set of characters -> the inside of a `re` character class, runs written as ranges a-z."""
    code_points = sorted(map(ord, chars))
    parts = []
    start = prev = code_points[0]
    for cp in code_points[1:] + [-1]:
        if cp != prev + 1:
            parts.append(re.escape(chr(start)) + ("" if prev == start else "-" + re.escape(chr(prev))))
            start = cp
        prev = cp
    return "".join(parts)


def _translate(pattern: str, alphabet: set[str]) -> str:
    """Rewrite a tiktoken pre-split pattern for Python's `re`, exact on text made of `alphabet`.

    \\p{L}, \\p{N}, \\s become the letters / numbers / White_Space characters of the alphabet (plus ASCII,
    so no class is ever empty), inside or outside [...]; \\S (outside [...]) becomes [^ white space ];
    $ becomes \\Z. Restricting the classes to the alphabet changes nothing on that text, and keeps `re`
    fast: a class holding all of Unicode's letters makes matching 2-3x slower, because `re` checks the
    ones beyond U+FFFF range by range. Any other \\p{..} raises ValueError.
    """
    alphabet = alphabet | _ASCII
    space = _class_body(alphabet & _WHITE_SPACE)
    classes = {
        r"\p{L}": _class_body({c for c in alphabet if unicodedata.category(c)[0] == "L"}),
        r"\p{N}": _class_body({c for c in alphabet if unicodedata.category(c)[0] == "N"}),
        r"\s": space,
    }
    out, i, in_class = [], 0, False
    while i < len(pattern):
        char = pattern[i]
        if char == "\\":
            escape = pattern[i:i + 2]
            if escape in (r"\p", r"\P"):
                escape = pattern[i:pattern.index("}", i) + 1]
            if escape in classes:
                out.append(classes[escape] if in_class else f"[{classes[escape]}]")
            elif escape == r"\S" and not in_class:
                out.append(f"[^{space}]")
            elif escape.startswith((r"\p", r"\P", r"\S")):
                raise ValueError(f"pre-split pattern uses {escape} in a way that has no `re` translation here")
            else:
                out.append(escape)
            i += len(escape)
            continue
        if char == "[":
            in_class = True
        elif char == "]":
            in_class = False
        elif char == "$" and not in_class:
            char = r"\Z"
        out.append(char)
        i += 1
    return "".join(out)


def pre_split(text: str, pattern: str = GPT4_SPLIT_PATTERN) -> list[str]:
    """Cut `text` into the chunks that tiktoken's pre-split regex would produce (their concatenation is text)."""
    return re.findall(_translate(pattern, set(text)), text)


def count_chunks(text: str, pattern: str = GPT4_SPLIT_PATTERN) -> Counter[str]:
    """Pre-split `text` and count each distinct chunk: {chunk: occurrences}."""
    return Counter(pre_split(text, pattern))


def _merge(word: list[int], a: int, b: int, new: int) -> list[int]:
    """Replace each occurrence of the pair (a, b) in `word`, scanning left to right, by `new`."""
    out = []
    i, last = 0, len(word) - 1
    while i <= last:
        if i < last and word[i] == a and word[i + 1] == b:
            out.append(new)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def _merge_counting(word: list[int], a: int, b: int, new: int, freq: int,
                    counts: dict[tuple[int, int], int]) -> list[int]:
    """`_merge`, also moving `freq` in `counts` from the pairs it breaks to the pairs it makes.

    Only the neighbours of each merge site change: x a b y loses (x, a), (a, b), (b, y) and gains
    (x, new), (new, y). When two sites touch (a b a b), the second sees `new` as its left neighbour and
    takes back the (new, a) the first one added, so the result is exact.
    """
    out = []
    i, last = 0, len(word) - 1
    while i <= last:
        if i < last and word[i] == a and word[i + 1] == b:
            counts[a, b] -= freq
            if out:
                counts[out[-1], a] -= freq
                counts[out[-1], new] += freq
            if i + 2 <= last:
                counts[b, word[i + 2]] -= freq
                counts[new, word[i + 2]] += freq
            out.append(new)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


class _Vocab:
    """Token id <-> bytes while training; ids are ranks, so the byte strings of ids are all distinct."""

    def __init__(self) -> None:
        self.bytes_of = [bytes([b]) for b in range(N_BYTES)]
        self.ranks = {token: rank for rank, token in enumerate(self.bytes_of)}

    def merge(self, a: int, b: int) -> int:
        """The id of the token a+b, adding it with the next rank unless those bytes are already a token."""
        merged = self.bytes_of[a] + self.bytes_of[b]
        if merged not in self.ranks:
            self.ranks[merged] = len(self.bytes_of)
            self.bytes_of.append(merged)
        return self.ranks[merged]

    def tie_key(self, pair: tuple[int, int]) -> tuple[bytes, bytes]:
        return self.bytes_of[pair[0]], self.bytes_of[pair[1]]


def _prepare(text: str, vocab_size: int, pattern: str) -> tuple[list[list[int]], list[int]]:
    """Distinct chunks as lists of byte values, and how often each occurs."""
    if vocab_size < N_BYTES:
        raise ValueError(f"vocab_size={vocab_size}: byte-level BPE needs at least {N_BYTES} (the single bytes)")
    chunk_counts = count_chunks(text, pattern)
    return [list(chunk.encode("utf-8")) for chunk in chunk_counts], list(chunk_counts.values())


def train_bpe_naive(text: str, vocab_size: int, pattern: str = GPT4_SPLIT_PATTERN) -> dict[bytes, int]:
    """The textbook loop: count every pair in every chunk, merge the best one everywhere, repeat.

    Same inputs, output, tie-break and early stop as `train_bpe`, at O(merges * text) cost; it is the
    reference the tests and bench/bpe.py compare `train_bpe` against.
    """
    words, freqs = _prepare(text, vocab_size, pattern)
    vocab = _Vocab()
    while len(vocab.ranks) < vocab_size:
        counts: Counter[tuple[int, int]] = Counter()
        for word, freq in zip(words, freqs):
            for pair in zip(word, word[1:]):
                counts[pair] += freq
        if not counts:
            break
        a, b = min(counts, key=lambda pair: (-counts[pair], vocab.tie_key(pair)))
        new = vocab.merge(a, b)
        words = [_merge(word, a, b, new) for word in words]
    return vocab.ranks


def train_bpe(text: str, vocab_size: int, pattern: str = GPT4_SPLIT_PATTERN) -> dict[bytes, int]:
    """Learn byte-level BPE ranks from `text`: {token bytes: rank}, ranks 0..255 are the single bytes.

    vocab_size counts the 256 byte tokens; fewer ranks come back if the text runs out of pairs first.
    State kept between merges:
      counts[pair]  how often the pair occurs, summed over chunks weighted by chunk frequency
      where[pair]   ids of the chunks that may contain it (a superset: entries go stale, never missing)
      heap          (-count, tie key, pair) candidates; an entry whose count is out of date is
                    re-pushed with the current count when it reaches the top (lazy invalidation)
    A merge visits only the chunks in where[pair] and changes only the counts next to each merge site.
    """
    words, freqs = _prepare(text, vocab_size, pattern)
    vocab = _Vocab()
    counts: dict[tuple[int, int], int] = defaultdict(int)
    where: dict[tuple[int, int], set[int]] = defaultdict(set)
    for wid, (word, freq) in enumerate(zip(words, freqs)):
        for pair in zip(word, word[1:]):
            counts[pair] += freq
            where[pair].add(wid)
    heap = [(-count, *vocab.tie_key(pair), pair) for pair, count in counts.items()]
    heapq.heapify(heap)

    while len(vocab.ranks) < vocab_size:
        pair = _pop_best(heap, counts)
        if pair is None:
            break
        a, b = pair
        new = vocab.merge(a, b)
        # Counts only go up for pairs that contain the new token; every other count only goes down,
        # which the lazy heap tolerates. So only the pairs with `new` need fresh heap entries.
        grown: set[tuple[int, int]] = set()
        for wid in where.pop(pair):
            word = words[wid]
            merged = _merge_counting(word, a, b, new, freqs[wid], counts)
            if len(merged) == len(word):
                continue  # a stale index entry: an earlier merge already consumed the pair here
            for new_pair in zip(merged, merged[1:]):
                if new in new_pair:
                    where[new_pair].add(wid)
                    grown.add(new_pair)
            words[wid] = merged
        for new_pair in grown:
            heapq.heappush(heap, (-counts[new_pair], *vocab.tie_key(new_pair), new_pair))
    return vocab.ranks


def _pop_best(heap: list, counts: dict[tuple[int, int], int]) -> tuple[int, int] | None:
    """Pop the pair with the highest current count (ties: smallest tie key), or None if no pair is left.

    An entry records the count at push time. If the count has since dropped, the entry is re-pushed with
    the current one; if it has grown, a newer entry exists and this one is dropped. Every live pair keeps
    an entry at least as high as its count, so the first entry found up to date is the true best.
    """
    while heap:
        neg_count, first, second, pair = heapq.heappop(heap)
        count = counts[pair]
        if count == -neg_count:
            return pair
        if 0 < count < -neg_count:
            heapq.heappush(heap, (-count, first, second, pair))
    return None
