"""Moving channels between the token layout (B, T, C) and the head layout (B, nh, T, hs), with RoPE.

- `split_heads` cuts the fused q|k|v projection (B, T, 3C) into q: (B, nh, T, hs) and k, v written at
  time positions offset .. offset + T - 1 of buffers with room for Tcap positions: in training
  Tcap == T and offset == 0; in generation they are the KV cache, so appending to the cache costs nothing.
- RoPE (Su et al. 2021, https://arxiv.org/abs/2104.09864) is applied to q and k on the way, with the
  cos/sin tables of minimm.rope.rope_tables uploaded once for every position (rows = absolute positions),
  so the angles are bit-for-bit PyTorch's. Channel d < hs/2 pairs with d + hs/2:
      x'[d] = x[d] cos - x[d + hs/2] sin,   x'[d + hs/2] = x[d + hs/2] cos + x[d] sin
  That is a rotation, so its backward is the rotation by the opposite angle: the same code with -sin.
- `join_heads_grad` is split_heads' backward: dq, dk, dv back into dqkv, rotated back.
- `transpose_heads` is the plain (B, nh, T, hs) <-> (B, T, C) move for attention's output.
- `write_positions` copies k or v: (B, nh, T, hs) into a cache (B, nh, Tcap, hs) at offset (generation with
  GPTConfig.qk_norm, where k is normalised between the split and the cache).
"""
from __future__ import annotations

from minimm.opencl.kernels.common import launch_elements
from minimm.opencl.runtime import Device

SOURCE = r"""
/* element d of the rotated head vector x[0..hs); sign = -1 rotates back */
float rope_at(__global const float* x, const int d, const int hs, __global const float* cos_row,
              __global const float* sin_row, const float sign) {
    const int pair = hs / 2;  /* "half" is a type in OpenCL C */
    const float partner = d < pair ? -x[d + pair] : x[d - pair];
    return x[d] * cos_row[d] + partner * (sign * sin_row[d]);
}

/* one work-item per element of qkv's q part: i indexes (b, t, h, d) */
__kernel void split_heads(const int B, const int T, const int nh, const int hs, const int Tcap,
                          const int offset, const int rope, __global const float* qkv,
                          __global const float* cos_table, __global const float* sin_table,
                          __global float* q, __global float* k, __global float* v) {
    const int C = nh * hs;
    const int i = get_global_id(0);
    if (i >= B * T * C) return;
    const int d = i % hs, h = (i / hs) % nh, t = (i / C) % T, b = i / (T * C);
    __global const float* q_in = qkv + (b * T + t) * 3 * C + h * hs;  /* this head's q vector */
    __global const float* k_in = q_in + C;
    __global const float* v_in = q_in + 2 * C;
    const int q_at = ((b * nh + h) * T + t) * hs + d;
    const int kv_at = ((b * nh + h) * Tcap + offset + t) * hs + d;
    if (rope) {
        __global const float* c = cos_table + (offset + t) * hs;
        __global const float* s = sin_table + (offset + t) * hs;
        q[q_at] = rope_at(q_in, d, hs, c, s, 1.0f);
        k[kv_at] = rope_at(k_in, d, hs, c, s, 1.0f);
    } else {
        q[q_at] = q_in[d];
        k[kv_at] = k_in[d];
    }
    v[kv_at] = v_in[d];
}

/* dqkv from dq, dk, dv: (B, nh, T, hs) each, rotated back; i indexes (b, t, h, d) */
__kernel void join_heads_grad(const int B, const int T, const int nh, const int hs, const int rope,
                              __global const float* dq, __global const float* dk, __global const float* dv,
                              __global const float* cos_table, __global const float* sin_table,
                              __global float* dqkv) {
    const int C = nh * hs;
    const int i = get_global_id(0);
    if (i >= B * T * C) return;
    const int d = i % hs, h = (i / hs) % nh, t = (i / C) % T, b = i / (T * C);
    const int head_row = ((b * nh + h) * T + t) * hs;
    __global float* out = dqkv + (b * T + t) * 3 * C + h * hs + d;
    if (rope) {
        __global const float* c = cos_table + t * hs;
        __global const float* s = sin_table + t * hs;
        out[0] = rope_at(dq + head_row, d, hs, c, s, -1.0f);
        out[C] = rope_at(dk + head_row, d, hs, c, s, -1.0f);
    } else {
        out[0] = dq[head_row + d];
        out[C] = dk[head_row + d];
    }
    out[2 * C] = dv[head_row + d];
}

/* x: (B, nh, T, hs) rotated by the angles of positions offset .. offset + T - 1 (sign -1: back) */
__kernel void rope(const int B, const int nh, const int T, const int hs, const int offset, const float sign,
                   __global const float* x, __global const float* cos_table,
                   __global const float* sin_table, __global float* out) {
    const int i = get_global_id(0);
    if (i >= B * nh * T * hs) return;
    const int d = i % hs, t = (i / hs) % T;
    out[i] = rope_at(x + (i - d), d, hs, cos_table + (offset + t) * hs, sin_table + (offset + t) * hs, sign);
}

/* to_tokens: (B, nh, T, hs) -> (B, T, C); otherwise (B, T, C) -> (B, nh, T, hs). i indexes (b, t, h, d) */
__kernel void transpose_heads(const int B, const int T, const int nh, const int hs, const int to_tokens,
                              __global const float* x, __global float* out) {
    const int C = nh * hs;
    const int i = get_global_id(0);
    if (i >= B * T * C) return;
    const int d = i % hs, h = (i / hs) % nh, t = (i / C) % T, b = i / (T * C);
    const int head_at = ((b * nh + h) * T + t) * hs + d;
    if (to_tokens) out[i] = x[head_at];
    else out[head_at] = x[i];
}

/* x: (B, nh, T, hs) -> positions offset .. offset + T - 1 of cache: (B, nh, Tcap, hs); i indexes x */
__kernel void write_positions(const int B, const int nh, const int T, const int hs, const int Tcap,
                              const int offset, __global const float* x, __global float* cache) {
    const int i = get_global_id(0);
    if (i >= B * nh * T * hs) return;
    const int d = i % hs, t = (i / hs) % T, bh = i / (T * hs);
    cache[(bh * Tcap + offset + t) * hs + d] = x[i];
}
"""


