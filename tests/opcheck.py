"""One helper that checks any fast op against its reference: forward values and every input gradient.

The tinygrad idea: instead of a hand-written test per kernel and per gradient, run the op and its
reference on copies of the same inputs, push the same random upstream gradient through both, and
compare everything that comes out. Used by the Triton tests; any other backend can use it too.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def check_op(fn: Callable[..., torch.Tensor], ref: Callable[..., torch.Tensor], inputs: Sequence,
             atol: float, rtol: float, grad_atol: float | None = None, grad_rtol: float | None = None,
             ref_dtype: torch.dtype | None = torch.float32, seed: int = 0) -> torch.Tensor:
    """Assert fn(*inputs) matches ref(*inputs) in value and in the gradient of each input that requires it.

    inputs: tensors (those with requires_grad are differentiated) and any other arguments, passed as is.
    ref_dtype: floating inputs are cast to it for the reference (default fp32: the reference is the
    exact answer for the low-precision inputs the op sees), or None to give the reference the same dtype.
    grad_atol, grad_rtol: tolerances for the gradients, default the forward ones.
    Returns the op's output so that a test can assert more about it.
    """
    def copies(cast: bool) -> list:
        out = []
        for x in inputs:
            if isinstance(x, torch.Tensor) and x.is_floating_point():
                y = x.detach().to(ref_dtype) if cast and ref_dtype is not None else x.detach().clone()
                out.append(y.requires_grad_(x.requires_grad))
            else:
                out.append(x)
        return out

    ins, ref_ins = copies(cast=False), copies(cast=True)
    out, expected = fn(*ins), ref(*ref_ins)
    assert out.shape == expected.shape, f"shape {tuple(out.shape)} != reference {tuple(expected.shape)}"
    assert torch.isfinite(out).all(), "output has NaN or inf"
    torch.testing.assert_close(out.float(), expected.float(), atol=atol, rtol=rtol,
                               msg=lambda m: f"forward: {m}")
    wrt = [i for i, x in enumerate(ins) if isinstance(x, torch.Tensor) and x.requires_grad]
    if not wrt:
        return out
    generator = torch.Generator().manual_seed(seed)
    upstream = torch.randn(expected.shape, generator=generator, dtype=torch.float32).to(expected.device)
    grads = torch.autograd.grad(out, [ins[i] for i in wrt], upstream.to(out.dtype))
    ref_grads = torch.autograd.grad(expected, [ref_ins[i] for i in wrt], upstream.to(expected.dtype))
    for i, g, r in zip(wrt, grads, ref_grads):
        assert g is not None and torch.isfinite(g).all(), f"gradient of input {i} is missing or not finite"
        torch.testing.assert_close(g.float(), r.float(), atol=grad_atol if grad_atol is not None else atol,
                                   rtol=grad_rtol if grad_rtol is not None else rtol,
                                   msg=lambda m, i=i: f"gradient of input {i}: {m}")
    return out
