"""The training step train.py calls when --device=opencl: forward, backward, clip, AdamW, on the device.

What this file teaches: everything a PyTorch training step does, spelled out over minimm.opencl's
pieces, and nothing more. The loop (schedule, batches, evaluation, checkpoints) stays in train.py:
    trainer = OpenCLTrainer(model, learning_rate, (beta1, beta2), weight_decay, grad_clip)
    for step ...:
        for batch in micro_batches:                 # token-weighted accumulation, as minimm.training
            token_loss = trainer.backward(batch.x, batch.y, batch.segment_ids, loss_scale=1 / n_supervised)
        trainer.update(lr)                          # clip, AdamW, zero the gradients
    trainer.copy_to(model)                          # then save model.state_dict() as always, with
    checkpoint["optimizer"] = trainer.optimizer_state_dict()   # torch AdamW's format
Checkpoints keep PyTorch's format (GPT.load_state_dict and torch's AdamW read them). Only the decoder
trains here: images and audio in a batch need the PyTorch path.
"""
from __future__ import annotations

import torch

from minimm.gpt import GPT
from minimm.opencl.model import OpenCLGPT, host_ints
from minimm.opencl.optim import AdamW
from minimm.opencl.tensor import Tensor, clear_tape


class OpenCLTrainer:
    def __init__(self, model: OpenCLGPT, learning_rate: float = 6e-4, betas: tuple[float, float] = (0.9, 0.95),
                 weight_decay: float = 0.1, grad_clip: float = 1.0, eps: float = 1e-8):
        if model.config.dropout:
            raise ValueError(f"dropout={model.config.dropout}: the OpenCL backend has no dropout; use 0.0")
        self.model = model
        self.grad_clip = grad_clip
        for t in model.params.values():
            t.requires_grad = True
        self.optimizer = AdamW(model.params, parameter_order(model), learning_rate, betas, eps, weight_decay)

    def backward(self, idx, targets, segment_ids=None, loss_scale: float | None = None) -> torch.Tensor:
        """Forward and backward one (micro-)batch, adding to the gradients.

        idx, targets, segment_ids: (B, T) torch tensors or numpy arrays (targets -100 where not in the loss).
        Back-propagates sum(per-token losses) * loss_scale; the default scale, 1 / (supervised targets),
        makes that the mean loss. Returns the per-token losses (B, T) as a CPU tensor (0 where ignored).
        """
        targets = host_ints(targets)
        if loss_scale is None:
            loss_scale = 1.0 / max(int((targets != -100).sum()), 1)
        try:
            _, token_loss = self.model.forward_tensors(host_ints(idx), targets, host_ints(segment_ids),
                                                       reduction="none")  # (B, T)
            seed = Tensor(token_loss.device, token_loss.shape)
            token_loss.device.fill(seed.buf, loss_scale, seed.nbytes)
            token_loss.backward(seed)
        finally:
            clear_tape()  # an exception mid-way must not leave half a graph for the next step
        return torch.from_numpy(token_loss.numpy())

    def update(self, lr: float | None = None) -> float:
        """Clip the gradients (if grad_clip > 0), take an AdamW step with lr (the schedule's value; None
        keeps the last one), zero the gradients. Returns the gradient norm before clipping."""
        norm = self.optimizer.grad_norm()
        scale = 1.0
        if self.grad_clip > 0:
            scale = min(1.0, self.grad_clip / (norm + 1e-6))
        self.optimizer.step(lr, grad_scale=scale)
        self.optimizer.zero_grad()
        return norm

    def step(self, idx, targets, lr: float | None = None, segment_ids=None) -> float:
        """One whole step on one batch; returns its mean loss."""
        token_loss = self.backward(idx, targets, segment_ids)
        self.update(lr)
        valid = host_ints(targets) != -100
        return float(token_loss.numpy()[valid].sum() / max(int(valid.sum()), 1))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The model weights in GPT's state_dict format (train.py's checkpoint["model"])."""
        return self.model.state_dict()

    def copy_to(self, model: torch.nn.Module) -> None:
        """Write the trained weights into a PyTorch GPT, or a MultimodalGPT's decoder, so that train.py
        saves and evaluates the model object it always has."""
        getattr(model, "gpt", model).load_state_dict(self.state_dict())

    def optimizer_state_dict(self) -> dict:
        """torch.optim.AdamW's state_dict format (train.py's checkpoint["optimizer"])."""
        return self.optimizer.state_dict()

    def load_optimizer_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)


def parameter_order(model: OpenCLGPT) -> list[str]:
    """GPT.named_parameters() order (the order of torch's param_groups), from a weightless meta model."""
    with torch.device("meta"):
        names = [n for n, _ in GPT(model.config).named_parameters()]
    assert set(names) == set(model.params), "parameter names differ from minimm.gpt.GPT's"
    return names
