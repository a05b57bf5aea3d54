"""The Triton kernels against minimm.ops' "math" reference: forward values and every gradient.

Runs on the CPU in Triton's interpreter (TRITON_INTERPRET=1, set before triton is imported). With
TRITON_INTERPRET=0 on a machine with CUDA the same tests run on the GPU, plus the bf16 cases, which
the interpreter cannot be trusted with. Sizes are deliberately not powers of two (T = 37 and 100,
V = 1000 and 4099, chunks that do not divide N) so that every masked edge tile is exercised; batches
and head counts stay tiny because the interpreter runs each program in numpy, one after another.

Tolerances, and why:
- fp32: the kernels and the reference both accumulate in fp32, only in a different order (tiles,
  online-softmax rescaling), so they agree to a few ulps times the number of terms: 1e-5.
- fp16 attention: inputs are the same fp16 values for both; the reference then works in fp32, while the
  kernel rounds the probabilities and dS to fp16 before its matmuls (as every fp16 FlashAttention does)
  and rounds the output to fp16. One fp16 rounding is 2^-11 ~ 5e-4 relative; a few of them over values
  of order 1 give errors of ~2e-3, hence 5e-3.
- fp16 cross-entropy: the loss is computed in fp32 from the fp16 logits, exactly like the reference
  (1e-5); the gradient is stored in fp16, so one rounding of values in [-1, 1]: 1e-3.
"""
import os
import sys

# Triton decides at import whether it interprets, so this must come before anything imports it.
TRITON_IMPORTED_EARLY = "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")
if TRITON_IMPORTED_EARLY and os.environ["TRITON_INTERPRET"] == "1":
    pytest.skip("triton was imported before TRITON_INTERPRET=1 was set: run with TRITON_INTERPRET=1 in the "
                "environment", allow_module_level=True)

from opcheck import check_op  # noqa: E402

from minimm import ops  # noqa: E402
from minimm.kernels.attention import triton_attention  # noqa: E402
from minimm.kernels.cross_entropy import triton_cross_entropy  # noqa: E402
from minimm.kernels.linear_cross_entropy import linear_cross_entropy  # noqa: E402

INTERPRET = os.environ["TRITON_INTERPRET"] == "1"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("TRITON_INTERPRET=0 needs a CUDA GPU", allow_module_level=True)
DEVICE = "cpu" if INTERPRET else "cuda"
gpu_only = pytest.mark.skipif(INTERPRET, reason="bf16 is not trustworthy in the Triton interpreter")
DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=gpu_only)]

ATTN_TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}
CE_GRAD_TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def qkv(B: int, nh: int, T: int, hs: int, dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, nh, T, hs, generator=g).to(DEVICE, dtype).requires_grad_() for _ in range(3)]


def math_attention(causal: bool, key_lengths: torch.Tensor | None = None):
    return lambda q, k, v: ops.attention(q, k, v, causal, key_lengths=key_lengths, backend="math")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("T,hs", [(37, 32), (100, 64)])
