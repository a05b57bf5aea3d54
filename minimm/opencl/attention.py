"""Attention on device tensors: heads in and out, RoPE, and softmax(q k^T / sqrt(hs)) v.

The straightforward formulation, in three steps per (batch, head), each a kernel over all B * nh heads:
    scores = q @ k^T                       batched SGEMM       (B * nh, Tq, Tk)
    probs  = masked softmax(scale * scores) (causal / key_lengths / segment_ids, see kernels/softmax.py)
    y      = probs @ v                     batched SGEMM       (B * nh, Tq, hs)
It stores the (Tq, Tk) probabilities for the backward, which is fine at minimm's context lengths; a
FlashAttention-style kernel (minimm/kernels/ for CUDA) avoids that memory. Backward:
    dprobs = dy @ v^T,  dscores = softmax backward,  dq = dscores @ k,  dk = dscores^T @ q,
    dv = probs^T @ dy.
Generation (`cached_attention`) instead runs one fused kernel per layer over the KV cache: there the
launches cost more than the arithmetic.

Shape letters: B batch, nh heads, T tokens, Tq queries, Tk keys, Tcap positions a KV cache has room
for, hs head size, C = nh * hs channels.
"""
from __future__ import annotations

import math

import numpy as np

from minimm.opencl.kernels import heads
from minimm.opencl.kernels.decode_attention import decode_attention
from minimm.opencl.kernels.gemm import sgemm
from minimm.opencl.kernels.softmax import softmax_backward, softmax_forward
from minimm.opencl.tensor import Tensor, accumulate_grad, grad_buffer, record, wants_grad

RopeTables = tuple[Tensor, Tensor]  # cos, sin: (positions, hs) each, rows are absolute positions


