"""ops.py's backends against each other: SDPA ("torch") must equal the written-out reference ("math")."""
import pytest
import torch

from minimm import ops


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("Tq,Tk", [(37, 37), (1, 23), (5, 19)])
def test_attention_torch_equals_math(causal, Tq, Tk):
    torch.manual_seed(0)
    q = torch.randn(2, 3, Tq, 16, requires_grad=True)
    k = torch.randn(2, 3, Tk, 16, requires_grad=True)
    v = torch.randn(2, 3, Tk, 16, requires_grad=True)
    lengths = torch.tensor([Tk, Tk - 4])
    for kw in ({}, {"key_lengths": lengths}):
        a = ops.attention(q, k, v, causal, backend="torch", **kw)
        b = ops.attention(q, k, v, causal, backend="math", **kw)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        ga = torch.autograd.grad(a.sum(), (q, k, v))
        gb = torch.autograd.grad(b.sum(), (q, k, v))
        for x, y in zip(ga, gb):
            torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


def test_padded_keys_are_ignored_and_empty_rows_are_zero():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 11, 8) for _ in range(3))
    lengths = torch.tensor([7, 0])
    out = ops.attention(q, k, v, causal=False, key_lengths=lengths)
    k2, v2 = k.clone(), v.clone()
    k2[0, :, 7:] += 100.0
    v2[0, :, 7:] -= 50.0
    out2 = ops.attention(q, k2, v2, causal=False, key_lengths=lengths)
    torch.testing.assert_close(out[0], out2[0])
    assert (out[1] == 0).all() and torch.isfinite(out).all()


def test_segments_block_attention_across_examples():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 10, 8) for _ in range(3))
    seg = torch.tensor([[0] * 4 + [1] * 6])
    packed = ops.attention(q, k, v, causal=True, segment_ids=seg)
    alone = ops.attention(q[:, :, 4:], k[:, :, 4:], v[:, :, 4:], causal=True)
    torch.testing.assert_close(packed[:, :, 4:], alone, atol=1e-6, rtol=1e-5)
    math = ops.attention(q, k, v, causal=True, segment_ids=seg, backend="math")
    torch.testing.assert_close(packed, math, atol=1e-6, rtol=1e-5)


def test_attention_under_cpu_autocast_runs_in_float32():
    """Under CPU bf16 autocast the linears give bf16 q, k, v; attention must still run in fp32 (the
    CPU kernel is slower in bf16) and hand back bf16: the fp32 result rounded once, with grads flowing to q, k, v."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 2, 29, 12).bfloat16().requires_grad_() for _ in range(3))
    seg = torch.tensor([[0] * 11 + [1] * 18, [0] * 29, [0] * 5 + [1] * 20 + [2] * 4])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ops.attention(q, k, v, causal=True, segment_ids=seg, backend="torch")
    assert out.dtype == torch.bfloat16
    ref = ops.attention(q.float(), k.float(), v.float(), causal=True, segment_ids=seg, backend="math")
    # fp32 attention rounded once to bf16 is within half a bf16 step (2^-9 relative) of the fp32 result;
    # attention computed in bf16 itself is off by several steps
    torch.testing.assert_close(out.float(), ref, atol=1e-5, rtol=2 ** -8)
    grads = torch.autograd.grad(out.float().sum(), (q, k, v))
    assert all(g.dtype == torch.bfloat16 and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_backends_agree(reduction):
    torch.manual_seed(0)
    logits = torch.randn(37, 1000, requires_grad=True)
    targets = torch.randint(0, 1000, (37,))
    targets[::3] = -100
    a = ops.cross_entropy(logits, targets, reduction=reduction, backend="torch")
    b = ops.cross_entropy(logits, targets, reduction=reduction, backend="math")
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(torch.autograd.grad(a.sum(), logits)[0], torch.autograd.grad(b.sum(), logits)[0])


def test_cross_entropy_all_ignored_is_zero_not_nan():
    logits = torch.randn(4, 9, requires_grad=True)
    loss = ops.cross_entropy(logits, torch.full((4,), -100))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(logits.grad).all()


def test_set_backend():
    assert ops.set_backend("auto", "cpu") == "torch"
    with pytest.raises(ValueError, match="kernels="):
        ops.set_backend("cuda-magic")
    ops.set_backend("torch")
