"""Differentiable ops on device tensors: each runs its kernels and records its backward on the tape.

Every function here is the OpenCL twin of a PyTorch function and is tested against it (forward and
gradients, tests/test_opencl.py). Each backward lists the gradients it produces; the formulas are in
the kernel files. Leading axes are flattened: a (B, T, C) input to linear() is an (M = B * T, C) matrix.

Conventions: x, y, out are activations; dy is the gradient of an op's output; a grad that is written
with a GEMM uses beta = 1 to add to an existing gradient (grad_buffer), small ones start from zeros.
Token ids and targets arrive as host arrays (they come from the data loader) and are uploaded here.
"""
from __future__ import annotations

import numpy as np

from minimm.opencl.kernels import conv1d as conv
from minimm.opencl.kernels import cross_entropy as ce_kernels
from minimm.opencl.kernels import elementwise, embedding as emb_kernels, norms
from minimm.opencl.kernels.gemm import sgemm
from minimm.opencl.kernels.softmax import softmax_backward, softmax_forward
from minimm.opencl.tensor import Tensor, accumulate_grad, grad_buffer, record, wants_grad, zero_grad_buffer


def add(a: Tensor, b: Tensor) -> Tensor:
    """a + b, same shapes."""
    _check_same_shape(a, b)
    out = Tensor(a.device, a.shape)
    elementwise.axpby(a.device, a.size, 1.0, a.buf, 1.0, b.buf, out.buf)

    def backward(dy: Tensor) -> None:
        if wants_grad(a):
            accumulate_grad(a, dy)
        if wants_grad(b):
            accumulate_grad(b, scale(dy, 1.0) if wants_grad(a) else dy)  # never one tensor for two grads
    return record(out, (a, b), backward)


def mul(a: Tensor, b: Tensor) -> Tensor:
    """a * b element-wise, same shapes."""
    _check_same_shape(a, b)
    out = Tensor(a.device, a.shape)
    elementwise.mul(a.device, a.size, a.buf, b.buf, out.buf)

    def backward(dy: Tensor) -> None:
        for t, other in ((a, b), (b, a)):
            if wants_grad(t):
                buf, accumulate = grad_buffer(t)
                elementwise.mul(t.device, t.size, dy.buf, other.buf, buf, accumulate)
    return record(out, (a, b), backward)


def scale(a: Tensor, factor: float) -> Tensor:
    """a * factor."""
    out = Tensor(a.device, a.shape)
    elementwise.axpby(a.device, a.size, factor, a.buf, 0.0, None, out.buf)

    def backward(dy: Tensor) -> None:
        accumulate_grad(a, scale(dy, factor))
    return record(out, (a,), backward)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, residual: Tensor | None = None) -> Tensor:
    """x @ weight^T + bias (+ residual), nn.Linear's layout. x: (..., K), weight: (N, K) -> (..., N).

    residual, same shape as the output, is added by the GEMM itself (beta = 1): a block's skip
    connection costs no extra pass over memory.
    """
    device, (N, K) = x.device, weight.shape
    if x.shape[-1] != K:
        raise ValueError(f"linear: input {x.shape} does not match weight {weight.shape}")
    M = x.size // K
    out = Tensor(device, x.shape[:-1] + (N,))
    if residual is not None:
        _check_same_shape(residual, out)
    sgemm(device, M, N, K, x.buf, weight.buf, out.buf, trans_b=True, bias=None if bias is None else bias.buf,
          beta=0.0 if residual is None else 1.0, D=None if residual is None else residual.buf)

    def backward(dy: Tensor) -> None:
        if wants_grad(x):  # dx = dy @ W: (M, N) @ (N, K)
            buf, accumulate = grad_buffer(x)
            sgemm(device, M, K, N, dy.buf, weight.buf, buf, beta=float(accumulate))
        if wants_grad(weight):  # dW = dy^T @ x: (N, M) @ (M, K)
            buf, accumulate = grad_buffer(weight)
            sgemm(device, N, K, M, dy.buf, x.buf, buf, trans_a=True, beta=float(accumulate))
        if wants_grad(bias):
            elementwise.column_sum(device, M, N, dy.buf, zero_grad_buffer(bias), accumulate=True)
        if wants_grad(residual):
            accumulate_grad(residual, dy)
    return record(out, (x, weight, bias, residual), backward)


def gelu(z: Tensor, bias: Tensor | None = None, approximate: str = "tanh") -> Tensor:
    """GELU of z + bias: the MLP's activation fused with its bias. z: (..., N), bias: (N,).
    approximate: "tanh" (the GPT's) or "none" (the erf form, F.gelu's default), as in F.gelu."""
    if approximate not in ("tanh", "none"):
        raise ValueError(f"approximate={approximate!r}: expected 'tanh' or 'none'")
    return _bias_activation(z, bias, "gelu" if approximate == "none" else "gelu_tanh")


def relu_squared(z: Tensor, bias: Tensor | None = None) -> Tensor:
    """max(0, z + bias)^2, the GPT's MLP activation with GPTConfig(activation="relu2"). z: (..., N), bias: (N,)."""
    return _bias_activation(z, bias, "relu2")


