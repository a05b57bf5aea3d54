"""OpenCL C kernels, one concept per file, each with its source string and the Python launchers.

Read in this order: common (shared reductions and launch shapes), gemm (tiled SGEMM), elementwise,
norms, softmax, heads (RoPE and the head layout), decode_attention, embedding, cross_entropy, conv1d,
adamw. Launchers take raw
device buffers and sizes; minimm/opencl/functional.py and attention.py wrap them as differentiable ops.
"""
