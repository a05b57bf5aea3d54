"""An optional OpenCL backend: the GPT's forward, backward, AdamW and generation on any OpenCL device.

Layers, read bottom-up: runtime (devices, program cache) -> kernels/ (OpenCL C) -> tensor (device
buffers and the autograd tape) -> functional, attention (differentiable ops) -> model (the GPT).
"""
