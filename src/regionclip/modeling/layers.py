"""Layers shared by the CLIP backbone and the offline detectron2 RPN."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["FrozenBatchNorm2d"]


class FrozenBatchNorm2d(nn.Module):
    """detectron2's FrozenBatchNorm2d: fixed affine parameters and statistics (all buffers, never trained).

    ``y = (x - running_mean) / sqrt(running_var + eps) * weight + bias``. Used for every BN of the CLIP ResNet
    (whatever ``MODEL.RESNETS.NORM`` says) and of the offline RPN (also the LSJ RPN's SyncBN layers: in eval
    mode SyncBN computes exactly this, and the RPN is always in eval mode).

    ``num_batches_tracked`` (OpenAI CLIP / SyncBN checkpoints) carries no information here, so it is not a
    buffer and is dropped when loading: strict loads of such checkpoints succeed and ``state_dict()`` never
    contains it.
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        # detectron2 initialises running_var to 1 - eps so that a fresh layer is the identity
        self.register_buffer("running_var", torch.ones(num_features) - eps)

    def forward(self, x: Tensor) -> Tensor:
        if not x.requires_grad:
            # detectron2 uses the fused op when no gradient is needed; mirroring it keeps bitwise-close parity
            return F.batch_norm(x, self.running_mean.to(x.dtype), self.running_var.to(x.dtype),
                                self.weight.to(x.dtype), self.bias.to(x.dtype), training=False, eps=self.eps)
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.view(1, -1, 1, 1).to(x.dtype) + shift.view(1, -1, 1, 1).to(x.dtype)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        # `state_dict` is nn.Module.load_state_dict's private copy, so popping is safe
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"
