import math

import pytest
import torch
import torch.nn.functional as F

from minimm.gpt import GPT, GPTConfig
from minimm.training import backward_token_weighted
from minimm.unlikelihood import (answer_prompts, induction_negatives, repeated_ngrams, sequence_unlikelihood,
                                 unlikelihood_loss)


def brute_force_negatives(idx, targets, segment_ids):
    """The definition, one position at a time: the last earlier equal token's successor, if wrong."""
    out = torch.full_like(idx, -100)
    for b in range(idx.shape[0]):
        for t in range(idx.shape[1]):
            earlier = [j for j in range(t) if idx[b, j] == idx[b, t] and segment_ids[b, j] == segment_ids[b, t]]
            if earlier and targets[b, t] != -100 and idx[b, earlier[-1] + 1] != targets[b, t]:
                out[b, t] = idx[b, earlier[-1] + 1]
    return out


def test_the_negative_is_the_wrong_copy_of_an_argument_list():
    # "( a , b , c )": after the second "," the copy of the first says "b"; the target is "c"
    lp, a, comma, b, c, rp = 1, 2, 3, 4, 5, 6
    idx = torch.tensor([[lp, a, comma, b, comma, c, rp, 0]])
    targets = torch.cat([idx[:, 1:], torch.tensor([[-100]])], dim=1)
    assert induction_negatives(idx, targets).tolist() == [[-100, -100, -100, -100, b, -100, -100, -100]]
    # a right copy is no negative: "( a , b , a , b"
    idx = torch.tensor([[lp, a, comma, b, comma, a, comma, b]])
    targets = torch.cat([idx[:, 1:], torch.tensor([[-100]])], dim=1)
    negatives = induction_negatives(idx, targets)
    assert negatives[0, 4] == b  # after "b ," the last "," was followed by "b"; the target is "a"
    assert negatives[0, 5] == -100  # after "a" the last "a" was followed by ","; so is this one
    # no target, no negative; a copy never reaches into another packed example
    targets[0, 4] = -100
    assert induction_negatives(idx, targets)[0, 4] == -100
    idx = torch.tensor([[lp, a, comma, b, comma, c, rp, 0]])
    targets = torch.cat([idx[:, 1:], torch.tensor([[-100]])], dim=1)
    assert (induction_negatives(idx, targets, torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1]])) == -100).all()


def test_negatives_match_the_definition_on_random_packed_rows():
    g = torch.Generator().manual_seed(3)
    idx = torch.randint(0, 7, (3, 37), generator=g)  # a small vocabulary: many repeats
    targets = torch.cat([idx[:, 1:], torch.randint(0, 7, (3, 1), generator=g)], dim=1)
    targets[torch.rand(3, 37, generator=g) < 0.3] = -100
    segment_ids = (torch.rand(3, 37, generator=g) < 0.1).cumsum(dim=1)
    got = induction_negatives(idx, targets, segment_ids)
    assert (got != -100).sum() > 10
    assert torch.equal(got, brute_force_negatives(idx, targets, segment_ids))


def test_unlikelihood_loss_is_minus_log_one_minus_p():
    logits = torch.randn(4, 5, 11, requires_grad=True)
    negatives = torch.randint(0, 11, (4, 5))
    negatives[0] = -100
    p = torch.softmax(logits, dim=-1).gather(-1, negatives.clamp(min=0)[..., None])[..., 0]
    want = -torch.log(1 - p) * (negatives != -100)
    got = unlikelihood_loss(logits, negatives)
    torch.testing.assert_close(got, want)
    assert (got[0] == 0).all()
    weights = torch.randn(4, 5)  # and the same gradient, rows without a negative included (zero)
    (grad_got,) = torch.autograd.grad((got * weights).sum(), logits)
    (grad_want,) = torch.autograd.grad((want * weights).sum(), logits)
    torch.testing.assert_close(grad_got, grad_want)
    assert (grad_got[0] == 0).all()
    none = torch.full((4, 5), -100)  # a batch without any negative: zeros, not an error
    assert torch.equal(unlikelihood_loss(logits, none), torch.zeros(4, 5))


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_gpt_loss_adds_the_weighted_term_on_both_head_paths(reduction):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=13, block_size=40, n_layer=1, n_head=2, n_embd=16))
    idx = torch.randint(0, 13, (2, 40))
    targets = torch.cat([idx[:, 1:], torch.randint(0, 13, (2, 1))], dim=1)
    targets[0, :9] = -100
    negatives = induction_negatives(idx, targets)
    assert (negatives != -100).sum() > 5
    logits, plain = model(idx, targets, reduction="none")
    ce = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="none")
    per_token = ce + 0.7 * unlikelihood_loss(logits, negatives)  # (B, T)
    want = {"none": per_token, "sum": per_token.sum(), "mean": per_token.sum() / (targets != -100).sum()}[reduction]
    for return_logits in (True, False):
        _, got = model(idx, targets, reduction=reduction, return_logits=return_logits,
                       negatives=negatives, unlikelihood=0.7)
        torch.testing.assert_close(got, want)
    _, off = model(idx, targets, reduction="none", negatives=negatives, unlikelihood=0.0)
    torch.testing.assert_close(off, plain)


