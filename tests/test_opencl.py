"""Every OpenCL op against PyTorch, forward and gradients, on irregular shapes, in float32.

One helper (`check`, the tinygrad idea) runs an op both ways on the same inputs, back-propagates the
same random output gradient through both, and compares outputs and input gradients.

Tolerances: both sides compute in float32 and differ only in the order of their sums (tiles, row
reductions). Summing K terms of size ~1 in another order moves the result by ~sqrt(K) * 6e-8; with
K <= a few hundred here that is ~1e-6, so atol = 2e-5 / rtol = 1e-4 leaves margin yet catches any real
bug (a wrong index or a missing term is off by ~1e-1). Runs on PoCL's CPU device; skips without OpenCL.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("pyopencl", reason="pyopencl is not installed: pip install pyopencl pocl-binary-distribution")
from minimm import ops  # noqa: E402
from minimm.rope import apply_rope, rope_tables  # noqa: E402
from minimm.opencl import attention as A  # noqa: E402
from minimm.opencl import functional as Fcl  # noqa: E402
from minimm.opencl.kernels.gemm import sgemm  # noqa: E402
from minimm.opencl.runtime import OpenCLUnavailable, get_device, is_available, parse_device  # noqa: E402
from minimm.opencl.tensor import Tensor, no_grad  # noqa: E402

if not is_available():
    pytest.skip("no OpenCL platform: pip install pyopencl pocl-binary-distribution", allow_module_level=True)

ATOL, RTOL = 2e-5, 1e-4


@pytest.fixture(scope="module")
def dev():
    return get_device("opencl")


def to_cl(dev, t: torch.Tensor | None) -> Tensor | None:
    return None if t is None else Tensor.from_numpy(dev, t.detach().numpy(), requires_grad=t.requires_grad)


def check(dev, cl_fn, torch_fn, *inputs: torch.Tensor | None, atol: float = ATOL, rtol: float = RTOL,
          seed: int = 0) -> None:
    """Compare cl_fn(*cl inputs) with torch_fn(*inputs): values, then gradients of sum(out * G)."""
    inputs = [None if t is None else t.detach().clone().requires_grad_(t.dtype.is_floating_point)
              for t in inputs]
    expected = torch_fn(*inputs)
    cl_inputs = [to_cl(dev, t) for t in inputs]
    out = cl_fn(*cl_inputs)
    np.testing.assert_allclose(out.numpy(), expected.detach().numpy(), atol=atol, rtol=rtol)
    upstream = torch.randn(expected.shape, generator=torch.Generator().manual_seed(seed))
    expected.backward(upstream)
    out.backward(Tensor.from_numpy(dev, upstream.numpy()))
    for t, c in zip(inputs, cl_inputs):
        if t is not None and t.requires_grad:
            assert c.grad is not None, "an input got no gradient"
            np.testing.assert_allclose(c.grad.numpy(), t.grad.numpy(), atol=atol, rtol=rtol)


def randn(*shape: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


# ----------------------------------------------------------------------------------------------- runtime

def test_device_strings():
    assert parse_device("opencl") is None
    assert parse_device("opencl:1:2") == (1, 2)
    with pytest.raises(ValueError, match="opencl:PLATFORM:DEVICE"):
        parse_device("opencl:1")
    with pytest.raises(ValueError, match="does not exist"):
        get_device("opencl:7:7")


def test_missing_pyopencl_says_how_to_install(monkeypatch):
    import builtins
    from minimm.opencl import runtime
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.startswith("pyopencl"):
            raise ImportError("No module named 'pyopencl'")
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", fake_import)
    monkeypatch.setattr(runtime, "_devices", {})
    with pytest.raises(OpenCLUnavailable, match="pocl-binary-distribution"):
        runtime.get_device("opencl")
    assert not runtime.is_available()


def test_no_platform_says_how_to_install(monkeypatch):
    import pyopencl as cl
    from minimm.opencl import runtime

    def no_platforms():
        raise cl.LogicError("clGetPlatformIDs failed: PLATFORM_NOT_FOUND_KHR")
    monkeypatch.setattr(cl, "get_platforms", no_platforms)
    monkeypatch.setattr(runtime, "_devices", {})
    with pytest.raises(OpenCLUnavailable, match="pip install pyopencl pocl-binary-distribution"):
        runtime.get_device("opencl")


def test_program_cache_returns_the_same_kernel(dev):
    from minimm.opencl.kernels import elementwise
    assert dev.kernel(elementwise.SOURCE, "mul") is dev.kernel(elementwise.SOURCE, "mul")


# ------------------------------------------------------------------------------------------------ SGEMM

@pytest.mark.parametrize("M,N,K", [(37, 53, 29), (1, 200, 70), (3, 5, 7), (130, 129, 65), (67, 300, 131),
                                   (517, 600, 45)])  # the last one takes the big CPU tiles
@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (False, True), (True, False), (True, True)])
def test_sgemm(dev, M, N, K, trans_a, trans_b):
    a, b, d, bias = randn(M, K, seed=1), randn(K, N, seed=2), randn(M, N, seed=3), randn(N, seed=4)
    stored_a = a.T.contiguous() if trans_a else a
    stored_b = b.T.contiguous() if trans_b else b
    A_, B_, C_ = (dev.upload(t.numpy()) for t in (stored_a, stored_b, d))
    sgemm(dev, M, N, K, A_, B_, C_, trans_a=trans_a, trans_b=trans_b, alpha=0.5, beta=1.5,
          bias=dev.upload(bias.numpy()))
    expected = 0.5 * (a.double() @ b.double()) + 1.5 * d + bias  # float64 reference
    np.testing.assert_allclose(dev.download(C_, (M, N), np.float32), expected.numpy(), atol=1e-4, rtol=1e-5)


def gpu_layout_device(dev):
    """The same OpenCL device, told it is a GPU: 16x16 work-groups and 128-wide row reductions. Running
    the GPU configuration on PoCL checks its indexing here, where no GPU is at hand."""
    from minimm.opencl.runtime import Device
    gpu_like = Device(dev.cl_device)
    gpu_like.is_cpu = False
    return gpu_like


@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (False, True), (True, False), (True, True)])
def test_sgemm_gpu_layout(dev, trans_a, trans_b):
    gpu = gpu_layout_device(dev)
    M, N, K = 70, 45, 37
    a, b = randn(M, K, seed=1), randn(K, N, seed=2)
    A_ = gpu.upload((a.T.contiguous() if trans_a else a).numpy())
    B_ = gpu.upload((b.T.contiguous() if trans_b else b).numpy())
    C_ = gpu.alloc(M * N * 4)
    sgemm(gpu, M, N, K, A_, B_, C_, trans_a=trans_a, trans_b=trans_b)
    np.testing.assert_allclose(gpu.download(C_, (M, N), np.float32), (a @ b).numpy(), atol=1e-4, rtol=1e-5)


def test_row_kernels_gpu_layout(dev):
    gpu = gpu_layout_device(dev)
    x, w, b = randn(5, 300, seed=1), randn(300, seed=2), randn(300, seed=3)
    check(gpu, lambda x, w, b: Fcl.layer_norm(x, w, b), lambda x, w, b: F.layer_norm(x, (300,), w, b), x, w, b)
    check(gpu, Fcl.softmax, lambda x: torch.softmax(x, -1), x)
    targets = torch.tensor([3, -100, 299, 0, 7])
    check(gpu, lambda x: Fcl.cross_entropy(x, targets.numpy()),
          lambda x: ops.cross_entropy(x, targets, backend="math"), x)
    from minimm.opencl.kernels.adamw import PARTIALS, sum_squares
    values = randn(1000, seed=6)
    partial = gpu.alloc(PARTIALS * 4)
    sum_squares(gpu, 1000, gpu.upload(values.numpy()), partial)
    assert abs(gpu.download(partial, (PARTIALS,), np.float32).sum() - (values ** 2).sum().item()) < 1e-3
    q, k = randn(1, 2, 3, 8, seed=4), randn(1, 2, 200, 8, seed=5)
    expected = ops.attention(q, k[:, :, :150], k[:, :, :150], causal=True, backend="math")
    out = A.cached_attention(to_cl(gpu, q), to_cl(gpu, k), to_cl(gpu, k), key_count=150)
    np.testing.assert_allclose(out.numpy(), expected.transpose(1, 2).reshape(1, 3, 16).numpy(), atol=ATOL)


def test_sgemm_batched_with_offsets_and_row_strides(dev):
    batch, M, N, K = 3, 17, 19, 23
    a, b = randn(batch, M, K, seed=5), randn(batch, N, K, seed=6)
    stride = (M + 2) * (K + 5)  # A lives inside a bigger array: offset 5, row stride K + 5
    padded = torch.zeros(5 + batch * stride)
    padded[5:].view(batch, M + 2, K + 5)[:, :M, :K] = a
    A_, B_ = dev.upload(padded.numpy()), dev.upload(b.numpy())
    C_ = dev.alloc(batch * M * N * 4)
    sgemm(dev, M, N, K, A_, B_, C_, trans_b=True, lda=K + 5, offsets=(5, 0, 0), batch=batch,
          strides=(stride, N * K, M * N))
    np.testing.assert_allclose(dev.download(C_, (batch, M, N), np.float32),
                               (a @ b.transpose(1, 2)).numpy(), atol=1e-4, rtol=1e-5)


# ------------------------------------------------------------------------------------ element-wise ops

def test_add_mul_scale(dev):
    a, b = randn(7, 13, seed=1), randn(7, 13, seed=2)
    check(dev, lambda x, y: x + y, lambda x, y: x + y, a, b)
    check(dev, lambda x, y: x * y, lambda x, y: x * y, a, b)
    check(dev, lambda x: x * 0.37, lambda x: x * 0.37, a)
    check(dev, lambda x: (x + x) * x, lambda x: (x + x) * x, a)  # one tensor used three times


@pytest.mark.parametrize("masked", [False, True])
def test_shift_time(dev, masked):
    """Each position's previous one (GPT.smear_previous): zeros at t = 0 and, masked, at packed starts."""
    x = randn(3, 7, 11, seed=1)
    keep = np.ones((3, 7), np.int32)
    keep[:, 0] = 0
    if masked:
        keep[0, 3] = keep[2, 5] = 0  # a new packed example starts there

    def reference(x):
        shifted = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)
        return shifted * torch.from_numpy(keep).float()[..., None]
    check(dev, lambda x: Fcl.shift_time(x, keep=keep if masked else None), reference, x)
    first = randn(3, 1, 11, seed=2)  # generation: the KV cache's last input comes first
    out = Fcl.shift_time(to_cl(dev, x), to_cl(dev, first))
    np.testing.assert_allclose(out.numpy(), torch.cat([first, x[:, :-1]], dim=1).numpy(), atol=0)


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("approximate", ["tanh", "none"])
def test_gelu_with_bias(dev, with_bias, approximate):
    z, bias = randn(5, 9, 37, seed=1, scale=2.0), randn(37, seed=2) if with_bias else None
    check(dev, lambda z, b: Fcl.gelu(z, b, approximate),
          lambda z, b: F.gelu(z if b is None else z + b, approximate=approximate), z, bias)


