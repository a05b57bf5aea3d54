"""Softmax cross-entropy with ignore_index, forward and backward, as three small kernels.

- `cross_entropy_rows`: one work-group per row computes lse = log(sum(exp(logits))) (max subtracted
  first: the stable form) and loss = lse - logits[target], or 0 where target == ignore_index. lse is
  kept for the backward, so the backward reads the logits once.
- `cross_entropy_reduce`: one work-group sums the row losses and counts the rows in the loss, in a fixed
  order (deterministic), and writes [sum or mean, count]; the mean is 0 when no row counts (never NaN),
  as in minimm.ops.cross_entropy.
- `cross_entropy_backward`: dlogits = (softmax(logits) - onehot(target)) * w, 0 for ignored rows, with
  the row's weight w = dloss[row] (reduction "none"), dloss[0] ("sum") or dloss[0] / count ("mean").
  dloss is read from device memory (the gradient of the loss), so a whole training step is queued
  without waiting for the host.

Shapes: logits, dlogits: (N, V); targets: (N,) int32; row_loss, lse: (N,); result: (2,).
"""
from __future__ import annotations

from minimm.opencl.kernels.common import REDUCE, launch_elements, launch_rows, row_local_size
from minimm.opencl.runtime import Device

SOURCE = REDUCE + r"""
__kernel void cross_entropy_rows(const int V, const int ignore_index, __global const float* logits,
                                 __global const int* targets, __global float* row_loss,
                                 __global float* lse_out) {
    __local float scratch[ROW_LS];
    const int row = get_group_id(0), lid = get_local_id(0);
    __global const float* x = logits + row * V;
    float best = -INFINITY;
    for (int v = lid; v < V; v += ROW_LS) best = fmax(best, x[v]);
    best = group_max(best, scratch);
    float total = 0.0f;
    for (int v = lid; v < V; v += ROW_LS) total += exp(x[v] - best);
    const float lse = best + log(group_sum(total, scratch));
    if (lid == 0) {
        const int target = targets[row];
        row_loss[row] = target == ignore_index ? 0.0f : lse - x[target];
        lse_out[row] = lse;
    }
}

__kernel void cross_entropy_reduce(const int N, const int ignore_index, const int mean,
                                   __global const float* row_loss, __global const int* targets,
                                   __global float* result) {
    __local float scratch[ROW_LS];
    const int lid = get_local_id(0);
    float total = 0.0f, count = 0.0f;
    for (int n = lid; n < N; n += ROW_LS) {
        total += row_loss[n];
        count += targets[n] != ignore_index ? 1.0f : 0.0f;
    }
    total = group_sum(total, scratch);
    count = group_sum(count, scratch);
    if (lid == 0) {
        result[0] = mean ? total / fmax(count, 1.0f) : total;
        result[1] = count;
    }
}

/* mode 0: per-row dloss[row] ("none"); 1: dloss[0] ("sum"); 2: dloss[0] / count ("mean") */
__kernel void cross_entropy_backward(const int N, const int V, const int ignore_index, const int mode,
                                     __global const float* logits, __global const int* targets,
                                     __global const float* lse, __global const float* result,
                                     __global const float* dloss, __global float* dlogits,
                                     const int accumulate) {
    const int i = get_global_id(0);
    if (i >= N * V) return;
    const int row = i / V, v = i % V;
    const int target = targets[row];
    float g = 0.0f;
    if (target != ignore_index) {
        const float weight = mode == 0 ? dloss[row] : mode == 1 ? dloss[0] : dloss[0] / fmax(result[1], 1.0f);
        g = (exp(logits[i] - lse[row]) - (v == target ? 1.0f : 0.0f)) * weight;
    }
    dlogits[i] = accumulate ? dlogits[i] + g : g;
}
"""


MODES = {"none": 0, "sum": 1, "mean": 2}


def cross_entropy_forward(device: Device, N: int, V: int, ignore_index: int, reduction: str, logits, targets,
                          row_loss, lse, result) -> None:
    """row_loss: one loss per row (0 where ignored); with reduction "mean" or "sum", result[0] is the
    mean over (or the sum of) the rows in the loss and result[1] their count."""
    local = row_local_size(device)
    rows = device.kernel(SOURCE, "cross_entropy_rows", ROW_LS=local)
    launch_rows(device, rows, N, V, ignore_index, logits, targets, row_loss, lse)
    if reduction != "none":
        reduce = device.kernel(SOURCE, "cross_entropy_reduce", ROW_LS=local)
        launch_rows(device, reduce, 1, N, ignore_index, int(reduction == "mean"), row_loss, targets, result)


def cross_entropy_backward(device: Device, N: int, V: int, ignore_index: int, reduction: str, logits, targets,
                           lse, result, dloss, dlogits, accumulate: bool = False) -> None:
    kernel = device.kernel(SOURCE, "cross_entropy_backward", ROW_LS=row_local_size(device))
    launch_elements(device, kernel, N * V, N, V, ignore_index, MODES[reduction], logits, targets, lse, result,
                    dloss, dlogits, int(accumulate))