def test_attention_matches_math(dtype, causal, T, hs):
    tol = ATTN_TOL[dtype]
    check_op(lambda q, k, v: triton_attention(q, k, v, causal=causal), math_attention(causal),
             qkv(2, 1, T, hs, dtype), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_padded_keys(dtype, causal):
    """Keys past key_lengths[b] are invisible; a batch row with no keys gives zeros and zero gradients."""
    tol = ATTN_TOL[dtype]
    lengths = torch.tensor([37, 20, 0], device=DEVICE)
    q, k, v = qkv(3, 2, 37, 32, dtype, seed=1)
    out = check_op(lambda q, k, v: triton_attention(q, k, v, causal=causal, key_lengths=lengths),
                   math_attention(causal, lengths), [q, k, v], atol=tol, rtol=tol)
    assert (out[2] == 0).all()
    triton_attention(q, k, v, causal=causal, key_lengths=lengths).float().pow(2).sum().backward()
    assert (q.grad[2] == 0).all() and (k.grad[1:, :, 20:] == 0).all() and (v.grad[1:, :, 20:] == 0).all()
    assert q.grad[1].abs().sum() > 0


def test_attention_through_ops_with_transposed_views():
    """minimm.ops dispatches backend="triton" here; q, k, v as the GPT makes them: transposed views."""
    B, T, nh, hs = 2, 45, 2, 32
    g = torch.Generator().manual_seed(2)
    qkv_rows = torch.randn(B, T, 3, nh, hs, generator=g).to(DEVICE)
    q, k, v = (qkv_rows[:, :, i].transpose(1, 2).requires_grad_() for i in range(3))  # (B, nh, T, hs) views
    lengths = torch.tensor([45, 31])
    check_op(lambda q, k, v: ops.attention(q, k, v, True, key_lengths=lengths, backend="triton"),
             lambda q, k, v: ops.attention(q, k, v, True, key_lengths=lengths, backend="math"),
             [q, k, v], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_attention_head_size_not_a_power_of_two(causal):
    """hs = 48 (n_embd 192 / 4 heads, say) runs in 64-wide tiles with zero padding."""
    check_op(lambda q, k, v: triton_attention(q, k, v, causal=causal), math_attention(causal),
             qkv(1, 2, 29, 48, torch.float32, seed=6), atol=1e-5, rtol=1e-5)


def test_attention_rejects_unsupported_head_size():
    q = torch.randn(1, 1, 8, 160, device=DEVICE)
    with pytest.raises(ValueError, match="head size 160"):
        triton_attention(q, q, q)


def ce_rows(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Per-row cross-entropy from PyTorch, 0 for ignored rows: the base of the z-loss references."""
    return torch.nn.functional.cross_entropy(x, t, ignore_index=-100, reduction="none")


def logits_and_targets(N: int, V: int, dtype: torch.dtype, ignored_every: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(N, V, generator=g)).to(DEVICE, dtype).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=g)
    targets[::ignored_every] = -100
    return logits, targets.to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V", [1000, 4099])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_matches_math(dtype, V, reduction):
    logits, targets = logits_and_targets(19, V, dtype)
    check_op(lambda x, t: triton_cross_entropy(x, t, reduction=reduction),
             lambda x, t: ops.math_cross_entropy(x, t, -100, reduction), [logits, targets],
             atol=1e-5, rtol=1e-5, grad_atol=CE_GRAD_TOL[dtype], grad_rtol=CE_GRAD_TOL[dtype])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_all_rows_ignored(reduction):
    logits, targets = logits_and_targets(7, 1000, torch.float32)
    targets.fill_(-100)
    loss = triton_cross_entropy(logits, targets, reduction=reduction)
    assert torch.equal(loss, torch.zeros_like(loss))  # 0, not NaN, for the mean over no rows
    loss.sum().backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cross_entropy_z_loss(dtype):
    z = 1e-2

    def z_loss_reference(x, t):
        lse = torch.logsumexp(x, -1)
        valid = t != -100
        per_row = (ce_rows(x, t) + z * lse ** 2) * valid
        return per_row.sum() / valid.sum()

    logits, targets = logits_and_targets(13, 1000, dtype)
    check_op(lambda x, t: triton_cross_entropy(x, t, z_loss=z), z_loss_reference, [logits, targets],
             atol=1e-5, rtol=1e-5, grad_atol=CE_GRAD_TOL[dtype], grad_rtol=CE_GRAD_TOL[dtype])


def test_cross_entropy_inplace_overwrites_logits_with_gradient():
    logits, targets = logits_and_targets(11, 1000, torch.float32)
    work = logits.detach().clone().requires_grad_()
    loss = triton_cross_entropy(work * 1.0, targets, reduction="sum", inplace=True)
    loss.backward()
    expected = torch.autograd.grad(ops.math_cross_entropy(logits, targets, -100, "sum"), logits)[0]
    torch.testing.assert_close(work.grad, expected, atol=1e-6, rtol=1e-5)


def test_cross_entropy_through_ops_and_backward_once():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 9, 1000, generator=g).to(DEVICE).requires_grad_()  # (B, T, V)
    targets = torch.randint(0, 1000, (2, 9), generator=g).to(DEVICE)
    check_op(lambda x, t: ops.cross_entropy(x, t, reduction="none", backend="triton"),
             lambda x, t: ops.cross_entropy(x, t, reduction="none", backend="math"), [logits, targets],
             atol=1e-5, rtol=1e-5)
    loss = ops.cross_entropy(logits, targets, backend="triton")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only once"):
        loss.backward()


@pytest.mark.parametrize("use_triton", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("z_loss", [0.0, 1e-2])
def test_linear_cross_entropy_matches_materialised_logits(use_triton, reduction, z_loss):
    """Chunks of 16 rows over N = 50 (the last chunk is short) against the full (N, V) logits."""
    N, H, V = 50, 48, 1000
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(N, H, generator=g).to(DEVICE).requires_grad_()
    weight = (torch.randn(V, H, generator=g) / H ** 0.5).to(DEVICE).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=g)
    targets[3:11] = -100
    targets = targets.to(DEVICE)

    def materialised(h, w, t):
        logits = h @ w.t()  # (N, V)
        lse = torch.logsumexp(logits, -1)
        per_row = (ce_rows(logits, t) + z_loss * lse ** 2) * (t != -100)
        return per_row.sum() / (t != -100).sum() if reduction == "mean" else per_row.sum()

    check_op(lambda h, w, t: linear_cross_entropy(h, w, t, reduction=reduction, chunk_size=16, z_loss=z_loss,
                                                  use_triton=use_triton),
             materialised, [hidden, weight, targets], atol=1e-5, rtol=1e-5)


def test_linear_cross_entropy_fp16_and_frozen_weight():
    """fp16 keeps the mean's 1/N out of the stored gradient; a frozen weight gets no gradient work."""
    N, H, V = 37, 32, 1000
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(N, H, generator=g).to(DEVICE, torch.float16).requires_grad_()
    weight = (torch.randn(V, H, generator=g) / H ** 0.5).to(DEVICE, torch.float16)
    targets = torch.randint(0, V, (N,), generator=g).to(DEVICE)
    check_op(lambda h, w, t: linear_cross_entropy(h, w, t, chunk_size=10),
             lambda h, w, t: ops.math_cross_entropy(h @ w.t(), t, -100, "mean"),
             [hidden, weight, targets], atol=1e-3, rtol=1e-3, grad_atol=1e-3, grad_rtol=1e-2)