@pytest.mark.parametrize("with_bias", [True, False])
def test_relu_squared_with_bias(dev, with_bias):
    z, bias = randn(4, 7, 33, seed=3, scale=2.0), randn(33, seed=4) if with_bias else None
    check(dev, Fcl.relu_squared, lambda z, b: F.relu(z if b is None else z + b).square(), z, bias)


@pytest.mark.parametrize("with_bias,with_residual", [(True, False), (False, True), (True, True)])
def test_linear(dev, with_bias, with_residual):
    x, w = randn(3, 11, 29, seed=1), randn(53, 29, seed=2, scale=0.2)
    bias = randn(53, seed=3) if with_bias else None
    residual = randn(3, 11, 53, seed=4) if with_residual else None
    check(dev, Fcl.linear, lambda x, w, b, r: F.linear(x, w, b) + (0 if r is None else r), x, w, bias, residual)


@pytest.mark.parametrize("stride,channels_last", [(1, False), (2, True), (2, False)])
def test_conv1d(dev, stride, channels_last):
    B, Cin, F_in, Cout = 2, 5, 13, 7
    x, w, b = randn(B, Cin, F_in, seed=1), randn(Cout, Cin, 3, seed=2, scale=0.3), randn(Cout, seed=3)

    def reference(x, w, b):
        return torch.nn.functional.conv1d(x.transpose(1, 2) if channels_last else x, w, b, stride=stride,
                                          padding=1).transpose(1, 2)  # (B, Tout, Cout)
    x_in = x.transpose(1, 2).contiguous() if channels_last else x
    check(dev, lambda x, w, b: Fcl.conv1d(x, w, b, stride, 1, channels_last), reference, x_in, w, b)


