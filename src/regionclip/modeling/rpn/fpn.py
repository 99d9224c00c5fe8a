"""detectron2 FPN on a ResNet trunk (p2..p6), as used by the FPN offline RPNs. docs/DESIGN.md#architecture.6.

Keys: ``bottom_up.*`` (the detectron2 ResNet, or the CLIP ResNet of ``rpn_lvis_1203_clipbackbone``), ``fpn_lateral{2..5}.*``, ``fpn_output{2..5}.*``; with ``norm=True`` (LSJ
RPN: SyncBN, evaluated as a frozen norm) the convs have no bias and carry ``.norm.*`` instead.
"""
from __future__ import annotations

from typing import Dict, List, Union

import torch.nn.functional as F
from torch import Tensor, nn

from .clip_trunk import ClipResNetTrunk
from .resnet import Conv2dNorm, FrozenBatchNorm2d, ResNet

__all__ = ["FPN"]


class FPN(nn.Module):
    """Feature pyramid: lateral 1x1 + output 3x3 convs, nearest x2 top-down sum, p6 = maxpool(k1, s2)(p5).

    Args:
        bottom_up: ResNet (or ClipResNetTrunk) with stages res2..res5.
        out_channels: FPN width (256).
        norm: True for the LSJ RPN (norm after every FPN conv, convs without bias).

    ``forward``: [N, 3, H, W] (H, W multiples of 32) -> ``{"p2": [N, C, H/4, W/4], ..., "p6": [.., H/64, ..]}``.
    """

    def __init__(self, bottom_up: Union[ResNet, ClipResNetTrunk], out_channels: int = 256, norm: bool = False) -> None:
        super().__init__()
        self.bottom_up = bottom_up
        self.in_features: List[str] = list(bottom_up.stage_names)
        self.lateral_convs: List[Conv2dNorm] = []
        self.output_convs: List[Conv2dNorm] = []
        for name in self.in_features:
            stage = int(name[len("res"):])
            in_ch = bottom_up.out_channels[name]
            lateral = Conv2dNorm(in_ch, out_channels, 1, bias=not norm,
                                 norm=FrozenBatchNorm2d(out_channels) if norm else None)
            output = Conv2dNorm(out_channels, out_channels, 3, padding=1, bias=not norm,
                                norm=FrozenBatchNorm2d(out_channels) if norm else None)
            # Registered under detectron2's names; the python lists below only order them (as detectron2 does,
            # so they do not add duplicate `lateral_convs.*` keys to the state dict).
            self.add_module(f"fpn_lateral{stage}", lateral)
            self.add_module(f"fpn_output{stage}", output)
            self.lateral_convs.insert(0, lateral)  # top-down order: res5 first
            self.output_convs.insert(0, output)
        last = int(self.in_features[-1][len("res"):])
        self.out_features: List[str] = [f"p{int(n[len('res'):])}" for n in self.in_features] + [f"p{last + 1}"]
        self.strides: Dict[str, int] = {f"p{int(n[len('res'):])}": bottom_up.strides[n] for n in self.in_features}
        self.strides[f"p{last + 1}"] = 2 * bottom_up.strides[self.in_features[-1]]
        self.size_divisibility: int = self.strides[self.out_features[-2]]  # stride of the last ResNet stage

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        bottom_up = self.bottom_up(x)
        prev = self.lateral_convs[0](bottom_up[self.in_features[-1]])
        results = [self.output_convs[0](prev)]
        for idx in range(1, len(self.lateral_convs)):
            feat = bottom_up[self.in_features[-idx - 1]]
            top_down = F.interpolate(prev, scale_factor=2.0, mode="nearest")
            prev = self.lateral_convs[idx](feat) + top_down
            results.insert(0, self.output_convs[idx](prev))
        # LastLevelMaxPool: kernel 1, stride 2 is plain subsampling of p5 (not of res5).
        results.append(F.max_pool2d(results[-1], kernel_size=1, stride=2, padding=0))
        return dict(zip(self.out_features, results))
