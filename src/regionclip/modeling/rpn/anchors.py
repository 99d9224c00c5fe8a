"""detectron2 ``DefaultAnchorGenerator`` (test-time, no parameters). docs/DESIGN.md#architecture.6.

Anchor order within a feature map: location-major (row-major: y, then x), cell-anchor-minor; cell anchors
are size-major, ratio-minor. The RPN head's objectness channel ``a`` and delta channels ``[4a, 4a+4)`` belong
to cell anchor ``a``.
"""
from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["generate_cell_anchors", "grid_anchors", "anchors_for_features"]


def generate_cell_anchors(sizes: Sequence[float], aspect_ratios: Sequence[float]) -> Tensor:
    """Anchors centred on (0, 0).

    For each size s (outer) and ratio r (inner): ``w = sqrt(s**2 / r)``, ``h = r * w``, anchor
    ``(-w/2, -h/2, w/2, h/2)``. Computed in python float64 and rounded once to float32, as detectron2 does.

    Returns:
        [len(sizes) * len(aspect_ratios), 4] float32.
    """
    anchors = []
    for size in sizes:
        area = float(size) ** 2.0
        for ratio in aspect_ratios:
            w = math.sqrt(area / ratio)
            h = ratio * w
            anchors.append([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0])
    return torch.tensor(anchors, dtype=torch.float32)


def grid_anchors(cell_anchors: Tensor, grid_size: Tuple[int, int], stride: int, offset: float = 0.0) -> Tensor:
    """All anchors of one feature map.

    Args:
        cell_anchors: [A, 4] from :func:`generate_cell_anchors`.
        grid_size: (Hi, Wi) of the feature map.
        stride: feature stride in input pixels.
        offset: 0.0 puts anchor centres on the top-left corner of each cell (detectron2 default), 0.5 on the
            cell centre.

    Returns:
        [Hi * Wi * A, 4] float32 XYXY, on ``cell_anchors.device``.
    """
    grid_h, grid_w = grid_size
    device = cell_anchors.device
    shifts_x = torch.arange(offset * stride, grid_w * stride, step=stride, dtype=torch.float32, device=device)
    shifts_y = torch.arange(offset * stride, grid_h * stride, step=stride, dtype=torch.float32, device=device)
    shift_y, shift_x = torch.meshgrid(shifts_y, shifts_x, indexing="ij")
    shift_x = shift_x.reshape(-1)
    shift_y = shift_y.reshape(-1)
    shifts = torch.stack((shift_x, shift_y, shift_x, shift_y), dim=1)
    return (shifts.view(-1, 1, 4) + cell_anchors.view(1, -1, 4)).reshape(-1, 4)


def anchors_for_features(cell_anchors: Sequence[Tensor], grid_sizes: Sequence[Tuple[int, int]],
                         strides: Sequence[int], offset: float = 0.0) -> List[Tensor]:
    """:func:`grid_anchors` for every level: a list of [Hi * Wi * A_i, 4] tensors."""
    return [grid_anchors(c, g, s, offset) for c, g, s in zip(cell_anchors, grid_sizes, strides)]
