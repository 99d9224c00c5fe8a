"""detectron2 ``Box2BoxTransform`` as pure functions.

Boxes are XYXY, widths are ``x2 - x1`` (no ``+1``). The arithmetic follows detectron2 operation by operation
(same order, same float32 intermediates) so that decoded proposals are bit-identical to the original's. Used
with weights (1, 1, 1, 1) by the RPN and (10, 10, 5, 5) by the fast-rcnn box regression.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

__all__ = ["DEFAULT_SCALE_CLAMP", "decode_boxes", "encode_boxes"]

# detectron2 `_DEFAULT_SCALE_CLAMP`: keeps exp(dw) from overflowing; a box can grow at most 1000/16 times.
DEFAULT_SCALE_CLAMP: float = math.log(1000.0 / 16)


def decode_boxes(
    deltas: Tensor,
    boxes: Tensor,
    weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
    scale_clamp: float = DEFAULT_SCALE_CLAMP,
) -> Tensor:
    """Apply regression deltas to boxes (detectron2 ``Box2BoxTransform.apply_deltas``).

    Args:
        deltas: [N, 4k] deltas ``(dx, dy, dw, dh)`` for k boxes per row (class-specific regression has k > 1).
        boxes: [N, 4] reference boxes XYXY.
        weights: ``(wx, wy, ww, wh)``; deltas are divided by them before use.
        scale_clamp: upper bound of ``dw``/``dh`` (after weighting) before ``exp``.

    Returns:
        [N, 4k] float32 decoded boxes XYXY, same layout as ``deltas``.
    """
    # detectron2 decodes in fp32 whatever the input precision, for accuracy of large coordinates.
    deltas = deltas.float()
    boxes = boxes.to(deltas.dtype)

    widths = boxes[:, 2] - boxes[:, 0]
    heights = boxes[:, 3] - boxes[:, 1]
    ctr_x = boxes[:, 0] + 0.5 * widths
    ctr_y = boxes[:, 1] + 0.5 * heights

    wx, wy, ww, wh = weights
    dx = deltas[:, 0::4] / wx
    dy = deltas[:, 1::4] / wy
    dw = deltas[:, 2::4] / ww
    dh = deltas[:, 3::4] / wh

    # Only the upper side is clamped (as in detectron2): large negative values just give tiny boxes.
    dw = torch.clamp(dw, max=scale_clamp)
    dh = torch.clamp(dh, max=scale_clamp)

    pred_ctr_x = dx * widths[:, None] + ctr_x[:, None]
    pred_ctr_y = dy * heights[:, None] + ctr_y[:, None]
    pred_w = torch.exp(dw) * widths[:, None]
    pred_h = torch.exp(dh) * heights[:, None]

    x1 = pred_ctr_x - 0.5 * pred_w
    y1 = pred_ctr_y - 0.5 * pred_h
    x2 = pred_ctr_x + 0.5 * pred_w
    y2 = pred_ctr_y + 0.5 * pred_h
    # [N, k, 4] -> [N, 4k]: box j of row i occupies columns [4j, 4j+4).
    return torch.stack((x1, y1, x2, y2), dim=-1).reshape(deltas.shape)


def encode_boxes(src: Tensor, target: Tensor, weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0)) -> Tensor:
    """Deltas that turn ``src`` into ``target`` (detectron2 ``Box2BoxTransform.get_deltas``).

    ``decode_boxes(encode_boxes(s, t, w), s, w) == t`` up to float rounding (and the ``scale_clamp``).

    Args:
        src: [N, 4] reference boxes XYXY with positive width and height.
        target: [N, 4] target boxes XYXY.
        weights: ``(wx, wy, ww, wh)``; deltas are multiplied by them.

    Returns:
        [N, 4] deltas ``(dx, dy, dw, dh)``.

    Raises:
        ValueError: if a ``src`` box has a non-positive width or height (the deltas would be inf/nan).
    """
    src_widths = src[:, 2] - src[:, 0]
    src_heights = src[:, 3] - src[:, 1]
    if not bool(((src_widths > 0) & (src_heights > 0)).all()):
        raise ValueError("encode_boxes: source boxes must have positive width and height")
    src_ctr_x = src[:, 0] + 0.5 * src_widths
    src_ctr_y = src[:, 1] + 0.5 * src_heights

    target_widths = target[:, 2] - target[:, 0]
    target_heights = target[:, 3] - target[:, 1]
    target_ctr_x = target[:, 0] + 0.5 * target_widths
    target_ctr_y = target[:, 1] + 0.5 * target_heights

    wx, wy, ww, wh = weights
    dx = wx * (target_ctr_x - src_ctr_x) / src_widths
    dy = wy * (target_ctr_y - src_ctr_y) / src_heights
    dw = ww * torch.log(target_widths / src_widths)
    dh = wh * torch.log(target_heights / src_heights)
    return torch.stack((dx, dy, dw, dh), dim=1)
