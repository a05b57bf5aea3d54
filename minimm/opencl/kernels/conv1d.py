"""1-D convolution as a matrix product: unfold the input (im2col), then one SGEMM; fold back for grads.

A Conv1d with Cout filters of Cin x KS weights computes, at each output frame t, the dot product of
every filter with the Cin x KS window starting at input frame t * stride - padding. Copying each window
into a row (`im2col`, Chellapilla et al. 2006, https://inria.hal.science/inria-00112631) turns the
whole convolution into cols (B * Tout, Cin * KS) @ weight^T (Cin * KS, Cout): the tiled SGEMM does the
work, and the output comes out frame-major (B, Tout, Cout), the token layout the transformer wants.
The weight (Cout, Cin, KS) is already that matrix: its element (o, c, j) is row o, column c * KS + j.

The backward of the unfold is a fold (`col2im`): each input element sums the window entries that copied
it. Written as a gather (one work-item per input element, at most KS terms) it needs no atomics and is
deterministic.

The input may be channels-first (B, Cin, F), as mel spectrograms are, or channels-last (B, F, Cin), as
the previous convolution's output is: strides say which.
Shapes: x: (B, Cin, F) or (B, F, Cin); cols: (B, Tout, Cin * KS), Tout = (F + 2 padding - KS) / stride + 1.
"""
from __future__ import annotations

from minimm.opencl.kernels.common import launch_elements
from minimm.opencl.runtime import Device

SOURCE = r"""
/* x[b, c, f] lives at b * F * Cin + c * channel_stride + f * frame_stride */
__kernel void im2col(const int B, const int Cin, const int F, const int Tout, const int KS, const int stride,
                     const int padding, const int channel_stride, const int frame_stride,
                     __global const float* x, __global float* cols) {
    const int i = get_global_id(0);
    if (i >= B * Tout * Cin * KS) return;
    const int j = i % KS, c = (i / KS) % Cin, t = (i / (KS * Cin)) % Tout, b = i / (KS * Cin * Tout);
    const int f = t * stride + j - padding;
    cols[i] = (f >= 0 && f < F) ? x[b * F * Cin + c * channel_stride + f * frame_stride] : 0.0f;
}

/* dx[b, c, f] = sum of dcols[b, t, c * KS + j] over the (t, j) with t * stride + j - padding == f */
__kernel void col2im(const int B, const int Cin, const int F, const int Tout, const int KS, const int stride,
                     const int padding, const int channel_stride, const int frame_stride,
                     __global const float* dcols, __global float* dx, const int accumulate) {
    const int i = get_global_id(0);
    if (i >= B * Cin * F) return;
    const int f = i % F, c = (i / F) % Cin, b = i / (F * Cin);
    float total = 0.0f;
    for (int j = 0; j < KS; j++) {
        const int shifted = f + padding - j;
        if (shifted < 0 || shifted % stride) continue;
        const int t = shifted / stride;
        if (t < Tout) total += dcols[((b * Tout + t) * Cin + c) * KS + j];
    }
    const int at = b * F * Cin + c * channel_stride + f * frame_stride;
    dx[at] = accumulate ? dx[at] + total : total;
}
"""


def _strides(Cin: int, F: int, channels_last: bool) -> tuple[int, int]:
    return (1, Cin) if channels_last else (F, 1)


def im2col(device: Device, B: int, Cin: int, F: int, Tout: int, KS: int, stride: int, padding: int,
           channels_last: bool, x, cols) -> None:
    launch_elements(device, device.kernel(SOURCE, "im2col"), B * Tout * Cin * KS, B, Cin, F, Tout, KS, stride,
                    padding, *_strides(Cin, F, channels_last), x, cols)


def col2im(device: Device, B: int, Cin: int, F: int, Tout: int, KS: int, stride: int, padding: int,
           channels_last: bool, dcols, dx, accumulate: bool = False) -> None:
    launch_elements(device, device.kernel(SOURCE, "col2im"), B * Cin * F, B, Cin, F, Tout, KS, stride,
                    padding, *_strides(Cin, F, channels_last), dcols, dx, int(accumulate))
