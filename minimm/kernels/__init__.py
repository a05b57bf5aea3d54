"""Triton kernels for the two hot operations of minimm.ops (CUDA, or the CPU interpreter for tests).

attention.py              FlashAttention-2 style forward and backward: triton_attention(q, k, v, ...)
cross_entropy.py          fused softmax cross-entropy, loss and gradient in one program per row
linear_cross_entropy.py   output layer + cross-entropy chunk by chunk, never holding the (N, V) logits

Each file reads: the idea, the kernels, the autograd wrapper. minimm/ops.py holds the plain PyTorch
reference every kernel is tested against (tests/test_kernels.py); bench/kernels.py times them.
Importing this package does not import triton; importing one of its modules does.
"""
