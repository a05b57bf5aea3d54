"""Token (and learned position) embeddings: a gather forward, a deterministic scatter-add backward.

Forward: out[n] = wte[idx[n]] (+ wpe[offset + n % T]), one work-item per output element.

Backward: dwte[v] = sum of dout[n] over the positions n where idx[n] == v. Many positions share a token,
so a parallel scatter must not race. GPUs would use atomic adds, but OpenCL 1.2 has no float atomics
and their order (hence the rounding) changes run to run. Instead the host, which has the token ids
anyway, sorts the positions by token (a stable argsort: O(N log N) on N = B * T ids, microseconds).
Then one work-item per (distinct token, channel) sums its positions in order: every sum has one owner,
and the result is the same every run. The position-table gradient sums over the batch the same way.

Both backward kernels add into their gradient (it starts as zeros or holds an earlier contribution: the
tied output head adds to the same dwte).

Shapes: idx: (N,) int32 with N = B * T; wte: (V, C); wpe: (block_size, C); out, dout: (N, C).
order: (N,) positions sorted by token; starts: (U + 1,) where each distinct token's run begins in order;
tokens: (U,) the distinct tokens.
"""
from __future__ import annotations

from minimm.opencl.kernels.common import launch_elements
from minimm.opencl.runtime import Device

SOURCE = r"""
__kernel void embedding_forward(const int N, const int T, const int C, const int offset,
                                __global const int* idx, __global const float* wte,
                                __global const float* wpe, __global float* out) {
    const int i = get_global_id(0);
    if (i >= N * C) return;
    const int n = i / C, c = i % C;
    float value = wte[idx[n] * C + c];
    if (wpe) value += wpe[(offset + n % T) * C + c];
    out[i] = value;
}

/* dwte[tokens[u], c] += sum of dout[order[p], c] for p in starts[u] .. starts[u + 1] - 1 */
__kernel void embedding_backward(const int U, const int C, __global const int* order,
                                 __global const int* starts, __global const int* tokens,
                                 __global const float* dout, __global float* dwte) {
    const int i = get_global_id(0);
    if (i >= U * C) return;
    const int u = i / C, c = i % C;
    float total = 0.0f;
    for (int p = starts[u]; p < starts[u + 1]; p++) total += dout[order[p] * C + c];
    dwte[tokens[u] * C + c] += total;
}

/* dwpe[t, c] += sum over the batch of dout[b, t, c] */
__kernel void position_backward(const int B, const int T, const int C, __global const float* dout,
                                __global float* dwpe) {
    const int i = get_global_id(0);
    if (i >= T * C) return;
    float total = 0.0f;
    for (int b = 0; b < B; b++) total += dout[b * T * C + i];
    dwpe[i] += total;
}
"""


def embedding_forward(device: Device, N: int, T: int, C: int, idx, wte, out, wpe=None, offset: int = 0) -> None:
    launch_elements(device, device.kernel(SOURCE, "embedding_forward"), N * C, N, T, C, offset, idx, wte,
                    wpe, out)


def embedding_backward(device: Device, U: int, C: int, order, starts, tokens, dout, dwte) -> None:
    """dwte += the scattered dout; dwte must hold zeros or an earlier gradient."""
    launch_elements(device, device.kernel(SOURCE, "embedding_backward"), U * C, U, C, order, starts,
                    tokens, dout, dwte)


def position_backward(device: Device, B: int, T: int, C: int, dout, dwpe) -> None:
    """dwpe[:T] += dout summed over the batch."""
    launch_elements(device, device.kernel(SOURCE, "position_backward"), T * C, B, T, C, dout, dwpe)
