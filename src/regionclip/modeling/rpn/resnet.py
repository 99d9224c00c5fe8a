"""detectron2 ResNet (MSRA variant, ``STRIDE_IN_1X1 True``) as used by the offline RPNs. docs/DESIGN.md#architecture.6.

Module and parameter names follow detectron2 exactly (``stem.conv1.norm.running_var``,
``res3.0.shortcut.weight``, ...) so that a detectron2 checkpoint loads strictly. Inference only.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from ..layers import FrozenBatchNorm2d

__all__ = ["FrozenBatchNorm2d", "Conv2dNorm", "BasicStem", "BottleneckBlock", "ResNet"]


class Conv2dNorm(nn.Conv2d):
    """detectron2 ``layers.Conv2d``: convolution, then optional ``norm`` submodule, then optional activation.

    Keeping the norm as a child named ``norm`` reproduces detectron2's ``<conv>.norm.*`` checkpoint keys.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, bias: bool = True, norm: Optional[nn.Module] = None,
                 relu: bool = False) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=bias)
        self.norm = norm
        self.relu = relu

    def forward(self, x: Tensor) -> Tensor:
        """x: [N, Cin, H, W] -> [N, Cout, H', W']."""
        x = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        if self.norm is not None:
            x = self.norm(x)
        if self.relu:
            x = F.relu(x)
        return x


class BasicStem(nn.Module):
    """7x7/2 conv (no bias) + norm + ReLU + 3x3/2 max-pool: [N, 3, H, W] -> [N, C, H/4, W/4]."""

    def __init__(self, in_channels: int = 3, out_channels: int = 64) -> None:
        super().__init__()
        self.conv1 = Conv2dNorm(in_channels, out_channels, 7, stride=2, padding=3, bias=False,
                                norm=FrozenBatchNorm2d(out_channels))

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.conv1(x))
        return F.max_pool2d(x, kernel_size=3, stride=2, padding=1)


class BottleneckBlock(nn.Module):
    """detectron2 bottleneck: 1x1 (carries the stride) -> 3x3 -> 1x1, projection shortcut if channels change."""

    def __init__(self, in_channels: int, out_channels: int, bottleneck_channels: int, stride: int = 1) -> None:
        super().__init__()
        if in_channels != out_channels:
            self.shortcut: Optional[Conv2dNorm] = Conv2dNorm(
                in_channels, out_channels, 1, stride=stride, bias=False, norm=FrozenBatchNorm2d(out_channels))
        else:
            self.shortcut = None
        # STRIDE_IN_1X1 True (MSRA weights): the stride sits in the first 1x1 conv, not in the 3x3.
        self.conv1 = Conv2dNorm(in_channels, bottleneck_channels, 1, stride=stride, bias=False,
                                norm=FrozenBatchNorm2d(bottleneck_channels))
        self.conv2 = Conv2dNorm(bottleneck_channels, bottleneck_channels, 3, stride=1, padding=1, bias=False,
                                norm=FrozenBatchNorm2d(bottleneck_channels))
        self.conv3 = Conv2dNorm(bottleneck_channels, out_channels, 1, bias=False,
                                norm=FrozenBatchNorm2d(out_channels))

    def forward(self, x: Tensor) -> Tensor:
        """x: [N, Cin, H, W] -> [N, Cout, H/stride, W/stride]."""
        out = F.relu(self.conv1(x))
        out = F.relu(self.conv2(out))
        out = self.conv3(out)
        shortcut = self.shortcut(x) if self.shortcut is not None else x
        return F.relu(out + shortcut)


class ResNet(nn.Module):
    """detectron2 ResNet trunk: ``stem`` + stages ``res2``..``res{1+len(layers)}``.

    Args:
        layers: blocks per stage, e.g. (3, 4, 6, 3) for R50 (FPN) or (3, 4, 6) for the C4 RPN trunk.
        stem_out_channels: stem width (64 for R50).
        width_per_group: bottleneck width of ``res2`` (64); doubles every stage.
        res2_out_channels: output width of ``res2`` (256); doubles every stage.

    ``forward`` returns ``{"res2": [N, C2, H/4, W/4], "res3": [.., H/8, ..], ...}``.
    """

    def __init__(self, layers: Sequence[int] = (3, 4, 6, 3), stem_out_channels: int = 64,
                 width_per_group: int = 64, res2_out_channels: int = 256) -> None:
        super().__init__()
        self.stem = BasicStem(3, stem_out_channels)
        self.stage_names: List[str] = []
        self.out_channels: Dict[str, int] = {}
        self.strides: Dict[str, int] = {}
        in_ch, bottleneck, out_ch, stride_total = stem_out_channels, width_per_group, res2_out_channels, 4
        for i, n_blocks in enumerate(layers):
            first_stride = 1 if i == 0 else 2  # res2 keeps the stem's stride 4
            stride_total *= first_stride
            blocks = []
            for b in range(n_blocks):
                blocks.append(BottleneckBlock(in_ch, out_ch, bottleneck, stride=first_stride if b == 0 else 1))
                in_ch = out_ch
            name = f"res{i + 2}"
            # nn.Sequential gives detectron2's `res2.0.conv1.weight` key layout.
            self.add_module(name, nn.Sequential(*blocks))
            self.stage_names.append(name)
            self.out_channels[name] = out_ch
            self.strides[name] = stride_total
            bottleneck *= 2
            out_ch *= 2

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        """x: [N, 3, H, W] normalized -> dict of stage outputs."""
        x = self.stem(x)
        outputs: Dict[str, Tensor] = {}
        for name in self.stage_names:
            x = getattr(self, name)(x)
            outputs[name] = x
        return outputs
