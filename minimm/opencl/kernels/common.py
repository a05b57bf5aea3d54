"""What every row-wise and element-wise kernel shares: group reductions and launch shapes.

- Row kernels (LayerNorm, softmax, cross-entropy) give each row one work-group of ROW_LS work-items that
  stride over the row and then combine their partial results in local memory with a tree reduction
  (log2(ROW_LS) steps). On a GPU ROW_LS = 128 keeps the reads coalesced; on a CPU device a work-group is a
  loop on one core, so ROW_LS = 1: the reduction disappears and each row is a plain sequential loop.
- Element-wise kernels use one work-item per element, in groups of 64, with a bounds check so any size
  works (OpenCL 1.2 wants the global size to be a multiple of the group size).
"""
from __future__ import annotations

from minimm.opencl.runtime import Device

REDUCE = r"""
/* Sum (or max) of v over the ROW_LS work-items of a group; every work-item gets the result. */
float group_sum(float v, __local float* scratch) {
    const int lid = get_local_id(0);
    scratch[lid] = v;
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int s = ROW_LS / 2; s > 0; s >>= 1) {
        if (lid < s) scratch[lid] += scratch[lid + s];
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    const float total = scratch[0];
    barrier(CLK_LOCAL_MEM_FENCE);
    return total;
}

float group_max(float v, __local float* scratch) {
    const int lid = get_local_id(0);
    scratch[lid] = v;
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int s = ROW_LS / 2; s > 0; s >>= 1) {
        if (lid < s) scratch[lid] = fmax(scratch[lid], scratch[lid + s]);
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    const float best = scratch[0];
    barrier(CLK_LOCAL_MEM_FENCE);
    return best;
}
"""

ELEMENTWISE_GROUP = 64


def row_local_size(device: Device) -> int:
    """Work-items per row for row kernels: 1 on CPUs, 128 on GPUs (see the module docstring)."""
    return 1 if device.is_cpu else min(128, device.max_work_group_size)


def launch_rows(device: Device, kernel, n_rows: int, *args) -> None:
    """One work-group per row."""
    local = row_local_size(device)
    device.launch(kernel, (n_rows * local,), (local,), *args)


def launch_elements(device: Device, kernel, n: int, *args) -> None:
    """One work-item per element; the kernel checks i < n."""
    device.launch(kernel, (max(n, 1),), (ELEMENTWISE_GROUP,), *args)
