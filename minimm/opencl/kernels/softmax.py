"""Softmax over the last axis, with the masks attention needs, forward and backward.

Rows are grouped as (batch, query): row r is query i = r % Tq of batch bh = r / Tq, with Tk keys, and
batch bh belongs to sequence b = bh / nh (attention's batches are B * nh heads). A key j is kept when
- causal: j <= Tk - Tq + i. The queries are the last Tq of the Tk positions, so one rule serves training
  (Tq == Tk) and a KV cache (Tq new tokens after Tk - Tq cached ones), exactly as minimm.ops does;
- key_lengths: j < key_lengths[b] (padding at the end of shorter sequences);
- segment_ids: segment_ids[b, Tk - Tq + i] == segment_ids[b, j] (packed examples see only themselves).
Masked keys get probability 0; a row with every key masked is all zeros rather than NaN (minimm.ops'
convention). The scale (1/sqrt(hs) in attention) is applied to the scores before the max is taken.

Backward, with p the probabilities: dscores = scale * p * (dp - sum_j(dp * p)); masked entries get 0
because their p is 0.

The max is subtracted before exponentiating so exp never overflows (the standard stable softmax).
Shapes: scores, probs, dprobs, dscores: (rows, Tk) stored with row stride Tk; key_lengths: (B,);
segment_ids: (B, Tk).
"""
from __future__ import annotations

from minimm.opencl.kernels.common import REDUCE, launch_rows, row_local_size
from minimm.opencl.runtime import Device

SOURCE = REDUCE + r"""
bool key_visible(const int i, const int j, const int b, const int Tq, const int Tk, const int causal,
                 __global const int* key_lengths, __global const int* segment_ids) {
    const int q_pos = Tk - Tq + i;
    if (causal && j > q_pos) return false;
    if (key_lengths && j >= key_lengths[b]) return false;
    if (segment_ids && segment_ids[b * Tk + q_pos] != segment_ids[b * Tk + j]) return false;
    return true;
}

/* probs = softmax(scale * scores) over visible keys; probs may be scores (in place) */
__kernel void softmax_forward(const int Tq, const int Tk, const int nh, const float scale,
                              const int causal, __global const int* key_lengths,
                              __global const int* segment_ids, __global const float* scores,
                              __global float* probs) {
    __local float scratch[ROW_LS];
    const int row = get_group_id(0), lid = get_local_id(0);
    const int i = row % Tq, b = (row / Tq) / nh;
    __global const float* s = scores + row * Tk;
    __global float* p = probs + row * Tk;
    float best = -INFINITY;
    for (int j = lid; j < Tk; j += ROW_LS)
        if (key_visible(i, j, b, Tq, Tk, causal, key_lengths, segment_ids)) best = fmax(best, scale * s[j]);
    best = group_max(best, scratch);
    float total = 0.0f;
    for (int j = lid; j < Tk; j += ROW_LS) {
        const float e = key_visible(i, j, b, Tq, Tk, causal, key_lengths, segment_ids)
                        ? exp(scale * s[j] - best) : 0.0f;
        p[j] = e;
        total += e;
    }
    total = group_sum(total, scratch);
    const float inv = total > 0.0f ? 1.0f / total : 0.0f;  /* every key masked: zeros, not NaN */
    for (int j = lid; j < Tk; j += ROW_LS) p[j] *= inv;
}

/* dscores = scale * p * (dp - sum(dp * p)); dscores may be dprobs (in place) */
__kernel void softmax_backward(const int Tk, const float scale, __global const float* probs,
                               __global const float* dprobs, __global float* dscores) {
    __local float scratch[ROW_LS];
    const int row = get_group_id(0), lid = get_local_id(0);
    __global const float* p = probs + row * Tk;
    __global const float* dp = dprobs + row * Tk;
    float dot = 0.0f;
    for (int j = lid; j < Tk; j += ROW_LS) dot += dp[j] * p[j];
    dot = group_sum(dot, scratch);
    for (int j = lid; j < Tk; j += ROW_LS) dscores[row * Tk + j] = scale * p[j] * (dp[j] - dot);
}
"""


def softmax_forward(device: Device, rows: int, Tq: int, Tk: int, nh: int, scale: float, causal: bool,
                    key_lengths, segment_ids, scores, probs) -> None:
    kernel = device.kernel(SOURCE, "softmax_forward", ROW_LS=row_local_size(device))
    launch_rows(device, kernel, rows, Tq, Tk, nh, scale, int(causal), key_lengths, segment_ids, scores, probs)


def softmax_backward(device: Device, rows: int, Tk: int, scale: float, probs, dprobs, dscores) -> None:
    kernel = device.kernel(SOURCE, "softmax_backward", ROW_LS=row_local_size(device))
    launch_rows(device, kernel, rows, Tk, scale, probs, dprobs, dscores)
