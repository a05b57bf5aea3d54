"""An optional OpenCL backend: the GPT's forward, backward, AdamW and generation on any OpenCL device.

Layers, read bottom-up: runtime (devices, program cache) -> kernels/ (OpenCL C) -> tensor (device
buffers and the autograd tape) -> functional, attention (differentiable ops) -> model (the GPT), vit
and audio (the encoders) -> optim (AdamW) -> trainer (the step train.py calls).

The entry points for the scripts:
    use_opencl_decoder(model, "opencl")   # sample.py: model.generate(...) now decodes on OpenCL
    model = load_gpt(checkpoint["model"], checkpoint["model_args"], device="opencl")
    model.generate(idx, max_new_tokens, temperature, top_k, top_p, stop_tokens, callback)
    trainer = OpenCLTrainer(model, learning_rate, betas, weight_decay, grad_clip)     # train.py
    trainer.backward(x, y, segment_ids, loss_scale); trainer.update(lr)

Install: `pip install pyopencl pocl-binary-distribution` (a CPU device), or pyopencl plus a GPU driver.
Importing this package needs neither: the error comes when a device is first asked for.
"""
from minimm.opencl.model import KVCache, OpenCLGPT, load_gpt, use_opencl_decoder
from minimm.opencl.runtime import OpenCLUnavailable, get_device, is_available, list_devices
from minimm.opencl.trainer import OpenCLTrainer

__all__ = ["KVCache", "OpenCLGPT", "OpenCLTrainer", "OpenCLUnavailable", "get_device", "is_available",
           "list_devices", "load_gpt", "use_opencl_decoder"]