# -------------------------------------------------------------------------------------------------- norms

@pytest.mark.parametrize("with_bias", [True, False])
def test_layer_norm(dev, with_bias):
    x = randn(4, 7, 45, seed=1, scale=3.0) + 2.0  # an offset mean: catches a one-pass variance
    w, b = randn(45, seed=2), randn(45, seed=3) if with_bias else None
    check(dev, lambda x, w, b: Fcl.layer_norm(x, w, b, 1e-5), lambda x, w, b: F.layer_norm(x, (45,), w, b, 1e-5),
          x, w, b)


def test_rms_norm(dev):
    x, w = randn(6, 51, seed=1, scale=2.0), randn(51, seed=2)
    check(dev, lambda x, w: Fcl.rms_norm(x, w, 1e-6), lambda x, w: F.rms_norm(x, (51,), w, 1e-6), x, w)


def test_softmax(dev):
    check(dev, Fcl.softmax, lambda x: torch.softmax(x, dim=-1), randn(3, 5, 77, seed=1, scale=4.0))


# ------------------------------------------------------------------------------------- embeddings, loss

def test_embedding_with_repeated_tokens(dev):
    V, C, B, T = 23, 13, 3, 9
    idx = torch.randint(0, 5, (B, T), generator=torch.Generator().manual_seed(0))  # many repeats
    wte, wpe = randn(V, C, seed=1), randn(T + 4, C, seed=2)
    check(dev, lambda w, p: Fcl.embedding(idx.numpy(), w, p), lambda w, p: F.embedding(idx, w) + p[:T], wte, wpe)
    check(dev, lambda w: Fcl.embedding(idx.numpy(), w), lambda w: F.embedding(idx, w), wte)