def split_heads(device: Device, B: int, T: int, nh: int, hs: int, qkv, q, k, v, *, Tcap: int | None = None,
                offset: int = 0, cos_table=None, sin_table=None) -> None:
    """qkv: (B, T, 3C) -> q: (B, nh, T, hs); k, v: (B, nh, Tcap, hs) at offset. RoPE when tables given."""
    rope = cos_table is not None
    launch_elements(device, device.kernel(SOURCE, "split_heads"), B * T * nh * hs, B, T, nh, hs,
                    Tcap or T, offset, int(rope), qkv, cos_table, sin_table, q, k, v)


def join_heads_grad(device: Device, B: int, T: int, nh: int, hs: int, dq, dk, dv, dqkv,
                    cos_table=None, sin_table=None) -> None:
    """dq, dk, dv: (B, nh, T, hs) -> dqkv: (B, T, 3C), RoPE undone when tables given (offset 0)."""
    rope = cos_table is not None
    launch_elements(device, device.kernel(SOURCE, "join_heads_grad"), B * T * nh * hs, B, T, nh, hs,
                    int(rope), dq, dk, dv, cos_table, sin_table, dqkv)


def rope(device: Device, B: int, nh: int, T: int, hs: int, x, cos_table, sin_table, out, *,
         offset: int = 0, inverse: bool = False) -> None:
    launch_elements(device, device.kernel(SOURCE, "rope"), B * nh * T * hs, B, nh, T, hs, offset,
                    -1.0 if inverse else 1.0, x, cos_table, sin_table, out)


def transpose_heads(device: Device, B: int, T: int, nh: int, hs: int, x, out, to_tokens: bool) -> None:
    launch_elements(device, device.kernel(SOURCE, "transpose_heads"), B * T * nh * hs, B, T, nh, hs,
                    int(to_tokens), x, out)


def write_positions(device: Device, B: int, nh: int, T: int, hs: int, Tcap: int, offset: int, x, cache) -> None:
    launch_elements(device, device.kernel(SOURCE, "write_positions"), B * nh * T * hs, B, nh, T, hs, Tcap, offset,
                    x, cache)
