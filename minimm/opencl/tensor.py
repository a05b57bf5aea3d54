"""Device tensors and a reverse-mode autograd tape: the smallest thing that can train a GPT.

How it works (the micrograd / tinygrad idea, with kernels instead of Python floats):
- A Tensor is a device buffer plus a shape. It is float32 (or int32 for token ids) and contiguous, so
  an op reads its shape and needs no strides.
- Every differentiable op (minimm/opencl/functional.py, attention.py) computes its output(s), then calls
  `record(outputs, inputs, backward)`. If any input requires a gradient, the op's backward closure goes
  on the tape; it receives one gradient per output (zeros for an output nothing used).
- The tape holds ops in the order they ran, which is a topological order, so `loss.backward()` walks it
  in reverse and each closure turns its output's gradient into its inputs' gradients. Then the tape is
  cleared, and the intermediate buffers return to the memory pool.
- Gradients accumulate (a tensor used twice, like the tied embedding, gets the sum), and a first
  gradient is simply adopted: `accumulate_grad` costs a kernel only when there is something to add to.
  Adopting is safe because the tape runs in reverse order: when an op's backward runs, every consumer
  of its output has already contributed, so nobody reads that gradient again. One op must not hand the
  same gradient tensor to two inputs, though (add() copies for its second input).
- `no_grad()` turns recording off, for evaluation and generation.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import numpy as np

from minimm.opencl.kernels import elementwise
from minimm.opencl.runtime import Device


class Tensor:
    """A contiguous float32 or int32 array in device memory, with an optional gradient."""

    def __init__(self, device: Device, shape: Sequence[int], buf=None, dtype=np.float32,
                 requires_grad: bool = False):
        self.device = device
        self.shape = tuple(int(s) for s in shape)
        self.size = math.prod(self.shape)
        self.dtype = np.dtype(dtype)
        self.buf = buf if buf is not None else device.alloc(self.nbytes)
        self.requires_grad = requires_grad
        self.grad: Tensor | None = None

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def __repr__(self) -> str:
        return f"Tensor(shape={self.shape}, dtype={self.dtype.name}, requires_grad={self.requires_grad})"

    @classmethod
    def zeros(cls, device: Device, shape: Sequence[int]) -> Tensor:
        out = cls(device, shape)
        device.fill(out.buf, 0.0, out.nbytes)
        return out

    @classmethod
    def from_numpy(cls, device: Device, array, requires_grad: bool = False) -> Tensor:
        """Upload an array (or anything np.asarray takes): integers become int32, the rest float32."""
        array = np.asarray(array)
        dtype = np.int32 if np.issubdtype(array.dtype, np.integer) else np.float32
        array = np.array(array, dtype=dtype, order="C")  # keeps 0-d arrays 0-d
        return cls(device, array.shape, device.upload(array), dtype, requires_grad)

    def numpy(self) -> np.ndarray:
        """Copy to the host (waits for every queued kernel)."""
        return self.device.download(self.buf, self.shape, self.dtype)

    def backward(self, grad: Tensor | float = 1.0) -> None:
        """Back-propagate through the tape from this tensor, then clear the tape.

        grad: the gradient of whatever is being minimized with respect to this tensor; a number for a
        scalar loss (1.0), or a Tensor of this shape (as torch's backward(gradient)).
        """
        if isinstance(grad, Tensor):
            if grad.shape != self.shape:
                raise ValueError(f"backward: gradient shape {grad.shape} != tensor shape {self.shape}")
            seed = Tensor(self.device, self.shape)  # a copy: gradients are updated in place later
            elementwise.axpby(self.device, self.size, 1.0, grad.buf, 0.0, None, seed.buf)
        elif self.size != 1:
            raise ValueError(f"backward() without a gradient needs a scalar, got shape {self.shape}")
        else:
            seed = Tensor(self.device, self.shape)
            self.device.fill(seed.buf, grad, seed.nbytes)
        accumulate_grad(self, seed)
        try:
            for outputs, backward in reversed(_tape):
                if any(out.grad is not None for out in outputs):
                    backward(*(out.grad if out.grad is not None else Tensor.zeros(out.device, out.shape)
                               for out in outputs))
        finally:
            _tape.clear()

    def __add__(self, other: Tensor) -> Tensor:
        from minimm.opencl.functional import add
        return add(self, other)

    def __mul__(self, other: Tensor | float) -> Tensor:
        from minimm.opencl.functional import mul, scale
        return mul(self, other) if isinstance(other, Tensor) else scale(self, other)


_tape: list[tuple[tuple[Tensor, ...], Callable[..., None]]] = []
_grad_enabled = True


@contextmanager
def no_grad() -> Iterator[None]:
    """Run ops without recording them (evaluation, generation)."""
    global _grad_enabled
    previous, _grad_enabled = _grad_enabled, False
    try:
        yield
    finally:
        _grad_enabled = previous


def record(outputs: Tensor | tuple[Tensor, ...], inputs: Sequence[Tensor | None],
           backward: Callable[..., None]) -> Tensor | tuple[Tensor, ...]:
    """Put backward(*output grads) on the tape if any input wants a gradient; returns outputs."""
    if _grad_enabled and any(t is not None and t.requires_grad for t in inputs):
        group = outputs if isinstance(outputs, tuple) else (outputs,)
        for out in group:
            out.requires_grad = True
        _tape.append((group, backward))
    return outputs


def clear_tape() -> None:
    """Drop recorded ops without back-propagating (a forward whose loss is not needed)."""
    _tape.clear()


def wants_grad(t: Tensor | None) -> bool:
    return t is not None and t.requires_grad


def accumulate_grad(t: Tensor, grad: Tensor) -> None:
    """t.grad += grad; the first gradient is adopted as it is."""
    if t.grad is None:
        t.grad = grad
    else:
        elementwise.axpby(t.device, t.size, 1.0, grad.buf, 1.0, t.grad.buf, t.grad.buf)


def grad_buffer(t: Tensor) -> tuple[object, bool]:
    """Where a kernel should write t's gradient: (buffer, accumulate). Allocates t.grad if needed, so
    kernels that can add in place (GEMM with beta = 1) skip the temporary."""
    if t.grad is None:
        t.grad = Tensor(t.device, t.shape)
        return t.grad.buf, False
    return t.grad.buf, True


def zero_grad_buffer(t: Tensor) -> object:
    """t's gradient buffer, zero-filled if new: for kernels that only add (scatter-adds)."""
    if t.grad is None:
        t.grad = Tensor.zeros(t.device, t.shape)
    return t.grad.buf
