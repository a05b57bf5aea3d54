"""AdamW over device tensors, with gradient-norm clipping, that saves and loads torch's AdamW state.

What this file teaches:
- The parameter groups are minimm.training.configure_optimizer's: weight decay for tensors with two or
  more dimensions (matrices, embeddings), none for biases and norm gains.
- Clipping as torch.nn.utils.clip_grad_norm_: the global norm over every gradient, and the gradients
  scaled by min(1, max_norm / (norm + 1e-6)). The scale is folded into the AdamW kernel rather than
  written back into the gradients: one pass over memory instead of two.
- `state_dict()` builds a real torch.optim.AdamW over CPU copies of the parameters and fills its state,
  so a checkpoint's "optimizer" entry has exactly torch's format and training can resume on either
  backend.
"""
from __future__ import annotations

import numpy as np
import torch

from minimm.opencl.kernels import adamw as kernels
from minimm.opencl.tensor import Tensor


class AdamW:
    """AdamW on named device tensors. names gives the order of torch's param_groups (decay, no decay)."""

    def __init__(self, params: dict[str, Tensor], names: list[str], lr: float = 6e-4,
                 betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.1):
        self.params = params
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.decay = [n for n in names if len(params[n].shape) >= 2]
        self.no_decay = [n for n in names if len(params[n].shape) < 2]
        self.exp_avg = {n: Tensor.zeros(t.device, t.shape) for n, t in params.items()}
        self.exp_avg_sq = {n: Tensor.zeros(t.device, t.shape) for n, t in params.items()}
        self.steps = 0

    def grad_norm(self) -> float:
        """The global L2 norm of every gradient (missing gradients count as zeros)."""
        total = 0.0
        for t in self.params.values():
            if t.grad is not None:
                partial = Tensor(t.device, (kernels.PARTIALS,))
                kernels.sum_squares(t.device, t.size, t.grad.buf, partial.buf)
                total += float(partial.numpy().astype(np.float64).sum())
        return total ** 0.5

    def step(self, lr: float | None = None, grad_scale: float = 1.0) -> None:
        """One update of every parameter that has a gradient; lr replaces the learning rate for good."""
        if lr is not None:
            self.lr = lr
        self.steps += 1
        beta1, beta2 = self.betas
        for names, weight_decay in ((self.decay, self.weight_decay), (self.no_decay, 0.0)):
            for n in names:
                p = self.params[n]
                if p.grad is None:
                    continue
                kernels.adamw(p.device, p.size, p.buf, p.grad.buf, self.exp_avg[n].buf, self.exp_avg_sq[n].buf,
                              lr=self.lr, beta1=beta1, beta2=beta2, eps=self.eps, weight_decay=weight_decay,
                              step=self.steps, grad_scale=grad_scale)

    def zero_grad(self) -> None:
        for t in self.params.values():
            t.grad = None

    def _torch_twin(self) -> tuple[torch.optim.AdamW, list[str], list[torch.Tensor]]:
        names = self.decay + self.no_decay
        cpu = [torch.from_numpy(self.params[n].numpy()) for n in names]
        groups = [{"params": cpu[:len(self.decay)], "weight_decay": self.weight_decay},
                  {"params": cpu[len(self.decay):], "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=self.lr, betas=self.betas, eps=self.eps), names, cpu

    def state_dict(self) -> dict:
        """torch.optim.AdamW.state_dict() of the same parameters in configure_optimizer's order."""
        optimizer, names, cpu = self._torch_twin()
        if self.steps:
            for n, p in zip(names, cpu):
                optimizer.state[p] = {"step": torch.tensor(float(self.steps)),
                                      "exp_avg": torch.from_numpy(self.exp_avg[n].numpy()),
                                      "exp_avg_sq": torch.from_numpy(self.exp_avg_sq[n].numpy())}
        return optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Resume from a torch AdamW state_dict (train.py's checkpoint["optimizer"])."""
        optimizer, names, cpu = self._torch_twin()
        optimizer.load_state_dict(state)
        self.lr = optimizer.param_groups[0]["lr"]
        self.betas = optimizer.param_groups[0]["betas"]
        self.eps = optimizer.param_groups[0]["eps"]
        self.weight_decay = optimizer.param_groups[0]["weight_decay"]
        for n, p in zip(names, cpu):
            s = optimizer.state.get(p)
            if s:
                self.steps = int(s["step"])
                device = self.params[n].device
                self.exp_avg[n] = Tensor.from_numpy(device, s["exp_avg"].float().numpy())
                self.exp_avg_sq[n] = Tensor.from_numpy(device, s["exp_avg_sq"].float().numpy())