def _bias_activation(z: Tensor, bias: Tensor | None, kind: str) -> Tensor:
    device, cols = z.device, z.shape[-1]
    rows = z.size // cols
    bias_buf = None if bias is None else bias.buf
    out = Tensor(device, z.shape)
    elementwise.bias_activation_forward(device, rows, cols, z.buf, bias_buf, out.buf, kind)

    def backward(dy: Tensor) -> None:
        dz = Tensor(device, z.shape)
        elementwise.bias_activation_backward(device, rows, cols, z.buf, bias_buf, dy.buf, dz.buf, kind)
        if wants_grad(bias):
            elementwise.column_sum(device, rows, cols, dz.buf, zero_grad_buffer(bias), accumulate=True)
        if wants_grad(z):
            accumulate_grad(z, dz)
    return record(out, (z, bias), backward)


def conv1d(x: Tensor, weight: Tensor, bias: Tensor | None = None, stride: int = 1, padding: int = 0,
           channels_last: bool = False) -> Tensor:
    """nn.Conv1d's function, output in token layout. x: (B, Cin, F), or (B, F, Cin) with channels_last;
    weight: (Cout, Cin, KS) -> (B, Tout, Cout), Tout = (F + 2 * padding - KS) // stride + 1."""
    device, (Cout, Cin, KS) = x.device, weight.shape
    B, F_in = x.shape[0], x.shape[1] if channels_last else x.shape[2]
    Tout = (F_in + 2 * padding - KS) // stride + 1
    M, K = B * Tout, Cin * KS  # the weight (Cout, Cin, KS) is the matrix (Cout, K)
    geometry = (B, Cin, F_in, Tout, KS, stride, padding, channels_last)
    cols = Tensor(device, (M, K))  # every window as a row
    conv.im2col(device, *geometry, x.buf, cols.buf)
    out = Tensor(device, (B, Tout, Cout))
    sgemm(device, M, Cout, K, cols.buf, weight.buf, out.buf, trans_b=True, bias=None if bias is None else bias.buf)

    def backward(dy: Tensor) -> None:
        if wants_grad(x):  # dcols = dy @ W, folded back onto the input
            dcols = Tensor(device, (M, K))
            sgemm(device, M, K, Cout, dy.buf, weight.buf, dcols.buf)
            buf, accumulate = grad_buffer(x)
            conv.col2im(device, *geometry, dcols.buf, buf, accumulate)
        if wants_grad(weight):  # dW = dy^T @ cols
            buf, accumulate = grad_buffer(weight)
            sgemm(device, Cout, K, M, dy.buf, cols.buf, buf, trans_a=True, beta=float(accumulate))
        if wants_grad(bias):
            elementwise.column_sum(device, M, Cout, dy.buf, zero_grad_buffer(bias), accumulate=True)
    return record(out, (x, weight, bias), backward)


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor | None = None, eps: float = 1e-5) -> Tensor:
    """LayerNorm over the last axis. x: (..., C), weight and bias: (C,)."""
    return _norm(x, weight, bias, eps, center=True)


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    """RMSNorm over the last axis. x: (..., C), weight: (C,)."""
    return _norm(x, weight, None, eps, center=False)


def _norm(x: Tensor, weight: Tensor, bias: Tensor | None, eps: float, center: bool) -> Tensor:
    device, C = x.device, x.shape[-1]
    rows = x.size // C
    out, mean, rstd = Tensor(device, x.shape), Tensor(device, (rows,)), Tensor(device, (rows,))
    norms.norm_forward(device, rows, C, eps, center, x.buf, weight.buf, None if bias is None else bias.buf,
                       out.buf, mean.buf, rstd.buf)

    def backward(dy: Tensor) -> None:
        if wants_grad(x):
            buf, accumulate = grad_buffer(x)
            norms.norm_backward_input(device, rows, C, center, x.buf, weight.buf, mean.buf, rstd.buf, dy.buf,
                                      buf, accumulate)
        if wants_grad(weight) or wants_grad(bias):
            dw = zero_grad_buffer(weight) if wants_grad(weight) else Tensor.zeros(device, (C,)).buf
            db = zero_grad_buffer(bias) if wants_grad(bias) else None
            norms.norm_backward_params(device, rows, C, x.buf, mean.buf, rstd.buf, dy.buf, dw, db,
                                       accumulate=True)
    return record(out, (x, weight, bias), backward)


def softmax(x: Tensor) -> Tensor:
    """Softmax over the last axis. x: (..., V)."""
    device, V = x.device, x.shape[-1]
    rows = x.size // V
    out = Tensor(device, x.shape)
    softmax_forward(device, rows, rows, V, 1, 1.0, False, None, None, x.buf, out.buf)

    def backward(dy: Tensor) -> None:
        dx = Tensor(device, x.shape)
        softmax_backward(device, rows, V, 1.0, out.buf, dy.buf, dx.buf)
        accumulate_grad(x, dx)
    return record(out, (x,), backward)