def split_heads(qkv: Tensor, n_head: int, rope: RopeTables | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """qkv: (B, T, 3C), q|k|v along the last axis -> q, k, v: (B, nh, T, hs), RoPE on q and k if given."""
    device, (B, T, C3) = qkv.device, qkv.shape
    hs = C3 // 3 // n_head
    q, k, v = (Tensor(device, (B, n_head, T, hs)) for _ in range(3))
    cos, sin = (None, None) if rope is None else (rope[0].buf, rope[1].buf)
    heads.split_heads(device, B, T, n_head, hs, qkv.buf, q.buf, k.buf, v.buf, cos_table=cos, sin_table=sin)

    def backward(dq: Tensor, dk: Tensor, dv: Tensor) -> None:
        dqkv = Tensor(device, qkv.shape)
        heads.join_heads_grad(device, B, T, n_head, hs, dq.buf, dk.buf, dv.buf, dqkv.buf, cos, sin)
        accumulate_grad(qkv, dqkv)
    return record((q, k, v), (qkv,), backward)


def split_heads_into_cache(qkv: Tensor, n_head: int, k_cache: Tensor, v_cache: Tensor, offset: int,
                           rope: RopeTables | None = None) -> Tensor:
    """Generation: q: (B, nh, T, hs) returned; k, v written into the caches (B, nh, Tcap, hs) at offset."""
    device, (B, T, C3) = qkv.device, qkv.shape
    hs = C3 // 3 // n_head
    q = Tensor(device, (B, n_head, T, hs))
    cos, sin = (None, None) if rope is None else (rope[0].buf, rope[1].buf)
    heads.split_heads(device, B, T, n_head, hs, qkv.buf, q.buf, k_cache.buf, v_cache.buf,
                      Tcap=k_cache.shape[2], offset=offset, cos_table=cos, sin_table=sin)
    return q


def write_into_cache(x: Tensor, cache: Tensor, offset: int) -> None:
    """Generation: x: (B, nh, T, hs) copied into cache: (B, nh, Tcap, hs) at positions offset .. offset + T - 1.
    Not differentiable."""
    device, (B, nh, T, hs) = x.device, x.shape
    heads.write_positions(device, B, nh, T, hs, cache.shape[2], offset, x.buf, cache.buf)


def merge_heads(y: Tensor) -> Tensor:
    """(B, nh, T, hs) -> (B, T, C)."""
    device, (B, nh, T, hs) = y.device, y.shape
    out = Tensor(device, (B, T, nh * hs))
    heads.transpose_heads(device, B, T, nh, hs, y.buf, out.buf, to_tokens=True)

    def backward(dout: Tensor) -> None:
        dy = Tensor(device, y.shape)
        heads.transpose_heads(device, B, T, nh, hs, dout.buf, dy.buf, to_tokens=False)
        accumulate_grad(y, dy)
    return record(out, (y,), backward)


def rope(x: Tensor, tables: RopeTables, offset: int = 0) -> Tensor:
    """Rotate x: (B, nh, T, hs) by the angles of positions offset .. offset + T - 1 (minimm.rope.apply_rope)."""
    device, (B, nh, T, hs) = x.device, x.shape
    out = Tensor(device, x.shape)
    cos, sin = tables[0].buf, tables[1].buf
    heads.rope(device, B, nh, T, hs, x.buf, cos, sin, out.buf, offset=offset)

    def backward(dy: Tensor) -> None:
        dx = Tensor(device, x.shape)
        heads.rope(device, B, nh, T, hs, dy.buf, cos, sin, dx.buf, offset=offset, inverse=True)
        accumulate_grad(x, dx)
    return record(out, (x,), backward)


def attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = True, key_lengths=None,
              segment_ids=None) -> Tensor:
    """softmax(q k^T / sqrt(hs)) v, the function of minimm.ops.attention. q: (B, nh, Tq, hs);
    k, v: (B, nh, Tk, hs); key_lengths: host ints (B,); segment_ids: host ints (B, Tk).
    Returns (B, nh, Tq, hs)."""
    device, (B, nh, Tq, hs) = q.device, q.shape
    Tk = k.shape[2]
    batch, scale = B * nh, 1.0 / math.sqrt(hs)
    lengths = None if key_lengths is None else _upload_ints(device, key_lengths).buf
    segments = None if segment_ids is None else _upload_ints(device, segment_ids).buf
    probs = Tensor(device, (B, nh, Tq, Tk))
    sgemm(device, Tq, Tk, hs, q.buf, k.buf, probs.buf, trans_b=True, batch=batch,
          strides=(Tq * hs, Tk * hs, Tq * Tk))  # scores: (B * nh, Tq, Tk)
    softmax_forward(device, batch * Tq, Tq, Tk, nh, scale, causal, lengths, segments, probs.buf,
                    probs.buf)  # in place
    y = Tensor(device, (B, nh, Tq, hs))
    sgemm(device, Tq, hs, Tk, probs.buf, v.buf, y.buf, batch=batch, strides=(Tq * Tk, Tk * hs, Tq * hs))

    def backward(dy: Tensor) -> None:
        dscores = Tensor(device, probs.shape)
        sgemm(device, Tq, Tk, hs, dy.buf, v.buf, dscores.buf, trans_b=True, batch=batch,
              strides=(Tq * hs, Tk * hs, Tq * Tk))  # dprobs = dy @ v^T
        softmax_backward(device, batch * Tq, Tk, scale, probs.buf, dscores.buf, dscores.buf)
        for t, a, b, trans_a, M, K in ((q, dscores, k, False, Tq, Tk),   # dq = dscores @ k
                                       (k, dscores, q, True, Tk, Tq),    # dk = dscores^T @ q
                                       (v, probs, dy, True, Tk, Tq)):    # dv = probs^T @ dy
            if wants_grad(t):
                buf, accumulate = grad_buffer(t)
                sgemm(device, M, hs, K, a.buf, b.buf, buf, trans_a=trans_a, beta=float(accumulate),
                      batch=batch, strides=(Tq * Tk, K * hs, M * hs))
    return record(y, (q, k, v), backward)


def cached_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, key_count: int) -> Tensor:
    """Generation: causal attention of q: (B, nh, Tq, hs) over the first key_count positions of the
    caches (B, nh, Tcap, hs), in one kernel (kernels/decode_attention.py). Returns (B, Tq, C), already
    in token layout. Not differentiable."""
    device, (B, nh, Tq, hs) = q.device, q.shape
    scores = Tensor(device, (B * nh * Tq, key_count))
    y = Tensor(device, (B, Tq, nh * hs))
    decode_attention(device, B, nh, Tq, key_count, k_cache.shape[2], hs, 1.0 / math.sqrt(hs), q.buf,
                     k_cache.buf, v_cache.buf, scores.buf, y.buf)
    return y


def _upload_ints(device, values) -> Tensor:
    return Tensor.from_numpy(device, np.asarray(values).astype(np.int32))
