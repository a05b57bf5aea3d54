"""Element-wise kernels: a * x + b * y, products, activations with their bias, bias gradients, time steps.

- One kernel `axpby` (BLAS's name for alpha * x + beta * y) is the residual add, the gradient
  accumulation, the scale and the copy: fewer kernels to read, one to test.
- GELU (Hendrycks & Gimpel 2016, https://arxiv.org/abs/1606.08415), fused with the bias of the linear
  layer before it, so the pre-activation is read once: the tanh form (kind 0, GPT-2's and the GPT's)
  or the erf form (kind 1, PyTorch's default, the ViT's); kind 2 is ReLU squared, max(0, x)^2 (the GPT's
  with GPTConfig(activation="relu2")). The backward recomputes the activation rather than storing it:
  memory is what limits a training batch, arithmetic is cheap. The GELU derivatives are written in the
  same order as PyTorch's GeluBackward, so the two agree to rounding.
- `column_sum` turns a (rows, cols) gradient into a bias gradient with one work-item per column and a
  sequential loop over rows: deterministic, unlike atomics.

- `shift_time` moves every position one step later in time (GPT.smear_previous's "previous input"),
  with a mask that keeps packed examples apart; its backward moves the gradient one step earlier.

Shapes: n elements; rows x cols matrices stored row-major; (B, T, C) for the time steps.
"""
from __future__ import annotations

from minimm.opencl.kernels.common import launch_elements
from minimm.opencl.runtime import Device

SOURCE = r"""
#define GELU_BETA 0.7978845608028654f  /* sqrt(2 / pi) */
#define GELU_KAPPA 0.044715f

/* out = alpha * x + beta * y (y may be NULL; out may be x or y) */
__kernel void axpby(const int n, const float alpha, __global const float* x, const float beta,
                    __global const float* y, __global float* out) {
    const int i = get_global_id(0);
    if (i >= n) return;
    out[i] = y ? alpha * x[i] + beta * y[i] : alpha * x[i];
}

/* out = x * y, or out += x * y with accumulate */
__kernel void mul(const int n, __global const float* x, __global const float* y, __global float* out,
                  const int accumulate) {
    const int i = get_global_id(0);
    if (i >= n) return;
    out[i] = accumulate ? out[i] + x[i] * y[i] : x[i] * y[i];
}

float gelu(const float x, const int exact) {
    if (exact) return x * 0.5f * (1.0f + erf(x * M_SQRT1_2_F));
    return 0.5f * x * (1.0f + tanh(GELU_BETA * (x + GELU_KAPPA * x * x * x)));
}

float gelu_derivative(const float x, const int exact) {
    if (exact) {
        const float cdf = 0.5f * (1.0f + erf(x * M_SQRT1_2_F));
        const float pdf = 0.3989422804014327f * exp(x * x * -0.5f);  /* 1 / sqrt(2 pi) */
        return cdf + x * pdf;
    }
    const float x_sq = x * x;
    const float tanh_inner = tanh(GELU_BETA * (x + GELU_KAPPA * x_sq * x));
    const float left_derivative = 0.5f * (1.0f + tanh_inner);
    const float right_derivative = 0.5f * x * (1.0f - tanh_inner * tanh_inner)
                                   * GELU_BETA * (1.0f + 3.0f * GELU_KAPPA * x_sq);
    return left_derivative + right_derivative;
}

/* kind: 0 GELU (tanh form), 1 GELU (erf form), 2 ReLU squared: max(0, x)^2 */
float activation(const float x, const int kind) {
    if (kind == 2) return x > 0.0f ? x * x : 0.0f;
    return gelu(x, kind);
}

float activation_derivative(const float x, const int kind) {
    if (kind == 2) return x > 0.0f ? 2.0f * x : 0.0f;
    return gelu_derivative(x, kind);
}

/* out = activation(z + bias[col]); z: (rows, cols), bias: (cols,) or NULL */
__kernel void bias_activation_forward(const int n, const int cols, const int kind, __global const float* z,
                                      __global const float* bias, __global float* out) {
    const int i = get_global_id(0);
    if (i >= n) return;
    out[i] = activation(bias ? z[i] + bias[i % cols] : z[i], kind);
}

/* dz = dout * activation'(z + bias[col]) */
__kernel void bias_activation_backward(const int n, const int cols, const int kind, __global const float* z,
                                       __global const float* bias, __global const float* dout,
                                       __global float* dz) {
    const int i = get_global_id(0);
    if (i >= n) return;
    dz[i] = dout[i] * activation_derivative(bias ? z[i] + bias[i % cols] : z[i], kind);
}

/* out[col] (+)= sum over rows of x[row, col] */
__kernel void column_sum(const int rows, const int cols, __global const float* x, __global float* out,
                         const int accumulate) {
    const int col = get_global_id(0);
    if (col >= cols) return;
    float total = 0.0f;
    for (int row = 0; row < rows; row++) total += x[row * cols + col];
    out[col] = accumulate ? out[col] + total : total;
}

/* out[b, t, c] = x[b, t - 1, c] where keep[b, t] (NULL: everywhere but t = 0), else 0; at t = 0 first[b, c]
   when first is given (a KV cache's last input), else 0. The previous position of each row, for smear */
__kernel void shift_time(const int B, const int T, const int C, __global const float* x,
                         __global const float* first, __global const int* keep, __global float* out) {
    const int i = get_global_id(0);
    if (i >= B * T * C) return;
    const int c = i % C, t = (i / C) % T, b = i / (T * C);
    if (t == 0) out[i] = first ? first[b * C + c] : 0.0f;
    else out[i] = (!keep || keep[b * T + t]) ? x[i - C] : 0.0f;
}

/* its backward: dx[b, t, c] (+)= dy[b, t + 1, c] where position t + 1 took its previous, else 0 */
__kernel void shift_time_backward(const int B, const int T, const int C, __global const float* dy,
                                  __global const int* keep, __global float* dx, const int accumulate) {
    const int i = get_global_id(0);
    if (i >= B * T * C) return;
    const int t = (i / C) % T, b = i / (T * C);
    const float g = (t + 1 < T && (!keep || keep[b * T + t + 1])) ? dy[i + C] : 0.0f;
    dx[i] = accumulate ? dx[i] + g : g;
}

/* out[b, c] = x[b, t, c]: one time step of a (B, T, C) tensor */
__kernel void select_time(const int B, const int T, const int C, const int t, __global const float* x,
                          __global float* out) {
    const int i = get_global_id(0);
    if (i >= B * C) return;
    out[i] = x[((i / C) * T + t) * C + i % C];
}
"""


