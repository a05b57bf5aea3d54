"""Causal attention of a few new queries over a KV cache, in one kernel: generation's attention.

During generation each step has one query per sequence and head, and the work is tiny: what costs is
the number of kernel launches (each is tens of microseconds of driver and thread wake-up on a CPU
device). The SGEMM + softmax + SGEMM + transpose path of minimm/opencl/attention.py is four launches per
layer; this kernel is one. One work-group per (sequence, head, query):
    scores[j] = scale * q . k[j]       for the visible keys j <= Tk - Tq + i (causal, as minimm.ops)
    p = softmax(scores)                (max subtracted; the scores live in a scratch buffer)
    y = sum_j p[j] v[j]                written straight into the token layout (B, Tq, C)
It is the textbook loop, not a fast kernel for long prompts: the prompt's first step runs it once with
Tq = prompt length, which is fine at minimm's context lengths.

Shapes: q: (B, nh, Tq, hs); k, v: (B, nh, Tcap, hs) with the first Tk positions filled; scores:
(B * nh * Tq, Tk) scratch; y: (B, Tq, C) with C = nh * hs.
"""
from __future__ import annotations

from minimm.opencl.kernels.common import REDUCE, launch_rows, row_local_size
from minimm.opencl.runtime import Device

SOURCE = REDUCE + r"""
__kernel void decode_attention(const int Tq, const int Tk, const int Tcap, const int nh, const int hs,
                               const float scale, __global const float* q, __global const float* k,
                               __global const float* v, __global float* scores, __global float* y) {
    __local float scratch[ROW_LS];
    const int row = get_group_id(0), lid = get_local_id(0);  /* row = (b * nh + h) * Tq + i */
    const int i = row % Tq, bh = row / Tq, b = bh / nh, h = bh % nh;
    __global const float* q_row = q + row * hs;
    __global const float* keys = k + bh * Tcap * hs;
    __global const float* values = v + bh * Tcap * hs;
    __global float* s = scores + row * Tk;
    const int visible = Tk - Tq + i + 1;
    float best = -INFINITY;
    for (int j = lid; j < visible; j += ROW_LS) {
        float dot = 0.0f;
        for (int d = 0; d < hs; d++) dot += q_row[d] * keys[j * hs + d];
        s[j] = scale * dot;
        best = fmax(best, s[j]);
    }
    best = group_max(best, scratch);
    float total = 0.0f;
    for (int j = lid; j < visible; j += ROW_LS) {
        s[j] = exp(s[j] - best);
        total += s[j];
    }
    total = group_sum(total, scratch);
    barrier(CLK_GLOBAL_MEM_FENCE);  /* every work-item's s[j] is written before anyone reads them all */
    for (int d = lid; d < hs; d += ROW_LS) {
        float acc = 0.0f;
        for (int j = 0; j < visible; j++) acc += s[j] * values[j * hs + d];
        y[((b * Tq + i) * nh + h) * hs + d] = acc / total;
    }
}
"""


def decode_attention(device: Device, B: int, nh: int, Tq: int, Tk: int, Tcap: int, hs: int, scale: float,
                     q, k, v, scores, y) -> None:
    kernel = device.kernel(SOURCE, "decode_attention", ROW_LS=row_local_size(device))
    launch_rows(device, kernel, B * nh * Tq, Tq, Tk, Tcap, nh, hs, scale, q, k, v, scores, y)
