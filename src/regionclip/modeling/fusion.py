"""Inference copies: :func:`fused_for_inference` returns a new, faster module and never changes the one it is given.

The trained module stays what it was (trainable, its ``state_dict`` unchanged and saveable); the copy is for
inference only: eval mode, no gradients, ``train()`` raises, and its state-dict keys differ (the BatchNorms are
gone). Keep only the copy when the original is not needed any more (``RegionCLIP.load`` does), so the two are in
memory together only while the copy is made.
"""
from __future__ import annotations

import copy
from typing import TypeVar, cast

import torch

from .clip_resnet import ModifiedResNet
from .detector import RegionCLIPDetector
from .rpn.model import OfflineRPN
from .transformer.region_head import TransformerRegionDetector

M = TypeVar("M")  # a ModifiedResNet, an OfflineRPN or a detector (checked at run time; typed callers keep their type)


@torch.no_grad()
def fused_for_inference(model: M, *, channels_last: bool = True, fold_attnpool_kv: bool = True) -> M:
    """A fused inference copy of ``model``: a CLIP ResNet, an offline RPN, or a detector of either family (its CLIP
    trunk and its offline RPN are fused; a transformer trunk and the small heads are copied unchanged).

    Rewrites, each exact in real arithmetic (float32 results differ from ``model`` only by rounding, ~1e-6
    relative):

    * every frozen BatchNorm is folded into the conv before it (:func:`~regionclip.modeling.layers.fold_frozen_bn`:
      a frozen BN is a fixed per-channel affine map, and a conv is linear in its weights), and the ReLUs and the
      residual add run in place on the conv outputs. Removes the memory-bound BN/ReLU passes: the trunk (res4,
      wide maps, few channels) gets ~1.4x faster; layer4 (7x7/14x14 maps) is GEMM-bound, no change;
    * ``channels_last``: conv weights in NHWC, so the convs produce NHWC maps (a layout change, no arithmetic; it
      also makes attnpool's token view contiguous). ~6% on the float32 trunk, and essential for bfloat16 on CPU
      (NCHW bf16 convs are several times slower still); False gives the plain NCHW layout graph export wants;
    * ``fold_attnpool_kv``: the attention pool folds its K/V projections into the single query
      (:meth:`~regionclip.modeling.clip_resnet.AttentionPool2d._forward_folded`): ~20x fewer attnpool FLOPs, ~6x
      less attnpool time, about -18% of the whole RN50 region head.

    Measured gains of each rewrite: docs/DESIGN.md#cpu-speed, benchmarks/results/fusion_steps_cpu.txt. An
    already fused model may be given (e.g. to get an NCHW copy of a channels-last one).

    Raises:
        TypeError: a module this function does not know how to fuse.
    """
    if not isinstance(model, (ModifiedResNet, OfflineRPN, RegionCLIPDetector, TransformerRegionDetector)):
        raise TypeError(f"fused_for_inference takes a ModifiedResNet, an OfflineRPN or a region detector, got "
                        f"{type(model).__name__}")
    out = copy.deepcopy(model)
    backbone = out.backbone if isinstance(out, RegionCLIPDetector) else out
    if isinstance(backbone, ModifiedResNet):
        backbone._fold_for_inference(channels_last=channels_last, fold_attnpool_kv=fold_attnpool_kv)
    rpn = out.rpn if isinstance(out, (RegionCLIPDetector, TransformerRegionDetector)) else out
    if isinstance(rpn, OfflineRPN):
        rpn._fold_for_inference(channels_last=channels_last)
    out.eval().requires_grad_(False)
    return cast(M, out)