def test_embedding_rejects_out_of_range_ids(dev):
    with pytest.raises(ValueError, match="token ids"):
        Fcl.embedding(np.array([[0, 23]]), to_cl(dev, randn(23, 4)))


@pytest.mark.parametrize("n_ignored", [0, 5, 21])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_ignore_index(dev, n_ignored, reduction):
    V = 67
    logits = randn(3, 7, V, seed=1, scale=3.0)
    targets = torch.randint(0, V, (3, 7), generator=torch.Generator().manual_seed(2))
    targets.view(-1)[:n_ignored] = -100  # 21: every target ignored, the mean must be 0, not NaN
    check(dev, lambda x: Fcl.cross_entropy(x, targets.numpy(), reduction=reduction),
          lambda x: ops.cross_entropy(x, targets, reduction=reduction, backend="math"), logits)


# -------------------------------------------------------------------------------------------- attention

ATTENTION_CASES = [
    dict(causal=True),
    dict(causal=False),
    dict(causal=True, key_lengths=[13, 4]),
    dict(causal=False, key_lengths=[0, 9]),  # a row with every key masked: zeros
    dict(causal=True, segment_ids=[[0] * 5 + [1] * 8, [0] * 13]),
]


@pytest.mark.parametrize("case", ATTENTION_CASES)
def test_attention(dev, case):
    B, nh, T, hs = 2, 3, 13, 10
    q, k, v = (randn(B, nh, T, hs, seed=s) for s in (1, 2, 3))
    lengths = None if "key_lengths" not in case else torch.tensor(case["key_lengths"])
    segments = None if "segment_ids" not in case else torch.tensor(case["segment_ids"])
    check(dev, lambda q, k, v: A.attention(q, k, v, case["causal"], lengths, segments),
          lambda q, k, v: ops.attention(q, k, v, case["causal"], lengths, segments, backend="math"), q, k, v)


