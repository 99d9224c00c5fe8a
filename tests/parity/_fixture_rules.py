"""Rules shared by the fixture drivers (scripts/fixtures/*, run in the original's environment) and the parity tests
that replay them: how the weights a random released-layout checkpoint lacks are made. Pure torch, so both
environments import this one file; the drivers store each rule's docstring in the fixture they write."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def init_missing_heads(bbox_pred: nn.Linear, mask_head: nn.Module) -> None:
    """Initial values of the parameters the released checkpoint lacks, from one ``torch.Generator().manual_seed(0)``
    in this order: ``bbox_pred.weight`` ~ N(0, 0.001^2), ``mask_head.deconv.weight`` ~ N(0, 2 / fan_out) with
    fan_out = out_channels * kh * kw of the ConvTranspose2d weight [in, out, kh, kw] (c2_msra_fill), then
    ``mask_head.predictor.weight`` ~ N(0, 0.001^2); every bias 0."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        bbox_pred.weight.copy_(torch.randn(bbox_pred.weight.shape, generator=g) * 0.001)
        bbox_pred.bias.zero_()
        w = mask_head.deconv.weight
        w.copy_(torch.randn(w.shape, generator=g) * math.sqrt(2.0 / (w.shape[1] * w.shape[2] * w.shape[3])))
        mask_head.deconv.bias.zero_()
        mask_head.predictor.weight.copy_(torch.randn(mask_head.predictor.weight.shape, generator=g) * 0.001)
        mask_head.predictor.bias.zero_()


def perturbed_teacher(student: dict[str, Tensor]) -> dict[str, Tensor]:
    """The 'different teacher': for every floating tensor with >= 2 dims (conv / linear weights, the attnpool
    positional embedding), in sorted key order, ``w + 0.5 * w.std() * randn(w.shape, generator)`` with one
    ``torch.Generator().manual_seed(1)``; everything else (BN statistics, biases) unchanged."""
    g = torch.Generator().manual_seed(1)
    out = {}
    for k in sorted(student):
        v = student[k]
        if v.is_floating_point() and v.ndim >= 2:
            v = v + 0.5 * v.std() * torch.randn(v.shape, generator=g)
        out[k] = v
    return out
