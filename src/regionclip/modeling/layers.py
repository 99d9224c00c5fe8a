"""Layers shared by the CLIP backbone and the offline detectron2 RPN."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["FrozenBatchNorm2d", "SelfAttention", "fold_frozen_bn"]


class FrozenBatchNorm2d(nn.Module):
    """detectron2's FrozenBatchNorm2d: fixed affine parameters and statistics (all buffers, never trained).

    ``y = (x - running_mean) / sqrt(running_var + eps) * weight + bias``. Used for every BN of the CLIP ResNet
    (whatever ``MODEL.RESNETS.NORM`` says) and of the offline RPN (also the LSJ RPN's SyncBN layers: in eval
    mode SyncBN computes exactly this, and the RPN is always in eval mode).

    ``num_batches_tracked`` (OpenAI CLIP / SyncBN checkpoints) carries no information here, so it is not a
    buffer and is dropped when loading: strict loads of such checkpoints succeed and ``state_dict()`` never
    contains it.
    """

    # buffers registered in __init__ (declared so that attribute access is typed as Tensor, not Tensor | Module)
    weight: Tensor
    bias: Tensor
    running_mean: Tensor
    running_var: Tensor

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

    def scale_shift(self, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
        """The per-channel affine map this layer applies: ``y = x * scale + shift`` ([C] each, in ``dtype``)."""
        scale = self.weight.to(dtype) * (self.running_var.to(dtype) + self.eps).rsqrt()
        return scale, self.bias.to(dtype) - self.running_mean.to(dtype) * scale

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        # `state_dict` is nn.Module.load_state_dict's private copy, so popping is safe
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


def _pair(values: tuple[int, ...]) -> tuple[int, int]:
    """A Conv2d attribute (``kernel_size``, ``stride``, ...; typed ``tuple[int, ...]`` by torch) as the 2-tuple
    the Conv2d constructor is typed to take."""
    if len(values) != 2:
        raise ValueError(f"expected a 2-d convolution attribute, got {values}")
    return values[0], values[1]


@torch.no_grad()
def fold_frozen_bn(conv: nn.Conv2d, bn: FrozenBatchNorm2d) -> nn.Conv2d:
    """A new conv computing ``bn(conv(x))`` in one op: ``W' = W * scale[:, None, None, None]``,
    ``b' = b * scale + shift`` (``b = 0`` for a bias-free conv).

    Exact in real arithmetic because a frozen BN is a fixed per-output-channel affine map and a convolution is
    linear in its weights; in float32 only the rounding order changes (relative differences ~1e-6 per layer).
    The folded values are computed in float64 and rounded once. The returned conv's parameters are frozen
    (``requires_grad=False``): folding is for inference only; gradients w.r.t. ``W'`` are not those of ``W``.
    """
    scale, shift = bn.scale_shift(torch.float64)
    w = conv.weight.double() * scale.view(-1, 1, 1, 1)
    b = shift if conv.bias is None else conv.bias.double() * scale + shift
    padding = conv.padding if isinstance(conv.padding, str) else _pair(conv.padding)
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, _pair(conv.kernel_size), stride=_pair(conv.stride),
                      padding=padding, dilation=_pair(conv.dilation), groups=conv.groups, bias=True,
                      padding_mode=conv.padding_mode, device=conv.weight.device, dtype=conv.weight.dtype)
    assert fused.bias is not None  # bias=True above
    fused.weight.copy_(w.to(conv.weight.dtype))
    fused.bias.copy_(b.to(conv.weight.dtype))
    fused.requires_grad_(False)
    return fused


class SelfAttention(nn.Module):
    """Multi-head self-attention in ``nn.MultiheadAttention``'s parameter layout (``in_proj_weight`` [3W, W],
    ``in_proj_bias`` [3W], ``out_proj``), computed with ``scaled_dot_product_attention``.

    ``causal=True``: position i attends to positions <= i (CLIP text tower); ``False``: bidirectional (ViT).
    """

    def __init__(self, width: int, heads: int, causal: bool = False) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by {heads} heads")
        self.heads = heads
        self.causal = causal
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, N, W] -> [B, N, W]."""
        b, n, w = x.shape
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (t.view(b, n, self.heads, w // self.heads).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, w))
