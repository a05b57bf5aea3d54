"""The ViT image encoder of minimm/vit.py on an OpenCL device, built from the GPT's ops.

Paper: Dosovitskiy et al. 2020, "An Image is Worth 16x16 Words", https://arxiv.org/abs/2010.11929

What is notable here: nothing new is needed. Patches are cut on the host (minimm.vit.patchify, a pure
reshape); the patch embedding is a linear layer; the blocks are the GPT's with attention not causal and
GELU in its erf form. Every op records its backward, so gradients reach every ViT weight.
The learned position grid is kept as (P, C) rows; an image of another size than the config's gets the
grid resized bilinearly on the host (minimm.vit.interpolate_pos_emb), and then the grid is not trained.

Shape letters: B batch, P patches, D flattened patch (3 * ps * ps), C channels, nh heads, hs head size.
"""
from __future__ import annotations

from dataclasses import asdict

import numpy as np
import torch

from minimm.opencl import attention as A
from minimm.opencl import functional as F
from minimm.opencl.runtime import Device, get_device
from minimm.opencl.tensor import Tensor, no_grad
from minimm.vit import ViT, ViTConfig, interpolate_pos_emb, patchify


class OpenCLViT:
    def __init__(self, config: ViTConfig, params: dict[str, Tensor], device: Device):
        self.config = config
        self.device = device
        self.params = params  # ViT's parameter names; pos_emb stored as (P, C) rows

    @classmethod
    def from_torch(cls, model: ViT, device: str = "opencl") -> OpenCLViT:
        dev = get_device(device)
        params = {}
        for name, p in model.state_dict().items():
            array = p.detach().float().cpu().numpy()
            if name == "pos_emb":
                array = array.reshape(-1, array.shape[-1])  # (gh, gw, C) -> (P, C)
            params[name] = Tensor.from_numpy(dev, array)
        return cls(model.config, params, dev)

    def forward_tensors(self, images: torch.Tensor) -> Tensor:
        """images: (B, 3, H, W) normalised pixels -> (B, P, C) on the device, recording the tape."""
        cfg, p = self.config, self.params.get
        ps = cfg.patch_size
        B, _, H, W = images.shape
        patches = patchify(images.detach().float().cpu(), ps)  # (B, P, D)
        P = patches.shape[1]
        x = F.linear(Tensor.from_numpy(self.device, patches.numpy()), p("patch_embed.weight"),
                     p("patch_embed.bias"))  # (B, P, C)
        pos = p("pos_emb")  # (P, C)
        if pos.shape[0] != P:  # another image size: resize the grid on the host
            grid = torch.from_numpy(pos.numpy()).reshape(cfg.image_size // ps, cfg.image_size // ps, -1)
            pos = Tensor.from_numpy(self.device, interpolate_pos_emb(grid, H // ps, W // ps).numpy())
        x = F.add(x, F.embedding(np.broadcast_to(np.arange(P), (B, P)), pos))  # (B, P, C)
        for layer in range(cfg.n_layer):
            h = f"blocks.{layer}."
            a = F.layer_norm(x, p(h + "ln_1.weight"), p(h + "ln_1.bias"))  # (B, P, C)
            qkv = F.linear(a, p(h + "attn.qkv.weight"), p(h + "attn.qkv.bias"))  # (B, P, 3C)
            q, k, v = A.split_heads(qkv, cfg.n_head)  # each (B, nh, P, hs)
            y = A.merge_heads(A.attention(q, k, v, causal=False))  # (B, P, C)
            x = F.linear(y, p(h + "attn.proj.weight"), p(h + "attn.proj.bias"), residual=x)  # (B, P, C)
            a = F.layer_norm(x, p(h + "ln_2.weight"), p(h + "ln_2.bias"))  # (B, P, C)
            a = F.gelu(F.linear(a, p(h + "mlp.fc.weight")), p(h + "mlp.fc.bias"), approximate="none")  # (B, P, 4C)
            x = F.linear(a, p(h + "mlp.proj.weight"), p(h + "mlp.proj.bias"), residual=x)  # (B, P, C)
        return F.layer_norm(x, p("ln_f.weight"), p("ln_f.bias"))  # (B, P, C)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """ViT.forward: images (B, 3, H, W) -> (B, P, C) as a CPU tensor (no gradients)."""
        with no_grad():
            return torch.from_numpy(self.forward_tensors(images).numpy())

    __call__ = forward

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The weights under ViT's names and shapes."""
        out = {name: torch.from_numpy(t.numpy()) for name, t in self.params.items()}
        grid = self.config.image_size // self.config.patch_size
        out["pos_emb"] = out["pos_emb"].reshape(grid, grid, -1)
        return out

    def model_args(self) -> dict:
        return asdict(self.config)