@pytest.mark.parametrize("Tq", [1, 3])
def test_cached_attention_over_part_of_a_kv_cache(dev, Tq):
    B, nh, Tk, Tcap, hs = 2, 2, 11, 16, 6
    q, k, v = randn(B, nh, Tq, hs, seed=1), randn(B, nh, Tcap, hs, seed=2), randn(B, nh, Tcap, hs, seed=3)
    expected = ops.attention(q, k[:, :, :Tk], v[:, :, :Tk], causal=True, backend="math")  # (B, nh, Tq, hs)
    out = A.cached_attention(to_cl(dev, q), to_cl(dev, k), to_cl(dev, v), key_count=Tk)  # (B, Tq, C)
    np.testing.assert_allclose(out.numpy(), expected.transpose(1, 2).reshape(B, Tq, nh * hs).numpy(),
                               atol=ATOL, rtol=RTOL)


def rope_cl_tables(dev, positions: int, hs: int) -> A.RopeTables:
    cos, sin = rope_tables(positions, hs, 10000.0)
    return Tensor.from_numpy(dev, cos.numpy()), Tensor.from_numpy(dev, sin.numpy())


def test_rope(dev):
    B, nh, T, hs, offset = 2, 3, 7, 12, 5
    tables = rope_cl_tables(dev, offset + T, hs)
    cos, sin = rope_tables(T, hs, 10000.0, offset)
    check(dev, lambda x: A.rope(x, tables, offset), lambda x: apply_rope(x, cos, sin), randn(B, nh, T, hs))


@pytest.mark.parametrize("use_rope", [True, False])
def test_split_and_merge_heads(dev, use_rope):
    B, T, nh, hs = 2, 9, 3, 8
    C = nh * hs
    tables = rope_cl_tables(dev, T, hs) if use_rope else None
    cos, sin = rope_tables(T, hs, 10000.0)

    def reference(qkv):
        q, k, v = (t.view(B, T, nh, hs).transpose(1, 2) for t in qkv.split(C, dim=2))  # (B, nh, T, hs)
        if use_rope:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return torch.stack([q, k, v]).sum(0) * 0.5 + q * v + k  # touches every output differently

    def opencl(qkv):
        q, k, v = A.split_heads(qkv, nh, tables)
        return (q + k + v) * 0.5 + q * v + k

    check(dev, opencl, reference, randn(B, T, 3 * C))
    check(dev, A.merge_heads, lambda y: y.transpose(1, 2).reshape(B, T, C), randn(B, nh, T, hs))


def test_split_heads_into_cache(dev):
    B, T, nh, hs, Tcap, offset = 2, 3, 2, 4, 10, 5
    qkv = randn(B, T, 3 * nh * hs)
    cache_k, cache_v = Tensor.zeros(dev, (B, nh, Tcap, hs)), Tensor.zeros(dev, (B, nh, Tcap, hs))
    tables = rope_cl_tables(dev, Tcap, hs)
    q = A.split_heads_into_cache(to_cl(dev, qkv), nh, cache_k, cache_v, offset, tables)
    cos, sin = rope_tables(T, hs, 10000.0, offset)
    q_ref, k_ref, v_ref = (t.view(B, T, nh, hs).transpose(1, 2) for t in qkv.split(nh * hs, dim=2))
    np.testing.assert_allclose(q.numpy(), apply_rope(q_ref, cos, sin).numpy(), atol=ATOL, rtol=RTOL)
    np.testing.assert_allclose(cache_k.numpy()[:, :, offset:offset + T], apply_rope(k_ref, cos, sin).numpy(),
                               atol=ATOL, rtol=RTOL)
    np.testing.assert_allclose(cache_v.numpy()[:, :, offset:offset + T], v_ref.numpy(), atol=ATOL, rtol=RTOL)
    assert not cache_k.numpy()[:, :, :offset].any() and not cache_v.numpy()[:, :, offset + T:].any()


def test_scale_of_attention_is_one_over_sqrt_head_size(dev):
    q = k = v = randn(1, 1, 4, 16, seed=7)
    with no_grad():
        out = A.attention(to_cl(dev, q), to_cl(dev, k), to_cl(dev, v), causal=False).numpy()
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(16)
    np.testing.assert_allclose(out, (scores.softmax(-1) @ v).numpy(), atol=ATOL, rtol=RTOL)