def axpby(device: Device, n: int, alpha: float, x, beta: float, y, out) -> None:
    launch_elements(device, device.kernel(SOURCE, "axpby"), n, n, alpha, x, beta, y, out)


def mul(device: Device, n: int, x, y, out, accumulate: bool = False) -> None:
    launch_elements(device, device.kernel(SOURCE, "mul"), n, n, x, y, out, int(accumulate))


ACTIVATIONS = {"gelu_tanh": 0, "gelu": 1, "relu2": 2}  # the kernels' kind codes


def bias_activation_forward(device: Device, rows: int, cols: int, z, bias, out, kind: str) -> None:
    launch_elements(device, device.kernel(SOURCE, "bias_activation_forward"), rows * cols, rows * cols, cols,
                    ACTIVATIONS[kind], z, bias, out)


def bias_activation_backward(device: Device, rows: int, cols: int, z, bias, dout, dz, kind: str) -> None:
    launch_elements(device, device.kernel(SOURCE, "bias_activation_backward"), rows * cols, rows * cols, cols,
                    ACTIVATIONS[kind], z, bias, dout, dz)


def column_sum(device: Device, rows: int, cols: int, x, out, accumulate: bool = False) -> None:
    launch_elements(device, device.kernel(SOURCE, "column_sum"), cols, rows, cols, x, out, int(accumulate))


def shift_time(device: Device, B: int, T: int, C: int, x, first, keep, out) -> None:
    launch_elements(device, device.kernel(SOURCE, "shift_time"), B * T * C, B, T, C, x, first, keep, out)


def shift_time_backward(device: Device, B: int, T: int, C: int, dy, keep, dx, accumulate: bool) -> None:
    launch_elements(device, device.kernel(SOURCE, "shift_time_backward"), B * T * C, B, T, C, dy, keep, dx,
                    int(accumulate))


def select_time(device: Device, B: int, T: int, C: int, t: int, x, out) -> None:
    launch_elements(device, device.kernel(SOURCE, "select_time"), B * C, B, T, C, t, x, out)
