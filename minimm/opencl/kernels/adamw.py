"""AdamW (Loshchilov & Hutter 2019, https://arxiv.org/abs/1711.05101) and the gradient norm for clipping.

The update, in the order and with the bias corrections of torch.optim.AdamW (single-tensor path), so
that 50 steps stay within float32 rounding of PyTorch:
    p  = p * (1 - lr * weight_decay)                      decoupled decay, before the moments
    m  = m + (1 - beta1) * (g - m)                        (torch: m.lerp_(g, 1 - beta1))
    v  = v * beta2 + (1 - beta2) * g * g
    p  = p - (lr / (1 - beta1^t)) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
The per-step scalars (1 - lr * weight_decay, the bias corrections, the step size) are computed on the
host in double precision, as PyTorch does, and passed in. g is the gradient times grad_scale (the
clipping coefficient).

`sum_squares` writes one partial sum of g^2 per work-group; the host adds the few partials. Clipping
needs the norm on the host anyway (to decide the coefficient), and a training step reads its loss.
"""
from __future__ import annotations

from minimm.opencl.kernels.common import REDUCE, launch_elements, row_local_size
from minimm.opencl.runtime import Device

PARTIALS = 64  # work-groups for sum_squares; each writes one partial sum

SOURCE = REDUCE + r"""
__kernel void adamw(const int n, __global float* p, __global const float* grad, __global float* m,
                    __global float* v, const float decay_factor, const float one_minus_beta1,
                    const float beta2, const float one_minus_beta2, const float eps, const float step_size,
                    const float bias_correction2_sqrt, const float grad_scale) {
    const int i = get_global_id(0);
    if (i >= n) return;
    const float g = grad[i] * grad_scale;
    const float param = p[i] * decay_factor;
    const float m_new = m[i] + one_minus_beta1 * (g - m[i]);
    const float v_new = v[i] * beta2 + one_minus_beta2 * g * g;
    m[i] = m_new;
    v[i] = v_new;
    p[i] = param - step_size * (m_new / (sqrt(v_new) / bias_correction2_sqrt + eps));
}

__kernel void sum_squares(const int n, __global const float* x, __global float* partial) {
    __local float scratch[ROW_LS];
    const int group = get_group_id(0), lid = get_local_id(0);
    float total = 0.0f;
    for (int i = group * ROW_LS + lid; i < n; i += get_num_groups(0) * ROW_LS) total += x[i] * x[i];
    total = group_sum(total, scratch);
    if (lid == 0) partial[group] = total;
}
"""


def adamw(device: Device, n: int, p, grad, m, v, *, lr: float, beta1: float, beta2: float, eps: float,
          weight_decay: float, step: int, grad_scale: float = 1.0) -> None:
    """One AdamW update of n parameters in place; step counts from 1."""
    step_size = lr / (1.0 - beta1 ** step)
    bias_correction2_sqrt = (1.0 - beta2 ** step) ** 0.5
    kernel = device.kernel(SOURCE, "adamw", ROW_LS=row_local_size(device))
    launch_elements(device, kernel, n, n, p, grad, m, v, 1.0 - lr * weight_decay, 1.0 - beta1, beta2,
                    1.0 - beta2, eps, step_size, bias_correction2_sqrt, grad_scale)


def sum_squares(device: Device, n: int, x, partial) -> None:
    """partial: (PARTIALS,) buffer; the sum of x^2 is the sum of its entries."""
    local = row_local_size(device)
    device.launch(device.kernel(SOURCE, "sum_squares", ROW_LS=local), (PARTIALS * local,), (local,),
                  n, x, partial)