def embedding(idx, wte: Tensor, wpe: Tensor | None = None, offset: int = 0) -> Tensor:
    """wte[idx] (+ wpe[offset + t]). idx: host ints (B, T); wte: (V, C); wpe: (block_size, C) -> (B, T, C)."""
    device, (V, C) = wte.device, wte.shape
    idx = np.asarray(idx)
    if idx.ndim != 2:
        raise ValueError(f"embedding: token ids must be (B, T), got shape {idx.shape}")
    if idx.size and (idx.min() < 0 or idx.max() >= V):
        raise ValueError(f"embedding: token ids must lie in [0, {V}), got {idx.min()} .. {idx.max()}")
    B, T = idx.shape
    ids = Tensor.from_numpy(device, idx.astype(np.int32))
    out = Tensor(device, (B, T, C))
    emb_kernels.embedding_forward(device, B * T, T, C, ids.buf, wte.buf, out.buf,
                                  None if wpe is None else wpe.buf, offset)

    def backward(dy: Tensor) -> None:
        if wants_grad(wte):
            flat = idx.reshape(-1)
            order = np.argsort(flat, kind="stable")  # positions grouped by token, in position order
            tokens, starts = np.unique(flat[order], return_index=True)
            starts = np.append(starts, flat.size)
            on_device = [device.upload(a.astype(np.int32)) for a in (order, starts, tokens)]
            emb_kernels.embedding_backward(device, tokens.size, C, *on_device, dy.buf, zero_grad_buffer(wte))
        if wants_grad(wpe):
            if offset:
                raise NotImplementedError("embedding backward with a position offset (only generation uses one)")
            emb_kernels.position_backward(device, B, T, C, dy.buf, zero_grad_buffer(wpe))
    return record(out, (wte, wpe), backward)


def cross_entropy(logits: Tensor, targets, ignore_index: int = -100, reduction: str = "mean") -> Tensor:
    """Softmax cross-entropy, minimm.ops.cross_entropy's function. logits: (..., V); targets: host ints (...).

    reduction: "mean" over targets != ignore_index (0 if none), "sum", or "none" (a loss per target,
    0 where ignored, shaped like targets).
    """
    if reduction not in ce_kernels.MODES:
        raise ValueError(f"reduction={reduction!r}: expected 'mean', 'sum' or 'none'")
    device, V = logits.device, logits.shape[-1]
    N = logits.size // V
    targets = np.asarray(targets)
    if targets.size != N:
        raise ValueError(f"cross_entropy: {targets.size} targets for {N} rows of logits")
    valid = targets[targets != ignore_index]
    if valid.size and (valid.min() < 0 or valid.max() >= V):
        raise ValueError(f"cross_entropy: targets must lie in [0, {V}) or be {ignore_index}")
    target_ids = Tensor.from_numpy(device, targets.reshape(-1).astype(np.int32))
    row_loss, lse = Tensor(device, targets.shape), Tensor(device, (N,))
    result = Tensor(device, (2,))  # [loss, count of targets in the loss]
    ce_kernels.cross_entropy_forward(device, N, V, ignore_index, reduction, logits.buf, target_ids.buf,
                                     row_loss.buf, lse.buf, result.buf)
    loss = row_loss if reduction == "none" else Tensor(device, (), result.buf)  # a view of result[0]

    def backward(dloss: Tensor) -> None:
        buf, accumulate = grad_buffer(logits)
        ce_kernels.cross_entropy_backward(device, N, V, ignore_index, reduction, logits.buf, target_ids.buf,
                                          lse.buf, result.buf, dloss.buf, buf, accumulate)
    return record(loss, (logits,), backward)


def shift_time(x: Tensor, first: Tensor | None = None, keep=None) -> Tensor:
    """Each position's previous one: out[:, t] = x[:, t - 1], out[:, 0] = first (B, C) or 0; where the
    host mask keep (B, T) is 0 (a packed example's first position) out is 0. (B, T, C) -> (B, T, C).
    Differentiable in x (first, a KV cache's last input, is not)."""
    B, T, C = x.shape
    out = Tensor(x.device, x.shape)
    mask = None if keep is None else Tensor.from_numpy(x.device, np.asarray(keep).astype(np.int32))
    elementwise.shift_time(x.device, B, T, C, x.buf, None if first is None else first.buf,
                           None if mask is None else mask.buf, out.buf)

    def backward(dy: Tensor) -> None:
        buf, accumulate = grad_buffer(x)
        elementwise.shift_time_backward(x.device, B, T, C, dy.buf, None if mask is None else mask.buf, buf,
                                        accumulate)
    return record(out, (x,), backward)


def select_time(x: Tensor, t: int) -> Tensor:
    """x[:, t]: (B, T, C) -> (B, 1, C). Not differentiable (generation reads the last position)."""
    B, T, C = x.shape
    out = Tensor(x.device, (B, 1, C))
    elementwise.select_time(x.device, B, T, C, t % T, x.buf, out.buf)
    return out


def _check_same_shape(a: Tensor, b: Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} and {b.shape}")