def test_training_with_unlikelihood_makes_wrong_copies_less_likely():
    """Thirty steps on one batch of random rows, with and without the term: p(wrong copy) ends lower with."""

    class Batch:
        def __init__(self, x, y):
            self.x, self.y, self.segment_ids, self.task_ids = x, y, None, torch.zeros_like(x)

        def media(self):
            return {}

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 29, (4, 30), generator=g)
    y = torch.cat([x[:, 1:], torch.randint(0, 29, (4, 1), generator=g)], dim=1)
    negatives = induction_negatives(x, y)
    p_wrong = {}
    for weight in (0.0, 3.0):
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=29, block_size=30, n_layer=1, n_head=2, n_embd=32))
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        for _ in range(30):
            opt.zero_grad()
            backward_token_weighted(model, [Batch(x, y)], 1, torch.autocast("cpu", enabled=False), scaler,
                                    unlikelihood=weight)
            opt.step()
        with torch.no_grad():
            logits, _ = model(x, y)
        p = torch.softmax(logits, -1).gather(-1, negatives.clamp(min=0)[..., None])[..., 0]
        p_wrong[weight] = p[negatives != -100].mean().item()
    assert p_wrong[3.0] < 0.85 * p_wrong[0.0]  # 0.058 against 0.082


def brute_force_repeats(row, start, n, stops):
    """The definition: a position of the answer is marked when some n-gram of the answer that holds it already
    occurred earlier in the answer; the answer ends at its first stop token."""
    end = next((t for t in range(start, len(row)) if row[t] in stops), len(row))
    grams = [(s, tuple(row[s:s + n])) for s in range(start, end - n + 1)]
    marked = [False] * len(row)
    for s, gram in grams:
        if any(g == gram for s2, g in grams if s2 < s):
            for p in range(s, s + n):
                marked[p] = True
    return marked


@pytest.mark.parametrize("n", [2, 4])
def test_repeated_ngrams_match_the_definition(n):
    g = torch.Generator().manual_seed(n)
    tokens = torch.randint(0, 4, (6, 40), generator=g)  # 4 symbols: plenty of repeats
    tokens[0, 20:] = 3  # a run of one token after a stop token: nothing marked after it
    tokens[0, 19] = 7
    got = repeated_ngrams(tokens, 5, n, stops=(7,))
    want = torch.tensor([brute_force_repeats(r, 5, n, (7,)) for r in tokens.tolist()])
    assert torch.equal(got, want) and want.any() and not got[0, 19:].any() and not got[:, :5].any()


def test_sequence_unlikelihood_is_the_unlikelihood_of_the_repeats_of_greedy_answers():
    torch.manual_seed(3)
    model = GPT(GPTConfig(vocab_size=29, block_size=64, n_layer=1, n_head=2, n_embd=32))
    prompts = torch.randint(0, 27, (3, 5))
    stops = (27, 28)
    cost, n_tokens = sequence_unlikelihood(model, prompts, 30, 3, stops)
    assert model.training and cost.requires_grad  # the mode it had, and a cost to step on
    with torch.no_grad():
        out = model.generate(prompts, 30, temperature=0.0, stop_tokens=stops)  # (3, 35)
        logits, _ = model(out[:, :-1], torch.full_like(out[:, :-1], -100), reduction="none")  # (3, 34, 29)
    p = torch.softmax(logits.float(), -1)
    want, count = 0.0, 0
    for b, row in enumerate(out.tolist()):
        marks = brute_force_repeats(row, 5, 3, stops)
        assert any(marks)  # a random model answers in loops
        want += sum(-math.log(1 - p[b, t - 1, row[t]].item()) for t in range(1, len(row)) if marks[t])
        answer = row[5:]
        count += next((i + 1 for i, tok in enumerate(answer) if tok in stops), len(answer))
    assert n_tokens == count
    assert cost.item() == pytest.approx(want, rel=1e-4)
    cost.backward()
    assert model.lm_head.weight.grad.abs().sum() > 0


def test_sequence_unlikelihood_of_answers_that_stop_at_once_is_zero():
    model = GPT(GPTConfig(vocab_size=29, block_size=64, n_layer=1, n_head=2, n_embd=32))
    cost, n_tokens = sequence_unlikelihood(model, torch.zeros(2, 4, dtype=torch.long), 10, 2, tuple(range(29)))
    assert cost.item() == 0.0 and not cost.requires_grad and n_tokens == 2  # each answer: its stop token


def test_answer_prompts_are_the_text_only_questions_as_rendered_grouped_by_length(tmp_path):
    from minimm.formats import write_jsonl
    from minimm.render import render_prompt
    from minimm.tokenizer import Tokenizer
    tok = Tokenizer.train("def add(x): return x + 1. Say it. " * 20, 300)
    rows = [{"task": "code", "instruction": "Add one.", "input": "def add(x):", "output": "def add(x):\n    return x + 1"},
            {"conversations": [{"role": "user", "content": "Say it."}, {"role": "assistant", "content": "It."}]},
            {"conversations": [{"role": "user", "content": "Say it. " * 40}, {"role": "assistant", "content": "It."}]},
            {"text": "plain text has no question"}]
    write_jsonl(tmp_path / "train.jsonl", rows)
    (tmp_path / "meta.json").write_text('{"sources": {"train": ["train.jsonl"]}}')
    got = answer_prompts(tmp_path, tok, max_length=40)
    code = render_prompt(tok, "code", [("user", "Add one.\n\ndef add(x):")])
    chat = render_prompt(tok, "text", [("user", "Say it.")])
    assert sorted(p for ps in got.values() for p in ps) == sorted([code, chat])  # the long one left out
    assert all(len(p) == n for n, ps in got.items() for p in ps)
