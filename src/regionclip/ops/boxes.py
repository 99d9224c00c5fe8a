"""Pure box operations. One internal format: XYXY, absolute pixels, float32."""
from __future__ import annotations

from typing import Union

import torch
from torch import Tensor
from torchvision.ops import batched_nms, box_iou

__all__ = ["box_iou", "xywh_to_xyxy", "xyxy_to_xywh", "clip_boxes", "nonempty", "scale_boxes", "scale_boxes_like_d2",
           "validate_boxes", "classwise_nms", "soft_nms"]


def xywh_to_xyxy(b: Tensor) -> Tensor:
    return torch.cat([b[..., :2], b[..., :2] + b[..., 2:4]], dim=-1)


def xyxy_to_xywh(b: Tensor) -> Tensor:
    return torch.cat([b[..., :2], b[..., 2:4] - b[..., :2]], dim=-1)


def clip_boxes(boxes: Tensor, height: float, width: float) -> Tensor:
    """Clamp x to [0, width] and y to [0, height] (detectron2 ``Boxes.clip``)."""
    x1 = boxes[..., 0].clamp(min=0, max=width)
    y1 = boxes[..., 1].clamp(min=0, max=height)
    x2 = boxes[..., 2].clamp(min=0, max=width)
    y2 = boxes[..., 3].clamp(min=0, max=height)
    return torch.stack([x1, y1, x2, y2], dim=-1)


def nonempty(boxes: Tensor, threshold: float = 0.0) -> Tensor:
    """Mask of boxes whose width and height both exceed ``threshold``."""
    return ((boxes[:, 2] - boxes[:, 0]) > threshold) & ((boxes[:, 3] - boxes[:, 1]) > threshold)


def scale_boxes(boxes: Tensor, scale_x: float, scale_y: float) -> Tensor:
    return boxes * boxes.new_tensor([scale_x, scale_y, scale_x, scale_y])


def scale_boxes_like_d2(boxes: Tensor, scale_x: float, scale_y: float, truncate: Union[bool, Tensor]) -> Tensor:
    """Scale original-image boxes to the resized frame exactly as detectron2's dataset mapper does.

    The mapper multiplies a numpy array in float64; a box written with whole numbers stays an *integer* array, so
    its scaled coordinates are truncated toward zero. ``truncate``: one flag for all boxes or a [R] bool mask.
    Returns float32 [R, 4].
    """
    b = boxes.reshape(-1, 4).to(torch.float64) * torch.tensor([scale_x, scale_y, scale_x, scale_y],
                                                               dtype=torch.float64)
    t = torch.as_tensor(truncate, dtype=torch.bool)
    b = torch.where(t.reshape(-1, 1) if t.ndim else t, b.trunc(), b)
    return b.float()


def validate_boxes(boxes: Tensor, height: int, width: int, name: str = "boxes") -> Tensor:
    """Check user boxes (XYXY, pixels of the image they refer to) and return them as float32 [R, 4].

    Raises ``ValueError`` for a wrong shape, non-finite values, or boxes with zero/negative area or entirely
    outside the image. Boxes that stick out of the image are accepted (they are clipped later, like the
    original's GT boxes).
    """
    b = torch.as_tensor(boxes, dtype=torch.float32)
    if b.ndim == 1 and b.numel() == 4:
        b = b[None]
    if b.ndim != 2 or b.shape[-1] != 4:
        raise ValueError(f"{name} must have shape [R, 4] (XYXY pixels), got {tuple(b.shape)}")
    if not torch.isfinite(b).all():
        raise ValueError(f"{name} contain NaN/inf values")
    bad = ~nonempty(b)
    if bad.any():
        i = int(bad.nonzero()[0])
        raise ValueError(f"{name}[{i}] = {b[i].tolist()} has zero or negative width/height; boxes are XYXY "
                         "(x1, y1, x2, y2) with x2 > x1 and y2 > y1 — convert XYWH boxes with xywh_to_xyxy")
    outside = (b[:, 2] <= 0) | (b[:, 3] <= 0) | (b[:, 0] >= width) | (b[:, 1] >= height)
    if outside.any():
        i = int(outside.nonzero()[0])
        raise ValueError(f"{name}[{i}] = {b[i].tolist()} lies entirely outside the {width}x{height} image")
    return b


def classwise_nms(boxes: Tensor, scores: Tensor, classes: Tensor, iou_thresh: float) -> Tensor:
    """Indices kept by per-class NMS, sorted by decreasing score (torchvision ``batched_nms``)."""
    return batched_nms(boxes.float(), scores.float(), classes, iou_thresh)


def soft_nms(boxes: Tensor, scores: Tensor, classes: Tensor, method: str = "gaussian", sigma: float = 0.5,
             iou_thresh: float = 0.3, prune: float = 0.001) -> tuple[Tensor, Tensor]:
    """Class-wise soft-NMS (Bodla et al. 2017) as in the original's ``batched_soft_nms``.

    Repeatedly takes the highest remaining score of a class, keeps it, and decays the others of the same class:
    gaussian ``exp(-iou^2 / sigma)``, linear ``1 - iou`` when ``iou > iou_thresh``, hard = 0 when
    ``iou >= iou_thresh``. Entries whose decayed score is ``<= prune`` are dropped.

    Returns (kept indices in selection order, their decayed scores).
    """
    if method not in ("gaussian", "linear", "hard"):
        raise ValueError(f"soft-NMS method must be 'gaussian', 'linear' or 'hard', got {method!r}")
    boxes = boxes.float()
    scores = scores.float().clone()
    # Offsetting boxes per class makes boxes of different classes never overlap, so one pass handles all
    # classes at once while staying exactly class-wise (the same trick as torchvision's batched_nms).
    if boxes.numel():
        offsets = classes.to(boxes) * (boxes.max() + 1)
        boxes = boxes + offsets[:, None]
    keep: list[int] = []
    kept_scores: list[float] = []
    alive = torch.ones(len(scores), dtype=torch.bool)
    idx_all = torch.arange(len(scores))
    while alive.any():
        cand = idx_all[alive]
        i = int(cand[scores[cand].argmax()])
        keep.append(i)
        kept_scores.append(float(scores[i]))
        alive[i] = False
        rest = idx_all[alive]
        if rest.numel() == 0:
            break
        iou = box_iou(boxes[i:i + 1], boxes[rest])[0]
        if method == "gaussian":
            decay = torch.exp(-(iou * iou) / sigma)
        elif method == "linear":
            decay = torch.where(iou > iou_thresh, 1.0 - iou, torch.ones_like(iou))
        else:
            decay = (iou < iou_thresh).float()  # as the original: suppressed at iou >= threshold
        scores[rest] = scores[rest] * decay
        alive[rest[scores[rest] <= prune]] = False
    return torch.tensor(keep, dtype=torch.long), torch.tensor(kept_scores, dtype=torch.float32)
