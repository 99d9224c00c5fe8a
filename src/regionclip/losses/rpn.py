"""Training losses of detectron2's class-agnostic RPN as pure functions (docs/RPN.md).

One RPN training step (detectron2 ``RPN.forward`` in training mode) is, per image: IoU of every GT box with every
anchor (:func:`pairwise_iou`), anchor labels from the IoU (:func:`match_anchors`: < 0.3 negative, [0.3, 0.7)
ignored, >= 0.7 positive, plus every anchor that is the best one of some GT box), a random subset of 256 labelled
anchors with at most half positives (:func:`label_and_sample_anchors`), and then, over the batch
(:func:`rpn_losses`): the sum of the objectness BCE over the sampled anchors and the sum of the smooth-L1 (beta 0:
L1) box-delta error over the sampled positives, each divided by ``256 * num_images``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops.box_coder import encode_boxes
from ..ops.sampling import subsample_labels

__all__ = ["pairwise_iou", "match_anchors", "label_and_sample_anchors", "smooth_l1_sum", "rpn_losses"]


def pairwise_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """[M, 4] x [N, 4] XYXY -> [M, N] IoU; 0 where the boxes do not intersect (detectron2 ``pairwise_iou``, which
    never divides 0 by a 0 union, unlike ``torchvision.ops.box_iou``)."""
    area1 = (boxes1[:, 2] - boxes1[:, 0]) * (boxes1[:, 3] - boxes1[:, 1])
    area2 = (boxes2[:, 2] - boxes2[:, 0]) * (boxes2[:, 3] - boxes2[:, 1])
    width_height = torch.min(boxes1[:, None, 2:], boxes2[:, 2:]) - torch.max(boxes1[:, None, :2], boxes2[:, :2])
    width_height.clamp_(min=0)
    inter = width_height.prod(dim=2)
    return torch.where(inter > 0, inter / (area1[:, None] + area2 - inter),
                       torch.zeros(1, dtype=inter.dtype, device=inter.device))


def match_anchors(iou: Tensor, thresholds: Sequence[float] = (0.3, 0.7), labels: Sequence[int] = (0, -1, 1),
                  allow_low_quality_matches: bool = True) -> tuple[Tensor, Tensor]:
    """detectron2 ``Matcher``: best GT per anchor and its label.

    Args:
        iou: [G, A] match quality (>= 0).
        thresholds: increasing; with the implicit -inf / +inf ends they cut IoU into ``len(labels)`` intervals
            ``[low, high)``, labelled ``labels``.
        allow_low_quality_matches: also label positive every anchor whose IoU with some GT box equals that box's
            best IoU (ties included; a GT box overlapping no anchor makes every anchor of IoU 0 "best", exactly as
            detectron2 does).

    Returns:
        ``(matches [A] int64 GT index, match_labels [A] int8)``; without GT every anchor is ``labels[0]``.
    """
    if len(labels) != len(thresholds) + 1:
        raise ValueError(f"need one label per IoU interval: {len(thresholds)} thresholds, {len(labels)} labels")
    if iou.numel() == 0:
        n = iou.shape[1]
        return (iou.new_zeros((n,), dtype=torch.int64), iou.new_full((n,), labels[0], dtype=torch.int8))
    matched_vals, matches = iou.max(dim=0)
    match_labels = matches.new_full(matches.size(), 1, dtype=torch.int8)
    bounds = [-float("inf"), *thresholds, float("inf")]
    for lab, low, high in zip(labels, bounds[:-1], bounds[1:]):
        match_labels[(matched_vals >= low) & (matched_vals < high)] = lab
    if allow_low_quality_matches:
        best_per_gt, _ = iou.max(dim=1)
        _, anchor_idx = torch.nonzero(iou == best_per_gt[:, None], as_tuple=True)
        match_labels[anchor_idx] = 1
    return matches, match_labels


def label_and_sample_anchors(anchors: Tensor, gt_boxes: Tensor, image_size: tuple[int, int], *,
                             iou_thresholds: Sequence[float] = (0.3, 0.7), batch_size_per_image: int = 256,
                             positive_fraction: float = 0.5, boundary_thresh: float = -1.0,
                             allow_low_quality_matches: bool = True,
                             generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
    """One image's anchor labels (-1 ignore, 0 negative, 1 positive) after sampling, and matched GT boxes.

    ``anchors`` [A, 4] are all levels concatenated; ``gt_boxes`` [G, 4] in the same (resized) frame. With
    ``boundary_thresh >= 0`` anchors reaching further than that outside ``image_size`` (h, w) are ignored (off in
    detectron2's default, -1). Sampling uses ``generator`` (None: the global RNG, as detectron2).

    Returns:
        ``(labels [A] int8, matched_gt_boxes [A, 4])`` (zeros when the image has no GT; undefined for labels != 1).
    """
    iou = pairwise_iou(gt_boxes.to(anchors.dtype), anchors)
    matches, labels = match_anchors(iou, iou_thresholds, (0, -1, 1), allow_low_quality_matches)
    labels = labels.to(gt_boxes.device)
    if boundary_thresh >= 0:
        h, w = image_size
        inside = ((anchors[:, 0] >= -boundary_thresh) & (anchors[:, 1] >= -boundary_thresh)
                  & (anchors[:, 2] < w + boundary_thresh) & (anchors[:, 3] < h + boundary_thresh))
        labels[~inside] = -1
    pos, neg = subsample_labels(labels, batch_size_per_image, positive_fraction, 0, generator)
    labels.fill_(-1)
    labels.scatter_(0, pos, 1)
    labels.scatter_(0, neg, 0)
    matched = torch.zeros_like(anchors) if gt_boxes.shape[0] == 0 else gt_boxes.to(anchors.dtype)[matches]
    return labels, matched


def smooth_l1_sum(pred: Tensor, target: Tensor, beta: float) -> Tensor:
    """fvcore ``smooth_l1_loss(..., reduction="sum")``: plain L1 for ``beta < 1e-5`` (the RPN default, 0)."""
    if beta < 1e-5:
        return torch.abs(pred - target).sum()
    n = torch.abs(pred - target)
    return torch.where(n < beta, 0.5 * n ** 2 / beta, n - 0.5 * beta).sum()


def rpn_losses(anchors: Sequence[Tensor], pred_objectness_logits: Sequence[Tensor],
               pred_anchor_deltas: Sequence[Tensor], gt_labels: Sequence[Tensor], gt_boxes: Sequence[Tensor], *,
               batch_size_per_image: int = 256, smooth_l1_beta: float = 0.0,
               box_reg_weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0), cls_weight: float = 1.0,
               loc_weight: float = 1.0) -> dict[str, Tensor]:
    """detectron2 ``RPN.losses`` (``smooth_l1`` box loss).

    Args:
        anchors: per level [A_i, 4].
        pred_objectness_logits: per level [N, A_i] (head output permuted to location-major, anchor-minor).
        pred_anchor_deltas: per level [N, A_i, 4].
        gt_labels / gt_boxes: per image [A] / [A, 4] from :func:`label_and_sample_anchors`.

    Returns:
        ``{"loss_rpn_cls", "loss_rpn_loc"}`` (normalised by ``batch_size_per_image * N``, times the weights) and the
        logged ``num_pos_anchors`` / ``num_neg_anchors`` per image (no gradient).
    """
    num_images = len(gt_labels)
    labels = torch.stack(list(gt_labels))  # [N, A]
    pos_mask = labels == 1
    all_anchors = torch.cat(list(anchors))
    gt_deltas = torch.stack([encode_boxes(all_anchors, g, box_reg_weights) for g in gt_boxes])  # [N, A, 4]
    loc = smooth_l1_sum(torch.cat(list(pred_anchor_deltas), dim=1)[pos_mask], gt_deltas[pos_mask], smooth_l1_beta)
    valid = labels >= 0
    cls = F.binary_cross_entropy_with_logits(torch.cat(list(pred_objectness_logits), dim=1)[valid],
                                             labels[valid].to(torch.float32), reduction="sum")
    normalizer = batch_size_per_image * num_images
    return {"loss_rpn_cls": cls / normalizer * cls_weight, "loss_rpn_loc": loc / normalizer * loc_weight,
            "num_pos_anchors": pos_mask.sum().float().detach() / num_images,
            "num_neg_anchors": (labels == 0).sum().float().detach() / num_images}
