"""LayerNorm and RMSNorm, forward and backward, one work-group per row.

LayerNorm (Ba et al. 2016, https://arxiv.org/abs/1607.06450): y = (x - mean) * rstd * w + b with
rstd = 1 / sqrt(var + eps), var the biased variance (PyTorch's). RMSNorm (Zhang & Sennrich 2019,
https://arxiv.org/abs/1910.07467) drops the centring and the bias: y = x * rstd * w, rstd from mean(x^2).

- The forward saves mean and rstd per row (2 floats) so the backward need not reduce them again.
- The mean and the variance are two passes over the row, not sum and sum of squares in one: the one-pass
  formula loses every digit when |mean| >> std, which a residual stream can reach.
- Input gradient, with xhat the normalized input and g = dy * w:
      dx = rstd * (g - mean(g) - xhat * mean(g * xhat))      (RMSNorm: no mean(g) term)
  Weight and bias gradients are column sums over rows (one work-item per column, sequential over rows:
  deterministic), in a second kernel.
- The same kernels do both norms: CENTER is 1 for LayerNorm, 0 for RMSNorm, passed at run time.

Shapes: x, y, dy, dx: (rows, C); w, b: (C,) (b may be absent); mean, rstd: (rows,).
"""
from __future__ import annotations

from minimm.opencl.kernels.common import REDUCE, launch_elements, launch_rows, row_local_size
from minimm.opencl.runtime import Device

SOURCE = REDUCE + r"""
__kernel void norm_forward(const int C, const float eps, const int center, __global const float* x,
                           __global const float* w, __global const float* b, __global float* y,
                           __global float* mean_out, __global float* rstd_out) {
    __local float scratch[ROW_LS];
    const int row = get_group_id(0), lid = get_local_id(0);
    __global const float* xr = x + row * C;
    float mean = 0.0f;
    if (center) {
        float s = 0.0f;
        for (int c = lid; c < C; c += ROW_LS) s += xr[c];
        mean = group_sum(s, scratch) / C;
    }
    float ss = 0.0f;
    for (int c = lid; c < C; c += ROW_LS) { const float d = xr[c] - mean; ss += d * d; }
    const float rstd = rsqrt(group_sum(ss, scratch) / C + eps);
    for (int c = lid; c < C; c += ROW_LS) {
        const float out = (xr[c] - mean) * rstd * w[c];
        y[row * C + c] = b ? out + b[c] : out;
    }
    if (lid == 0) { mean_out[row] = mean; rstd_out[row] = rstd; }
}

__kernel void norm_backward_input(const int C, const int center, __global const float* x,
                                  __global const float* w, __global const float* mean_in,
                                  __global const float* rstd_in, __global const float* dy,
                                  __global float* dx, const int accumulate) {
    __local float scratch[ROW_LS];
    const int row = get_group_id(0), lid = get_local_id(0);
    const float mean = mean_in[row], rstd = rstd_in[row];
    __global const float* xr = x + row * C;
    __global const float* dyr = dy + row * C;
    float g_sum = 0.0f, gx_sum = 0.0f;
    for (int c = lid; c < C; c += ROW_LS) {
        const float g = dyr[c] * w[c];
        g_sum += g;
        gx_sum += g * (xr[c] - mean) * rstd;
    }
    const float g_mean = center ? group_sum(g_sum, scratch) / C : 0.0f;
    const float gx_mean = group_sum(gx_sum, scratch) / C;
    for (int c = lid; c < C; c += ROW_LS) {
        const float xhat = (xr[c] - mean) * rstd;
        const float d = rstd * (dyr[c] * w[c] - g_mean - xhat * gx_mean);
        dx[row * C + c] = accumulate ? dx[row * C + c] + d : d;
    }
}

/* dw[c] (+)= sum_rows dy * xhat, db[c] (+)= sum_rows dy (db may be NULL) */
__kernel void norm_backward_params(const int rows, const int C, __global const float* x,
                                   __global const float* mean_in, __global const float* rstd_in,
                                   __global const float* dy, __global float* dw, __global float* db,
                                   const int accumulate) {
    const int c = get_global_id(0);
    if (c >= C) return;
    float w_sum = 0.0f, b_sum = 0.0f;
    for (int row = 0; row < rows; row++) {
        const float g = dy[row * C + c];
        w_sum += g * (x[row * C + c] - mean_in[row]) * rstd_in[row];
        b_sum += g;
    }
    dw[c] = accumulate ? dw[c] + w_sum : w_sum;
    if (db) db[c] = accumulate ? db[c] + b_sum : b_sum;
}
"""


def norm_forward(device: Device, rows: int, C: int, eps: float, center: bool, x, w, b, y, mean, rstd) -> None:
    kernel = device.kernel(SOURCE, "norm_forward", ROW_LS=row_local_size(device))
    launch_rows(device, kernel, rows, C, eps, int(center), x, w, b, y, mean, rstd)


def norm_backward_input(device: Device, rows: int, C: int, center: bool, x, w, mean, rstd, dy, dx,
                        accumulate: bool = False) -> None:
    kernel = device.kernel(SOURCE, "norm_backward_input", ROW_LS=row_local_size(device))
    launch_rows(device, kernel, rows, C, int(center), x, w, mean, rstd, dy, dx, int(accumulate))


def norm_backward_params(device: Device, rows: int, C: int, x, mean, rstd, dy, dw, db,
                         accumulate: bool = False) -> None:
    kernel = device.kernel(SOURCE, "norm_backward_params", ROW_LS=row_local_size(device))
    launch_elements(device, kernel, C, rows, C, x, mean, rstd, dy, dw, db, int(accumulate))
